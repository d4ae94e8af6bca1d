"""The HTTP front of each simulated host: XML-RPC at ``/`` and ``/RPC2`` (any unregistered POST
path), JSON-RPC at ``/jsonrpc``, and the disk data handlers (xapi.md 1.1, 4).

One :class:`http.server.ThreadingHTTPServer` per host, HTTP/1.1 keep-alive, a thread per
connection (the SDK keeps its connection open, event.from long-polls and transfers run at once).
Every host of a pool serves the pool's state; members answer API calls with ``HOST_IS_SLAVE``
and serve the data handlers for the SRs they see. Hosts of a pool with several hosts listen on
distinct ports of the same address, which their ``host.address`` records as ``<address>:<port>``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from xencr.sim import api, http_data, wire_jsonrpc, wire_xmlrpc  # noqa: F401 - api registers handlers
from xencr.sim.api.sim import dispatch_sim
from xencr.sim.dispatch import dispatch
from xencr.sim.errors import HttpFailure, XapiError
from xencr.sim.nbd import NbdService
from xencr.sim.pool_state import PoolState

log = logging.getLogger("xencr.sim.http")

HTML_500 = b"<html><body><h1>HTTP 500 internal server error</h1>An unexpected error occurred; please wait a while and try again. If the problem persists, please contact your support representative.<h1> Additional information </h1></body></html>"  # noqa: E501


def call(pool: PoolState, method: str, params: list[Any], host: str | None = None) -> Any:
    """One RPC received by ``host`` through the right dispatcher, saving the database afterwards."""
    if method.startswith("sim."):
        return dispatch_sim(pool, method, params)
    try:
        return dispatch(pool, method, params, host)
    finally:
        pool.save()


# The connection each handler thread serves: a host going down spares the one asking for it.
_serving = threading.local()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "xapi"
    sys_version = ""
    server: PoolServer

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines carry session refs in query strings (secrets): log the path only.
        log.debug("pool%d %s", self.server.pool.index, urlsplit(self.path).path)

    def handle_expect_100(self) -> bool:
        """xapi's HTTP server does not answer ``Expect: 100-continue`` (xapi.md 0, fact 16): no
        interim 100 is sent, the request is handled as if the header were absent."""
        return True

    def setup(self) -> None:
        _serving.sock = self.request
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(60)
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()
        # Replies are written in one piece, and without Nagle's delay (keep-alive RPC latency).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ---------------------------------------------------------------- helpers

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(
        self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
    ) -> None:
        """Status line, headers and body in one write (no Nagle/delayed-ACK stall on keep-alive)."""
        headers = {
            "Server": self.version_string(),
            "Date": self.date_time_string(),
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            **(extra or {}),
        }
        if headers.get("Connection", "").lower() == "close":
            self.close_connection = True
        phrase = HTTPStatus(status).phrase
        head = (
            f"{self.protocol_version} {status} {phrase}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n"
        )
        self.wfile.write(head.encode("latin-1") + body)

    def _error_page(self, status: int) -> None:
        extra = {"Connection": "close"}
        if status == 401:
            extra["WWW-Authenticate"] = 'Basic realm="xapi"'
        body = HTML_500 if status == 500 else f"<html><body><h1>HTTP {status}</h1></body></html>".encode()
        self._reply(status, body, "text/html", extra)
        self.close_connection = True

    def _drop_if_unreachable(self) -> bool:
        if self.server.host_ref in self.server.pool.down_hosts:
            self.close_connection = True  # accepted just before the host went down
            return True
        if self.server.pool.faults.dropping():
            self.server.pool.log.warning(
                "fault: host unreachable, dropping %s %s", self.command, urlsplit(self.path).path
            )
            self.close_connection = True
            return True
        return False

    # ---------------------------------------------------------------- RPC

    def do_POST(self) -> None:
        body = self._body()
        path = urlsplit(self.path).path
        if path.startswith("/jsonrpc"):
            self._jsonrpc(body)
        else:
            self._xmlrpc(body)

    def _xmlrpc(self, body: bytes) -> None:
        pool = self.server.pool
        try:
            method, params = wire_xmlrpc.parse_call(body)
        except wire_xmlrpc.MalformedRequest:
            self._error_page(500)
            return
        if not method.startswith("sim.") and self._drop_if_unreachable():
            return
        if method == "system.listMethods":
            out = wire_xmlrpc.bare(sorted(api_methods()))
        elif method.startswith("system.isAlive"):
            out = wire_xmlrpc.bare(params[0] if params else "")
        else:
            try:
                out = wire_xmlrpc.success(call(pool, method, params, self.server.host_ref))
            except XapiError as err:
                out = wire_xmlrpc.failure(err)
            except Exception:
                pool.log.exception("internal error in %s", method)
                self._error_page(500)
                return
        self._reply(200, out, "text/xml", {"Access-Control-Allow-Origin": "*", **self._closing()})

    def _jsonrpc(self, body: bytes) -> None:
        pool = self.server.pool
        try:
            rpc = wire_jsonrpc.parse_call(body)
        except wire_jsonrpc.MalformedJson:
            self._error_page(500)
            return
        if not rpc.method.startswith("sim.") and self._drop_if_unreachable():
            return
        try:
            out = wire_jsonrpc.success(rpc, call(pool, rpc.method, rpc.params, self.server.host_ref))
        except XapiError as err:
            out = wire_jsonrpc.failure(rpc, err)
        except Exception:
            pool.log.exception("internal error in %s", rpc.method)
            self._error_page(500)
            return
        self._reply(200, out, "application/json", {"Access-Control-Allow-Origin": "*", **self._closing()})

    def _closing(self) -> dict[str, str]:
        """A call that took its own host down is answered, then the connection closes."""
        return {"Connection": "close"} if self.server.host_ref in self.server.pool.down_hosts else {}

    # ---------------------------------------------------------------- data

    def _data(self, fn: Any) -> None:
        if self._drop_if_unreachable():
            return
        try:
            fn(self.server.pool, self.server.host_ref, self)
        except HttpFailure as failure:
            if failure.error is not None:
                self.server.pool.log.info("HTTP %d: %s", failure.status, failure.error)
            self._error_page(failure.status)
        except Exception:
            self.server.pool.log.exception("data handler failed")
            self.close_connection = True

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/export_raw_vdi"):
            self._data(http_data.export_raw_vdi)
        else:
            self._error_page(404)

    def do_PUT(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/import_raw_vdi"):
            self._data(http_data.import_raw_vdi)
        else:
            self._error_page(404)


def api_methods() -> list[str]:
    from xencr.sim import schema

    return [f"{c}.{m}" for c in schema.class_names() for m in schema.cls(c).messages]


class PoolServer(ThreadingHTTPServer):
    """One host's listener."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, pool: PoolState, host_ref: str, address: str, port: int, tls: ssl.SSLContext | None = None
    ) -> None:
        self.pool = pool
        self.host_ref = host_ref
        self.tls = tls
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__((address, port), Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that drops its connection (a cut transfer, a killed process) is routine for
        # a pool: log it, instead of socketserver's traceback on stderr.
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError, ssl.SSLError, OSError)):
            self.pool.log.info("connection from %s ended: %s", client_address, err)
            return
        self.pool.log.exception("request from %s failed", client_address)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:
            # the handshake runs in the connection's own thread (Handler.setup), not in accept
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self.connections_lock:
            self.connections.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        """Reset every open connection (a host that died), except the one asking for it."""
        asking = getattr(_serving, "sock", None)
        with self.connections_lock:
            victims = [c for c in self.connections if c is not asking]
        for sock in victims:
            # the plain socket's shutdown: the TLS object stays usable by its handler thread
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class HostListener:
    """A host's server and its thread; a fault stops it (connections refused) and restarts it on
    the same port."""

    def __init__(
        self, pool: PoolState, host_ref: str, address: str, port: int, tls: ssl.SSLContext | None
    ) -> None:
        self.pool, self.host_ref, self.address, self.tls = pool, host_ref, address, tls
        self.server: PoolServer | None = PoolServer(pool, host_ref, address, port, tls)
        self.port = self.server.server_address[1]
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        assert self.server is not None
        name = f"pool{self.pool.index}-{self.pool.db.get('host', self.host_ref)['name_label']}"
        self.thread = threading.Thread(target=self.server.serve_forever, name=name, daemon=True)
        self.thread.start()

    def _close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server.cut_connections()
            self.server = None
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        self.thread = None

    def go_down(self) -> None:
        with self.lock:
            self._close()

    def come_up(self) -> None:
        with self.lock:
            if self.server is None:
                self.server = PoolServer(self.pool, self.host_ref, self.address, self.port, self.tls)
                self.start()

    def stop(self) -> None:
        self.go_down()


TlsFor = Callable[[PoolState, str], ssl.SSLContext]


class Simulator:
    """All hosts of all pools of one state directory, served until :meth:`stop`.

    Ports: with ``base_port``, host 0 of pool ``i`` listens on ``base_port + i`` (as always) and
    the other hosts follow, pool by pool; with 0, each host of a multi-host pool takes the port its
    ``address`` recorded when that port is free (addresses survive a restart), else any port."""

    def __init__(
        self, pools: list[PoolState], address: str, base_port: int, tls: TlsFor | None = None
    ) -> None:
        self.pools = pools
        self.scheme = "https" if tls else "http"
        self.listeners: dict[tuple[int, int], HostListener] = {}
        order = [(i, 0) for i in range(len(pools))] + [
            (i, j) for i, pool in enumerate(pools) for j in range(1, len(pool.hosts()))
        ]
        wanted, contexts = {}, {}
        for k, (i, j) in enumerate(order):
            pools[i].tls = tls is not None
            pools[i].address = address
            host = pools[i].hosts()[j]
            wanted[(i, j)] = base_port + k if base_port else _recorded_port(pools[i], host)
            contexts[(i, j)] = tls(pools[i], host) if tls else None
        # recorded ports are taken first, so that a host given any port cannot take one of them
        for i, j in sorted(order, key=lambda ij: wanted[ij] == 0):
            pool, port = pools[i], wanted[(i, j)]
            host, context = pool.hosts()[j], contexts[(i, j)]
            try:
                listener = HostListener(pool, host, address, port, context)
            except OSError:
                if base_port or not port:
                    raise
                listener = HostListener(pool, host, address, 0, context)
            self.listeners[(i, j)] = listener
            pool.listeners[host] = listener
        for i, pool in enumerate(pools):
            _record_addresses(pool, address, [self.listeners[(i, j)].port for j in range(len(pool.hosts()))])
        self.nbd = NbdService(pools, address)

    def urls(self) -> list[str]:
        """Per pool, the URL of its host 0 (the first master)."""
        return [self._url(self.listeners[(i, 0)]) for i in range(len(self.pools))]

    def host_urls(self) -> list[list[str]]:
        """Per pool, the URL of each host in host order."""
        return [
            [self._url(self.listeners[(i, j)]) for j in range(len(pool.hosts()))]
            for i, pool in enumerate(self.pools)
        ]

    def _url(self, listener: HostListener) -> str:
        return f"{self.scheme}://{listener.address}:{listener.port}"

    def start(self) -> None:
        for listener in self.listeners.values():
            listener.start()
        for pool in self.pools:
            pool.guests.start()
            pool.boots.resume()
        self.nbd.start()

    def stop(self) -> None:
        self.nbd.stop()  # NBD clients' attachments released while xapi still runs
        for pool in self.pools:
            pool.guests.close()
            pool.boots.close()
            pool.gc.close()  # let a running merge finish and record itself before the process ends
        for listener in self.listeners.values():
            listener.stop()
        for pool in self.pools:
            pool.listeners.clear()
            pool.down_hosts.clear()
            pool.save()


def _recorded_port(pool: PoolState, host: str) -> int:
    """The port in a multi-host pool's ``host.address`` (``127.0.0.1:8482``), else 0."""
    if len(pool.hosts()) == 1:
        return 0
    _, _, port = str(pool.db.get("host", host)["address"]).rpartition(":")
    return int(port) if port.isdigit() else 0


def _record_addresses(pool: PoolState, address: str, ports: list[int]) -> None:
    """Each host is up and live when served; a multi-host pool records where each listens (the
    address members and redirects name). A one-host pool keeps its address as it always was."""
    with pool.db.lock:
        for host, port in zip(pool.hosts(), ports, strict=True):
            row = pool.db.get("host", host)
            if len(ports) > 1 and row["address"] != f"{address}:{port}":
                pool.db.update("host", host, address=f"{address}:{port}")
            metrics = row["metrics"]
            if pool.db.exists("host_metrics", metrics) and not pool.db.get("host_metrics", metrics)["live"]:
                pool.db.update("host_metrics", metrics, live=True)
            # the management interface carries the address the host is reached on (NBD records)
            for pif in pool.db.reverse("host", "PIFs", host):
                pif_row = pool.db.get("PIF", pif)
                if pif_row["management"] and pif_row["IP"] != address:
                    pool.db.update("PIF", pif, IP=address)
    pool.save()
