"""`xencr pool ...`: the configured pools (never their passwords)."""

from __future__ import annotations

import os
import socket
import ssl
import sys
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from tomlkit import TOMLDocument

from xencr.cli.common import ConfigOption, JsonFlag, columns, load, print_json, reported
from xencr.cli.errors import CliError
from xencr.cli.tomledit import appended, edit, set_value, table_at
from xencr.config import PoolConfig, default_config_path, is_sample_pool, load_config, normalise_fingerprint
from xencr.credentials import password_source, split_url_credentials, warn
from xencr.replication.jobs import connect
from xencr.units import human_bytes
from xencr.xapi.errors import PoolUnreachable
from xencr.xapi.members import PoolHost
from xencr.xapi.tls import display_fingerprint, fetch_fingerprint

pool_app = typer.Typer(
    help="Configured pools: add (with certificate pinning), list, test, remove.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def tls_mode(pool: PoolConfig) -> str:
    if pool.fingerprint is not None:
        return "pinned"
    return "verify" if pool.verify_tls else "no-verify"


def pool_json(pool: PoolConfig) -> dict[str, Any]:
    """Everything about a pool except a secret: where its password would come from."""
    return {
        "name": pool.name,
        "url": pool.url,
        "username": pool.username,
        "password_source": password_source(pool),
        "password_env": pool.password_env,
        "password_env_set": bool(os.environ.get(pool.password_env)),
        "password_file": pool.password_file,
        "password_in_url": pool.url_password is not None,
        "fingerprint": display_fingerprint(pool.fingerprint) if pool.fingerprint else None,
        "verify_tls": pool.verify_tls,
        "tls": tls_mode(pool),
    }


@pool_app.command("list")
@reported
def list_command(config: ConfigOption = None, json_out: JsonFlag = False) -> None:
    """List the configured pools: URL, user, where the password comes from, TLS mode.

    The password source is the first of: env (the variable is set), file (password_file),
    url (a password embedded in the URL: move it), none (only a prompt on a terminal will do).

    Example:  xencr pool list --json
    """
    cfg = load(config)
    pools = sorted(cfg.pools.values(), key=lambda p: p.name)
    if json_out:
        print_json([pool_json(p) for p in pools])
        return
    if not pools:
        typer.echo(f"no pools in {cfg.path}")
        return
    rows = [(p.name, p.url, p.username, password_source(p), tls_mode(p)) for p in pools]
    typer.echo(columns(("NAME", "URL", "USER", "PASSWORD", "TLS"), rows))


def _verified(url: str) -> bool:
    """Does the pool's certificate verify against the system's CAs (and its host name)?"""
    parts = urlsplit(url)
    ctx = ssl.create_default_context()
    try:
        with (
            socket.create_connection((parts.hostname or "", parts.port or 443), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=parts.hostname),
        ):
            return True
    except ssl.SSLCertVerificationError:
        return False
    except OSError as err:
        raise PoolUnreachable(f"{url}: {err.strerror or err}") from None


def _pinned(clean: str, trust_fingerprint: str | None) -> str | None:
    """The fingerprint to pin for ``clean``: none when its certificate verifies; else the one
    shown and accepted (on a terminal) or given with --trust-fingerprint."""
    if urlsplit(clean).scheme != "https" or _verified(clean):
        return None
    seen = fetch_fingerprint(clean)
    shown = display_fingerprint(seen)
    if trust_fingerprint is not None:
        if normalise_fingerprint(trust_fingerprint) != seen:
            raise CliError(f"{clean} presents {shown}, not the fingerprint given: not added")
    elif sys.stdin.isatty():
        typer.echo(f"{clean} presents a certificate that does not verify; its fingerprint is {shown}")
        if not typer.confirm("Trust (pin) this certificate?", default=False):
            raise CliError("certificate not trusted: pool not added")
    else:
        raise CliError(
            f"{clean}: certificate does not verify; its fingerprint is {shown}: "
            f"check it, then add --trust-fingerprint {shown}"
        )
    return seen


@pool_app.command("add")
@reported
def add_command(
    name: Annotated[str, typer.Argument(help="Name of the pool in the config (e.g. site-a).")],
    url: Annotated[str, typer.Argument(help="https://host[:port] of the pool master.")],
    username: Annotated[str, typer.Option("--username", help="XAPI user.")] = "root",
    password_file: Annotated[
        str | None, typer.Option("--password-file", help="File (mode 0600) holding the password.")
    ] = None,
    trust_fingerprint: Annotated[
        str | None,
        typer.Option("--trust-fingerprint", help="Pin this certificate (sha256:...) of a self-signed pool."),
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Change a configured pool (new URL, user or certificate).")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Add a pool to the configuration. A self-signed certificate is shown on first contact and
    pinned once you accept it (or pass --trust-fingerprint). No password is ever written.

    A pool of the sample `xencr init` writes (its URL still on example.com) is replaced in place,
    so the sample's jobs that use it keep working; any other pool of that name only with
    --replace, which sets url, username, fingerprint (and password_file if given) and keeps the
    pool's other keys. The file's comments and layout are kept (edited with tomlkit).

    Example:  xencr pool add site-b https://10.0.0.2 --trust-fingerprint sha256:AB:CD:...
    """
    path = config or default_config_path()
    clean, user, password = split_url_credentials(url)
    if password is not None:
        warn("the password in the URL was dropped: use XENCR_<POOL>_PASSWORD, --password-file or a prompt")
    username = user or username
    existing = load_config(path).pools.get(name) if path.exists() else None
    sample = existing is not None and is_sample_pool(existing)
    if existing is not None and not (sample or replace):
        raise CliError(
            f"pool {name!r} is already in {path} "
            f"(--replace changes it; `xencr pool remove {name}` removes it)"
        )
    pin = _pinned(clean, trust_fingerprint)
    values: dict[str, str] = {"url": clean, "username": username}
    if password_file:
        values["password_file"] = password_file
    if pin:
        values["fingerprint"] = display_fingerprint(pin)

    def change(doc: TOMLDocument) -> TOMLDocument | None:
        if existing is None:
            return appended(doc, "pools", name, values)
        table = table_at(doc, "pools", name)
        for key, value in values.items():
            set_value(table, key, value)
        if not pin and "fingerprint" in table:
            del table["fingerprint"]  # the certificate now verifies: an old pin would refuse it
        return None

    edit(path, change)
    what = "added" if existing is None else ("replaced the sample" if sample else "replaced")
    typer.echo(f"{what} pool {name!r} in {path}" + (f" (pinned {display_fingerprint(pin)})" if pin else ""))


@pool_app.command("remove")
@reported
def remove_command(
    name: Annotated[str, typer.Argument(help="Configured pool name.")],
    config: ConfigOption = None,
) -> None:
    """Remove a pool from the configuration; refused while a job uses it (as its source or a
    target). Nothing changes on the pool itself. The file's comments and layout are kept.

    Example:  xencr pool remove old-site
    """
    cfg = load(config)
    cfg.pool(name)  # one line naming the known pools if there is no such pool
    users = [
        f"{j.name} ({'source' if j.pool == name else 'target'})"
        for j in sorted(cfg.jobs.values(), key=lambda j: j.name)
        if j.pool == name or any(t.pool == name for t in j.targets)
    ]
    if users:
        raise CliError(f"pool {name!r} is used by job {', job '.join(users)}: not removed")

    def change(doc: TOMLDocument) -> None:
        del doc["pools"][name]

    edit(cfg.path, change)
    typer.echo(f"removed pool {name!r} from {cfg.path}")


@dataclass(frozen=True)
class CertificateCheck:
    """What a host presented on a TLS connection to its address, against the certificate the
    pool names for it: ``status`` is ``ok``, ``mismatch``, ``not named`` (the pool could not
    say) or ``not checked`` (plain HTTP, or the host did not answer: ``reason``)."""

    presented: str | None
    status: str
    reason: str | None = None

    def text(self, named: str | None) -> str:
        shown = display_fingerprint(named) if named else "none named by the pool"
        if self.status == "ok":
            return f"certificate {shown}: presented"
        if self.status == "mismatch":
            assert self.presented is not None
            return f"certificate {shown}: MISMATCH: presents {display_fingerprint(self.presented)}"
        if self.status == "not named":
            got = display_fingerprint(self.presented) if self.presented else "nothing"
            return f"certificate {shown}: presents {got}"
        return f"certificate {shown}: not checked ({self.reason})"


def check_certificate(scheme: str, host: PoolHost) -> CertificateCheck:
    """Open a TLS connection to the host's address and compare what it presents."""
    if scheme != "https":
        return CertificateCheck(None, "not checked", "plain HTTP")
    try:
        presented = fetch_fingerprint(host.url(scheme))
    except PoolUnreachable as err:
        return CertificateCheck(None, "not checked", str(err))
    if host.fingerprint is None:
        return CertificateCheck(presented, "not named")
    return CertificateCheck(presented, "ok" if presented == host.fingerprint else "mismatch")


def _host_json(host: PoolHost, check: CertificateCheck) -> dict[str, Any]:
    return {
        "name": host.name,
        "uuid": host.uuid,
        "address": host.address,
        "enabled": host.enabled,
        "role": "master" if host.master else "member",
        "certificate": display_fingerprint(host.fingerprint) if host.fingerprint else None,
        "presented": display_fingerprint(check.presented) if check.presented else None,
        "certificate_check": check.status,
        "certificate_error": check.reason,
    }


@pool_app.command("test")
@reported
def test_command(
    name: Annotated[str, typer.Argument(help="Configured pool name.")],
    config: ConfigOption = None,
    json_out: JsonFlag = False,
) -> None:
    """Log in to a pool and show what xencr sees: pool, master, API version; each host (address,
    enabled, master or member) and the certificate it presents on a TLS connection to its
    address, against the one the pool names for it (host.get_server_certificate); the SRs with
    their free space and the hosts they are plugged on. How the login reached the pool (a member
    that named the master, a recorded host) comes first. The hosts are recorded for later logins.
    Exit code 1 when a host presents a certificate other than the one the pool names for it.
    (--json: the same, free space in bytes.)

    Example:  xencr pool test site-a
    """
    cfg = load(config)
    with connect(cfg.pool(name), interactive=sys.stdin.isatty(), state_path=cfg.state.local_path) as s:
        pool = s.api.pool.get_all()[0]
        master = s.api.pool.get_master(pool)
        major, minor = s.api.host.get_API_version_major(master), s.api.host.get_API_version_minor(master)
        hosts = s.pool_hosts().hosts
        host_names = {ref: rec["name_label"] for ref, rec in s.api.host.get_all_records().items()}
        plugged: dict[str, list[str]] = {}
        for pbd in s.api.PBD.get_all_records().values():
            if pbd["currently_attached"]:
                plugged.setdefault(pbd["SR"], []).append(host_names.get(pbd["host"], pbd["host"]))
        info = {
            "pool": s.api.pool.get_name_label(pool),
            "master": s.api.host.get_name_label(master),
            "api_version": f"{major}.{minor}",
            "url": s.endpoint.url,
            "followed": s.followed,
            "hosts": [],
            "srs": [
                {
                    "name": r["name_label"],
                    "uuid": r["uuid"],
                    "type": r["type"],
                    "free": int(r["physical_size"]) - int(r["physical_utilisation"]),
                    "hosts": sorted(plugged.get(ref, [])),
                }
                for ref, r in s.api.SR.get_all_records().items()
                if r["content_type"] != "iso" and int(r["physical_size"]) > 0
            ],
        }
        scheme = s.endpoint.scheme
    checks = [(h, check_certificate(scheme, h)) for h in hosts]
    info["hosts"] = [_host_json(h, c) for h, c in checks]
    mismatched = [h.name for h, c in checks if c.status == "mismatch"]
    if json_out:
        print_json(info)
    else:
        typer.echo(
            f"{name}: pool {info['pool']!r}, master {info['master']!r}, XAPI {info['api_version']}: ok"
        )
        for line in s.followed:
            typer.echo(f"  note: {line}")
        for h, c in checks:
            role = "master" if h.master else "member"
            typer.echo(f"  host {h.name} ({h.address}): {role}, {'enabled' if h.enabled else 'disabled'}")
            typer.echo(f"    {c.text(h.fingerprint)}")
        for sr in info["srs"]:
            typer.echo(f"  SR {sr['name']} ({sr['type']}, {sr['uuid']}): {human_bytes(sr['free'])} free")
            typer.echo(f"    plugged on {', '.join(sr['hosts']) or 'no host'}")
    if mismatched:
        raise CliError(
            f"pool {name!r}: host {', '.join(mismatched)} presents a certificate other than the one "
            "the pool names for it"
        )
