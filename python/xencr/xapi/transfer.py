"""Disk transfers: a VDI's export streamed straight into another VDI's import, through the
engine's transform (validation, per-block digests, rate limit). No temporary file, one block of
buffer. XAPI's export sends no ``Content-Length`` and its import requires one, so the stream's
head (footer, header, BAT) is read first and its total length announced before forwarding.

Python opens the TCP connections (so a watchdog can cut them at a deadline) and follows the
pools' tasks; the engine does the rest on those descriptors: TLS where a pool is HTTPS (rustls,
system CAs or a pinned certificate), the HTTP exchange, and the stream. No byte of a disk passes
through Python."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from xencr import _engine
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import XapiSession
from xencr.xapi.tls import check_pin, client_context

# A peer silent for this long is declared dead (kernel-level timeouts: the engine reads and
# writes the descriptors directly, so Python's socket timeouts do not apply).
STALL_SECONDS = 300
_MAX_HEAD = 64 * 1024 * 1024  # far beyond any BAT (2 TiB at 2 MiB blocks needs 4 MiB)


class TransferError(Exception):
    """A transfer failed; ``str()`` is one readable line."""


class TransferTimeout(TransferError):
    """The transfer ran past its deadline and was cut."""


class TransferCancelled(TransferError):
    """The transfer was cut because its run was cancelled (the daemon is shutting down)."""


@dataclass
class TransferReport:
    stream_length: int
    bytes_sent: int
    blocks: int
    kind: str  # "full" or "delta"
    seconds: float
    digests: list[tuple[int, str]] = field(default_factory=list)
    digest_algorithm: str = _engine.DIGEST_ALGORITHM
    imported_vdi: str = ""
    block_size: int = 2 * 1024 * 1024


def _tcp(session: XapiSession) -> socket.socket:
    """A TCP connection to the pool, with kernel-level stall timeouts."""
    e = session.endpoint
    try:
        raw = socket.create_connection((e.host, e.port), timeout=30)
    except OSError as err:
        raise PoolUnreachable(f"{e.url}: {err.strerror or err}") from None
    raw.settimeout(None)
    # Kernel timeouts, so that a stalled peer fails the engine's blocking read or write too.
    tv = struct.pack("ll", STALL_SECONDS, 0)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return raw


def _connect(session: XapiSession) -> socket.socket:
    """A connection for a small HTTP exchange done in Python (TLS by Python's ssl)."""
    e = session.endpoint
    raw = _tcp(session)
    if e.scheme != "https":
        return raw
    ctx = client_context(e.fingerprint, e.verify_tls)
    s = ctx.wrap_socket(raw, server_hostname=e.host if ctx.check_hostname else None)
    check_pin(s, e.fingerprint, e.url)
    return s


def _send_request(sock: socket.socket, method: str, path: str, host: str, length: int | None) -> None:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "User-Agent: xencr", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))


def _read_head(sock: socket.socket, where: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and whatever body bytes came along."""
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


def _read_stream_head(sock: socket.socket, have: bytes) -> tuple[bytes, int]:
    """Read until the engine knows the stream's total length."""
    while True:
        need, total = _engine.probe_stream_length(have)
        if total is not None:
            return have, total
        if need > _MAX_HEAD:
            raise TransferError(f"export stream head of {need} bytes is implausible")
        while len(have) < need:
            chunk = sock.recv(need - len(have))
            if not chunk:
                raise TransferError(f"export ended after {len(have)} bytes, inside the VHD header")
            have += chunk


def _query(session: XapiSession, task: str, **params: str) -> str:
    return urlencode({"session_id": session.ref, "task_id": task, **params})


def copy_vdi(
    src: XapiSession,
    src_vdi: str,
    dst: XapiSession,
    dst_vdi: str,
    *,
    base_vdi: str | None = None,
    rate_limit: int | None = None,
    timeout: float | None = None,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
    progress: Callable[[int], _engine.Progress | None] | None = None,
) -> TransferReport:
    """Stream ``src_vdi`` (delta against ``base_vdi`` when given) into ``dst_vdi``. Past
    ``deadline`` (a `time.monotonic()` value) the connections are cut and `TransferTimeout`
    raised; when ``cancel`` is set, likewise with `TransferCancelled`. Either way both pools'
    tasks are cancelled and destroyed. ``progress(total)`` may return an engine byte counter for
    the stream (its length being known once the head has arrived)."""
    if cancel is not None and cancel.is_set():
        raise TransferCancelled(f"transfer of {src_vdi} cancelled before it started")
    start = time.monotonic()
    src_task = str(src.call("task.create", "xencr export", f"export of {src_vdi}"))
    dst_task = str(dst.call("task.create", "xencr import", f"import into {dst_vdi}"))
    socks: list[socket.socket] = []
    done = False
    try:
        params = {"vdi": src_vdi, "format": "vhd"}
        if base_vdi:
            params["base"] = base_vdi
        export_path = "/export_raw_vdi?" + _query(src, src_task, **params)
        import_path = "/import_raw_vdi?" + _query(dst, dst_task, vdi=dst_vdi, format="vhd")
        s, d = _tcp(src), _tcp(dst)
        socks += [s, d]
        watchdog = _Watchdog(socks, deadline, cancel)
        # TLS (where a side is HTTPS), the HTTP exchange and the stream all in the engine, on
        # the TCP connections opened here, so that the watchdog can still cut them.
        counter = progress(0) if progress else None  # the engine learns the length: `.total`
        try:
            report = _engine.relay(
                s.fileno(),
                src.endpoint.host,
                export_path,
                d.fileno(),
                dst.endpoint.host,
                import_path,
                src_tls=_tls_spec(src),
                dst_tls=_tls_spec(dst),
                rate_limit=rate_limit,
                progress=counter,
            )
        except (_engine.VhdError, OSError) as err:
            if watchdog.fired == "cancel":
                raise TransferCancelled(f"transfer of {src_vdi} cancelled") from None
            if watchdog.fired:
                raise TransferTimeout(f"transfer of {src_vdi} cut at its deadline") from None
            if getattr(err, "kind", "") == "http_status":  # the pool said why in its task (xapi.md 4.1)
                raise _task_failure(src, src_task) or TransferError(f"export of {src_vdi}: {err}") from None
            # Closing the import connection mid-body makes the pool fail its import task.
            raise _task_failure(dst, dst_task, wait=2.0) or TransferError(
                f"transfer of {src_vdi}: {err}"
            ) from None
        finally:
            watchdog.cancel()
        if report.get("import_status", 200) != 200:
            raise _task_failure(dst, dst_task) or TransferError(
                f"import into {dst_vdi}: HTTP {report.get('import_status')}"
            )
        imported = _wait(dst, dst_task, timeout, deadline, cancel)
        _wait(src, src_task, timeout, deadline, cancel)
        done = True
        return TransferReport(
            stream_length=int(report["bytes_in"]),
            bytes_sent=int(report["bytes_out"]),
            blocks=int(report["blocks"]),
            kind="delta" if report["disk_type"] == "differencing" else "full",
            seconds=time.monotonic() - start,
            digests=list(report["digests"]),
            imported_vdi=imported,
            block_size=int(report["block_size"]),
        )
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        for session, task in ((src, src_task), (dst, dst_task)):
            if not done:
                session.cancel_task(task)
            session.destroy_task(task)


def _tls_spec(session: XapiSession) -> str | None:
    """How the engine trusts this pool: plain HTTP, a pinned certificate, or the system CAs."""
    e = session.endpoint
    if e.scheme != "https":
        return None
    if e.fingerprint:
        return e.fingerprint
    if not e.verify_tls:
        raise TransferError(f"{e.url}: unverified TLS is not used for disk transfers; pin the certificate")
    return "verify"


class _Watchdog:
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


def _wait(
    session: XapiSession,
    task: str,
    timeout: float | None,
    until: float | None = None,
    cancel: threading.Event | None = None,
) -> str:
    """Wait for a handler's task (without destroying it: `copy_vdi` does that once), at most
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


def _task_failure(session: XapiSession, task: str, wait: float = 0.5) -> XapiError | None:
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


def changed_blocks(session: XapiSession, vdi: str, base_vdi: str) -> int:
    """How many blocks ``vdi`` holds that ``base_vdi`` does not, read from the head of a delta
    export alone (footer, header, BAT): the connection is closed before any data flows."""
    task = str(session.call("task.create", "xencr probe", f"changes of {vdi}"))
    sock = _connect(session)
    try:
        query = _query(session, task, vdi=vdi, base=base_vdi, format="vhd")
        _send_request(sock, "GET", "/export_raw_vdi?" + query, session.endpoint.host, None)
        status, _, rest = _read_head(sock, "export")
        if status != 200:
            raise _task_failure(session, task) or TransferError(f"export of {vdi}: HTTP {status}")
        head, total = _read_stream_head(sock, rest)
        head_len, _ = _engine.probe_stream_length(head)
        # Whole blocks follow the head: bitmap + data, XAPI's block size being 2 MiB.
        return max(0, (total - head_len - 512) // (512 + 2 * 1024 * 1024))
    finally:
        with contextlib.suppress(OSError):
            sock.close()
        session.cancel_task(task)
        session.destroy_task(task)


def read_digests(session: XapiSession, vdi: str) -> dict[str, Any]:
    """Re-read a VDI through a full export and digest every block it holds (the stream is only
    validated and digested by the engine; nothing is written anywhere)."""
    task = str(session.call("task.create", "xencr verify", f"re-read of {vdi}"))
    sock = _tcp(session)
    try:
        path = "/export_raw_vdi?" + _query(session, task, vdi=vdi, format="vhd")
        try:
            return dict(_engine.relay(sock.fileno(), session.endpoint.host, path, src_tls=_tls_spec(session)))
        except _engine.VhdError as err:
            if err.kind == "http_status":
                raise _task_failure(session, task) or TransferError(f"export of {vdi}: {err}") from None
            raise
    finally:
        with contextlib.suppress(OSError):
            sock.close()
        session.cancel_task(task)
        session.destroy_task(task)


# ------------------------------------------------------------------------------ reading back


class ReadbackMismatch(TransferError):
    """What a target holds after an import is not what was sent to it."""


@dataclass(frozen=True)
class ReadBack:
    """A VDI's blocks as an export of it carried them (all of them, or those of a delta)."""

    algorithm: str
    block_size: int
    digests: list[tuple[int, str]]  # (block index, hex digest), ascending
    bytes_read: int
    block_count: int  # blocks of the whole disk (the BAT's entries)


@functools.cache
def zero_digest(algorithm: str, block_size: int) -> str:
    """The digest of an all-zero block, as the engine computes it (asked of the engine once:
    a one-block disk written with zeros, exported to nowhere)."""
    if algorithm != _engine.DIGEST_ALGORITHM:
        raise TransferError(f"digests of {algorithm} are not computed by this engine")
    with tempfile.TemporaryDirectory(prefix="xencr-zero-") as tmp:
        path = os.path.join(tmp, "zero.vhd")
        _engine.create(path, block_size, block_size=block_size)
        _engine.write(path, 0, bytes(block_size))
        report = _engine.export_stream(path, os.devnull)
    return str(report["digests"][0][1])


def export_digests(
    session: XapiSession,
    vdi: str,
    *,
    base: str | None = None,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
) -> ReadBack:
    """Export ``vdi`` (a delta against ``base`` when given) and digest every block it carries;
    nothing is written anywhere. Past ``deadline`` or once ``cancel`` is set the export is cut
    (`TransferTimeout` / `TransferCancelled`)."""
    task = str(session.call("task.create", "xencr read-back", f"read-back of {vdi}"))
    sock = _tcp(session)
    watchdog = _Watchdog([sock], deadline, cancel)
    try:
        params = {"vdi": vdi, "format": "vhd"} | ({"base": base} if base else {})
        path = "/export_raw_vdi?" + _query(session, task, **params)
        try:
            report = _engine.relay(sock.fileno(), session.endpoint.host, path, src_tls=_tls_spec(session))
        except (_engine.VhdError, OSError) as err:
            if watchdog.fired == "cancel":
                raise TransferCancelled(f"read-back of {vdi} cancelled") from None
            if watchdog.fired:
                raise TransferTimeout(f"read-back of {vdi} cut at its deadline") from None
            if getattr(err, "kind", "") == "http_status":
                raise _task_failure(session, task) or TransferError(f"export of {vdi}: {err}") from None
            raise TransferError(f"read-back of {vdi}: {err}") from None
    finally:
        watchdog.cancel()
        with contextlib.suppress(OSError):
            sock.close()
        session.cancel_task(task)
        session.destroy_task(task)
    return ReadBack(
        algorithm=str(report["digest_algorithm"]),
        block_size=int(report["block_size"]),
        digests=[(int(i), str(h)) for i, h in report["digests"]],
        bytes_read=int(report["bytes_in"]),
        block_count=-(-int(report["virtual_size"]) // int(report["block_size"])),
    )


def read_back(
    session: XapiSession,
    vdi: str,
    sent: list[tuple[int, str]],
    *,
    base: str | None,
    where: str,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
) -> ReadBack:
    """Read back from the target what an import into ``vdi`` wrote and compare it with the
    digests of what was ``sent``; `ReadbackMismatch` (its line starts with ``where``) otherwise.

    A delta (``vdi`` a clone of the commit snapshot ``base``) is exported against that base, so
    only the blocks written into the clone come back (vhd-tool, and the engine after it, carries
    the blocks of the chain layers the two do not share); each must be exactly one sent. A full
    is exported whole: the same blocks must come back, except that a zero block may be absent or
    present on either side (an unallocated block reads as zeros; whether a pool allocates a
    block written with zeros is its own business)."""
    got = export_digests(session, vdi, base=base, deadline=deadline, cancel=cancel)
    expected = dict(sent)
    found = dict(got.digests)
    if base is None:
        zero = zero_digest(got.algorithm, got.block_size)
        expected = {i: h for i, h in expected.items() if h != zero}
        found = {i: h for i, h in found.items() if h != zero}
    bad = sorted(i for i in set(expected) | set(found) if expected.get(i) != found.get(i))
    if bad:
        raise ReadbackMismatch(f"{where}: read back differs from what was sent: {_blocks_phrase(bad)}")
    return got


def _blocks_phrase(indices: list[int]) -> str:
    text = ",".join(_ranges(indices))
    return f"block {text}" if len(indices) == 1 else f"blocks {text}"


def _ranges(indices: list[int]) -> list[str]:
    """``[0, 1, 2, 7]`` -> ``["0-2", "7"]``."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return [f"{a}-{b}" if a != b else str(a) for a, b in out]


def read_sample(
    session: XapiSession, vdi: str, choose: Callable[[int], set[int]]
) -> tuple[ReadBack, set[int]]:
    """Digest only some blocks of ``vdi``: ``choose(block_count)`` picks them once the export's
    head says how many the disk has; returns their digests (those allocated) and the choice.

    XAPI's export streams the disk from its first block and cannot seek (`/export_raw_vdi`
    takes no range; only NBD, `VDI.get_nbd_info`, reads at an offset), so the export is read up
    to the last chosen allocated block and cut there; only the chosen blocks are digested (the
    engine digests a stream made of them alone)."""
    task = str(session.call("task.create", "xencr verify", f"sampled re-read of {vdi}"))
    sock = _connect(session)
    try:
        query = _query(session, task, vdi=vdi, format="vhd")
        _send_request(sock, "GET", "/export_raw_vdi?" + query, session.endpoint.host, None)
        status, _, rest = _read_head(sock, "export")
        if status != 200:
            raise _task_failure(session, task) or TransferError(f"export of {vdi}: HTTP {status}")
        have, _ = _read_stream_head(sock, rest)
        # The header follows the footer: its BAT offset, entries and block size (VHD spec).
        table_offset: int = struct.unpack(">Q", have[528:536])[0]
        entries, block_size = struct.unpack(">II", have[540:548])
        bat = struct.unpack(f">{entries}I", have[table_offset : table_offset + 4 * entries])
        chosen = choose(entries)
        # Stream order: ascending offsets; each block is its sector bitmap, then its data.
        allocated = sorted((off, i) for i, off in enumerate(bat) if off != _UNALLOCATED)
        block_len = -(-block_size // 512 // 8 // 512) * 512 + block_size
        wanted = [(off, i) for off, i in allocated if i in chosen]
        if not wanted:
            return ReadBack(_engine.DIGEST_ALGORITHM, block_size, [], len(have), entries), chosen
        data_start = allocated[0][0] * 512
        while len(have) < data_start:
            chunk = sock.recv(data_start - len(have))
            if not chunk:
                raise TransferError(f"export of {vdi} ended before its first block")
            have += chunk
        new_bat = [_UNALLOCATED] * entries
        for n, (_, i) in enumerate(wanted):
            new_bat[i] = (data_start + n * block_len) // 512
        head = bytearray(have[:data_start])
        head[table_offset : table_offset + 4 * entries] = struct.pack(f">{entries}I", *new_bat)
        pending = have[data_start:]  # block bytes that came with the head
        length = data_start + len(wanted) * block_len + 512
        rfd, wfd = os.pipe()
        result: list[dict[str, Any]] = []
        errors: list[BaseException] = []

        def digest() -> None:
            try:
                result.append(dict(_engine.transform(rfd, os.devnull, length=length)))
            except BaseException as err:
                errors.append(err)
            finally:
                os.close(rfd)  # a writer still writing then fails instead of waiting forever

        worker = threading.Thread(target=digest, name="xencr-sample", daemon=True)
        worker.start()
        read = len(have)
        try:
            _write_all(wfd, bytes(head))
            at = data_start  # stream offset of the next byte to take
            buf = bytearray(block_len)
            for off, i in allocated:
                if off > wanted[-1][0]:
                    break  # past the last chosen block: the rest is never read
                skip = off * 512 - at
                got, pending = _take(sock, pending, buf, skip + block_len)
                read += got
                at = off * 512 + block_len
                if i in chosen:
                    _write_all(wfd, bytes(buf))
            _write_all(wfd, have[:512])  # the footer copy that ends a stream
        except BrokenPipeError:
            pass  # the engine stopped reading: its error says why
        finally:
            os.close(wfd)
            worker.join()
        if errors or not result:
            raise TransferError(f"sampled re-read of {vdi}: {errors[0] if errors else 'no report'}")
        report = result[0]
        digests = [(int(i), str(h)) for i, h in report["digests"]]
        return ReadBack(str(report["digest_algorithm"]), block_size, digests, read, entries), chosen
    finally:
        with contextlib.suppress(OSError):
            sock.close()
        session.cancel_task(task)
        session.destroy_task(task)


_UNALLOCATED = 0xFFFFFFFF


def _take(sock: socket.socket, pending: bytes, buf: bytearray, n: int) -> tuple[int, bytes]:
    """The next ``n`` stream bytes, the last ``len(buf)`` of them left in ``buf``: first from
    ``pending``, then from the socket. Returns the bytes read from the socket and what is left
    of ``pending``."""
    view = memoryview(buf)
    keep_from = n - len(buf)  # bytes before this offset are skipped, not kept
    done = read = 0
    while done < n:
        want = n - done
        if pending:
            chunk, pending = pending[:want], pending[want:]
        else:
            chunk = sock.recv(min(want, 1 << 20))
            if not chunk:
                raise TransferError("export ended early")
            read += len(chunk)
        end = done + len(chunk)
        if end > keep_from:
            lo = max(done, keep_from)
            view[lo - keep_from : end - keep_from] = chunk[lo - done :]
        done = end
    return read, pending


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
