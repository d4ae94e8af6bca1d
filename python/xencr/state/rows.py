"""What the state database holds, as Python values: one frozen dataclass per kind of record,
the values its text columns may take, and the fixed-width UTC text every time is stored as."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

RUNNING = "running"
RUN_OUTCOMES = frozenset({"success", "failure", "partial", "skipped", "interrupted"})
TASK_OUTCOMES = RUN_OUTCOMES
TRANSFERS = frozenset({"full", "delta", "mixed"})

# A map no restore point uses yet may belong to an attempt still running (put before its commit,
# referenced when its task is recorded): only maps untouched for this long are dropped.
MAP_GRACE = timedelta(days=2)


# Fixed width, so text order is time order and `since` filters in SQL, on every engine.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def time_text(t: datetime) -> str:
    """``t`` as stored: UTC, fixed width; a naive time is taken as UTC (the only zone stored)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime(TIME_FORMAT)


def text_time(text: str | None) -> datetime | None:
    """A stored time back (aware, UTC); None stays None."""
    if text is None:
        return None
    # The fixed format written by `time_text` ("...Z"), read by the ISO parser: 50 times faster
    # than strptime, and long histories read thousands (the status page's charts).
    return datetime.fromisoformat(text)


@dataclass(frozen=True)
class RunRow:
    id: int
    job_id: str
    job_name: str
    schedule_id: str | None
    trigger: str
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    error: str | None
    host: str
    pid: int
    process_start: str | None
    worker: str | None = None  # the cluster worker that ran it (PostgreSQL state); None otherwise

    @property
    def duration(self) -> timedelta | None:
        return self.finished_at - self.started_at if self.finished_at is not None else None


@dataclass(frozen=True)
class TaskRow:
    id: int
    run_id: int
    vm_uuid: str
    vm_name: str
    target_sr: str
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    transfer: str | None
    reasons: dict[str, str]  # disk -> why it went full or delta (from task_disks)
    bytes_sent: int
    error: str | None
    restore_point: str | None
    snapshot_time: datetime | None = None  # the restore point's moment (schema 2)
    cleaned: int = 0  # orphans this task cleaned up (schema 2)
    detached: int = 0  # objects this task found detached (schema 3)
    target: str = ""  # pool/SR name when recorded (schema 3; empty before)
    maps: dict[str, str] = field(default_factory=dict)  # disk -> its block map's digest (schema 3)
    health_check: str | None = None  # "passed: ..." / "failed: ...", None: not checked (schema 5)
    paths: dict[str, str] = field(default_factory=dict)  # disk -> the path it took and why (schema 9)
    worker: str | None = None  # the cluster worker that ran it (revision 0002); None otherwise

    @property
    def duration(self) -> timedelta | None:
        return self.finished_at - self.started_at if self.finished_at is not None else None


FAILOVER_STATES = frozenset({"chosen", "prepared", "started", "passed", "failed"})


@dataclass(frozen=True)
class FailoverRow:
    """One VM of a plan's failover: where it is recovered from (the restore point, a replica VM
    UUID on ``pool``), its start group, and how far it got: ``chosen`` (recorded, nothing done),
    ``prepared`` (unprotected or cloned, networks mapped; ``vm`` is the VM to start), ``started``
    (``VM.start`` returned), ``passed``/``failed`` (its gate and hooks)."""

    plan: str
    vm_uuid: str  # the source VM
    vm_name: str
    job: str
    pool: str
    restore_point: str
    group: int
    start_delay: int  # the group's wait after it
    clone: bool
    token: str  # in the clone's name, so a clone a kill left unrecorded is found again
    vm: str | None = None  # the UUID of the VM started (the replica itself, or its clone)
    state: str = "chosen"
    started_at: datetime | None = None
    detail: str | None = None


FAILBACK_STEPS = ("copied", "switched", "attached", "snapshot", "linked", "done")


@dataclass(frozen=True)
class FailbackRow:
    """One VM's failback: the last step done (``FAILBACK_STEPS``, in order; "" for none), its
    attempt id, the DR VM's snapshots (``d1``, ``d2``), the primary's new disks ("<userdevice>=<VDI
    UUID>"), the user's former disks it detached (VDI UUIDs), the job's new source snapshot, and
    why a disk went in full."""

    plan: str
    vm_uuid: str  # the source (primary) VM
    attempt: str
    step: str = ""
    d1: str | None = None
    d2: str | None = None
    disks: tuple[str, ...] = ()
    old_disks: tuple[str, ...] = ()
    snapshot: str | None = None
    detail: str | None = None

    def reached(self, step: str) -> bool:
        return self.step != "" and FAILBACK_STEPS.index(self.step) >= FAILBACK_STEPS.index(step)


@dataclass(frozen=True)
class RehearsedVmRow:
    """One VM of a test failover: its start group (None: not started), when it was started,
    how long from the start to its gate passing, and the gate's one line."""

    name: str
    vm_uuid: str  # the source VM
    clone: str  # the UUID of the clone the test made (destroyed since, unless kept)
    ok: bool
    group: int | None = None
    started_at: datetime | None = None
    boot_seconds: float | None = None
    detail: str | None = None


@dataclass(frozen=True)
class RehearsalRow:
    """A test failover's record, beside its run (trigger ``dr-test``)."""

    plan: str
    run_id: int
    booted: bool
    ok: bool
    kept: bool
    vms: tuple[RehearsedVmRow, ...] = ()


NATIVE_MODES = frozenset({"recover", "test"})
NATIVE_OUTCOMES = frozenset({"running", "done", "failed", "cleaned"})


@dataclass(frozen=True)
class NativeRecoveryRow:
    """One native DR recovery attempt on a pool: what the pool held before it (SR, VM and vApp
    UUIDs), the SRs its DR tasks introduced, the VMs it set out to recover, those it started, the
    isolated network of a test, and where it is (``outcome``: running until done/failed/cleaned)."""

    attempt: str
    pool: str
    mode: str  # "recover" or "test"
    outcome: str = "running"
    srs_before: tuple[str, ...] = ()
    vms_before: tuple[str, ...] = ()
    apps_before: tuple[str, ...] = ()
    introduced: tuple[str, ...] = ()  # SR UUIDs its DR tasks were to introduce
    tasks: tuple[str, ...] = ()  # its DR tasks' refs
    selected: tuple[str, ...] = ()
    started: tuple[str, ...] = ()
    network: str | None = None
    detail: str | None = None
    started_at: datetime | None = None


PLANNED_STEPS = ("final-delta", "shutdown", "last-delta", "failover", "done")
PLANNED_OUTCOMES = frozenset({"running", "aborted", "done"})


@dataclass(frozen=True)
class ResumeDisk:
    """One disk of an incomplete attempt: its target VDI and how far its stream had passed
    (`_engine.Progress.position`: blocks, in stream order) when last recorded."""

    userdevice: str
    vdi: str  # the target VDI's uuid
    position: int = 0
    blocks: int = 0  # blocks in the stream (0 until its head was read)
    stream_bytes: int = 0  # the stream's length (0 until known)


@dataclass(frozen=True)
class ResumeRow:
    """An attempt left incomplete (`replication.resume`): its replica on the target, the source
    snapshot it copies and its inputs (``shape``: `resume.Shape` as text), per disk its progress."""

    job_id: str
    vm_uuid: str
    target_sr: str
    attempt: str
    snapshot: str  # the source snapshot's uuid
    replica: str  # the replica VM's uuid on the target
    shape: str
    disks: tuple[ResumeDisk, ...] = ()
    started_at: datetime | None = None


@dataclass(frozen=True)
class PlannedRow:
    """A plan's planned failover: the step it reached (``PLANNED_STEPS``, in order), whether it
    is ``running``, ``aborted`` (``detail`` says why) or ``done``, and the source VMs (UUIDs) it
    shut down."""

    plan: str
    step: str
    outcome: str = "running"
    halted: tuple[str, ...] = ()
    detail: str | None = None
    started_at: datetime | None = None  # set when recorded
    updated_at: datetime | None = None


@dataclass(frozen=True)
class JobTotals:
    """What a job's whole history adds up to (metrics' counters: they survive restarts because
    they are recomputed from here). Running tasks are not counted until they finish."""

    job_id: str
    job_name: str  # as recorded by its newest run
    tasks: dict[str, int]  # outcome -> finished tasks
    bytes_sent: dict[str, int]  # transfer ("full", "delta", "mixed", or "" when none) -> bytes
    full_disks: dict[str, int]  # reason -> disks sent in full by successful tasks
    cleaned: int  # orphans cleaned up
    last_started: datetime  # the newest run's start
    last_finished: RunRow | None  # the newest finished run


@dataclass
class WorkerTotals:
    """What the tasks a cluster worker ran add up to (its metrics' counters)."""

    worker: str
    tasks: dict[str, int]  # outcome -> finished tasks
    bytes_sent: int


@dataclass(frozen=True)
class RunSums:
    """What one run's finished tasks add up to (the status page's chart of a run)."""

    run_id: int
    bytes_sent: dict[str, int]  # transfer ("full", "delta", "mixed", or "" when none) -> bytes
    tasks: dict[str, int]  # outcome -> tasks


class PointRow(NamedTuple):
    """A successful task that made a restore point: the light columns only (no disks). A tuple:
    long histories read tens of thousands (the status page's charts)."""

    task_id: int
    run_id: int
    vm_uuid: str
    vm_name: str
    target_sr: str
    target: str
    restore_point: str
    snapshot_time: datetime
    finished_at: datetime | None
    transfer: str | None
    bytes_sent: int
