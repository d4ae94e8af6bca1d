"""The HTTP front of each simulated pool: XML-RPC at ``/`` and ``/RPC2`` (any unregistered POST
path), JSON-RPC at ``/jsonrpc``, and the disk data handlers (xapi.md 1.1, 4).

One :class:`http.server.ThreadingHTTPServer` per pool, HTTP/1.1 keep-alive, a thread per
connection (the SDK keeps its connection open, event.from long-polls and transfers run at once).
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from xencr.sim import api, http_data, wire_jsonrpc, wire_xmlrpc  # noqa: F401 - api registers handlers
from xencr.sim.api.sim import dispatch_sim
from xencr.sim.dispatch import dispatch
from xencr.sim.errors import HttpFailure, XapiError
from xencr.sim.pool_state import PoolState

log = logging.getLogger("xencr.sim.http")

HTML_500 = b"<html><body><h1>HTTP 500 internal server error</h1>An unexpected error occurred; please wait a while and try again. If the problem persists, please contact your support representative.<h1> Additional information </h1></body></html>"  # noqa: E501


def call(pool: PoolState, method: str, params: list[Any]) -> Any:
    """One RPC through the right dispatcher, saving the database afterwards."""
    if method.startswith("sim."):
        return dispatch_sim(pool, method, params)
    try:
        return dispatch(pool, method, params)
    finally:
        pool.save()


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
        if self.server.pool.faults.unreachable:
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
                out = wire_xmlrpc.success(call(pool, method, params))
            except XapiError as err:
                out = wire_xmlrpc.failure(err)
            except Exception:
                pool.log.exception("internal error in %s", method)
                self._error_page(500)
                return
        self._reply(200, out, "text/xml", {"Access-Control-Allow-Origin": "*"})

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
            out = wire_jsonrpc.success(rpc, call(pool, rpc.method, rpc.params))
        except XapiError as err:
            out = wire_jsonrpc.failure(rpc, err)
        except Exception:
            pool.log.exception("internal error in %s", rpc.method)
            self._error_page(500)
            return
        self._reply(200, out, "application/json", {"Access-Control-Allow-Origin": "*"})

    # ---------------------------------------------------------------- data

    def _data(self, fn: Any) -> None:
        if self._drop_if_unreachable():
            return
        try:
            fn(self.server.pool, self)
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
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, pool: PoolState, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.pool = pool
        self.tls = tls
        super().__init__((host, port), Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that drops its connection (a cut transfer, a killed process) is routine for
        # a pool: log it, instead of socketserver's traceback on stderr.
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError, ssl.SSLError)):
            self.pool.log.info("connection from %s ended: %s", client_address, err)
            return
        self.pool.log.exception("request from %s failed", client_address)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:
            # the handshake runs in the connection's own thread (Handler.setup), not in accept
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class Simulator:
    """All pools of one state directory, served until :meth:`stop`."""

    def __init__(
        self, pools: list[PoolState], host: str, base_port: int, tls: ssl.SSLContext | None = None
    ) -> None:
        self.pools = pools
        self.scheme = "https" if tls else "http"
        self.servers: list[PoolServer] = []
        for i, pool in enumerate(pools):
            pool.tls = tls is not None
            server = PoolServer(pool, host, base_port + i if base_port else 0, tls)
            pool.address, pool.port = host, server.server_address[1]
            self.servers.append(server)
        self.threads: list[threading.Thread] = []

    def urls(self) -> list[str]:
        return [f"{self.scheme}://{p.address}:{p.port}" for p in self.pools]

    def start(self) -> None:
        for server in self.servers:
            t = threading.Thread(target=server.serve_forever, name=f"pool{server.pool.index}", daemon=True)
            t.start()
            self.threads.append(t)
            server.pool.guests.start()

    def stop(self) -> None:
        for pool in self.pools:
            pool.guests.close()
            pool.gc.close()  # let a running merge finish and record itself before the process ends
        for server in self.servers:
            server.shutdown()
            server.server_close()
        for t in self.threads:
            t.join()
        for pool in self.pools:
            pool.save()
