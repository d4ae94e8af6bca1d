"""The hosts' NBD servers: what ``xapi-nbd`` does on a real host (``ocaml/nbd/src/main.ml``,
``cleanup.ml``, ``lib/consts.ml``), served by Debian's ``nbdkit`` with the Python plugin
``nbd_plugin.py`` reading the VHD chain through the engine.

One nbdkit per host, listening on the host's address and its own port, while some network of the
pool has an NBD purpose (xapi opens the NBD port in the host's firewall only then,
``network_event_loop.ml``) and the host is up: ``--tls=require`` with the host's certificate for
``nbd``, ``--tls=off`` for ``insecure_nbd`` (xapi-nbd's ``xapi_says_use_tls``), at most 16 clients
(``Consts.connection_limit``). Changing the purposes restarts the pool's servers (open NBD
connections are cut; xapi-nbd decides TLS per connection instead).

On each connection the plugin asks the simulator, over a unix socket private to this process, to
do what xapi-nbd does through xapi's: check the session named in the export name
(``/<vdi uuid>?session_id=<ref>``), look the VDI up, create a read-only VBD of it on the serving
host's control domain and plug it (with the client's session), then hand back the VHD chain; on
disconnect the VBD is unplugged and destroyed (with a local session). VBDs left behind by a server
that died are cleaned up as xapi-nbd's persistent list does at its start.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import os
import queue
import shutil
import signal
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import xencr
from xencr.sim.dispatch import dispatch
from xencr.sim.errors import XapiError
from xencr.sim.pool_state import USERNAME

if TYPE_CHECKING:
    from xencr.sim.pool_state import PoolState

log = logging.getLogger("xencr.sim.nbd")

NBDKIT = "nbdkit"
PLUGIN = Path(__file__).with_name("nbd_plugin.py")
STANDARD_PORT = 10809  # ocaml/nbd/lib/consts.ml standard_nbd_port (every real host)
CONNECTION_LIMIT = 16  # ocaml/nbd/lib/consts.ml connection_limit
# nbdkit rate filter bucket, in seconds of traffic a connection may burst after a pause (its
# default is 2 s; short, so that a limit holds from the first megabytes as the HTTP streams' do)
BURSTINESS = "0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
TERM_GRACE = 1.0  # nbdkit waits for its clients on SIGTERM: they are cut after this
NBD_PURPOSES = ("nbd", "insecure_nbd")
_REQUEST_LIMIT = 64 * 1024


class NbdUnavailable(Exception):
    """nbdkit or its Python plugin is missing (Debian packages ``nbdkit nbdkit-plugin-python``)."""


def nbdkit_available() -> bool:
    """nbdkit with its Python plugin is installed."""
    if shutil.which(NBDKIT) is None:
        return False
    probe = subprocess.run([NBDKIT, "python", "--version"], capture_output=True, check=False)
    return probe.returncode == 0


def pool_purposes(pool: PoolState) -> set[str]:
    """The NBD purposes of the pool's networks (caller holds the database lock)."""
    return {p for _, net in pool.db.items("network") for p in net["purpose"] if p in NBD_PURPOSES}


@dataclass
class Attachment:
    """A connected NBD client's read-only VBD on a control domain."""

    pool: int
    host: str
    vdi: str
    vdi_uuid: str
    vbd: str
    sr: str
    server: str  # the nbdkit process that asked for it


@dataclass
class Server:
    """One host's running nbdkit."""

    pool: int
    host: str
    port: int
    tls: bool
    ident: str
    process: subprocess.Popen[bytes]


class _Control(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, service: NbdService) -> None:
        self.service = service
        super().__init__(path, _ControlHandler)


class _ControlHandler(socketserver.StreamRequestHandler):
    server: _Control

    def handle(self) -> None:
        line = self.rfile.readline(_REQUEST_LIMIT)
        try:
            request = json.loads(line)
            reply = self.server.service.request(request)
        except XapiError as err:
            reply = {"ok": False, "error": err.description}
        except Exception as err:  # answered, never raised into socketserver
            log.exception("NBD control request failed")
            reply = {"ok": False, "error": ["INTERNAL_ERROR", type(err).__name__]}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class NbdService:
    """Every host's NBD server for the pools served by one simulator process."""

    def __init__(self, pools: list[PoolState], address: str) -> None:
        self.pools = pools
        self.address = address
        self.dir = Path(tempfile.mkdtemp(prefix="xencr-nbd-"))  # 0700: socket, certificates, logs
        self.socket_path = self.dir / "control.sock"
        self.servers: dict[tuple[int, str], Server] = {}
        self.attachments: dict[str, Attachment] = {}  # VBD ref -> attachment
        self.lock = threading.Lock()
        self._ids = itertools.count()
        self._jobs: queue.Queue[tuple[Callable[[], None], threading.Event, list[BaseException]] | None] = (
            queue.Queue()
        )
        self._supervisor: threading.Thread | None = None
        self._control: _Control | None = None
        self._control_thread: threading.Thread | None = None
        self.available = nbdkit_available()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if not self.available:
            log.warning("nbdkit or its Python plugin is missing: the hosts serve no NBD")
        for pool in self.pools:
            self._cleanup_leaked(pool)
        self._control = _Control(str(self.socket_path), self)
        self._control_thread = threading.Thread(
            target=self._control.serve_forever, name="nbd-control", daemon=True
        )
        self._control_thread.start()
        # nbdkit runs with --exit-with-parent, i.e. until the thread that started it ends: one
        # thread lives as long as the service and starts them all.
        self._supervisor = threading.Thread(target=self._supervise, name="nbd-supervisor", daemon=True)
        self._supervisor.start()
        for pool in self.pools:
            pool.nbd = self
            self.reconcile(pool.index)

    def stop(self) -> None:
        for pool in self.pools:
            pool.nbd = None
        if self._supervisor is not None:
            self._run(self._stop_all)
            self._jobs.put(None)
            self._supervisor.join(STOP_TIMEOUT)
            self._supervisor = None
        if self._control is not None:
            self._control.shutdown()
            self._control.server_close()
            self._control = None
        for attachment in list(self.attachments.values()):
            self._release(attachment)
        shutil.rmtree(self.dir, ignore_errors=True)

    def reconcile(self, pool: int) -> None:
        if self._supervisor is None:
            return
        self._run(lambda: self._reconcile(self.pools[pool]))

    def port(self, pool: int, host: str) -> int | None:
        with self.lock:
            server = self.servers.get((pool, host))
            return server.port if server is not None else None

    def attached(self, pool: int) -> list[Attachment]:
        with self.lock:
            return [a for a in self.attachments.values() if a.pool == pool]

    # ------------------------------------------------------------------ supervisor thread

    def _run(self, job: Callable[[], None]) -> None:
        """Run ``job`` in the supervisor thread and wait for it."""
        if threading.current_thread() is self._supervisor:
            job()
            return
        done = threading.Event()
        errors: list[BaseException] = []
        self._jobs.put((job, done, errors))
        done.wait()
        if errors:
            raise errors[0]

    def _supervise(self) -> None:
        while True:
            try:
                item = self._jobs.get(timeout=0.5)
            except queue.Empty:
                self._reap()
                continue
            if item is None:
                return
            job, done, errors = item
            try:
                job()
            except BaseException as err:
                errors.append(err)
            finally:
                done.set()

    def _reap(self) -> None:
        """A server that died on its own: its attachments are released, it starts again."""
        with self.lock:
            dead = [s for s in self.servers.values() if s.process.poll() is not None]
        for server in dead:
            log.warning("nbdkit of pool%d exited (%s)", server.pool, server.process.returncode)
            with self.lock:
                self.servers.pop((server.pool, server.host), None)
            self._release_server(server.ident)
            with contextlib.suppress(Exception):
                self._reconcile(self.pools[server.pool])

    def _stop_all(self) -> None:
        with self.lock:
            servers = list(self.servers.values())
            self.servers.clear()
        for server in servers:
            self._stop_server(server)

    # ------------------------------------------------------------------ servers

    def _rate_file(self, pool: int) -> Path:
        return self.dir / f"connection-rate-pool{pool}"

    def _reconcile(self, pool: PoolState) -> None:
        rate = pool.faults.connection_rate() or 0
        tmp = self._rate_file(pool.index).with_suffix(".tmp")
        tmp.write_text(f"{rate * 8}\n")  # the rate filter counts bits per second
        os.replace(tmp, self._rate_file(pool.index))
        with pool.db.lock:
            purposes = pool_purposes(pool)
            hosts = pool.hosts()
            wanted: dict[str, bool] = {}
            if purposes and self.available:
                for host in hosts:
                    if host not in pool.down_hosts:
                        wanted[host] = "nbd" in purposes  # xapi_says_use_tls
        for host in hosts:
            with self.lock:
                current = self.servers.get((pool.index, host))
            if current is not None and wanted.get(host) != current.tls:
                with self.lock:
                    self.servers.pop((pool.index, host), None)
                self._stop_server(current)
                current = None
            if current is None and host in wanted:
                try:
                    server = self._start_server(pool, host, wanted[host])
                except (OSError, XapiError) as err:  # the API call that changed things still succeeds
                    pool.log.error("NBD server of host %s did not start: %s", host, err)
                    continue
                with self.lock:
                    self.servers[(pool.index, host)] = server

    def _tls_dir(self, pool: PoolState, host: str) -> Path:
        """nbdkit's certificate directory for ``host``: links to the certificate and key its
        HTTPS presents (self-signed, so also its own CA)."""
        directory = self.dir / f"tls-pool{pool.index}-{pool.hosts().index(host)}"
        directory.mkdir(mode=0o700, exist_ok=True)
        cert, key = pool.tls_files(host)
        for name, target in (("server-cert.pem", cert), ("ca-cert.pem", cert), ("server-key.pem", key)):
            link = directory / name
            link.unlink(missing_ok=True)
            link.symlink_to(target.resolve())
        return directory

    def _start_server(self, pool: PoolState, host: str, tls: bool) -> Server:
        with pool.db.lock:
            recorded = int(pool.db.get("host", host).get("_nbd_port") or 0)
        tls_args = (
            ["--tls=require", f"--tls-certificates={self._tls_dir(pool, host)}"] if tls else ["--tls=off"]
        )
        last = ""
        for attempt in range(3):
            port = _free_port(self.address, recorded if attempt == 0 else 0)
            ident = f"pool{pool.index}-{pool.hosts().index(host)}-{next(self._ids)}"
            pidfile = self.dir / f"{ident}.pid"
            logfile = self.dir / f"{ident}.log"
            argv = [
                NBDKIT,
                "--foreground",
                "--exit-with-parent",
                "--readonly",
                f"--ipaddr={self.address}",
                f"--port={port}",
                f"--pidfile={pidfile}",
                *tls_args,
                "--filter=limit",
                "--filter=rate",
                "python",
                str(PLUGIN),
                f"syspath={_package_root()}",
                f"control={self.socket_path}",
                f"pool={pool.index}",
                f"host={host}",
                f"server={ident}",
                f"limit={CONNECTION_LIMIT}",
                f"connection-rate-file={self._rate_file(pool.index)}",
                f"burstiness={BURSTINESS}",
            ]
            with open(logfile, "wb") as out:
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and process.poll() is None and not pidfile.exists():
                time.sleep(0.02)
            if pidfile.exists() and process.poll() is None:
                with pool.db.lock:
                    if recorded != port:
                        pool.db.update("host", host, _nbd_port=port)
                pool.save()
                pool.log.info("NBD server of %s on %s:%d (tls %s)", host, self.address, port, tls)
                return Server(pool.index, host, port, tls, ident, process)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
            last = (
                logfile.read_text(errors="replace").strip().splitlines()[-1:][0] if logfile.exists() else ""
            )
        raise XapiError("INTERNAL_ERROR", f"nbdkit did not start: {last}")

    def _stop_server(self, server: Server) -> None:
        with contextlib.suppress(ProcessLookupError):
            server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(TERM_GRACE)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
        self._release_server(server.ident)

    def _release_server(self, ident: str) -> None:
        """Attachments its clients still held (their close never came)."""
        with self.lock:
            left = [a for a in self.attachments.values() if a.server == ident]
        for attachment in left:
            self._release(attachment)

    # ------------------------------------------------------------------ the plugin's requests

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        pool = self.pools[int(request["pool"])]
        if op == "open":
            return self._open(pool, str(request["host"]), str(request["server"]), str(request["export"]))
        if op == "close":
            with self.lock:
                attachment = self.attachments.get(str(request["vbd"]))
            if attachment is not None:
                self._release(attachment)
            return {"ok": True}
        raise XapiError("INTERNAL_ERROR", "unknown NBD control request")

    def _open(self, pool: PoolState, host: str, server: str, export: str) -> dict[str, Any]:
        """xapi-nbd ``handle_connection``: session, VDI, read-only VBD on the host's control
        domain, plugged; the VHD chain to serve."""
        if pool.faults.dropping():
            raise XapiError("INTERNAL_ERROR", "host unreachable")
        uri = urlsplit(export)
        sessions = parse_qs(uri.query).get("session_id")
        if not sessions:
            raise XapiError("INTERNAL_ERROR", "No session_id parameter provided")
        session = sessions[-1]
        path = unquote(uri.path)
        vdi_uuid = path[1:] if path else path
        _call(pool, "session.get_uuid", session, session)
        vdi = str(_call(pool, "VDI.get_by_uuid", session, vdi_uuid))
        with pool.db.lock:
            dom0 = next(
                r for r, rec in pool.db.items("VM") if rec["is_control_domain"] and rec["resident_on"] == host
            )
        vbd = str(
            _call(
                pool,
                "VBD.create",
                session,
                {
                    "VM": dom0,
                    "VDI": vdi,
                    "userdevice": "autodetect",
                    "bootable": False,
                    "mode": "RO",
                    "type": "Disk",
                    "unpluggable": True,
                    "empty": False,
                    "other_config": {},
                    "qos_algorithm_type": "",
                    "qos_algorithm_params": {},
                    "device": "",
                    "currently_attached": False,
                },
            )
        )
        with pool.db.lock:
            # xapi-nbd's persistent list of VBDs to clean up (/var/lib/xapi-nbd)
            pool.db.update("VBD", vbd, _nbd=server)
            sr = str(pool.db.get("VDI", vdi)["SR"])
        attachment = Attachment(pool.index, host, vdi, vdi_uuid, vbd, sr, server)
        with self.lock:
            self.attachments[vbd] = attachment
        try:
            _call(pool, "VBD.plug", session, vbd)
            with pool.db.lock:
                row = pool.db.get("VDI", vdi)
                chain = {
                    "path": str(pool.storage.path(vdi)),
                    "parents": pool.storage.parents(vdi),
                    "size": int(row["virtual_size"]),
                }
                block_size, allocated = pool.storage.allocated_blocks(vdi)
                pool.gc.transfer(sr, +1)  # the chain handed out must stay as it is
        except BaseException:
            self._release(attachment, counted=False)
            raise
        pool.log.info("NBD: VDI %s attached to dom0 (VBD %s)", vdi_uuid, vbd)
        return {
            "ok": True,
            "vbd": vbd,
            **chain,
            "block_size": block_size,
            "allocated": base64.b64encode(allocated).decode(),
        }

    def _release(self, attachment: Attachment, *, counted: bool = True) -> None:
        """xapi-nbd ``cleanup_vbd``: unplug and destroy with a local session, errors logged.
        ``counted``: the attachment holds the SR against the garbage collector."""
        with self.lock:
            if self.attachments.pop(attachment.vbd, None) is None:
                return
        pool = self.pools[attachment.pool]
        if counted:
            pool.gc.transfer(attachment.sr, -1)
        _destroy_vbd(pool, attachment.vbd)
        pool.log.info("NBD: VDI %s detached from dom0", attachment.vdi_uuid)

    def _cleanup_leaked(self, pool: PoolState) -> None:
        """``Cleanup.Persistent.cleanup``: VBDs a previous run left behind."""
        with pool.db.lock:
            leaked = [r for r, rec in pool.db.items("VBD") if rec.get("_nbd")]
        for vbd in leaked:
            pool.log.warning("NBD: cleaning up VBD %s left by a previous run", vbd)
            _destroy_vbd(pool, vbd)


def _call(pool: PoolState, method: str, *params: Any) -> Any:
    """An XAPI call as xapi-nbd makes it through xapi (faults and checks included)."""
    try:
        return dispatch(pool, method, list(params))
    finally:
        pool.save()


def _destroy_vbd(pool: PoolState, vbd: str) -> None:
    session = pool.login(USERNAME, pool.password, "xapi-nbd")
    try:
        for method in ("VBD.unplug", "VBD.destroy"):
            try:
                _call(pool, method, session, vbd)
            except XapiError as err:  # ignore_exn_log_error
                if err.code != "DEVICE_ALREADY_DETACHED":
                    pool.log.info("NBD cleanup: %s %s: %s", method, vbd, err.code)
    finally:
        pool.logout(session)
        pool.save()


def _free_port(address: str, preferred: int) -> int:
    """``preferred`` when it can be bound on ``address``, else a free port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise OSError(f"no free port on {address}")


def _package_root() -> str:
    """The directory holding the ``xencr`` package (nbdkit's Python imports the engine from it)."""
    return str(Path(xencr.__file__).resolve().parent.parent)
