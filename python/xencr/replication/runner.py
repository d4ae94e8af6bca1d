"""One run of a job: for each selected VM, clean up, snapshot, then for each target plan,
build the replica, stream every disk, commit, and apply retention; finally keep on the source
only the snapshots the next deltas need.

Runs may overlap (a daemon's ticks, several jobs, a `xencr run` by hand): a VM's target whose
lock is held elsewhere is skipped for this run; disk copies wait for their pools' transfer slots;
a per-VM deadline and a cancel event cut transfers cleanly (tasks cancelled, replica discarded)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from xencr import _engine
from xencr._engine import VhdError
from xencr.config import HealthCheckConfig, TransferPath
from xencr.replication import health, ownership, resume
from xencr.replication import metadata as md
from xencr.replication import path as paths
from xencr.replication import source as srcmod
from xencr.replication import target as tgt
from xencr.replication.blockmap import KEY as MAP_KEY
from xencr.replication.blockmap import BlockMap, MapStore, combine
from xencr.replication.decide import DiskPlan, SeedPending, TargetPlan, plan_target
from xencr.service import limits, locks
from xencr.state import ResumeDisk, ResumeRow
from xencr.units import human_bytes, transfer_text
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.handlers import (
    ConnectionCut,
    RedirectRefused,
    TransferCancelled,
    TransferError,
    TransferTimeout,
)
from xencr.xapi.nbd import nbd_copy_vdi
from xencr.xapi.session import XapiSession
from xencr.xapi.transfer import (
    ReadBack,
    ReadbackMismatch,
    TransferReport,
    copy_vdi,
    export_digests,
    read_back,
    zero_digest,
)

log = logging.getLogger("xencr.replication")


@dataclass(frozen=True)
class JobSpec:
    id: str
    name: str
    schedule_id: str = "manual"
    retention: int = 3
    full_interval: int = 0
    snapshot_mode: str = "normal"
    concurrency: int = 2
    disk_concurrency: int = 2
    rate_limit: int | None = None
    vm_timeout: float | None = None
    retries: int = 1  # further attempts of a target after a data-path failure
    # Set to stop the run: transfers are cut, nothing new starts, tasks end "interrupted".
    cancel: threading.Event | None = field(default=None, compare=False)
    # Per VM/target locks shared with other runs (None: no locking): flock files on one host,
    # database leases across hosts (`service.locks.Locker`).
    locker: locks.Locker | None = field(default=None, compare=False)
    # Where the pools' transfer slots are counted: this process, or every worker of a cluster.
    slots: limits.SlotProvider = field(default=limits.IN_PROCESS, compare=False)
    source_pool: str = ""  # the source pool's name, for its export limit
    max_exports: int | None = None  # disk exports from the source pool at once (None: no limit)
    # Read each disk back from the target before the commit and compare it with what was sent.
    verify_import: bool = True
    # Where each restore point disk's block map is kept (the state database); None: no maps.
    maps: MapStore | None = field(default=None, compare=False)
    # Boot a clone of each new restore point (`health`); None: no check.
    health_check: HealthCheckConfig | None = None
    transfer: TransferPath = "auto"  # `path`: NBD + CBT where offered, else the stream
    nbd_connections: int = 4
    purge_snapshot_data: bool = False  # after the run, keep only the CBT log of kept snapshots
    # Where incomplete attempts and their progress are recorded (`resume`); None: never resumed.
    resumes: resume.ResumeStore | None = field(default=None, compare=False)


CANCELLED = "cancelled: shutting down"
SAME_JOB_BUSY = "skipped: previous run still running"


class LeaseLost(TransferCancelled):
    """The (VM, target) lock lapsed before the commit (a cluster worker cut from the state
    database for longer than its lease): another worker may be at it, so this attempt is not
    committed; it is kept for a resume. ``str()`` says so."""


@dataclass
class Target:
    name: str
    session: XapiSession
    sr: str
    sr_uuid: str
    network_map: dict[str, str] = field(default_factory=dict)
    pool: str = ""  # the target pool's name, for its import limit
    max_imports: int | None = None  # disk imports into that pool at once (None: no limit)


@dataclass
class DiskResult:
    userdevice: str
    name: str
    kind: str
    reason: str
    bytes_sent: int = 0
    blocks: int = 0
    seconds: float = 0.0
    digest: str = ""
    block_indices: list[int] = field(default_factory=list)
    map_digest: str = ""  # the restore point disk's block map (`blockmap`), when maps are kept
    # What was sent, block by block, until the read-back and the map have used it.
    sent: list[tuple[int, str]] = field(default_factory=list, repr=False)
    units: list[tuple[int, str]] = field(default_factory=list, repr=False)  # NBD: per 64 KiB unit
    algorithm: str = _engine.DIGEST_ALGORITHM
    block_size: int = 0
    path: str = "stream"  # "stream" or "nbd"
    path_reason: str = ""  # why that path (`path.choose`)
    bytes_read: int = 0  # read from the source (NBD payload; the stream's length otherwise)
    resumed_from: int = 0  # the stream block the disk was resumed at by a later run (0: none)
    drops: int = 0  # connections dropped during this attempt and resumed from
    resumed: str = ""  # "resumed at 78%: 1.6 GiB left" when it was resumed, by this run or a later one


@dataclass
class TargetResult:
    target: str
    sr_uuid: str
    outcome: str = "failure"
    restore_point: str | None = None
    disks: list[DiskResult] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Objects of this job that xencr leaves alone (`ownership`): one line each, found this run.
    detached: list[str] = field(default_factory=list)
    error: str | None = None
    holder: str | None = None  # skipped: who holds the VM/target ("job web (pid 12) since ...")
    health_check: health.HealthResult | None = None  # of the new restore point, when checked

    @property
    def kind(self) -> str:
        kinds = {d.kind for d in self.disks}
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")

    @property
    def bytes_sent(self) -> int:
        return sum(d.bytes_sent for d in self.disks)


@dataclass
class VmResult:
    vm_uuid: str
    vm_name: str
    snapshot: str | None = None
    snapshot_time: datetime | None = None  # the moment the snapshot (and its restore points) hold
    targets: list[TargetResult] = field(default_factory=list)
    source_pruned: list[str] = field(default_factory=list)
    source_kept: list[str] = field(default_factory=list)  # snapshots of ours left alone: in use
    source_purged: list[str] = field(default_factory=list)  # snapshots whose data was destroyed
    notes: list[str] = field(default_factory=list)  # what xencr changed on the source (CBT on)
    error: str | None = None

    @property
    def outcome(self) -> str:
        if self.error or not self.targets:
            return "failure"
        return _combined(t.outcome for t in self.targets)


@dataclass
class RunReport:
    job: str
    started: datetime
    finished: datetime | None = None
    vms: list[VmResult] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        if not self.vms:
            return "success"
        return _combined(v.outcome for v in self.vms)


def _combined(outcomes: Iterable[str]) -> str:
    """One outcome for several: skips are not failures and do not count when something else ran;
    all skipped is "skipped"; one kind is itself; a mix is "partial"."""
    outs = set(outcomes)
    ran = outs - {"skipped"} or outs
    return ran.pop() if len(ran) == 1 else "partial"


Progress = Callable[[str], None]


class TaskObserver(Protocol):
    """Follows each VM/target task (the state database): ``started`` when a target's work
    begins (its lock taken), ``finished`` once for every target, started or not (skipped,
    interrupted before starting, or failed with its VM's snapshot)."""

    def started(self, vm: VmResult, target: Target) -> None: ...
    def finished(self, vm: VmResult, tr: TargetResult) -> None: ...


class TransferMonitor(Protocol):
    """Follows transfers as they run (the CLI's live display): ``begin`` returns the engine
    counter the transfer updates."""

    def begin(self, label: str, total: int) -> _engine.Progress: ...
    def end(self, label: str) -> None: ...


def _error_line(err: BaseException) -> str:
    return str(err) or type(err).__name__


def replicate_vm(
    src: XapiSession,
    vm: str,
    targets: list[Target],
    job: JobSpec,
    *,
    force_full: bool = False,
    progress: Progress = lambda _: None,
    monitor: TransferMonitor | None = None,
    observer: TaskObserver | None = None,
) -> VmResult:
    rec = src.api.VM.get_record(vm)
    result = VmResult(rec["uuid"], rec["name_label"])
    obs = observer or _NoObserver()
    if _cancelled(job):
        # Nothing new starts once the run is cancelled.
        for t in targets:
            tr = TargetResult(t.name, t.sr_uuid, outcome="interrupted", error=CANCELLED)
            result.targets.append(tr)
            obs.finished(result, tr)
        return result
    held: list[locks.Held] = []
    try:
        active, skipped = _lock_targets(rec, targets, job, held)
        for tr in skipped:
            # No progress line: the caller says it once (`xencr run`'s refusal, the daemon's task).
            obs.finished(result, tr)
        if active:
            _replicate_locked(
                src, vm, rec, active, job, result, force_full, progress, monitor, obs, bool(skipped)
            )
        order = [t.sr_uuid for t in targets]
        result.targets = sorted(skipped + result.targets, key=lambda tr: order.index(tr.sr_uuid))
    finally:
        for lock in held:
            lock.release()
    return result


def _cancelled(job: JobSpec) -> bool:
    return job.cancel is not None and job.cancel.is_set()


class _NoObserver:
    def started(self, vm: VmResult, target: Target) -> None:
        pass

    def finished(self, vm: VmResult, tr: TargetResult) -> None:
        pass


def _lock_targets(
    rec: dict[str, Any], targets: list[Target], job: JobSpec, held: list[locks.Held]
) -> tuple[list[Target], list[TargetResult]]:
    """Take the lock of each target (appended to ``held``); the targets got, and a skipped
    result for each target another run holds."""
    if job.locker is None:
        return list(targets), []
    active, skipped = [], []
    for t in targets:
        lock = job.locker.try_lock(rec["uuid"], t.sr_uuid, job.name, job_id=job.id)
        if lock is not None:
            held.append(lock)
            active.append(t)
            continue
        h = job.locker.read_holder(rec["uuid"], t.sr_uuid)
        who = h.describe() if h is not None else "another run (holder unknown)"
        same = h is not None and (h.job_id == job.id if h.job_id else h.job_name == job.name)
        busy = SAME_JOB_BUSY + (f" on worker {h.worker}" if h is not None and h.worker else "")
        reason = busy if same else f"skipped: being replicated by {who}"
        skipped.append(TargetResult(t.name, t.sr_uuid, outcome="skipped", error=reason, holder=who))
    return active, skipped


def _replicate_locked(
    src: XapiSession,
    vm: str,
    rec: dict[str, Any],
    targets: list[Target],
    job: JobSpec,
    result: VmResult,
    force_full: bool,
    progress: Progress,
    monitor: TransferMonitor | None,
    obs: TaskObserver,
    some_skipped: bool,
) -> None:
    """The VM's run on the targets whose locks are held: clean up, snapshot, each target, prune."""
    for t in targets:
        obs.started(result, t)
    # The per-VM timeout covers every target and attempt; transfers are cut when it passes.
    deadline = time.monotonic() + job.vm_timeout if job.vm_timeout else None
    tidied = {}
    rows = {t.name: _resume_row(job, rec["uuid"], t) for t in targets}
    for t in targets:
        # A health check killed midway left its clone: removed before the survey, which would
        # take a clone not marked yet for a user's copy of a restore point.
        gone = ownership.remove_health_checks(t.session, job.id, rec["uuid"], t.sr_uuid)
        row = rows[t.name]
        tidied[t.name] = ownership.tidy(
            t.session, job.id, rec["uuid"], t.sr_uuid, keep=row.attempt if row else None
        )
        tidied[t.name].removed[:0] = gone
    resuming = _resumable(src, vm, rec, targets, job, rows, tidied, progress)
    # A target where the VM was failed over runs it from its replica: replicating it again there
    # would only send a full copy of a stale source beside it. Skipped until failback (or the
    # administrator removes the mark); its base snapshot on the source is kept for the failback.
    for t in [t for t in targets if tidied[t.name].failed_over]:
        why = f"skipped: {tidied[t.name].failed_over}: the VM runs from its replica on this target"
        tr = _tidied(TargetResult(t.name, t.sr_uuid, outcome="skipped", error=why), tidied[t.name])
        result.targets.append(tr)
        obs.finished(result, tr)
        progress(f"{rec['name_label']} -> {t.name}: {why}")
        some_skipped = True
    targets = [t for t in targets if not tidied[t.name].failed_over]
    if not targets:
        return
    if not some_skipped:
        # A busy target may be another run of this job, whose snapshot may not be tagged yet.
        gone, in_use = srcmod.drop_leftovers(src, vm, job.id)
        for t in targets:
            tidied[t.name].removed += gone
        result.source_kept += in_use
    offered = paths.offer(src, job.source_pool, job.transfer)
    try:
        result.notes += paths.enable_cbt(src, srcmod.disks_of(src, vm), offered)
    except XapiError as err:  # the NBD path then falls back, saying why; the run goes on
        result.notes.append(f"could not enable changed block tracking: {err}")
    for line in result.notes:
        progress(f"{rec['name_label']}: {line}")
    attempt = ownership.new_attempt(job.id)
    previous = srcmod.job_snapshots(src, vm, job.id)
    foreign = srcmod.foreign_snapshots(src, vm, job.id)
    nobak = [d.vdi for d in srcmod.disks_of(src, vm, with_nobak=True) if md.NOBAK in d.name]
    if resuming:
        # The interrupted attempt's snapshot is sent again, not a new one: its replica holds part
        # of it already (`resume`); the next run takes a new snapshot as usual.
        snap = next(iter(resuming.values())).snapshot
        previous = [(ref, r) for ref, r in previous if ref != snap]
        when = md.parse_stamp(src.api.VM.get_other_config(snap).get(md.SNAPSHOT_TIME, "")) or datetime.now(
            UTC
        )
    else:
        try:
            snap, when = srcmod.take_snapshot(
                src, vm, rec, job.id, job.name, job.schedule_id, job.snapshot_mode, nobak, attempt
            )
        except (XapiError, PoolUnreachable) as err:
            result.error = f"snapshot failed: {_error_line(err)}"
            for t in targets:
                obs.finished(
                    result, _tidied(TargetResult(t.name, t.sr_uuid, error=result.error), tidied[t.name])
                )
            return
    snap_rec = src.api.VM.get_record(snap)
    result.snapshot = snap_rec["uuid"]
    result.snapshot_time = when
    disks = srcmod.disks_of(src, snap)
    progress(f"{rec['name_label']}: snapshot {snap_rec['uuid']} ({len(disks)} disk(s))")
    shared = _VmRun(
        src,
        vm,
        rec,
        snap,
        snap_rec,
        when,
        disks,
        previous,
        foreign,
        job,
        force_full,
        progress,
        deadline,
        monitor,
        offered,
        resuming,
    )
    for t in targets:
        tr = _tidied(TargetResult(t.name, t.sr_uuid), tidied[t.name])
        result.targets.append(tr)
        if t.name not in resuming and resuming and _holds(t, job, rec["uuid"], snap_rec["uuid"]):
            tr.outcome = "skipped"
            tr.error = (
                f"skipped: already holds the restore point of snapshot {snap_rec['uuid']} (resumed elsewhere)"
            )
            obs.finished(result, tr)
            continue
        _attempts(shared, t, tr)
        _check_health(shared, t, tr)
        obs.finished(result, tr)
    # Keep, per target, the snapshot of its newest restore point (the next delta's base).
    uuids = {r["uuid"]: s for s, r in srcmod.job_snapshots(src, vm, job.id)}
    keep: set[str] = set()
    for t in targets:
        try:
            points = tgt.restore_points(t.session, job.id, rec["uuid"], t.sr_uuid)
        except (XapiError, PoolUnreachable):
            # Without the target's word, keep everything rather than lose a base.
            keep.update(uuids.values())
            continue
        bases = [uuids[p.copy_of] for p in points if p.copy_of in uuids]
        keep.update(bases[-1:])
        row = _resume_row(job, rec["uuid"], t)
        if row is not None and row.snapshot in uuids:
            keep.add(uuids[row.snapshot])  # an attempt kept for a resume sends it again
    if some_skipped:
        # A busy target may be another run of this job, sending a snapshot not ours to judge;
        # the next run that has every target prunes.
        keep.update(uuids.values())
    pruned, in_use = srcmod.prune_snapshots(src, vm, job.id, keep)
    result.source_pruned = pruned
    result.source_kept += in_use
    if job.purge_snapshot_data and offered.nbd is None:
        # Once every target is done: the next deltas read the new snapshot over NBD and need of
        # the kept ones only their CBT logs (`path`); a stream fallback is then a full.
        for snap_ref in sorted(keep):
            purged = ownership.purge_snapshot_data(src, snap_ref, job.id, rec["uuid"])
            if purged:
                result.source_purged.append(purged)
                progress(f"{rec['name_label']}: {purged}")


@dataclass(frozen=True)
class Kept:
    """An incomplete attempt this run resumes on one target (`resume`)."""

    row: ResumeRow
    replica: ownership.Incomplete
    snapshot: str  # the source snapshot's ref


def _resume_row(job: JobSpec, vm_uuid: str, t: Target) -> ResumeRow | None:
    return None if job.resumes is None else job.resumes.resume_of(job.id, vm_uuid, t.sr_uuid)


def _resumable(
    src: XapiSession,
    vm: str,
    rec: dict[str, Any],
    targets: list[Target],
    job: JobSpec,
    rows: dict[str, ResumeRow | None],
    tidied: dict[str, ownership.Cleaned],
    progress: Progress,
) -> dict[str, Kept]:
    """The targets whose recorded incomplete attempt this run resumes (all of the same source
    snapshot); every other recorded attempt is cleaned up now, saying why (`resume`)."""
    out: dict[str, Kept] = {}
    for t in targets:
        row = rows[t.name]
        if row is None:
            continue
        c = tidied[t.name]
        devices = {d.userdevice for d in srcmod.disks_of(src, vm)}
        snap, why = resume.judge(src, vm, job.id, row, c.kept, c.kept_problem, devices)
        others = {k.row.snapshot for k in out.values()}
        if why is None and others and row.snapshot not in others:
            why = f"another target resumes snapshot {others.pop()}"
        if why is None and snap is not None and c.kept is not None:
            out[t.name] = Kept(row, c.kept, snap)
        else:
            _give_up(t, job, rec, row, str(why), c, progress)
    return out


def _give_up(
    t: Target,
    job: JobSpec,
    rec: dict[str, Any],
    row: ResumeRow,
    why: str,
    c: ownership.Cleaned,
    progress: Progress,
) -> None:
    """Clean up an incomplete attempt that will not be resumed (by the usual rule, now that it
    is no longer kept) and forget its record; the lines say why."""
    progress(f"{rec['name_label']} -> {t.name}: incomplete attempt {row.attempt} not resumed: {why}")
    again = ownership.tidy(t.session, job.id, rec["uuid"], t.sr_uuid)
    c.removed += [f"{line} (not resumed: {why})" for line in again.removed]
    c.detached += [d for d in again.detached if d not in c.detached]
    c.kept = None
    if job.resumes is not None:
        job.resumes.forget_resume(job.id, rec["uuid"], t.sr_uuid, row.attempt)


def _holds(t: Target, job: JobSpec, vm_uuid: str, snap_uuid: str) -> bool:
    """Whether the target's newest restore point is already of that snapshot."""
    points = tgt.restore_points(t.session, job.id, vm_uuid, t.sr_uuid)
    return bool(points) and points[-1].copy_of == snap_uuid


def _tidied(tr: TargetResult, c: ownership.Cleaned) -> TargetResult:
    tr.cleaned = list(c.removed)
    tr.detached = [d.line() for d in c.detached]
    return tr


def _attempts(run: _VmRun, t: Target, tr: TargetResult) -> None:
    """One target, retried after a data-path failure; a timeout or a cancel is final."""
    job, name = run.job, run.rec["name_label"]
    for attempt in range(1, job.retries + 2):
        try:
            _to_target(run, t, tr)
            tr.outcome, tr.error = "success", None
            return
        except RETRYABLE as err:
            if _cancelled(job) or isinstance(err, TransferCancelled):
                tr.outcome = "interrupted"
                tr.error = str(err) if isinstance(err, LeaseLost) else CANCELLED
                run.progress(f"{name} -> {t.name}: {CANCELLED}")
                return
            timed_out = isinstance(err, TransferTimeout) or (
                run.deadline is not None and time.monotonic() > run.deadline
            )
            tr.outcome = "failure"
            if timed_out:
                limit = f" after {job.vm_timeout:g}s" if job.vm_timeout is not None else ""
                tr.error = f"timed out{limit} ({_error_line(err)})"
                run.progress(f"{name} -> {t.name}: {tr.error}")
                return
            tr.error = _error_line(err)
            # A dropped connection or a damaged stream: the attempt was discarded; once more.
            retry = attempt <= job.retries and _worth_retrying(err)
            run.progress(f"{name} -> {t.name}: failed: {tr.error}" + ("; retrying" if retry else ""))
            if not retry:
                return
            tr.warnings.append(f"retried after: {tr.error}")


def _check_health(run: _VmRun, t: Target, tr: TargetResult) -> None:
    """The job's health check of the restore point just committed; its outcome is the check's,
    never the target's."""
    job, name = run.job, run.rec["name_label"]
    if job.health_check is None or tr.outcome != "success" or tr.restore_point is None or _cancelled(job):
        return
    tr.health_check = health.check(
        t.session, tr.restore_point, name, job.id, job.health_check, cancel=job.cancel
    )
    run.progress(f"{name} -> {t.name}: health check {tr.health_check.line()}")


RETRYABLE = (XapiError, PoolUnreachable, TransferError, OSError, VhdError)


def _worth_retrying(err: BaseException) -> bool:
    """Data-path failures may pass on a second attempt; a refusal (a full SR, a bad request) won't."""
    if isinstance(err, XapiError):
        return err.code in ("VDI_IO_ERROR", "TASK_CANCELLED")
    return not isinstance(err, (TransferTimeout, TransferCancelled, SeedPending, RedirectRefused))


def hold(point: str) -> None:
    """Test hook: with XENCR_TEST_HOLD=<point>, announce the point in XENCR_TEST_HOLD_FILE and
    wait there forever (the reliability tests SIGKILL the process at each such point)."""
    if os.environ.get("XENCR_TEST_HOLD") != point:
        return
    Path(os.environ.get("XENCR_TEST_HOLD_FILE", "/dev/null")).write_text(point)
    while True:
        time.sleep(3600)


@dataclass(frozen=True)
class _VmRun:
    """What every target of one VM's run shares: the VM, its new snapshot and the settings."""

    src: XapiSession
    vm: str
    rec: dict[str, Any]
    snap: str
    snap_rec: dict[str, Any]
    when: datetime
    disks: list[srcmod.Disk]
    previous: list[tuple[str, dict[str, Any]]]  # this job's earlier snapshots, oldest first
    foreign: list[tuple[str, dict[str, Any]]]  # other snapshots (a Xen Orchestra base, perhaps)
    job: JobSpec
    force_full: bool
    progress: Progress
    deadline: float | None
    monitor: TransferMonitor | None
    offered: paths.PoolPaths
    # Per target, the incomplete attempt the next try resumes: found by this run's clean-up, or
    # kept by a try whose connection dropped (`_to_target` takes it).
    resuming: dict[str, Kept]


def _to_target(run: _VmRun, t: Target, tr: TargetResult) -> None:
    """One attempt at one target: plan, build the replica, stream every disk, commit, retention.
    Anything it built is destroyed if it fails."""
    src, vm, rec, snap_rec, when, disks = run.src, run.vm, run.rec, run.snap_rec, run.when, run.disks
    job, force_full, progress, deadline, monitor = (
        run.job,
        run.force_full,
        run.progress,
        run.deadline,
        run.monitor,
    )
    ts = t.session
    if _cancelled(job):
        raise TransferCancelled(f"cancelled before {t.name}")
    if deadline is not None and time.monotonic() > deadline:
        raise TransferTimeout(f"the VM's timeout passed before {t.name}")
    plan = plan_target(
        src,
        ts,
        job_id=job.id,
        vm_uuid=rec["uuid"],
        sr_uuid=t.sr_uuid,
        previous=run.previous,
        disks=disks,
        full_interval=job.full_interval,
        force_full=force_full,
        xo_snapshots=run.foreign,
    )
    try:
        plan = paths.choose(src, plan, run.offered, job.transfer)
    except paths.NbdRequired as err:
        raise TransferError(f"{rec['name_label']} -> {t.name}: {err}") from None
    stamp = md.stamp(when)
    kept = _continue(run, t, plan, tr)
    keys = {
        md.JOB: job.id,
        md.SCHEDULE: job.schedule_id,
        md.VM: rec["uuid"],
        md.SR: t.sr_uuid,
        md.COPY_OF: snap_rec["uuid"],
        md.SNAPSHOT_TIME: md.precise(when),
        # Every object this attempt creates carries it; a resumed attempt keeps its own.
        md.ATTEMPT: kept.row.attempt if kept else ownership.new_attempt(job.id),
    }
    hold("before-replica")
    starts: dict[str, int] = {}
    recorder: resume.Recorder | None = None
    if kept is not None:
        replica = kept.replica.vm
        new_vdis = [kept.replica.disks[dp.disk.userdevice][0] for dp in plan.disks]
        recorder = (
            resume.Recorder(job.resumes, job.id, rec["uuid"], t.sr_uuid, kept.row.attempt)
            if job.resumes
            else None
        )
        for rd in kept.row.disks:
            if rd.position > 0:
                starts[rd.userdevice] = resume.recorded_start(rd)
    else:
        # The snapshot has the disks' moment; startup settings (order, delays, HA priority) are
        # reset on snapshots, so they come from the VM itself.
        startup = {
            k: rec[k] for k in ("order", "start_delay", "shutdown_delay", "ha_restart_priority") if k in rec
        }
        replica = tgt.create_replica(ts, snap_rec | startup | {"name_label": rec["name_label"]}, keys)
        new_vdis = []
    recorded = kept is not None
    try:
        if kept is None:
            for dp in plan.disks:
                disk_keys = {k: v for k, v in keys.items() if k != md.COPY_OF} | {
                    md.FULL_COUNT: str(dp.chain)
                }
                vdi = tgt.create_disk(ts, t.sr, dp.disk, dp.base_target_vdi, disk_keys)
                new_vdis.append(vdi)
                tgt.attach(ts, replica, vdi, dp.disk)
            tr.warnings += tgt.copy_vifs(src, vm, ts, replica, t.network_map)
            if job.resumes is not None:
                # From here on a cut leaves the attempt for a resume rather than for the clean-up.
                recorder = _record(run, t, plan, keys[md.ATTEMPT], replica, new_vdis)
                recorded = True
        for dp in plan.disks:
            how = transfer_text(dp.kind, dp.reason) + (f" via {dp.path_reason}" if dp.path_reason else "")
            if dp.disk.userdevice in starts and kept is not None:
                how += "; " + _resumed_line(kept.row, dp.disk.userdevice, starts[dp.disk.userdevice])
            progress(f"{rec['name_label']} -> {t.name}: disk {dp.disk.userdevice} {how}")
        hold("before-transfer")
        with ThreadPoolExecutor(max_workers=max(1, job.disk_concurrency)) as pool:
            pairs = list(zip(plan.disks, new_vdis, strict=True))
            label = f"{rec['name_label']} -> {t.name}"
            results = list(
                pool.map(
                    lambda pv: _send(
                        src,
                        t,
                        pv[0],
                        pv[1],
                        job,
                        deadline,
                        monitor,
                        label,
                        starts.get(pv[0].disk.userdevice, 0),
                        recorder,
                    ),
                    pairs,
                )
            )
        if kept is not None:
            for d in results:
                if d.userdevice in starts:
                    d.resumed = _resumed_line(kept.row, d.userdevice, d.resumed_from)
        for d in results:
            if d.resumed:
                d.reason += f"; {d.resumed}"
        tr.disks = results
        with ThreadPoolExecutor(max_workers=max(1, job.disk_concurrency)) as pool:
            checks = zip(plan.disks, results, new_vdis, strict=True)
            list(pool.map(lambda c: _read_back_and_map(ts, t.name, c[0], c[1], c[2], job, deadline), checks))
        total = sum(d.bytes_sent for d in results)
        kinds = ", ".join(f"disk {d.userdevice} {d.kind}" for d in results)
        name = f"{rec['name_label']} ({stamp})"
        description = (
            f"xencr replica of {rec['name_label']} at {stamp}: {human_bytes(total)} transferred ({kinds})"
        )
        for d, vdi in zip(results, new_vdis, strict=True):
            # What `xencr verify` re-reads and compares: which blocks came, and their digests.
            oc = dict(ts.api.VDI.get_other_config(vdi))
            mapped = {MAP_KEY: d.map_digest} if d.map_digest else {}
            ts.api.VDI.set_other_config(
                vdi, oc | {md.DIGEST: d.digest, md.BLOCKS: md.ranges(d.block_indices)} | mapped
            )
        hold("before-commit")
        if job.locker is not None and not job.locker.still_held(rec["uuid"], t.sr_uuid):
            # A lease lapsed (this worker lost the database for longer than it lasts): another
            # worker may be at this VM and target now; only one attempt may ever commit.
            raise LeaseLost(
                "not committed: the lease on this VM and target lapsed (the state database was out of "
                "reach longer than the lease); the attempt is kept for a resume"
            )
        tgt.commit(ts, replica, new_vdis, keys | {md.BYTES: str(total)}, name, description)
        if job.resumes is not None:
            job.resumes.forget_resume(job.id, rec["uuid"], t.sr_uuid, keys[md.ATTEMPT])
        hold("after-commit")
    except BaseException as err:
        cut = _kept_now(run, t, replica, new_vdis, plan) if recorded and _keep_for_resume(err) else None
        if cut is not None:
            # Left with its record: the next try (this run's retry, or the next run) resumes it.
            run.resuming[t.name] = cut
            log.info(
                "%s -> %s: incomplete attempt %s kept for a resume",
                rec["name_label"],
                t.name,
                keys[md.ATTEMPT],
            )
            raise
        # In-process failure: nothing of this attempt may remain (a kill is cleaned next run).
        ownership.discard(ts, replica, new_vdis)
        if job.resumes is not None:
            job.resumes.forget_resume(job.id, rec["uuid"], t.sr_uuid, keys[md.ATTEMPT])
        raise
    tr.restore_point = str(ts.api.VM.get_uuid(replica))
    seconds = max((d.seconds for d in tr.disks), default=0.0)
    speed = f", {human_bytes(int(tr.bytes_sent / seconds))}/s" if seconds > 0 else ""
    sent = human_bytes(tr.bytes_sent)
    progress(f"{rec['name_label']} -> {t.name}: restore point {tr.restore_point} ({sent}{speed})")
    # Retention: the oldest intact restore points beyond the schedule's count, never the newest;
    # detached replicas are not restore points and are never counted (`ownership`).
    points = tgt.restore_points(ts, job.id, rec["uuid"], t.sr_uuid)
    for rp in points[: max(0, len(points) - max(1, job.retention))]:
        left = ownership.expire(ts, rp)
        if left is None:
            tr.expired.append(rp.uuid)
        else:
            tr.detached.append(left.line())


def _continue(run: _VmRun, t: Target, plan: TargetPlan, tr: TargetResult) -> Kept | None:
    """The incomplete attempt this try resumes on ``t``, if a plan made now has its shape; else
    it is cleaned up (saying why) and None returned."""
    kept = run.resuming.pop(t.name, None)
    if kept is None:
        return None
    why = resume.changed(resume.Shape.parse(kept.row.shape), resume.shape_of(run.src, t.session, plan))
    if why is None and set(kept.replica.disks) != {dp.disk.userdevice for dp in plan.disks}:
        why = "the replica's disks changed"
    if why is None:
        return kept
    c = ownership.Cleaned()
    _give_up(t, run.job, run.rec, kept.row, why, c, run.progress)
    tr.cleaned += c.removed
    tr.detached += [d.line() for d in c.detached]
    tr.warnings.append(f"incomplete attempt {kept.row.attempt} not resumed: {why}")
    return None


def _record(
    run: _VmRun, t: Target, plan: TargetPlan, attempt: str, replica: str, vdis: list[str]
) -> resume.Recorder:
    """Record a new attempt as resumable, its disks at position 0."""
    store, ts = run.job.resumes, t.session
    assert store is not None
    disks = tuple(
        ResumeDisk(dp.disk.userdevice, str(ts.api.VDI.get_uuid(vdi)))
        for dp, vdi in zip(plan.disks, vdis, strict=True)
    )
    row = ResumeRow(
        job_id=run.job.id,
        vm_uuid=run.rec["uuid"],
        target_sr=t.sr_uuid,
        attempt=attempt,
        snapshot=run.snap_rec["uuid"],
        replica=str(ts.api.VM.get_uuid(replica)),
        shape=resume.shape_of(run.src, ts, plan).text(),
        disks=disks,
    )
    store.record_resume(row)
    return resume.Recorder(store, run.job.id, run.rec["uuid"], t.sr_uuid, attempt)


def _keep_for_resume(err: BaseException) -> bool:
    """A cut (a timeout, a cancel, a dropped connection, the process stopping) leaves the attempt
    for a resume; a refusal or a read-back that differs does not (`resume`)."""
    if isinstance(err, (ReadbackMismatch, RedirectRefused, SeedPending)):
        return False
    if isinstance(err, (TransferTimeout, TransferCancelled, KeyboardInterrupt, SystemExit)):
        return True
    return _dropped(err)


def _dropped(err: BaseException) -> bool:
    """A connection cut in mid-transfer, by either pool or the network (`handlers.is_cut`)."""
    return isinstance(err, ConnectionCut)


def _kept_now(run: _VmRun, t: Target, replica: str, vdis: list[str], plan: TargetPlan) -> Kept | None:
    """The attempt just cut, as the next try will resume it; None when no disk got anywhere
    (nothing to gain: it is discarded as before)."""
    store = run.job.resumes
    row = None if store is None else store.resume_of(run.job.id, run.rec["uuid"], t.sr_uuid)
    if row is None or not any(d.position > 0 for d in row.disks):
        return None
    ts = t.session
    try:
        disks = {
            dp.disk.userdevice: (vdi, str(ts.api.VDI.get_uuid(vdi)))
            for dp, vdi in zip(plan.disks, vdis, strict=True)
        }
        uuid = str(ts.api.VM.get_uuid(replica))
    except (XapiError, PoolUnreachable):
        return None  # the target does not answer: the next run's survey decides
    return Kept(row, ownership.Incomplete(row.attempt, replica, uuid, disks), run.snap)


def _resumed_line(row: ResumeRow, userdevice: str, start: int) -> str:
    d = next((d for d in row.disks if d.userdevice == userdevice), None)
    return "" if d is None else resume.progress_line(d, start)


def _send(
    src: XapiSession,
    t: Target,
    dp: DiskPlan,
    vdi: str,
    job: JobSpec,
    deadline: float | None,
    monitor: TransferMonitor | None = None,
    label: str = "",
    start: int = 0,
    recorder: resume.Recorder | None = None,
) -> DiskResult:
    name = f"{label} disk {dp.disk.userdevice}"
    hook = (lambda total: monitor.begin(name, total)) if monitor else None
    # The pools' transfer slots (per-pool limits across runs, or across workers) for this disk.
    slots = []
    if job.max_exports is not None:
        slots.append(limits.Slot("export", job.source_pool, job.max_exports))
    if t.max_imports is not None:
        slots.append(limits.Slot("import", t.pool, t.max_imports))
    try:
        with job.slots.transfer_slots(slots, cancel=job.cancel, deadline=deadline):
            return _copy(src, t.session, dp, vdi, job, deadline, hook, start, recorder)
    except limits.SlotsUnavailable as err:  # a cluster's state database out of reach
        raise TransferError(f"{name}: {err}") from None
    except limits.SlotCancelled as err:
        raise (TransferCancelled if _cancelled(job) else TransferTimeout)(str(err)) from None
    finally:
        if monitor:
            monitor.end(name)


MAX_DROPS = 8  # dropped connections resumed per disk and attempt before the attempt fails


def _copy(
    src: XapiSession,
    ts: XapiSession,
    dp: DiskPlan,
    vdi: str,
    job: JobSpec,
    deadline: float | None,
    hook: Callable[[int], _engine.Progress] | None,
    start: int = 0,
    recorder: resume.Recorder | None = None,
) -> DiskResult:
    """One disk by its path (`path.choose`), from stream block ``start`` (a resume). A connection
    that drops is resumed at once from the window before where it was (`resume`), at most
    `MAX_DROPS` times; the disk's position is recorded meanwhile when a ``recorder`` is given."""
    at, drops, sent_before = start, 0, 0
    uuid = str(ts.api.VDI.get_uuid(vdi)) if recorder is not None else ""
    while True:
        counter = (hook(0) if hook else None) or _engine.Progress()
        try:
            with (
                recorder.watching(dp.disk.userdevice, uuid, counter) if recorder else contextlib.nullcontext()
            ):
                r, read, units = _copy_once(src, ts, dp, vdi, job, deadline, counter, at)
            break
        except RETRYABLE as err:
            if not _dropped(err) or drops >= MAX_DROPS or (_cancelled(job)):
                raise
            sent_before += counter.sent
            drops += 1
            block = counter.total // max(1, counter.blocks)
            was, at = at, resume.resume_point(counter.position, block, floor=at)
            log.warning(
                "disk %s: %s; resuming at stream block %d of %d (passed %d, started at %d)",
                dp.disk.userdevice,
                _error_line(err),
                at,
                counter.blocks,
                counter.position,
                was,
            )
    d = DiskResult(
        dp.disk.userdevice,
        dp.disk.name,
        dp.kind,
        dp.reason,
        sent_before + r.bytes_sent,
        r.blocks,
        r.seconds,
        md.digest_of_list(r.digest_algorithm, r.digests),
        [b for b, _ in r.digests],
        sent=list(r.digests),
        algorithm=r.digest_algorithm,
        block_size=r.block_size,
        path=dp.path,
        path_reason=dp.path_reason,
        bytes_read=read,
        units=units,
        resumed_from=start,
        drops=drops,
    )
    if drops:
        d.resumed = f"resumed after {drops} dropped connection{'s' if drops > 1 else ''}"
    return d


def _copy_once(
    src: XapiSession,
    ts: XapiSession,
    dp: DiskPlan,
    vdi: str,
    job: JobSpec,
    deadline: float | None,
    counter: _engine.Progress,
    start: int,
) -> tuple[TransferReport, int, list[tuple[int, str]]]:
    """One try of `_copy`: the report, the bytes read from the source, and the NBD unit digests."""
    if dp.path == "nbd":
        n = nbd_copy_vdi(
            src,
            dp.disk.vdi,
            ts,
            vdi,
            changed=dp.changed,
            connections=job.nbd_connections,
            rate_limit=job.rate_limit,
            timeout=job.vm_timeout,
            deadline=deadline,
            cancel=job.cancel,
            progress=lambda _total: counter,
            resume_from=start,
        )
        return n, n.bytes_read, list(n.unit_digests)
    r = copy_vdi(
        src,
        dp.disk.vdi,
        ts,
        vdi,
        base_vdi=dp.base_source_vdi,
        rate_limit=job.rate_limit,
        timeout=job.vm_timeout,
        deadline=deadline,
        cancel=job.cancel,
        progress=lambda _total: counter,
        resume_from=start,
    )
    return r, r.stream_length, []


def _read_back_and_map(
    ts: XapiSession,
    target: str,
    dp: DiskPlan,
    d: DiskResult,
    vdi: str,
    job: JobSpec,
    deadline: float | None,
) -> None:
    """Before the commit: read back what this attempt wrote into ``vdi`` (`read_back` raises
    on a difference, and the attempt is discarded and retried), then keep the disk's block map
    (its base's map with the delta's blocks replaced) and set ``d.map_digest``."""
    where = f"target {target} disk {d.userdevice}"
    # A resumed disk is always read back: that is what proves the resume point (`resume`).
    verify = job.verify_import or bool(d.resumed or d.drops)
    if d.path == "nbd" and (verify or job.maps is not None):
        # An NBD delta carries 64 KiB units, not whole blocks: the blocks it touched are read back
        # whole (a delta export against the base), and the map records what the target holds.
        got = export_digests(
            ts, vdi, base=dp.base_target_vdi, deadline=deadline, cancel=job.cancel, units=verify
        )
        if verify:
            _compare_nbd(got, d, where, full=dp.base_target_vdi is None)
        d.sent = got.digests
    elif verify:
        read_back(ts, vdi, d.sent, base=dp.base_target_vdi, where=where, deadline=deadline, cancel=job.cancel)
    if job.maps is not None:
        base: BlockMap | None = None
        missing = ""
        if dp.base_target_vdi is not None:
            key = ts.api.VDI.get_other_config(dp.base_target_vdi).get(MAP_KEY)
            base = job.maps.get_map(key) if key else None
            if base is None:
                missing = "carries no map key" if not key else f"map {key} is not in the state database"
        if missing:
            # Only the delta's blocks are known: the whole disk is read once to know the rest.
            log.warning(
                "%s disk %s: the base %s; reading the whole disk back for its map",
                target,
                d.userdevice,
                missing,
            )
            whole = export_digests(ts, vdi, deadline=deadline, cancel=job.cancel)
            new_map = BlockMap.of_blocks(whole.algorithm, whole.block_size, whole.digests)
        else:
            new_map = combine(base, d.sent, algorithm=d.algorithm, block_size=d.block_size)
        d.map_digest = job.maps.put_map(new_map)
    d.sent = []  # a large disk's list is large; nothing needs it any more


def _compare_nbd(got: ReadBack, d: DiskResult, where: str, *, full: bool) -> None:
    """What the target holds after an NBD transfer against what was read: every 64 KiB unit read
    has the same digest in the target (the blocks it touched read back whole, so every unit of
    them is there), and no block the transfer did not touch came back (a full: unless all zeros,
    which a pool need not allocate)."""
    per_block = max(1, (d.block_size or 2 * 1024 * 1024) // (64 * 1024))
    touched = {u // per_block for u, _ in d.units} | {b for b, _ in d.sent}
    found = dict(got.units)
    bad = sorted({u // per_block for u, h in d.units if found.get(u) != h})
    blocks = dict(got.digests)
    if full:
        zero = zero_digest(got.algorithm, got.block_size)
        blocks = {i: h for i, h in blocks.items() if h != zero}
    stray = sorted(set(blocks) - touched)
    if bad or stray:
        raise ReadbackMismatch(
            f"{where}: read back differs from what was read over NBD: blocks {bad + stray}"
        )


def run_job(
    src: XapiSession,
    vms: list[str],
    targets: list[Target],
    job: JobSpec,
    *,
    force_full: bool = False,
    progress: Progress = lambda _: None,
    monitor: TransferMonitor | None = None,
    observer: TaskObserver | None = None,
) -> RunReport:
    """Replicate ``vms`` (refs on ``src``) to every target; VMs run ``job.concurrency`` at once."""
    report = RunReport(job.name, datetime.now(UTC))

    def one(vm: str) -> VmResult:
        try:
            return replicate_vm(
                src,
                vm,
                targets,
                job,
                force_full=force_full,
                progress=progress,
                monitor=monitor,
                observer=observer,
            )
        except RETRYABLE as err:
            return VmResult("", vm, error=_error_line(err))

    with ThreadPoolExecutor(max_workers=max(1, job.concurrency)) as pool:
        report.vms = list(pool.map(one, vms))
    report.finished = datetime.now(UTC)
    return report
