"""One call of a pool's HTTP data handler (`/export_raw_vdi`, `/import_raw_vdi`): where it is
served, the TCP connection (with stall timeouts and a watchdog that cuts it at a deadline or on
cancel), its task, and the errors a transfer ends with.

Where: the pool's configured address, or the member a redirect names. In a pool of several
hosts XAPI answers a data request for a VDI whose SR the receiving host does not see with
``302 Location: https://<member address>/<same path>?<same query>`` (xapi.md 4.1,
`importexport.ml` `return_302_redirect`). One redirect is followed, to a host of the same pool
only (the pool's own host records say which addresses those are), with TLS verified: a pool
pinned by its master's certificate is trusted for a member with the certificate the master
names for it (`host.get_server_certificate`, read over the verified session), a pool verified by
the system CAs is verified the same way at the member. A second redirect, or one to an address
that is not a host of the pool, is refused with one line."""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.members import host_url, same_place
from xencr.xapi.session import XapiSession
from xencr.xapi.tls import check_pin, client_context, pem_fingerprint

# A peer silent for this long is declared dead (kernel-level timeouts: the engine reads and
# writes the descriptors directly, so Python's socket timeouts do not apply).
STALL_SECONDS = 300


class TransferError(Exception):
    """A transfer failed; ``str()`` is one readable line."""


class TransferTimeout(TransferError):
    """The transfer ran past its deadline and was cut."""


class TransferCancelled(TransferError):
    """The transfer was cut because its run was cancelled (the daemon is shutting down)."""


class ConnectionCut(TransferError):
    """The connection of a transfer was cut (reset, closed early, timed out) while it ran: what
    passed before stays where it went, and the transfer can resume from the engine's
    `_engine.Progress.position` (`replication.resume`)."""


# What a cut connection looks like from this side (the pool's reason is in its task).
_CUT_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN}


def is_cut(err: BaseException) -> bool:
    """Whether an engine or socket error is a connection cut rather than a refusal or a damaged
    stream: a reset or broken connection, or a stream that ended before its length (the sender
    went away)."""
    if isinstance(err, OSError):
        return isinstance(err, ConnectionError) or err.errno in _CUT_ERRNOS
    return getattr(err, "kind", "") == "stream_length" and "ended" in str(err)


class RedirectRefused(TransferError):
    """A pool sent a data request elsewhere than one of its own hosts, or more than once."""


@dataclass(frozen=True)
class DataHost:
    """Where a data handler is called: host (also the HTTP ``Host`` and TLS name), port, how the
    engine trusts it (`None`: plain HTTP; ``"verify"``: system CAs; ``"sha256:..."``: exactly
    that certificate), and how messages name it."""

    host: str
    port: int
    tls: str | None
    label: str

    @property
    def pin(self) -> str | None:
        return self.tls.removeprefix("sha256:") if self.tls and self.tls != "verify" else None


def data_host(session: XapiSession) -> DataHost:
    """The pool's own address, as its session reaches it."""
    e = session.endpoint
    tls = None
    if e.scheme == "https":
        if e.fingerprint:
            tls = e.fingerprint
        elif not e.verify_tls:
            raise TransferError(
                f"{e.where}: unverified TLS is not used for disk transfers; pin the certificate"
            )
        else:
            tls = "verify"
    return DataHost(e.host, e.port, tls, e.where)


def follow(session: XapiSession, location: str, what: str) -> tuple[DataHost, str]:
    """The member a redirect names, and the request path to send it (the location's path and
    query, unchanged). Refused unless it is a host of this pool reached the same way."""
    e = session.endpoint
    target = urlsplit(location)
    shown = f"{target.scheme}://{target.netloc}"  # the query holds the session: never shown
    # A host record's address: a bare IP for XAPI (IPv6 unbracketed), `ip:port` in the simulator.
    found = [
        (ref, h)
        for ref, h in session.api.host.get_all_records().items()
        if same_place(host_url(e.scheme, str(h["address"])), location)
    ]
    if target.scheme != e.scheme or not found:
        raise RedirectRefused(
            f"{e.where}: the {what} was redirected to {shown}, not a host of this pool: refused"
        )
    ref, rec = found[0]
    port = target.port or (443 if target.scheme == "https" else 80)
    tls = None
    if e.scheme == "https":
        if e.fingerprint:
            # A chain may come: the host's own certificate is first.
            tls = "sha256:" + pem_fingerprint(str(session.api.host.get_server_certificate(ref)))
        else:
            tls = data_host(session).tls
    path = target.path + (f"?{target.query}" if target.query else "")
    return DataHost(target.hostname or "", port, tls, f"{e.where} host {rec['name_label']} ({shown})"), path


def tcp(at: DataHost) -> socket.socket:
    """A TCP connection to a data host, with kernel-level stall timeouts."""
    try:
        raw = socket.create_connection((at.host, at.port), timeout=30)
    except OSError as err:
        raise PoolUnreachable(f"{at.label}: {err.strerror or err}") from None
    raw.settimeout(None)
    # Kernel timeouts, so that a stalled peer fails the engine's blocking read or write too.
    tv = struct.pack("ll", STALL_SECONDS, 0)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return raw


def connect(at: DataHost) -> socket.socket:
    """A connection for a small HTTP exchange done in Python (TLS by Python's ssl)."""
    raw = tcp(at)
    if at.tls is None:
        return raw
    ctx = client_context(at.pin, True)
    s = ctx.wrap_socket(raw, server_hostname=at.host if ctx.check_hostname else None)
    check_pin(s, at.pin, at.label)
    return s


def send_request(sock: socket.socket, method: str, path: str, host: str, length: int | None) -> None:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "User-Agent: xencr", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))


def read_head(sock: socket.socket, where: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and whatever body bytes came along."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise TransferError(f"{where}: connection closed before the HTTP response")
        buf += chunk
        if len(buf) > 1 << 20:
            raise TransferError(f"{where}: oversized HTTP response head")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("iso-8859-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise TransferError(f"{where}: bad HTTP status line {lines[0]!r}") from None
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def query(session: XapiSession, task: str, **params: str) -> str:
    return urlencode({"session_id": session.ref, "task_id": task, **params})


class Watchdog:
    """Shuts the transfer's sockets down at the deadline or when ``cancel`` is set: the engine's
    blocking read or write then fails, and the transfer ends without waiting for the stall
    timeout. ``fired`` says why (``"deadline"`` or ``"cancel"``), or is empty."""

    POLL = 0.1  # how soon a set cancel event is noticed

    def __init__(
        self, socks: list[socket.socket], deadline: float | None, cancel: threading.Event | None
    ) -> None:
        self.fired = ""
        self._socks = socks
        self._deadline = deadline
        self._cancel = cancel
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        if deadline is not None or cancel is not None:
            self._thread = threading.Thread(target=self._watch, name="xencr-watchdog", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while True:
            if self._cancel is not None and self._cancel.is_set():
                self._fire("cancel")
                return
            wait = self.POLL if self._cancel is not None else None
            if self._deadline is not None:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self._fire("deadline")
                    return
                wait = left if wait is None else min(wait, left)
            if self._done.wait(wait):
                return

    def _fire(self, why: str) -> None:
        self.fired = why
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def check(self, what: str) -> None:
        """After the engine failed: `TransferCancelled` or `TransferTimeout` when the watchdog
        cut ``what`` ("transfer of X", "read-back of X"), so the cut is said, not its symptom."""
        if self.fired == "cancel":
            raise TransferCancelled(f"{what} cancelled")
        if self.fired:
            raise TransferTimeout(f"{what} cut at its deadline")


def wait_task(
    session: XapiSession,
    task: str,
    timeout: float | None,
    until: float | None = None,
    cancel: threading.Event | None = None,
) -> str:
    """Wait for a handler's task (without destroying it: its caller does that once), at most
    ``timeout`` seconds, and not past ``until`` (the VM's deadline) nor once ``cancel`` is set."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.002  # a handler's task usually ends right after its body: poll fast, then back off
    while True:
        status = session.call("task.get_status", task)
        if status == "success":
            return str(session.call("task.get_result", task)).replace("<value>", "").replace("</value>", "")
        if status in ("failure", "cancelled"):
            info = session.call("task.get_error_info", task)
            raise XapiError(str(info[0]) if info else "TASK_CANCELLED", info[1:] if info else [task])
        if deadline is not None and time.monotonic() > deadline:
            raise TransferError(f"task {task} did not finish in {timeout:.0f}s")
        if until is not None and time.monotonic() > until:
            raise TransferTimeout(f"task {task} still running at the deadline")
        if cancel is not None and cancel.is_set():
            raise TransferCancelled(f"task {task} abandoned: cancelled")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def task_failure(session: XapiSession, task: str, wait: float = 0.5) -> XapiError | None:
    """The error a failed handler left in its task, if it left one in time."""
    deadline = time.monotonic() + wait
    while True:
        try:
            status = session.call("task.get_status", task)
            if status in ("failure", "cancelled"):
                info = session.call("task.get_error_info", task)
                return XapiError(str(info[0]), info[1:]) if info else None
        except (XapiError, PoolUnreachable):
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
