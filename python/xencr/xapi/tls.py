"""TLS for XAPI: verified against the system CAs by default, or pinned to one certificate's
sha256 fingerprint (self-signed pool certificates)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import socket
import ssl
import xmlrpc.client
from urllib.parse import urlsplit

from xencr.xapi.errors import FingerprintMismatch, PoolDown, PoolUnreachable, describe


def fingerprint_of(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.S)


def pem_fingerprint(pem: str) -> str:
    """The fingerprint of the first certificate of a PEM text (``host.get_server_certificate``
    may give a chain: the host's own certificate comes first); ValueError when there is none."""
    m = _PEM_CERT.search(pem)
    if m is None:
        raise ValueError("no PEM certificate")
    return fingerprint_of(base64.b64decode("".join(m.group(1).split()), validate=True))


def display_fingerprint(fp: str) -> str:
    """``sha256:AB:CD:...``, the form users compare with `openssl x509 -fingerprint -sha256`."""
    return "sha256:" + ":".join(fp[i : i + 2].upper() for i in range(0, len(fp), 2))


def client_context(pinned: str | None, verify: bool = True) -> ssl.SSLContext:
    """A pinned context skips CA checks (the pin is stronger); `check_pin` runs after the handshake."""
    if pinned is not None or not verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context()


def check_pin(sock: ssl.SSLSocket, pinned: str | None, where: str) -> None:
    if pinned is None:
        return
    der = sock.getpeercert(binary_form=True)
    got = fingerprint_of(der or b"")
    if got != pinned:
        raise FingerprintMismatch(
            f"{where}: certificate fingerprint {display_fingerprint(got)} is not the pinned "
            f"{display_fingerprint(pinned)}"
        )


def fetch_fingerprint(url: str, timeout: float = 10.0) -> str:
    """The sha256 fingerprint of the certificate a pool presents (first contact of `pool add`)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    ctx = client_context(pinned="", verify=False)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, ctx.wrap_socket(raw) as s:
            return fingerprint_of(s.getpeercert(binary_form=True) or b"")
    except ssl.SSLError as err:
        raise PoolUnreachable(f"{host}:{port}: TLS: {err.reason or err}") from None
    except OSError as err:
        raise PoolDown(f"{host}:{port}", describe(err)) from None


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    pinned: str | None = None

    def connect(self) -> None:
        super().connect()
        assert isinstance(self.sock, ssl.SSLSocket)
        check_pin(self.sock, self.pinned, f"{self.host}:{self.port}")


class PinnedTransport(xmlrpc.client.SafeTransport):
    """XML-RPC over HTTPS whose certificate must match a pinned fingerprint."""

    def __init__(self, pinned: str, timeout: float) -> None:
        self._pin_context = client_context(pinned)
        super().__init__(context=self._pin_context)
        self._pinned = pinned
        self._timeout = timeout

    def make_connection(self, host: object) -> http.client.HTTPSConnection:
        cached = self._connection
        if cached[0] == host and isinstance(cached[1], _PinnedHTTPSConnection):
            return cached[1]
        chost, self._extra_headers, _ = self.get_host_info(host)  # type: ignore[arg-type]
        conn = _PinnedHTTPSConnection(chost, None, context=self._pin_context, timeout=self._timeout)
        conn.pinned = self._pinned
        self._connection = host, conn  # type: ignore[assignment]
        return conn


class TimeoutTransport(xmlrpc.client.Transport):
    """Plain-HTTP XML-RPC with a connect/read timeout (the stdlib default waits forever)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def make_connection(self, host: object) -> http.client.HTTPConnection:
        conn = super().make_connection(host)  # type: ignore[arg-type]
        conn.timeout = self._timeout
        return conn


class TimeoutSafeTransport(xmlrpc.client.SafeTransport):
    def __init__(self, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self._timeout = timeout

    def make_connection(self, host: object) -> http.client.HTTPSConnection:
        conn = super().make_connection(host)  # type: ignore[arg-type]
        conn.timeout = self._timeout
        return conn
