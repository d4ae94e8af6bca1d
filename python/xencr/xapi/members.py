"""The hosts of a pool as xencr last saw them, so that the next login still reaches the pool when
its configured address is down: recorded after each login to a configured pool, one JSON file per
pool next to the state database (``<state dir>/hosts/<pool>.json``), replaced atomically.

The record holds each host's UUID, name, address, role and the sha256 fingerprint of the
certificate the pool names for it (``host.get_server_certificate``), never a password or a
session. A recorded fingerprint is trusted later (to verify a host of a pool pinned by its
master's certificate) only when it was read over a session that had verified its peer:
``verified``. A host's ``address`` is XAPI's ``host.address``: a bare IP (IPv6 unbracketed, port
443), or ``ip:port`` in the simulator's multi-host pools; :func:`host_url` makes a URL of either."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

log = logging.getLogger("xencr.xapi")

FORMAT = 1


@dataclass(frozen=True)
class PoolHost:
    """One host of a pool: ``fingerprint`` is the sha256 (hex) of the certificate the pool names
    for it, ``None`` when the pool could not say (the host was offline)."""

    uuid: str
    name: str
    address: str
    master: bool
    enabled: bool
    fingerprint: str | None

    def url(self, scheme: str) -> str:
        return host_url(scheme, self.address)


@dataclass(frozen=True)
class PoolHosts:
    """A pool's hosts, master first, and whether their certificates were read over a verified
    session (a pinned certificate or the system CAs)."""

    pool_uuid: str
    hosts: tuple[PoolHost, ...]
    verified: bool

    def host_at(self, url: str) -> PoolHost | None:
        """The host whose address ``url`` names (same host and port), if any."""
        scheme = urlsplit(url).scheme
        return next((h for h in self.hosts if same_place(h.url(scheme), url)), None)

    def fingerprint_at(self, url: str) -> str | None:
        """The certificate fingerprint to trust at ``url``: the one recorded for that host, if it
        was read over a verified session."""
        host = self.host_at(url)
        return host.fingerprint if host is not None and self.verified else None


def host_url(scheme: str, address: str) -> str:
    """``https://10.0.0.2``, ``https://[fd00::2]`` (an IPv6 literal is bracketed, as xapi's
    ``Http.Url.maybe_wrap_IPv6_literal`` does), ``http://127.0.0.1:8481``."""
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(address).version == 6:
            return f"{scheme}://[{address}]"
    return f"{scheme}://{address}"


def same_place(a: str, b: str) -> bool:
    """Do two URLs name the same host and port (default ports made explicit)?"""
    return _place(a) == _place(b)


def _place(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def hosts_path(state_path: Path, pool: str) -> Path:
    """Where the hosts of configured pool ``pool`` are recorded, beside the state database."""
    return state_path.parent / "hosts" / f"{quote(pool, safe='-_.')}.json"


def load(path: Path) -> PoolHosts | None:
    """The recorded hosts, or ``None`` when there is no record or it cannot be read (a damaged
    record is only a lost hint: the next login writes a new one)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        hosts = tuple(
            PoolHost(
                uuid=str(h["uuid"]),
                name=str(h["name"]),
                address=str(h["address"]),
                master=bool(h["master"]),
                enabled=bool(h["enabled"]),
                fingerprint=str(h["fingerprint"]) if h["fingerprint"] else None,
            )
            for h in raw["hosts"]
        )
        return PoolHosts(pool_uuid=str(raw["pool_uuid"]), hosts=hosts, verified=bool(raw["verified"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        log.warning("%s: recorded hosts not used (%s: %s)", path, type(err).__name__, err)
        return None


def save(path: Path, hosts: PoolHosts) -> None:
    """Record ``hosts`` unless the file already says the same: a unique temporary file,
    fsynced, then renamed, so that a reader (another xencr process logging in at the same time)
    sees the old record or the whole new one."""
    doc = {
        "format": FORMAT,
        "pool_uuid": hosts.pool_uuid,
        "verified": hosts.verified,
        "hosts": [asdict(h) for h in hosts.hosts],
    }
    text = json.dumps(doc, indent=2) + "\n"
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
