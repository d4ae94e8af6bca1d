"""Resuming a transfer instead of starting over: when, from where, and what proves it right.

**What is kept.** An attempt whose transfers began is recorded in the state database (`resumes`:
its id, the source snapshot, the replica, its inputs as a `Shape`) and, about once a second, how
far each disk's stream has passed (`_engine.Progress.position`: blocks in stream order, each
written in full to the import's connection; see `RECORD_STEP`). When the attempt ends uncommitted because a
connection dropped, its timeout passed, the run was cancelled or the process was killed, its
replica and disks stay on the target with that record, instead of being destroyed (`ownership`,
rule (a), keeps exactly the attempt the record names). Any other failure (a refusal, a read-back
that differs) discards the attempt as before.

**When it is resumed.** The next try (the same run's retry after a dropped connection, or the
next run after a kill) resumes it only if nothing it was made of changed (`judge`): the source
snapshot still exists and is this job's; the replica and its disks are still there, unused, never
started, snapshotted or copied (the survey that would otherwise destroy them says so), with the
same disks; and a plan made now with that snapshot has the same shape: the same disks, bases
(source and target), full/delta and path. Otherwise the attempt is cleaned up (destroyed by the
usual rule) and the disk sent from zero, and the reason is said ("the base of disk 0 changed").

**From where.** XAPI's import writes only the blocks a stream carries into a VDI that keeps the
rest (vhd.md 1.5), so a second import carrying the blocks from stream position K on completes
the disk, and a block sent twice is written twice with the same bytes. What the pool had written
when the connection dropped is never acknowledged: bytes written to a socket may sit in both
hosts' buffers and in the import's pipeline. So the resume point is the recorded position less
a window of `WINDOW` bytes (64 MiB, 32 blocks of 2 MiB): those blocks are sent again, and bytes
sent again per interruption are bounded by the window whatever the disk's size. A recorded
position lags the truth by at most `RECORD_STEP` bytes or a second (which errs the safe way:
a kill re-sends that much more).

**What proves it.** The resumed stream is read from the start of the export (an export cannot
seek), so the engine digests every block of the source again, including those not sent; before
the commit the whole target disk is read back and every block compared with those digests
(forced for a resumed disk, whatever ``verify_import`` says). A block the window did not cover,
or one someone wrote meanwhile into the staging disk, therefore makes the read-back differ: the
attempt is discarded and sent again from zero, never committed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from xencr import _engine
from xencr.replication import metadata as md
from xencr.replication.decide import TargetPlan
from xencr.replication.ownership import Incomplete
from xencr.state import ResumeDisk, ResumeRow
from xencr.units import human_bytes
from xencr.xapi.errors import XapiError
from xencr.xapi.session import XapiSession

WINDOW = 64 * 1024 * 1024  # bytes sent again after an interruption, at most
# A disk's position is recorded once it has moved by RECORD_STEP bytes, or a second after it last
# was if it moved at all, looked at every RECORD_POLL seconds: a kill re-sends what passed since the
# last record on top of the window, so that stays a fraction of it (at 200 MiB/s: 4 MiB + 10 MiB,
# 20 small writes a second).
RECORD_STEP = 4 * 1024 * 1024
RECORD_POLL = 0.05
RECORD_EVERY = 1.0


def window_blocks(block_size: int) -> int:
    return max(1, WINDOW // max(1, block_size))


def resume_point(position: int, block_size: int, floor: int = 0) -> int:
    """Where to resume a stream that had passed ``position`` blocks: the window before it, and
    never before ``floor`` (the start of a stream that was itself resumed there: what came before
    was confirmed by the window of an earlier interruption)."""
    return max(floor, position - window_blocks(block_size), 0)


def recorded_start(d: ResumeDisk) -> int:
    """Where a recorded disk resumes: the window before its position (block length from its
    stream's length and block count)."""
    return resume_point(d.position, d.stream_bytes // max(1, d.blocks))


class ResumeStore(Protocol):
    """Where attempts and their progress are recorded (`state.StateDB`)."""

    def record_resume(self, row: ResumeRow) -> None: ...
    def update_resume_disk(
        self, job_id: str, vm_uuid: str, target_sr: str, attempt: str, disk: ResumeDisk
    ) -> None: ...
    def resume_of(self, job_id: str, vm_uuid: str, target_sr: str) -> ResumeRow | None: ...
    def forget_resume(
        self, job_id: str, vm_uuid: str, target_sr: str, attempt: str | None = None
    ) -> None: ...


@dataclass(frozen=True)
class DiskShape:
    userdevice: str
    source: str  # the source snapshot's VDI uuid
    base_source: str  # the delta's base on the source ("" for a full)
    base_target: str  # the target VDI the replica disk was cloned from ("" for a full)
    kind: str  # "full" or "delta"
    path: str  # "stream" or "nbd"


@dataclass(frozen=True)
class Shape:
    """An attempt's inputs: what must not have changed for it to be resumed."""

    disks: tuple[DiskShape, ...]

    def text(self) -> str:
        return json.dumps([asdict(d) for d in self.disks], sort_keys=True)

    @staticmethod
    def parse(text: str) -> Shape:
        try:
            return Shape(tuple(DiskShape(**d) for d in json.loads(text)))
        except (ValueError, TypeError):
            return Shape(())


def shape_of(src: XapiSession, ts: XapiSession, plan: TargetPlan) -> Shape:
    def uuid(session: XapiSession, cls: str, ref: str | None) -> str:
        return "" if not ref else str(session.call(f"{cls}.get_uuid", ref))

    return Shape(
        tuple(
            DiskShape(
                dp.disk.userdevice,
                uuid(src, "VDI", dp.disk.vdi),
                uuid(src, "VDI", dp.base_source_vdi),
                uuid(ts, "VDI", dp.base_target_vdi),
                dp.kind,
                dp.path,
            )
            for dp in plan.disks
        )
    )


def changed(was: Shape, now: Shape) -> str | None:
    """Why an attempt made as ``was`` cannot be continued by a plan shaped ``now`` (None: it can)."""
    before = {d.userdevice: d for d in was.disks}
    after = {d.userdevice: d for d in now.disks}
    if set(before) != set(after):
        return f"the disk set changed (was {_devices(before)}, now {_devices(after)})"
    for dev in sorted(after):
        a, b = before[dev], after[dev]
        if a.source != b.source:
            return f"disk {dev} comes from another source disk"
        if (a.base_source, a.base_target) != (b.base_source, b.base_target) or a.kind != b.kind:
            return f"the base of disk {dev} changed"
        if a.path != b.path:
            return f"disk {dev} now goes by {b.path}, not {a.path}"
    return None


def judge(
    src: XapiSession,
    vm: str,
    job_id: str,
    row: ResumeRow,
    kept: Incomplete | None,
    problem: str | None,
    devices: set[str],
) -> tuple[str | None, str | None]:
    """Whether the recorded attempt ``row`` can be resumed, before any plan: the source snapshot's
    ref, or why not. ``kept``/``problem``: what the target's survey set aside for it (`ownership`);
    ``devices``: the disks the job would replicate of the VM now (a disk added or left out since
    calls for a new snapshot)."""
    if kept is None:
        return None, problem or "its replica is gone"
    if not any(d.position > 0 for d in row.disks):
        return None, "nothing of it had been sent"
    was = {d.userdevice for d in Shape.parse(row.shape).disks}
    if was != devices:
        return (
            None,
            f"the disk set changed (was {_devices(dict.fromkeys(was))}, "
            f"now {_devices(dict.fromkeys(devices))})",
        )
    if {dev: uuid for dev, (_, uuid) in kept.disks.items()} != {d.userdevice: d.vdi for d in row.disks}:
        return None, "the replica's disks changed"
    try:
        ref = str(src.api.VM.get_by_uuid(row.snapshot))
        r = src.api.VM.get_record(ref)
    except XapiError as err:
        if err.code in ("UUID_INVALID", "HANDLE_INVALID"):
            return None, f"the source snapshot {row.snapshot} was deleted"
        raise
    if not r["is_a_snapshot"] or str(r["snapshot_of"]) != vm or r["other_config"].get(md.JOB) != job_id:
        return None, f"the source snapshot {row.snapshot} is no longer this job's snapshot of the VM"
    return ref, None


def _devices(d: dict[str, Any]) -> str:
    return ", ".join(sorted(d)) or "none"


def progress_line(d: ResumeDisk, start: int) -> str:
    """ "resumed at 78%: 1.6 GiB left" for a disk resumed at stream block ``start``."""
    if d.blocks <= 0:
        return "resumed at 0%"
    done = min(start, d.blocks) / d.blocks
    left = int(d.stream_bytes * (1 - done))
    return f"resumed at {int(done * 100)}%: {human_bytes(left)} left"


class Recorder:
    """Records one attempt's disk positions (about once a second while a disk is sent, and once
    when it stops), and nothing once the attempt is no longer the one recorded."""

    def __init__(self, store: ResumeStore, job_id: str, vm_uuid: str, target_sr: str, attempt: str) -> None:
        self.store = store
        self.key = (job_id, vm_uuid, target_sr)
        self.attempt = attempt

    def record(self, userdevice: str, vdi: str, counter: _engine.Progress) -> None:
        disk = ResumeDisk(userdevice, vdi, counter.position, counter.blocks, counter.total)
        self.store.update_resume_disk(*self.key, self.attempt, disk)

    @contextmanager
    def watching(self, userdevice: str, vdi: str, counter: _engine.Progress) -> Iterator[None]:
        stop = threading.Event()

        def loop() -> None:
            last, at = counter.position, time.monotonic()
            while not stop.wait(RECORD_POLL):
                pos = counter.position
                step = max(1, RECORD_STEP // max(1, counter.total // max(1, counter.blocks)))
                if pos - last >= step or (pos != last and time.monotonic() - at >= RECORD_EVERY):
                    self.record(userdevice, vdi, counter)
                    last, at = pos, time.monotonic()

        worker = threading.Thread(target=loop, name=f"xencr-resume-{userdevice}", daemon=True)
        worker.start()
        try:
            yield
        finally:
            stop.set()
            worker.join()
            self.record(userdevice, vdi, counter)
