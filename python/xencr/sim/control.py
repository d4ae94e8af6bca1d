"""Access to a state directory from the command line, with or without a running server.

The server holds an exclusive ``flock`` on ``<state>/lock`` for its lifetime and writes
``<state>/server.json`` (URLs and a control token, mode 0600). ``sim write``/``sim hash`` and the
fault commands go through the server's sim-only RPCs when it runs; otherwise they take the lock
themselves and work on the files, so state is never modified by two processes at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import ssl
import threading
import xmlrpc.client
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xencr.sim.api import dr
from xencr.sim.api.sim import SIM_CALLS
from xencr.sim.array import Array
from xencr.sim.errors import XapiError
from xencr.sim.layout import init_state, pool_count, read_password
from xencr.sim.pool_state import PoolState
from xencr.sim.tls import all_certificates

SERVER_FILE = "server.json"
LOCK_FILE = "lock"


class StateBusy(Exception):
    """Another server already serves this state directory."""


@contextmanager
def state_lock(root: Path, *, wait: bool) -> Iterator[int]:
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise StateBusy(str(root)) from None
        yield fd
    finally:
        os.close(fd)


def running_server(root: Path) -> dict[str, Any] | None:
    """server.json of a live server (its lock is held), else None."""
    info = root / SERVER_FILE
    if not info.exists():
        return None
    try:
        with state_lock(root, wait=False):
            return None  # nobody holds the lock: a stale file from a killed server
    except StateBusy:
        doc: dict[str, Any] = json.loads(info.read_text())
        return doc


def load_pools(root: Path, password: str, *, auth_delay: float) -> list[PoolState]:
    """Every pool of ``root``, sharing one storage array, each resumed as xapi starts (its DR redo
    logs and foreign metadata VDI cache rebuilt)."""
    pools = [PoolState(root, i, password, auth_delay=auth_delay) for i in range(pool_count(root))]
    array = Array(root, pools)
    for pool in pools:
        pool.array = array
    for pool in pools:
        dr.resume(pool)
    return pools


def serve(
    root: Path,
    *,
    pools: int | None,
    host: str,
    port: int,
    password_file: Path | None,
    auth_delay: float,
    announce: Callable[[str], None],
    stop: threading.Event | None = None,
    tls: bool = False,
) -> None:
    """Serve every pool of ``root`` until SIGTERM/SIGINT (or ``stop`` is set)."""
    from xencr.sim.server import Simulator
    from xencr.sim.tls import fingerprint, host_certificate, server_context

    root.mkdir(parents=True, exist_ok=True)
    with state_lock(root, wait=False):
        if pool_count(root) == 0:
            secret = read_password(root, password_file) if password_file else None
            init_state(root, pools or 2, password=secret)
        elif pools is not None and pools != pool_count(root):
            raise ValueError(f"{root} holds {pool_count(root)} pools, not {pools}")
        password = read_password(root, password_file)
        states = load_pools(root, password, auth_delay=auth_delay)
        token = secrets.token_hex(16)
        for p in states:
            p.control_token = token
        certs: dict[Path, None] = {}  # announced once each, in host order

        def tls_for(pool: PoolState, host_ref: str) -> ssl.SSLContext:
            hosts = pool.hosts()
            own = len(hosts) > 1
            cert, key = host_certificate(root, pool.index, hosts.index(host_ref), own=own, hostname=host)
            certs[cert] = None
            return server_context(cert, key)

        sim = Simulator(states, host, port, tls_for if tls else None)
        if tls:
            for cert in certs:
                announce(f"tls {cert} sha256 {fingerprint(cert)}")
        info = root / SERVER_FILE
        fd = os.open(info, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {
                    "pid": os.getpid(),
                    "urls": sim.urls(),
                    "hosts": sim.host_urls(),
                    "token": token,
                    "tls": tls,
                },
                f,
            )
        done = stop or threading.Event()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda *_: done.set())
        sim.start()
        try:
            for i, url in enumerate(sim.urls()):
                announce(f"pool{i} {url}")
            for i, urls in enumerate(sim.host_urls()):
                if len(urls) > 1:
                    for j, url in enumerate(urls):
                        announce(f"pool{i} host{j} {url}")
            done.wait()
        finally:
            sim.stop()
            info.unlink(missing_ok=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def describe(root: Path) -> list[dict[str, Any]]:
    """Every pool's content, from the running server or (under the lock) from the files."""
    server = running_server(root)
    if server is not None:
        # XML-RPC carries ints as strings (as xapi does): turn the counters back into ints
        return [_ints(sim_call(root, "sim.info", pool_index=i)) for i in range(len(server["urls"]))]
    with state_lock(root, wait=True):
        return [SIM_CALLS["sim.info"](p) for p in load_pools(root, read_password(root), auth_delay=0)]


def _control_call(root: Path, server: dict[str, Any], pool: int, method: str, params: tuple[Any, ...]) -> Any:
    """A sim-only call to pool ``pool`` through the first of its hosts that answers (a host may
    be down)."""
    context = None
    if server.get("tls"):
        context = ssl.create_default_context()
        for cert in all_certificates(root):
            context.load_verify_locations(cafile=str(cert))
    urls = server.get("hosts", [[u] for u in server["urls"]])[pool]
    for k, url in enumerate(urls):
        proxy = xmlrpc.client.ServerProxy(url + "/", allow_none=False, context=context)
        try:
            return getattr(proxy, method)(server["token"], *params)
        except ConnectionRefusedError:
            if k == len(urls) - 1:
                raise
    raise AssertionError("a pool has at least one host")


def _ints(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: int(v) if k in ("index", "size", "used") else _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def sim_call(
    root: Path, method: str, *params: Any, vdi_uuid: str | None = None, pool_index: int | None = None
) -> Any:
    """Run a sim-only call on the pool holding ``vdi_uuid`` (or pool ``pool_index``, default 0)."""
    server = running_server(root)
    if server is not None:
        urls = server["urls"]
        indexes = [pool_index] if pool_index is not None else list(range(len(urls)))
        last: Exception | None = None
        for i in indexes:
            reply = _control_call(root, server, i, method, params)
            if reply.get("Status") == "Success":
                return reply["Value"]
            err = XapiError(*reply["ErrorDescription"])
            if err.code == "UUID_INVALID" and vdi_uuid is not None:
                last = err
                continue
            raise err
        raise last or XapiError("UUID_INVALID", "VDI", vdi_uuid or "")
    with state_lock(root, wait=True):
        password = read_password(root)
        states = load_pools(root, password, auth_delay=0)
        indexes = [pool_index] if pool_index is not None else list(range(len(states)))
        for i in indexes:
            pool = states[i]
            if vdi_uuid is not None:
                try:
                    pool.db.by_uuid("VDI", vdi_uuid)
                except XapiError:
                    continue
            result = SIM_CALLS[method](pool, *params)
            pool.save()
            return result
        raise XapiError("UUID_INVALID", "VDI", vdi_uuid or "")
