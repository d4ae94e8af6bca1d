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

from xencr import _engine
from xencr.xapi.handlers import (
    ConnectionCut,
    DataHost,
    RedirectRefused,
    TransferCancelled,
    TransferError,
    Watchdog,
    connect,
    data_host,
    follow,
    is_cut,
    query,
    read_head,
    send_request,
    task_failure,
    tcp,
    wait_task,
)
from xencr.xapi.session import XapiSession

_MAX_HEAD = 64 * 1024 * 1024  # far beyond any BAT (2 TiB at 2 MiB blocks needs 4 MiB)


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


class _Redirected(Exception):
    """A handler answered with a redirect (kept private: `copy_vdi` follows it or refuses)."""

    def __init__(self, side: str, location: str) -> None:
        super().__init__(side)
        self.side = side
        self.location = location


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
    resume_from: int = 0,
) -> TransferReport:
    """Stream ``src_vdi`` (delta against ``base_vdi`` when given) into ``dst_vdi``; with
    ``resume_from`` K, the import is sent the export's stream without its first K blocks (read
    and digested all the same: `replication.resume`). Past
    ``deadline`` (a `time.monotonic()` value) the connections are cut and `TransferTimeout`
    raised; when ``cancel`` is set, likewise with `TransferCancelled`. Either way both pools'
    tasks are cancelled and destroyed. ``progress(total)`` may return an engine byte counter for
    the stream (its length being known once the head has arrived).

    A side that answers with a redirect (a VDI on a member's local SR) is followed once to that
    member (`handlers.follow`), with fresh tasks: the import's redirect comes before its body,
    so nothing of the disk was sent yet."""
    at = {"export": (data_host(src), ""), "import": (data_host(dst), "")}
    followed: set[str] = set()
    while True:
        try:
            return _copy_once(
                src,
                src_vdi,
                dst,
                dst_vdi,
                at,
                base_vdi,
                rate_limit,
                timeout,
                deadline,
                cancel,
                progress,
                resume_from,
            )
        except _Redirected as r:
            session = src if r.side == "export" else dst
            what = f"{r.side} of VDI {src_vdi if r.side == 'export' else dst_vdi}"
            if r.side in followed:
                raise RedirectRefused(
                    f"{session.endpoint.where}: the {what} was redirected a second time: refused"
                ) from None
            followed.add(r.side)
            at[r.side] = follow(session, r.location, what)


def _copy_once(
    src: XapiSession,
    src_vdi: str,
    dst: XapiSession,
    dst_vdi: str,
    at: dict[str, tuple[DataHost, str]],
    base_vdi: str | None,
    rate_limit: int | None,
    timeout: float | None,
    deadline: float | None,
    cancel: threading.Event | None,
    progress: Callable[[int], _engine.Progress | None] | None,
    resume_from: int = 0,
) -> TransferReport:
    """One try of `copy_vdi` at the data hosts ``at`` (per side: where, and the path a redirect
    gave, or "" for the usual one)."""
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
        (src_at, export_path), (dst_at, import_path) = at["export"], at["import"]
        # A redirect's path carries the first try's task: this try's own task replaces it.
        export_path = "/export_raw_vdi?" + query(src, src_task, **params)
        import_path = "/import_raw_vdi?" + query(dst, dst_task, vdi=dst_vdi, format="vhd")
        s, d = tcp(src_at), tcp(dst_at)
        socks += [s, d]
        watchdog = Watchdog(socks, deadline, cancel)
        # TLS (where a side is HTTPS), the HTTP exchange and the stream all in the engine, on
        # the TCP connections opened here, so that the watchdog can still cut them.
        counter = progress(0) if progress else None  # the engine learns the length: `.total`
        try:
            report = _engine.relay(
                s.fileno(),
                src_at.host,
                export_path,
                d.fileno(),
                dst_at.host,
                import_path,
                src_tls=src_at.tls,
                dst_tls=dst_at.tls,
                rate_limit=rate_limit,
                progress=counter,
                resume_from=resume_from,
            )
        except (_engine.VhdError, OSError) as err:
            watchdog.check(f"transfer of {src_vdi}")
            kind, side = getattr(err, "kind", ""), getattr(err, "side", None)
            if kind == "redirect" and side is not None:
                raise _Redirected(side, str(getattr(err, "location", ""))) from None
            if kind == "http_status":  # the pool said why in its task (xapi.md 4.1)
                session, task, what = (
                    (dst, dst_task, "import into") if side == "import" else (src, src_task, "export of")
                )
                vdi = dst_vdi if side == "import" else src_vdi
                raise task_failure(session, task) or TransferError(f"{what} {vdi}: {err}") from None
            # Closing the import connection mid-body makes the pool fail its import task.
            reason = task_failure(dst, dst_task, wait=2.0)
            if is_cut(err):  # resumable (`replication.resume`): the pool's reason, when it has one
                raise ConnectionCut(f"transfer of {src_vdi}: connection cut: {reason or err}") from None
            raise reason or TransferError(f"transfer of {src_vdi}: {err}") from None
        finally:
            watchdog.cancel()
        imported = wait_task(dst, dst_task, timeout, deadline, cancel)
        wait_task(src, src_task, timeout, deadline, cancel)
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


def _open_export(session: XapiSession, task: str, what: str, **params: str) -> tuple[socket.socket, bytes]:
    """A GET of the export done in Python, past its 200 (following one redirect to a member):
    the connection, and the body bytes that came with the head."""
    at, path = data_host(session), "/export_raw_vdi?" + query(session, task, **params)
    for hop in range(2):
        sock = connect(at)
        try:
            send_request(sock, "GET", path, at.host, None)
            status, headers, rest = read_head(sock, what)
        except BaseException:
            sock.close()
            raise
        if status == 200:
            return sock, rest
        sock.close()
        location = headers.get("location")
        if location is None or not 300 <= status < 400:
            raise task_failure(session, task) or TransferError(f"{what}: HTTP {status}")
        if hop:
            raise RedirectRefused(
                f"{session.endpoint.where}: the {what} was redirected a second time: refused"
            )
        at, path = follow(session, location, what)
    raise AssertionError("unreachable")


def _relay_export(
    session: XapiSession,
    task: str,
    what: str,
    *,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
    unit_digests: bool = False,
    **params: str,
) -> dict[str, Any]:
    """The export validated and digested by the engine, written nowhere (following one redirect
    to a member: XAPI redirects before it binds the task, so the same task serves)."""
    at, path = data_host(session), "/export_raw_vdi?" + query(session, task, **params)
    for hop in range(2):
        sock = tcp(at)
        watchdog = Watchdog([sock], deadline, cancel)
        try:
            return dict(
                _engine.relay(sock.fileno(), at.host, path, src_tls=at.tls, unit_digests=unit_digests)
            )
        except (_engine.VhdError, OSError) as err:
            watchdog.check(what)
            kind = getattr(err, "kind", "")
            if kind == "redirect" and not hop:
                at, path = follow(session, str(getattr(err, "location", "")), what)
                continue
            if kind == "redirect":
                raise RedirectRefused(
                    f"{session.endpoint.where}: the {what} was redirected a second time: refused"
                ) from None
            if kind == "http_status":
                raise task_failure(session, task) or TransferError(f"{what}: {err}") from None
            raise TransferError(f"{what}: {err}") from None
        finally:
            watchdog.cancel()
            with contextlib.suppress(OSError):
                sock.close()
    raise AssertionError("unreachable")


def changed_blocks(session: XapiSession, vdi: str, base_vdi: str) -> int:
    """How many blocks ``vdi`` holds that ``base_vdi`` does not, read from the head of a delta
    export alone (footer, header, BAT): the connection is closed before any data flows."""
    task = str(session.call("task.create", "xencr probe", f"changes of {vdi}"))
    sock = None
    try:
        sock, rest = _open_export(session, task, f"export of {vdi}", vdi=vdi, base=base_vdi, format="vhd")
        head, total = _read_stream_head(sock, rest)
        head_len, _ = _engine.probe_stream_length(head)
        # Whole blocks follow the head: bitmap + data, XAPI's block size being 2 MiB.
        return max(0, (total - head_len - 512) // (512 + 2 * 1024 * 1024))
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        session.cancel_task(task)
        session.destroy_task(task)


def read_digests(session: XapiSession, vdi: str) -> dict[str, Any]:
    """Re-read a VDI through a full export and digest every block it holds (the stream is only
    validated and digested by the engine; nothing is written anywhere)."""
    task = str(session.call("task.create", "xencr verify", f"re-read of {vdi}"))
    try:
        return _relay_export(session, task, f"export of {vdi}", vdi=vdi, format="vhd")
    finally:
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
    units: list[tuple[int, str]] = field(default_factory=list)  # per 64 KiB unit, when asked


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
    units: bool = False,
) -> ReadBack:
    """Export ``vdi`` (a delta against ``base`` when given) and digest every block it carries
    (and, with ``units``, every 64 KiB unit of them); nothing is written anywhere. Past
    ``deadline`` or once ``cancel`` is set the export is cut (`TransferTimeout` /
    `TransferCancelled`)."""
    task = str(session.call("task.create", "xencr read-back", f"read-back of {vdi}"))
    params = {"vdi": vdi, "format": "vhd"} | ({"base": base} if base else {})
    try:
        report = _relay_export(
            session,
            task,
            f"read-back of {vdi}",
            deadline=deadline,
            cancel=cancel,
            unit_digests=units,
            **params,
        )
    finally:
        session.cancel_task(task)
        session.destroy_task(task)
    return ReadBack(
        algorithm=str(report["digest_algorithm"]),
        block_size=int(report["block_size"]),
        digests=[(int(i), str(h)) for i, h in report["digests"]],
        bytes_read=int(report["bytes_in"]),
        block_count=-(-int(report["virtual_size"]) // int(report["block_size"])),
        units=[(int(i), str(h)) for i, h in report.get("unit_digests", [])],
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
    sock = None
    try:
        sock, rest = _open_export(session, task, f"export of {vdi}", vdi=vdi, format="vhd")
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
        if sock is not None:
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
