"""Changed-block tracking logs, as sm keeps them (``libs/sm/VDI.py``, ``libs/sm/cbtutil.py``,
``FileSR.py``): one ``<vdi uuid>.cbtlog`` beside the VHD per VDI with CBT enabled, holding a bitmap
of 64 KiB blocks written since the log was started, the disk size, a consistency flag and the
UUIDs of its parent and child log. The logs of a VDI and its snapshots form a chain:

- ``enable_cbt`` starts an empty log (no parent, no child); ``disable_cbt`` deletes it and clears
  its parent's child pointer (``configure_blocktracking``);
- a snapshot renames the VDI's log to the snapshot's (it then holds the writes made between the
  previous snapshot and this one) and starts a fresh log for the VDI, chained after it
  (``_cbt_snapshot``); clones get no log;
- deleting a VDI merges its bitmap into its child's and splices it out of the chain (``delete``);
  ``data_destroy`` keeps the log;
- a resize records the new size, the bitmap growing with zeros (``resize_cbt``);
- ``list_changed_blocks(from, to)`` follows child pointers from ``from`` and ORs every bitmap up
  to and including ``to`` (``VDI.list_changed_blocks``).

Every write into a VDI with a log marks its 64 KiB blocks *before* the data is written (a crash
in between over-reports, never under-reports), even when the data written is what was there.

File layout (the simulator's own; sm's is tapdisk's): a 512-byte header, ``XENCRCBT`` then a
JSON object padded with spaces, then the bitmap, one bit per block, most significant bit first
(bit *i* is byte ``i >> 3``, mask ``0x80 >> (i & 7)``), as ``list_changed_blocks`` returns it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from xencr.sim.errors import sr_backend_failure

CBT_BLOCK = 64 * 1024  # sm VDI.CBT_BLOCK_SIZE
SUFFIX = ".cbtlog"  # sm constants.CBTLOG_TAG
NULL_UUID = "00000000-0000-0000-0000-000000000000"  # cbtutil's "no parent/child"
_MAGIC = b"XENCRCBT"
_HEADER = 512
# sm XE_SR_ERRORCODES.xml: 459 CBTMetadataInconsistent, 460 CBTChangedBlocksError
_INCONSISTENT = "Changed block tracking log is in an inconsistent state."
_CHANGED_BLOCKS = "Failed to calculate changed blocks for given VDIs."


def bitmap_bytes(size: int) -> int:
    """Bytes of a bitmap covering ``size`` bytes of disk (whole bytes, rounded up)."""
    units = (size + CBT_BLOCK - 1) // CBT_BLOCK
    return (units + 7) // 8


@dataclass
class LogHeader:
    parent: str
    child: str
    size: int
    consistent: bool


def log_path(directory: Path, vdi_uuid: str) -> Path:
    return directory / f"{vdi_uuid}{SUFFIX}"


def exists(directory: Path, vdi_uuid: str) -> bool:
    return vdi_uuid != NULL_UUID and log_path(directory, vdi_uuid).exists()


def read_header(path: Path) -> LogHeader:
    with open(path, "rb") as f:
        raw = f.read(_HEADER)
    if not raw.startswith(_MAGIC):
        raise sr_backend_failure(459, f"{_INCONSISTENT} [opterr=bad log header]")
    doc = json.loads(raw[len(_MAGIC) :].decode().strip())
    return LogHeader(str(doc["parent"]), str(doc["child"]), int(doc["size"]), bool(doc["consistent"]))


def _write_header(fd: int, header: LogHeader) -> None:
    doc = json.dumps(
        {
            "parent": header.parent,
            "child": header.child,
            "size": header.size,
            "consistent": header.consistent,
        }
    ).encode()
    raw = _MAGIC + doc
    if len(raw) > _HEADER:
        raise ValueError("CBT log header too long")
    os.pwrite(fd, raw.ljust(_HEADER, b" "), 0)


def read_bitmap(path: Path) -> bytearray:
    with open(path, "rb") as f:
        f.seek(_HEADER)
        return bytearray(f.read())


def create(path: Path, size: int, *, parent: str = NULL_UUID, child: str = NULL_UUID) -> None:
    """A new log: every block clean (``cbtutil.create_cbt_log``), consistent."""
    tmp = path.with_suffix(".cbtlog.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_header(fd, LogHeader(parent, child, size, True))
        os.pwrite(fd, bytes(bitmap_bytes(size)), _HEADER)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def update_header(path: Path, **changes: object) -> None:
    header = read_header(path)
    for key, value in changes.items():
        setattr(header, key, value)
    fd = os.open(path, os.O_WRONLY)
    try:
        _write_header(fd, header)
    finally:
        os.close(fd)


def write_bitmap(path: Path, bitmap: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bitmap, _HEADER)
        os.ftruncate(fd, _HEADER + len(bitmap))
    finally:
        os.close(fd)


def mark_bits(bitmap: bytearray, first: int, last: int) -> None:
    """Set bits ``first..last`` (inclusive) of an MSB-first bitmap."""
    i = first
    while i <= last:
        if i & 7 == 0 and i + 7 <= last:
            end = min(last + 1, (last + 1) & ~7)  # whole bytes
            bitmap[i >> 3 : end >> 3] = b"\xff" * ((end - i) >> 3)
            i = end
            continue
        bitmap[i >> 3] |= 0x80 >> (i & 7)
        i += 1


class CbtLogs:
    """The CBT logs of one pool's SRs. Callers name the SR directory and the VDI UUID; a lock
    keeps each read-modify-write of a log whole."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ enable / disable

    def enable(self, directory: Path, vdi_uuid: str, size: int) -> None:
        with self.lock:
            path = log_path(directory, vdi_uuid)
            if not path.exists():
                create(path, size)

    def disable(self, directory: Path, vdi_uuid: str) -> None:
        """Delete the log and clear its parent's child pointer (``configure_blocktracking``)."""
        with self.lock:
            path = log_path(directory, vdi_uuid)
            if not path.exists():
                return
            parent = read_header(path).parent
            path.unlink()
            if exists(directory, parent):
                update_header(log_path(directory, parent), child=NULL_UUID)

    def discard(self, directory: Path, vdi_uuid: str) -> None:
        """Delete the log without touching the chain (``_disable_cbt_on_error``)."""
        with self.lock:
            log_path(directory, vdi_uuid).unlink(missing_ok=True)

    # ------------------------------------------------------------------ writes

    def mark(self, directory: Path, vdi_uuid: str, offset: int, length: int) -> None:
        """Record a write of ``length`` bytes at ``offset`` (no-op without a log)."""
        if length <= 0:
            return
        with self.lock:
            path = log_path(directory, vdi_uuid)
            if not path.exists():
                return
            first, last = offset // CBT_BLOCK, (offset + length - 1) // CBT_BLOCK
            lo, hi = first >> 3, (last >> 3) + 1
            fd = os.open(path, os.O_RDWR)
            try:
                chunk = bytearray(os.pread(fd, hi - lo, _HEADER + lo).ljust(hi - lo, b"\0"))
                before = bytes(chunk)
                mark_bits(chunk, first - lo * 8, last - lo * 8)
                if bytes(chunk) != before:
                    os.pwrite(fd, chunk, _HEADER + lo)
            finally:
                os.close(fd)

    def begin_bulk(self, directory: Path, vdi_uuid: str) -> bytes | None:
        """Before a write whose extent is only known afterwards (a VHD import): mark every block,
        returning the bitmap as it was (None without a log)."""
        with self.lock:
            path = log_path(directory, vdi_uuid)
            if not path.exists():
                return None
            before = bytes(read_bitmap(path))
            write_bitmap(path, b"\xff" * len(before))
            return before

    def end_bulk(self, directory: Path, vdi_uuid: str, before: bytes, ranges: list[tuple[int, int]]) -> None:
        """After that write succeeded: the bitmap as it was plus the ``(offset, length)`` ranges
        actually written."""
        with self.lock:
            path = log_path(directory, vdi_uuid)
            if not path.exists():
                return
            bitmap = bytearray(before)
            for offset, length in ranges:
                if length > 0:
                    first, last = offset // CBT_BLOCK, (offset + length - 1) // CBT_BLOCK
                    last = min(last, len(bitmap) * 8 - 1)
                    if first <= last:
                        mark_bits(bitmap, first, last)
            write_bitmap(path, bytes(bitmap))

    def resize(self, directory: Path, vdi_uuid: str, size: int) -> None:
        """``resize_cbt`` / ``cbtutil.set_cbt_size``: the bitmap grows with clean blocks."""
        with self.lock:
            path = log_path(directory, vdi_uuid)
            if not path.exists():
                return
            bitmap = read_bitmap(path)
            want = bitmap_bytes(size)
            if want > len(bitmap):
                write_bitmap(path, bytes(bitmap) + bytes(want - len(bitmap)))
            update_header(path, size=size)

    # ------------------------------------------------------------------ snapshot / delete

    def snapshot(self, directory: Path, vdi_uuid: str, snap_uuid: str, size: int) -> bool:
        """``_cbt_snapshot``: the VDI's log becomes the snapshot's, a fresh one follows it.
        Returns whether the VDI had a log (then the snapshot has CBT enabled)."""
        with self.lock:
            vdi_log, snap_log = log_path(directory, vdi_uuid), log_path(directory, snap_uuid)
            if not vdi_log.exists():
                return False
            os.rename(vdi_log, snap_log)
            update_header(snap_log, consistent=True)
            header = read_header(snap_log)
            if exists(directory, header.parent):
                update_header(log_path(directory, header.parent), child=snap_uuid)
            create(vdi_log, size, parent=snap_uuid, child=header.child)
            update_header(snap_log, child=vdi_uuid)
            return True

    def undo_snapshot(self, directory: Path, vdi_uuid: str, snap_uuid: str) -> None:
        """Crash recovery of a snapshot the database never recorded: the snapshot's log goes back
        to the VDI, keeping any block the VDI's new log recorded since."""
        with self.lock:
            vdi_log, snap_log = log_path(directory, vdi_uuid), log_path(directory, snap_uuid)
            if not snap_log.exists():
                return
            header = read_header(snap_log)
            bitmap = read_bitmap(snap_log)
            child = NULL_UUID
            if vdi_log.exists():
                _or_into(bitmap, read_bitmap(vdi_log))
                child = read_header(vdi_log).child
            create(vdi_log, header.size, parent=header.parent, child=child)
            write_bitmap(vdi_log, bytes(bitmap))
            snap_log.unlink()
            if exists(directory, header.parent):
                update_header(log_path(directory, header.parent), child=vdi_uuid)

    def delete(self, directory: Path, vdi_uuid: str) -> None:
        """``VDI.delete``: splice the log out of its chain, its bitmap merged into the child's."""
        with self.lock:
            path = log_path(directory, vdi_uuid)
            if not path.exists():
                return
            header = read_header(path)
            if exists(directory, header.parent):
                update_header(log_path(directory, header.parent), child=header.child)
            if exists(directory, header.child):
                child_path = log_path(directory, header.child)
                update_header(child_path, parent=header.parent)
                theirs = read_bitmap(child_path)
                _or_into(theirs, read_bitmap(path))
                write_bitmap(child_path, bytes(theirs))
            path.unlink()

    # ------------------------------------------------------------------ queries

    def has_log(self, directory: Path, vdi_uuid: str) -> bool:
        return exists(directory, vdi_uuid)

    def changed_blocks(self, directory: Path, vdi_from: str, vdi_to: str) -> bytes:
        """``VDI.list_changed_blocks``: the OR of the bitmaps after ``vdi_from`` up to ``vdi_to``
        along the child pointers; SR_BACKEND_FAILURE_460 when they are the same VDI, when either
        has no log or when ``vdi_to`` is not reached, 459 for inconsistent bitmap sizes."""
        if vdi_from == vdi_to:
            raise sr_backend_failure(460, f"{_CHANGED_BLOCKS} [opterr=Source and target VDI are same]")
        with self.lock:
            if exists(directory, vdi_from) and exists(directory, vdi_to):
                merged: bytearray | None = None
                size = 0
                current = vdi_from
                seen = {current}
                while True:
                    following = read_header(log_path(directory, current)).child
                    if not exists(directory, following) or following in seen:
                        break
                    current = following
                    seen.add(current)
                    path = log_path(directory, current)
                    current_size = read_header(path).size
                    bitmap = read_bitmap(path)
                    if len(bitmap) * 8 < current_size // CBT_BLOCK:
                        raise sr_backend_failure(459, f"{_INCONSISTENT} [opterr=Inconsistent bitmaps]")
                    if merged is None:
                        merged, size = bitmap, current_size
                    else:
                        if (
                            current_size < size
                            or len(bitmap) < len(merged)
                            or (current_size > size and len(bitmap) <= len(merged))
                        ):
                            raise sr_backend_failure(459, f"{_INCONSISTENT} [opterr=Inconsistent bitmaps]")
                        if current_size > size:
                            size = current_size
                            merged += bytes(len(bitmap) - len(merged))
                        _or_into(merged, bitmap)
                    if current == vdi_to:
                        return bytes(merged)
        raise sr_backend_failure(460, f"{_CHANGED_BLOCKS} [opterr=Source and target VDI are unrelated]")


def _or_into(dst: bytearray, src: bytes | bytearray) -> None:
    """``dst |= src`` over ``dst``'s length (bitmaps can be megabytes: whole-int arithmetic)."""
    n = min(len(dst), len(src))
    if n:
        merged = int.from_bytes(dst[:n], "big") | int.from_bytes(src[:n], "big")
        dst[:n] = merged.to_bytes(n, "big")
