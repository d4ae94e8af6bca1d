"""Run history in SQLite: one table per concept (runs, tasks, the reasons of each disk's transfer),
and the block map of each restore point disk (`blockmap`), kept while a restore point uses it.

Several processes may share the file (the daemon and a `xencr run` started by hand): WAL journal,
a busy timeout, and short ``BEGIN IMMEDIATE`` write transactions. The schema grows by numbered
migrations appended to ``MIGRATIONS``; a database stamped with a newer version is refused rather
than misread.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from xencr.replication.blockmap import BlockMap

RUNNING = "running"
RUN_OUTCOMES = frozenset({"success", "failure", "partial", "skipped", "interrupted"})
TASK_OUTCOMES = RUN_OUTCOMES
TRANSFERS = frozenset({"full", "delta", "mixed"})

# MIGRATIONS[i] takes the schema from version i to i + 1. Append only; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL,
            job_name TEXT NOT NULL,
            schedule_id TEXT,
            trigger TEXT NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            outcome TEXT NOT NULL DEFAULT 'running',
            error TEXT,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            process_start TEXT
        )""",
        "CREATE INDEX runs_by_job ON runs (job_id, started_at)",
        "CREATE INDEX runs_by_start ON runs (started_at)",
        "CREATE INDEX runs_by_outcome ON runs (outcome)",
        """CREATE TABLE tasks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            vm_uuid TEXT NOT NULL,
            vm_name TEXT NOT NULL,
            target_sr TEXT NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            outcome TEXT NOT NULL DEFAULT 'running',
            transfer TEXT,
            bytes_sent INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            restore_point TEXT
        )""",
        "CREATE INDEX tasks_by_run ON tasks (run_id)",
        "CREATE INDEX tasks_by_vm_target ON tasks (vm_uuid, target_sr, id)",
        """CREATE TABLE task_disks (
            task_id INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            disk TEXT NOT NULL,
            reason TEXT NOT NULL,
            PRIMARY KEY (task_id, disk)
        )""",
    ),
    (
        # When the restore point was taken (its age is what the RPO measures, not the task's end),
        # orphans a task cleaned up, and the scheduler's fire times per (job, schedule).
        "ALTER TABLE tasks ADD COLUMN snapshot_time TEXT",
        "ALTER TABLE tasks ADD COLUMN cleaned INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE schedule_fires (
            job_id TEXT NOT NULL,
            schedule_id TEXT NOT NULL,
            last_fire TEXT,
            next_fire TEXT,
            PRIMARY KEY (job_id, schedule_id)
        )""",
    ),
    (
        # Objects a task found detached; each restore point disk's block map (`blockmap`): the map
        # digest per task disk, the maps themselves by digest (compressed, shared by equal content),
        # and which restore point disk uses which map, so that maps are dropped once none does.
        "ALTER TABLE tasks ADD COLUMN detached INTEGER NOT NULL DEFAULT 0",
        # The target as people name it (pool/SR name at the time), beside its SR UUID.
        "ALTER TABLE tasks ADD COLUMN target TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE task_disks ADD COLUMN map TEXT",
        """CREATE TABLE block_maps (
            digest TEXT PRIMARY KEY,
            data BLOB NOT NULL,
            blocks INTEGER NOT NULL,
            touched_at TEXT NOT NULL
        )""",
        """CREATE TABLE map_refs (
            restore_point TEXT NOT NULL,
            disk TEXT NOT NULL,
            digest TEXT NOT NULL,
            PRIMARY KEY (restore_point, disk)
        )""",
        "CREATE INDEX map_refs_by_digest ON map_refs (digest)",
    ),
    (
        # Failovers (`dr.failover`): one row per plan and source VM, written before anything is
        # done to it, so a failover run again after a kill continues and never starts a VM twice.
        """CREATE TABLE failovers (
            plan TEXT NOT NULL,
            vm_uuid TEXT NOT NULL,
            vm_name TEXT NOT NULL,
            job TEXT NOT NULL,
            pool TEXT NOT NULL,
            restore_point TEXT NOT NULL,
            grp INTEGER NOT NULL,
            start_delay INTEGER NOT NULL,
            clone INTEGER NOT NULL,
            token TEXT NOT NULL,
            vm TEXT,
            state TEXT NOT NULL,
            started_at TEXT,
            detail TEXT,
            recorded_at TEXT NOT NULL,
            PRIMARY KEY (plan, vm_uuid)
        )""",
    ),
    (
        # The health check of the task's new restore point (`health.HealthResult.line`): NULL
        # when none ran, else "passed: ..." or "failed: ...".
        "ALTER TABLE tasks ADD COLUMN health_check TEXT",
    ),
    (
        # Planned failovers (`dr.planned`): the step a plan's planned failover reached, and the
        # source VMs it shut down (so an abort, even a later attempt's, says how to restart them).
        # Its own table: a `failovers` row needs the restore point, known only after the last
        # delta, and makes `xencr failover PLAN` continue it.
        """CREATE TABLE planned_failovers (
            plan TEXT PRIMARY KEY,
            step TEXT NOT NULL,
            outcome TEXT NOT NULL,
            halted TEXT NOT NULL,
            detail TEXT,
            started_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
    ),
    (
        # Failbacks (`dr.failback`): the step each failed-over VM's failback reached and the
        # objects it made (recorded before the next step), so a rerun continues.
        """CREATE TABLE failbacks (
            plan TEXT NOT NULL,
            vm_uuid TEXT NOT NULL,
            step TEXT NOT NULL,
            attempt TEXT NOT NULL,
            d1 TEXT,
            d2 TEXT,
            disks TEXT NOT NULL,
            old_disks TEXT NOT NULL,
            snapshot TEXT,
            detail TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (plan, vm_uuid)
        )""",
    ),
    (
        # Native DR recoveries (`dr.native.recover`): what each attempt found before it changed
        # anything and what it made, recorded before each step, so a rerun continues or cleans up.
        """CREATE TABLE native_recoveries (
            attempt TEXT PRIMARY KEY,
            pool TEXT NOT NULL,
            mode TEXT NOT NULL,
            outcome TEXT NOT NULL,
            srs_before TEXT NOT NULL,
            vms_before TEXT NOT NULL,
            apps_before TEXT NOT NULL,
            introduced TEXT NOT NULL,
            tasks TEXT NOT NULL,
            selected TEXT NOT NULL,
            started TEXT NOT NULL,
            network TEXT,
            detail TEXT,
            started_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
    ),
    (
        # The path each disk took ("NBD + CBT", "stream: no NBD network on pool a"...), beside
        # the full/delta reason.
        "ALTER TABLE task_disks ADD COLUMN path TEXT",
        # A test failover's VMs (`monitor.rehearsals`): their start group, when each started, how
        # long its gate took; the run row (trigger dr-test) has the outcome.
        """CREATE TABLE rehearsals (
            run_id INTEGER PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE,
            plan TEXT NOT NULL,
            booted INTEGER NOT NULL,
            ok INTEGER NOT NULL,
            kept INTEGER NOT NULL
        )""",
        """CREATE TABLE rehearsal_vms (
            run_id INTEGER NOT NULL REFERENCES rehearsals (run_id) ON DELETE CASCADE,
            vm_uuid TEXT NOT NULL,
            name TEXT NOT NULL,
            clone TEXT NOT NULL,
            ok INTEGER NOT NULL,
            grp INTEGER,
            started_at TEXT,
            boot_seconds REAL,
            detail TEXT,
            PRIMARY KEY (run_id, name)
        )""",
    ),
    (
        # Attempts left incomplete by a kill, a timeout or a dropped link (`replication.resume`):
        # the replica kept for the next run to resume, what it was made of, and per disk how far
        # its stream had passed when last recorded.
        """CREATE TABLE resumes (
            job_id TEXT NOT NULL,
            vm_uuid TEXT NOT NULL,
            target_sr TEXT NOT NULL,
            attempt TEXT NOT NULL,
            snapshot TEXT NOT NULL,
            replica TEXT NOT NULL,
            shape TEXT NOT NULL,
            started_at TEXT NOT NULL,
            PRIMARY KEY (job_id, vm_uuid, target_sr)
        )""",
        """CREATE TABLE resume_disks (
            job_id TEXT NOT NULL,
            vm_uuid TEXT NOT NULL,
            target_sr TEXT NOT NULL,
            userdevice TEXT NOT NULL,
            vdi TEXT NOT NULL,
            position INTEGER NOT NULL DEFAULT 0,
            blocks INTEGER NOT NULL DEFAULT 0,
            stream_bytes INTEGER NOT NULL DEFAULT 0,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (job_id, vm_uuid, target_sr, userdevice),
            FOREIGN KEY (job_id, vm_uuid, target_sr) REFERENCES resumes (job_id, vm_uuid, target_sr)
                ON DELETE CASCADE
        )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
# A map no restore point uses yet may belong to an attempt still running (put before its commit,
# referenced when its task is recorded): only maps untouched for this long are dropped.
MAP_GRACE = timedelta(days=2)

# Fixed width, so text order is time order and `since` filters in SQL.
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class StateError(Exception):
    """The state database cannot be used (newer schema, not a database, unwritable)."""


def _to_text(t: datetime) -> str:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)  # naive: taken as UTC, the only zone stored here
    return t.astimezone(UTC).strftime(_TIME_FORMAT)


def _from_text(text: str | None) -> datetime | None:
    if text is None:
        return None
    # The fixed format written by `_to_text` ("...Z"), read by the ISO parser: 50 times faster
    # than strptime, and long histories read thousands (the status page's charts).
    return datetime.fromisoformat(text)


def _now() -> datetime:
    return datetime.now(UTC)


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


def _process_start(pid: int) -> str | None:
    """Boot id and start tick of a process: with the pid, it names one process for good (a reused
    pid has another start). ``None`` where /proc does not tell (the pid alone is used then)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may hold spaces, so count after its ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return f"{boot}/{fields[19]}" if len(fields) > 19 else None


def _process_alive(pid: int, start: str | None) -> bool:
    if start is not None:
        return _process_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class StateDB:
    """The history database at ``path`` (created with its directories, migrated to the newest schema).

    Thread-safe (one connection behind a lock); ``clock`` returns aware datetimes (tests pass a
    fake one).
    """

    def __init__(self, path: Path, *, clock: Callable[[], datetime] | None = None) -> None:
        self.path = Path(path)
        self._clock = clock or _now
        self._lock = threading.RLock()
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._process_start = _process_start(self._pid)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are opened explicitly, so their extent is visible here.
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as err:
            raise StateError(f"{self.path}: cannot open the state database: {err}") from None
        try:
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._setup_with_retries()
        except sqlite3.DatabaseError as err:
            self._db.close()
            raise StateError(f"{self.path}: not a usable state database: {err}") from None
        except StateError:
            self._db.close()
            raise

    def _setup_with_retries(self, seconds: float = 30.0) -> None:
        """Switching a new file to WAL needs it to itself, and SQLite answers "locked" at once
        rather than waiting on the busy timeout: several processes opening a fresh database
        together (a daemon and a manual run) take turns here."""
        deadline = time.monotonic() + seconds
        delay = 0.01
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._db.execute("PRAGMA foreign_keys = ON")
                self._migrate()
                return
            except sqlite3.OperationalError as err:
                transient = "locked" in str(err) or "busy" in str(err)
                if not transient or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    # -- plumbing

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so two processes
        wait for each other (busy timeout) instead of failing on lock upgrade."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._db.execute(sql, args)
            cur.row_factory = sqlite3.Row
            return list(cur.fetchall())

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            (current,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
            if current > SCHEMA_VERSION:
                raise StateError(
                    f"{self.path}: written by a newer xencr "
                    f"(schema {current}, this one knows {SCHEMA_VERSION})"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version - 1]:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, _to_text(self._clock())),
                )

    @property
    def schema_version(self) -> int:
        (row,) = self._read("SELECT MAX(version) FROM schema_version")
        return int(row[0])

    # -- runs

    def start_run(self, job_id: str, job_name: str, schedule_id: str | None, trigger: str) -> int:
        """Record a run starting now, owned by this process; its id."""
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO runs (job_id, job_name, schedule_id, trigger, started_at, host, pid,"
                " process_start) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    job_name,
                    schedule_id,
                    trigger,
                    _to_text(self._clock()),
                    self._host,
                    self._pid,
                    self._process_start,
                ),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def finish_run(self, run_id: int, outcome: str, error: str | None = None) -> None:
        if outcome not in RUN_OUTCOMES:
            raise ValueError(f"unknown run outcome {outcome!r} (one of {', '.join(sorted(RUN_OUTCOMES))})")
        with self._write() as db:
            cur = db.execute(
                "UPDATE runs SET outcome = ?, error = ?, finished_at = ? WHERE id = ?",
                (outcome, error, _to_text(self._clock()), run_id),
            )
            if cur.rowcount != 1:
                raise KeyError(f"no run {run_id}")

    def runs(
        self, job: str | None = None, since: datetime | None = None, *, limit: int | None = None
    ) -> list[RunRow]:
        """Runs in start order (oldest first); ``job`` is a job name or id; ``since`` keeps the runs
        started at or after it; ``limit`` keeps the newest N."""
        where: list[str] = []
        args: list[Any] = []
        if job is not None:
            where.append("(job_id = ? OR job_name = ?)")
            args += [job, job]
        if since is not None:
            where.append("started_at >= ?")
            args.append(_to_text(since))
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [_run_row(r) for r in reversed(self._read(sql, args))]

    def run(self, run_id: int) -> RunRow:
        rows = self._read("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise KeyError(f"no run {run_id}")
        return _run_row(rows[0])

    # -- tasks

    def start_task(self, run_id: int, vm_uuid: str, vm_name: str, target_sr: str, target: str = "") -> int:
        """Record one VM's transfer to one target starting now; its id."""
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO tasks (run_id, vm_uuid, vm_name, target_sr, target, started_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, vm_uuid, vm_name, target_sr, target, _to_text(self._clock())),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def finish_task(
        self,
        task_id: int,
        outcome: str,
        *,
        transfer: str | None = None,
        reasons: Mapping[str, str] | None = None,
        bytes_sent: int = 0,
        error: str | None = None,
        restore_point: str | None = None,
        snapshot_time: datetime | None = None,
        cleaned: int = 0,
        detached: int = 0,
        maps: Mapping[str, str] | None = None,
        paths: Mapping[str, str] | None = None,
        health_check: str | None = None,
    ) -> None:
        """Record a task's end. ``maps`` (disk -> block map digest) of a task that made
        ``restore_point`` also say that the restore point uses those maps (`release_maps`)."""
        if outcome not in TASK_OUTCOMES:
            raise ValueError(f"unknown task outcome {outcome!r} (one of {', '.join(sorted(TASK_OUTCOMES))})")
        if transfer is not None and transfer not in TRANSFERS:
            raise ValueError(f"unknown transfer {transfer!r} (one of {', '.join(sorted(TRANSFERS))})")
        with self._write() as db:
            cur = db.execute(
                "UPDATE tasks SET outcome = ?, finished_at = ?, transfer = ?, bytes_sent = ?, error = ?,"
                " restore_point = ?, snapshot_time = ?, cleaned = ?, detached = ?, health_check = ?"
                " WHERE id = ?",
                (
                    outcome,
                    _to_text(self._clock()),
                    transfer,
                    bytes_sent,
                    error,
                    restore_point,
                    None if snapshot_time is None else _to_text(snapshot_time),
                    cleaned,
                    detached,
                    health_check,
                    task_id,
                ),
            )
            if cur.rowcount != 1:
                raise KeyError(f"no task {task_id}")
            maps = dict(maps or {})
            db.execute("DELETE FROM task_disks WHERE task_id = ?", (task_id,))
            db.executemany(
                "INSERT INTO task_disks (task_id, disk, reason, map, path) VALUES (?, ?, ?, ?, ?)",
                [
                    (task_id, disk, reason, maps.get(disk), (paths or {}).get(disk))
                    for disk, reason in (reasons or {}).items()
                ],
            )
            if restore_point is not None:
                db.executemany(
                    "INSERT OR REPLACE INTO map_refs (restore_point, disk, digest) VALUES (?, ?, ?)",
                    [(restore_point, disk, digest) for disk, digest in maps.items()],
                )

    def skip_task(
        self, run_id: int, vm_uuid: str, vm_name: str, target_sr: str, reason: str, target: str = ""
    ) -> int:
        """Record a VM/target this run did not attempt (e.g. still busy from a previous run): a
        finished task with outcome 'skipped' and ``reason`` as its error; its id."""
        now = _to_text(self._clock())
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO tasks (run_id, vm_uuid, vm_name, target_sr, target, started_at, finished_at,"
                " outcome, error) VALUES (?, ?, ?, ?, ?, ?, ?, 'skipped', ?)",
                (run_id, vm_uuid, vm_name, target_sr, target, now, now, reason),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def tasks(self, run_id: int) -> list[TaskRow]:
        return self._tasks("WHERE run_id = ? ORDER BY id", (run_id,))

    def all_tasks(self, job: str | None = None, since: datetime | None = None) -> list[TaskRow]:
        """Tasks in id order, of the runs of ``job`` (name or id) started at or after ``since``."""
        where: list[str] = []
        args: list[Any] = []
        if job is not None:
            where.append("(r.job_id = ? OR r.job_name = ?)")
            args += [job, job]
        if since is not None:
            where.append("r.started_at >= ?")
            args.append(_to_text(since))
        clause = "WHERE run_id IN (SELECT r.id FROM runs r" + (
            " WHERE " + " AND ".join(where) if where else ""
        )
        return self._tasks(clause + ") ORDER BY id", args)

    def last_task(self, vm_uuid: str, target_sr: str, *, outcome: str | None = None) -> TaskRow | None:
        """The newest task of this VM to this SR (of any outcome, or only ``outcome``)."""
        sql = "WHERE vm_uuid = ? AND target_sr = ?"
        args: list[Any] = [vm_uuid, target_sr]
        if outcome is not None:
            sql += " AND outcome = ?"
            args.append(outcome)
        rows = self._tasks(sql + " ORDER BY id DESC LIMIT 1", args)
        return rows[0] if rows else None

    def health_checks(self, job: str) -> tuple[list[TaskRow], int]:
        """The newest checked task of each (VM, target SR) among the runs of ``job`` (name or id),
        in id order, and how many of the job's checks ever failed."""
        runs = "SELECT id FROM runs WHERE job_id = ? OR job_name = ?"
        newest = self._tasks(
            f"WHERE id IN (SELECT MAX(id) FROM tasks WHERE health_check IS NOT NULL AND run_id IN ({runs})"
            " GROUP BY vm_uuid, target_sr) ORDER BY id",
            [job, job],
        )
        with self._lock:
            failed = self._read(
                f"SELECT COUNT(*) AS n FROM tasks WHERE health_check LIKE 'failed:%' AND run_id IN ({runs})",
                [job, job],
            )
        return newest, int(failed[0]["n"])

    def newest_tasks(self, job: str, *, outcome: str | None = None) -> list[TaskRow]:
        """The newest task of each (VM, target SR) among the runs of ``job`` (name or id), of any
        outcome or only ``outcome``; in id order."""
        # The job's runs first, then their tasks by run (indexed): a join would scan every task.
        sql = (
            "WHERE id IN (SELECT MAX(t.id) FROM tasks t"
            " WHERE t.run_id IN (SELECT id FROM runs WHERE job_id = ? OR job_name = ?)"
        )
        args: list[Any] = [job, job]
        if outcome is not None:
            sql += " AND t.outcome = ?"
            args.append(outcome)
        return self._tasks(sql + " GROUP BY t.vm_uuid, t.target_sr) ORDER BY id", args)

    def run_sums(self, job: str, since: datetime) -> dict[int, RunSums]:
        """Run id -> its tasks' bytes by transfer and counts by outcome, for the runs of ``job``
        (name or id) started at or after ``since``; running tasks are not counted."""
        rows = self._read(
            "SELECT t.run_id, COALESCE(t.transfer, '') AS transfer, t.outcome, COUNT(*) AS n,"
            " SUM(t.bytes_sent) AS bytes FROM tasks t WHERE t.run_id IN"
            " (SELECT id FROM runs WHERE (job_id = ? OR job_name = ?) AND started_at >= ?)"
            " AND t.outcome != 'running' GROUP BY t.run_id, t.transfer, t.outcome",
            (job, job, _to_text(since)),
        )
        out: dict[int, RunSums] = {}
        for r in rows:
            sums = out.setdefault(r["run_id"], RunSums(r["run_id"], {}, {}))
            sums.bytes_sent[r["transfer"]] = sums.bytes_sent.get(r["transfer"], 0) + r["bytes"]
            sums.tasks[r["outcome"]] = sums.tasks.get(r["outcome"], 0) + r["n"]
        return out

    def points(self, job: str, since: datetime) -> list[PointRow]:
        """The successful tasks of ``job`` (name or id) that made a restore point: every one of
        a run started at or after ``since``, and before it the newest of each (VM, target SR)
        (what was protecting it when the period began); in id order."""
        cols = (
            "t.id, t.run_id, t.vm_uuid, t.vm_name, t.target_sr, t.target, t.restore_point,"
            " COALESCE(t.snapshot_time, t.started_at) AS snap, t.finished_at, t.transfer, t.bytes_sent"
        )
        made = "t.outcome = 'success' AND t.restore_point IS NOT NULL"
        # The job's runs first (by id, then tasks by run: both indexed), the two periods apart.
        rows = self._read(
            "WITH r AS (SELECT id, started_at FROM runs WHERE job_id = ? OR job_name = ?)"
            f" SELECT {cols} FROM tasks t WHERE t.run_id IN (SELECT id FROM r WHERE started_at >= ?)"
            f" AND {made} UNION ALL SELECT {cols} FROM tasks t WHERE t.id IN (SELECT MAX(t.id) FROM tasks t"
            f" WHERE t.run_id IN (SELECT id FROM r WHERE started_at < ?) AND {made}"
            " GROUP BY t.vm_uuid, t.target_sr) ORDER BY 1",
            (job, job, _to_text(since), _to_text(since)),
        )
        parse = datetime.fromisoformat  # `_from_text`, without a call per column
        return [
            PointRow(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                parse(r[7]),
                parse(r[8]) if r[8] else None,
                r[9],
                r[10],
            )
            for r in rows
        ]

    def job_totals(self) -> list[JobTotals]:
        """Per job id ever recorded, the sums of its history, in job id order."""
        with self._lock:
            runs = self._read(
                "SELECT job_id, MAX(id) AS newest, MAX(CASE WHEN outcome != 'running' THEN id END) AS done"
                " FROM runs GROUP BY job_id ORDER BY job_id"
            )
            counts = self._read(
                "SELECT r.job_id, t.outcome, COALESCE(t.transfer, '') AS transfer, COUNT(*) AS n,"
                " SUM(t.bytes_sent) AS bytes, SUM(t.cleaned) AS cleaned"
                " FROM tasks t JOIN runs r ON t.run_id = r.id WHERE t.outcome != 'running'"
                " GROUP BY r.job_id, t.outcome, t.transfer"
            )
            # A disk's reason is "delta" (or continues a Xen Orchestra chain) unless it went full.
            fulls = self._read(
                "SELECT r.job_id, d.reason, COUNT(*) AS n FROM task_disks d"
                " JOIN tasks t ON d.task_id = t.id JOIN runs r ON t.run_id = r.id"
                " WHERE t.outcome = 'success' AND d.reason != 'delta'"
                " AND d.reason NOT LIKE 'continues Xen Orchestra replica %'"
                " GROUP BY r.job_id, d.reason"
            )
        out = []
        for r in runs:
            newest = self.run(r["newest"])
            job_counts = [c for c in counts if c["job_id"] == r["job_id"]]
            tasks: dict[str, int] = {}
            sent: dict[str, int] = {}
            for c in job_counts:
                tasks[c["outcome"]] = tasks.get(c["outcome"], 0) + c["n"]
                sent[c["transfer"]] = sent.get(c["transfer"], 0) + c["bytes"]
            out.append(
                JobTotals(
                    job_id=r["job_id"],
                    job_name=newest.job_name,
                    tasks=tasks,
                    bytes_sent=sent,
                    full_disks={f["reason"]: f["n"] for f in fulls if f["job_id"] == r["job_id"]},
                    cleaned=sum(c["cleaned"] for c in job_counts),
                    last_started=newest.started_at,
                    last_finished=self.run(r["done"]) if r["done"] is not None else None,
                )
            )
        return out

    def _tasks(self, clause: str, args: Sequence[Any]) -> list[TaskRow]:
        with self._lock:
            rows = self._read(f"SELECT * FROM tasks {clause}", args)
            ids = [r["id"] for r in rows]
            reasons: dict[int, dict[str, str]] = {i: {} for i in ids}
            maps: dict[int, dict[str, str]] = {i: {} for i in ids}
            paths: dict[int, dict[str, str]] = {i: {} for i in ids}
            if ids:
                marks = ",".join("?" * len(ids))
                for r in self._read(
                    f"SELECT task_id, disk, reason, map, path FROM task_disks WHERE task_id IN ({marks})"
                    " ORDER BY disk",
                    ids,
                ):
                    reasons[r["task_id"]][r["disk"]] = r["reason"]
                    if r["map"] is not None:
                        maps[r["task_id"]][r["disk"]] = r["map"]
                    if r["path"] is not None:
                        paths[r["task_id"]][r["disk"]] = r["path"]
        return [_task_row(r, reasons[r["id"]], maps[r["id"]], paths[r["id"]]) for r in rows]

    # -- block maps

    def put_map(self, block_map: BlockMap) -> str:
        """Keep a block map (once per content); its digest."""
        digest = block_map.digest
        data = block_map.to_bytes()
        with self._write() as db:
            # Touched again when put again: an attempt about to use it keeps it from `release_maps`.
            db.execute(
                "INSERT INTO block_maps (digest, data, blocks, touched_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (digest) DO UPDATE SET touched_at = excluded.touched_at",
                (digest, data, len(block_map.blocks), _to_text(self._clock())),
            )
        return digest

    def get_map(self, digest: str) -> BlockMap | None:
        rows = self._read("SELECT data FROM block_maps WHERE digest = ?", (digest,))
        return BlockMap.from_bytes(bytes(rows[0]["data"])) if rows else None

    def release_maps(self, restore_points: Iterable[str]) -> int:
        """These restore points are gone (retention destroyed them): forget which maps they used,
        and drop the maps no restore point uses any more (those untouched for `MAP_GRACE`: a
        running attempt's map is not used by anything yet). Returns the number dropped."""
        points = list(restore_points)
        cutoff = _to_text(self._clock() - MAP_GRACE)
        with self._write() as db:
            db.executemany("DELETE FROM map_refs WHERE restore_point = ?", [(p,) for p in points])
            cur = db.execute(
                "DELETE FROM block_maps WHERE touched_at < ? AND digest NOT IN (SELECT digest FROM map_refs)",
                (cutoff,),
            )
            return cur.rowcount

    def map_bytes(self) -> int:
        """What the kept block maps take in the database (compressed)."""
        (row,) = self._read("SELECT COALESCE(SUM(LENGTH(data)), 0) AS n FROM block_maps")
        return int(row["n"])

    # -- schedules

    def set_fire(
        self, job_id: str, schedule_id: str, *, last: datetime | None, next: datetime | None
    ) -> None:
        """Record a schedule's last and next fire times (the daemon's view, shown by status)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO schedule_fires (job_id, schedule_id, last_fire, next_fire) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (job_id, schedule_id) DO UPDATE SET"
                " last_fire = excluded.last_fire, next_fire = excluded.next_fire",
                (
                    job_id,
                    schedule_id,
                    None if last is None else _to_text(last),
                    None if next is None else _to_text(next),
                ),
            )

    def fires(self) -> dict[tuple[str, str], tuple[datetime | None, datetime | None]]:
        """(job_id, schedule_id) -> (last fire, next fire) as recorded by ``set_fire``."""
        return {
            (r["job_id"], r["schedule_id"]): (_from_text(r["last_fire"]), _from_text(r["next_fire"]))
            for r in self._read("SELECT * FROM schedule_fires ORDER BY job_id, schedule_id")
        }

    # -- failovers

    def record_failover(self, rows: Iterable[FailoverRow]) -> None:
        """Record a failover's VMs before anything is done to them (one transaction)."""
        with self._write() as db:
            for r in rows:
                db.execute(
                    "INSERT INTO failovers (plan, vm_uuid, vm_name, job, pool, restore_point, grp,"
                    " start_delay, clone, token, vm, state, started_at, detail, recorded_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        r.plan,
                        r.vm_uuid,
                        r.vm_name,
                        r.job,
                        r.pool,
                        r.restore_point,
                        r.group,
                        r.start_delay,
                        int(r.clone),
                        r.token,
                        r.vm,
                        r.state,
                        None if r.started_at is None else _to_text(r.started_at),
                        r.detail,
                        _to_text(self._clock()),
                    ),
                )

    def failover_rows(self, plan: str) -> list[FailoverRow]:
        """The recorded VMs of a plan's failover, in start order (group, then name)."""
        rows = self._read("SELECT * FROM failovers WHERE plan = ? ORDER BY grp, vm_name, vm_uuid", (plan,))
        return [
            FailoverRow(
                plan=r["plan"],
                vm_uuid=r["vm_uuid"],
                vm_name=r["vm_name"],
                job=r["job"],
                pool=r["pool"],
                restore_point=r["restore_point"],
                group=r["grp"],
                start_delay=r["start_delay"],
                clone=bool(r["clone"]),
                token=r["token"],
                vm=r["vm"],
                state=r["state"],
                started_at=_from_text(r["started_at"]),
                detail=r["detail"],
            )
            for r in rows
        ]

    def update_failover(
        self,
        plan: str,
        vm_uuid: str,
        state: str,
        *,
        vm: str | None = None,
        started_at: datetime | None = None,
        detail: str | None = None,
    ) -> None:
        """Move one VM of a failover on; ``vm``, ``started_at`` and ``detail`` are kept when None."""
        if state not in FAILOVER_STATES:
            raise ValueError(f"unknown failover state {state!r}")
        with self._write() as db:
            cur = db.execute(
                "UPDATE failovers SET state = ?, vm = COALESCE(?, vm),"
                " started_at = COALESCE(?, started_at), detail = COALESCE(?, detail)"
                " WHERE plan = ? AND vm_uuid = ?",
                (state, vm, None if started_at is None else _to_text(started_at), detail, plan, vm_uuid),
            )
            if cur.rowcount != 1:
                raise KeyError(f"no failover of VM {vm_uuid} in plan {plan!r}")

    def forget_failover(self, plan: str, vm_uuid: str) -> None:
        """Drop a VM's failover row (it failed back): a later failover of the plan chooses anew."""
        with self._write() as db:
            db.execute("DELETE FROM failovers WHERE plan = ? AND vm_uuid = ?", (plan, vm_uuid))

    # -- failbacks

    def record_failback(self, row: FailbackRow) -> None:
        """Record (replace) where one VM's failback is."""
        if row.step not in ("", *FAILBACK_STEPS):
            raise ValueError(f"unknown failback step {row.step!r}")
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO failbacks (plan, vm_uuid, step, attempt, d1, d2, disks,"
                " old_disks, snapshot, detail, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.plan,
                    row.vm_uuid,
                    row.step,
                    row.attempt,
                    row.d1,
                    row.d2,
                    " ".join(row.disks),
                    " ".join(row.old_disks),
                    row.snapshot,
                    row.detail,
                    _to_text(self._clock()),
                ),
            )

    def failbacks(self, plan: str) -> dict[str, FailbackRow]:
        """Source VM UUID -> its recorded failback, for a plan."""
        rows = self._read("SELECT * FROM failbacks WHERE plan = ?", (plan,))
        return {
            r["vm_uuid"]: FailbackRow(
                plan=r["plan"],
                vm_uuid=r["vm_uuid"],
                attempt=r["attempt"],
                step=r["step"],
                d1=r["d1"],
                d2=r["d2"],
                disks=tuple(r["disks"].split()),
                old_disks=tuple(r["old_disks"].split()),
                snapshot=r["snapshot"],
                detail=r["detail"],
            )
            for r in rows
        }

    # -- planned failovers

    def record_planned(self, row: PlannedRow) -> None:
        """Record where a plan's planned failover is (replacing what was recorded); ``started_at``
        is kept from the recorded row of a running attempt, else now."""
        if row.step not in PLANNED_STEPS or row.outcome not in PLANNED_OUTCOMES:
            raise ValueError(f"unknown planned failover step {row.step!r} / outcome {row.outcome!r}")
        now = _to_text(self._clock())
        started = now if row.started_at is None else _to_text(row.started_at)
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO planned_failovers"
                " (plan, step, outcome, halted, detail, started_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row.plan, row.step, row.outcome, " ".join(row.halted), row.detail, started, now),
            )

    def planned(self, plan: str) -> PlannedRow | None:
        """The recorded planned failover of a plan (None: never run)."""
        rows = self._read("SELECT * FROM planned_failovers WHERE plan = ?", (plan,))
        if not rows:
            return None
        r = rows[0]
        return PlannedRow(
            plan=r["plan"],
            step=r["step"],
            outcome=r["outcome"],
            halted=tuple(r["halted"].split()),
            detail=r["detail"],
            started_at=_from_text(r["started_at"]),
            updated_at=_from_text(r["updated_at"]),
        )

    # -- test failovers

    def record_rehearsal(self, r: RehearsalRow) -> None:
        """Record (replace) a finished test failover's VMs."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO rehearsals (run_id, plan, booted, ok, kept) VALUES (?, ?, ?, ?, ?)",
                (r.run_id, r.plan, int(r.booted), int(r.ok), int(r.kept)),
            )
            db.execute("DELETE FROM rehearsal_vms WHERE run_id = ?", (r.run_id,))
            db.executemany(
                "INSERT INTO rehearsal_vms (run_id, vm_uuid, name, clone, ok, grp, started_at,"
                " boot_seconds, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.run_id,
                        v.vm_uuid,
                        v.name,
                        v.clone,
                        int(v.ok),
                        v.group,
                        _to_text(v.started_at) if v.started_at else None,
                        v.boot_seconds,
                        v.detail,
                    )
                    for v in r.vms
                ],
            )

    def rehearsal(self, run_id: int) -> RehearsalRow | None:
        """A test failover's record (None: none kept, e.g. a test cut short)."""
        rows = self._read("SELECT * FROM rehearsals WHERE run_id = ?", (run_id,))
        if not rows:
            return None
        r = rows[0]
        vms = tuple(
            RehearsedVmRow(
                name=v["name"],
                vm_uuid=v["vm_uuid"],
                clone=v["clone"],
                ok=bool(v["ok"]),
                group=v["grp"],
                started_at=_from_text(v["started_at"]),
                boot_seconds=v["boot_seconds"],
                detail=v["detail"],
            )
            for v in self._read("SELECT * FROM rehearsal_vms WHERE run_id = ? ORDER BY name", (run_id,))
        )
        return RehearsalRow(r["plan"], r["run_id"], bool(r["booted"]), bool(r["ok"]), bool(r["kept"]), vms)

    # -- native DR recoveries

    def record_native(self, row: NativeRecoveryRow) -> None:
        """Record (replace) where a native recovery attempt is."""
        if row.mode not in NATIVE_MODES or row.outcome not in NATIVE_OUTCOMES:
            raise ValueError(f"native recovery: unknown mode/outcome {row.mode!r}/{row.outcome!r}")
        now = _to_text(self._clock())
        started = now if row.started_at is None else _to_text(row.started_at)
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO native_recoveries (attempt, pool, mode, outcome, srs_before,"
                " vms_before, apps_before, introduced, tasks, selected, started, network, detail,"
                " started_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.attempt,
                    row.pool,
                    row.mode,
                    row.outcome,
                    " ".join(row.srs_before),
                    " ".join(row.vms_before),
                    " ".join(row.apps_before),
                    " ".join(row.introduced),
                    " ".join(row.tasks),
                    " ".join(row.selected),
                    " ".join(row.started),
                    row.network,
                    row.detail,
                    started,
                    now,
                ),
            )

    def native_recoveries(self, pool: str | None = None, *, running: bool = False) -> list[NativeRecoveryRow]:
        """Native recovery attempts, oldest first (of one pool; only unfinished ones)."""
        sql, args = "SELECT * FROM native_recoveries WHERE 1 = 1", []
        if pool is not None:
            sql, args = sql + " AND pool = ?", [pool]
        if running:
            sql += " AND outcome = 'running'"
        return [
            NativeRecoveryRow(
                attempt=r["attempt"],
                pool=r["pool"],
                mode=r["mode"],
                outcome=r["outcome"],
                srs_before=tuple(r["srs_before"].split()),
                vms_before=tuple(r["vms_before"].split()),
                apps_before=tuple(r["apps_before"].split()),
                introduced=tuple(r["introduced"].split()),
                tasks=tuple(r["tasks"].split()),
                selected=tuple(r["selected"].split()),
                started=tuple(r["started"].split()),
                network=r["network"],
                detail=r["detail"],
                started_at=_from_text(r["started_at"]),
            )
            for r in self._read(sql + " ORDER BY started_at, attempt", args)
        ]

    # -- incomplete attempts kept for a resume

    def record_resume(self, row: ResumeRow) -> None:
        """Record (replace) an attempt that may be resumed, with its disks at their positions."""
        now = _to_text(self._clock())
        started = now if row.started_at is None else _to_text(row.started_at)
        key = (row.job_id, row.vm_uuid, row.target_sr)
        with self._write() as db:
            db.execute("DELETE FROM resumes WHERE job_id = ? AND vm_uuid = ? AND target_sr = ?", key)
            db.execute(
                "INSERT INTO resumes (job_id, vm_uuid, target_sr, attempt, snapshot, replica, shape,"
                " started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, row.attempt, row.snapshot, row.replica, row.shape, started),
            )
            for d in row.disks:
                db.execute(
                    "INSERT INTO resume_disks (job_id, vm_uuid, target_sr, userdevice, vdi, position,"
                    " blocks, stream_bytes, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*key, d.userdevice, d.vdi, d.position, d.blocks, d.stream_bytes, now),
                )

    def update_resume_disk(
        self, job_id: str, vm_uuid: str, target_sr: str, attempt: str, disk: ResumeDisk
    ) -> None:
        """A disk's progress, recorded only while ``attempt`` is still the one recorded."""
        with self._write() as db:
            db.execute(
                "UPDATE resume_disks SET position = ?, blocks = ?, stream_bytes = ?, updated_at = ?"
                " WHERE job_id = ? AND vm_uuid = ? AND target_sr = ? AND userdevice = ? AND EXISTS"
                " (SELECT 1 FROM resumes r WHERE r.job_id = ? AND r.vm_uuid = ? AND r.target_sr = ?"
                " AND r.attempt = ?)",
                (
                    disk.position,
                    disk.blocks,
                    disk.stream_bytes,
                    _to_text(self._clock()),
                    job_id,
                    vm_uuid,
                    target_sr,
                    disk.userdevice,
                    job_id,
                    vm_uuid,
                    target_sr,
                    attempt,
                ),
            )

    def resumes(self, job_id: str | None = None) -> list[ResumeRow]:
        """The incomplete attempts recorded (of one job), oldest first."""
        sql, args = "SELECT * FROM resumes", []
        if job_id is not None:
            sql, args = sql + " WHERE job_id = ?", [job_id]
        disks: dict[tuple[str, str, str], list[ResumeDisk]] = {}
        for d in self._read("SELECT * FROM resume_disks ORDER BY userdevice"):
            disks.setdefault((d["job_id"], d["vm_uuid"], d["target_sr"]), []).append(
                ResumeDisk(
                    d["userdevice"], d["vdi"], int(d["position"]), int(d["blocks"]), int(d["stream_bytes"])
                )
            )
        return [
            ResumeRow(
                job_id=r["job_id"],
                vm_uuid=r["vm_uuid"],
                target_sr=r["target_sr"],
                attempt=r["attempt"],
                snapshot=r["snapshot"],
                replica=r["replica"],
                shape=r["shape"],
                disks=tuple(disks.get((r["job_id"], r["vm_uuid"], r["target_sr"]), ())),
                started_at=_from_text(r["started_at"]),
            )
            for r in self._read(sql + " ORDER BY started_at", args)
        ]

    def resume_of(self, job_id: str, vm_uuid: str, target_sr: str) -> ResumeRow | None:
        return next(
            (r for r in self.resumes(job_id) if (r.vm_uuid, r.target_sr) == (vm_uuid, target_sr)), None
        )

    def forget_resume(self, job_id: str, vm_uuid: str, target_sr: str, attempt: str | None = None) -> None:
        """Drop the record (only if it is still ``attempt``'s, when given)."""
        sql = "DELETE FROM resumes WHERE job_id = ? AND vm_uuid = ? AND target_sr = ?"
        args: list[Any] = [job_id, vm_uuid, target_sr]
        if attempt is not None:
            sql, args = sql + " AND attempt = ?", [*args, attempt]
        with self._write() as db:
            db.execute(sql, args)

    # -- recovery

    def mark_interrupted(self, *, force: bool = False) -> int:
        """Close the runs (and their tasks) left 'running' by processes that no longer exist, as
        'interrupted'; call it when a process starts. Runs of live processes (the daemon while a
        `xencr run` starts, or this process itself) are left alone, and so are those recorded on
        another host; ``force`` closes every running run. Returns the number of runs closed."""
        with self._write() as db:
            db.row_factory = sqlite3.Row
            try:
                running = db.execute(
                    "SELECT id, host, pid, process_start FROM runs WHERE outcome = ?", (RUNNING,)
                ).fetchall()
            finally:
                db.row_factory = None
            dead = [
                r["id"]
                for r in running
                if force or (r["host"] == self._host and not _process_alive(r["pid"], r["process_start"]))
            ]
            now = _to_text(self._clock())
            message = "the process running it ended before it finished"
            for run_id in dead:
                db.execute(
                    "UPDATE runs SET outcome = 'interrupted', finished_at = ?, error = COALESCE(error, ?)"
                    " WHERE id = ?",
                    (now, message, run_id),
                )
            # Tasks still 'running' under a run that is no longer running cannot be running either.
            db.execute(
                "UPDATE tasks SET outcome = 'interrupted', finished_at = ?, error = COALESCE(error, ?)"
                " WHERE outcome = 'running' AND run_id IN (SELECT id FROM runs WHERE outcome != 'running')",
                (now, message),
            )
            return len(dead)


def _run_row(r: sqlite3.Row) -> RunRow:
    started = _from_text(r["started_at"])
    assert started is not None
    return RunRow(
        id=r["id"],
        job_id=r["job_id"],
        job_name=r["job_name"],
        schedule_id=r["schedule_id"],
        trigger=r["trigger"],
        started_at=started,
        finished_at=_from_text(r["finished_at"]),
        outcome=r["outcome"],
        error=r["error"],
        host=r["host"],
        pid=r["pid"],
        process_start=r["process_start"],
    )


def _task_row(
    r: sqlite3.Row, reasons: dict[str, str], maps: dict[str, str], paths: dict[str, str]
) -> TaskRow:
    started = _from_text(r["started_at"])
    assert started is not None
    return TaskRow(
        id=r["id"],
        run_id=r["run_id"],
        vm_uuid=r["vm_uuid"],
        vm_name=r["vm_name"],
        target_sr=r["target_sr"],
        started_at=started,
        finished_at=_from_text(r["finished_at"]),
        outcome=r["outcome"],
        transfer=r["transfer"],
        reasons=reasons,
        bytes_sent=r["bytes_sent"],
        error=r["error"],
        restore_point=r["restore_point"],
        snapshot_time=_from_text(r["snapshot_time"]),
        cleaned=r["cleaned"],
        detached=r["detached"],
        target=r["target"],
        maps=maps,
        health_check=r["health_check"],
        paths=paths,
    )
