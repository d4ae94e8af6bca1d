"""`StateDB`: the records (runs, tasks, block maps, fire times, failovers...) in SQLite or
PostgreSQL through SQLAlchemy Core, one short transaction per call.

Several processes may share the database (the daemon and a `xencr run` started by hand; with
PostgreSQL, several hosts): see `engine` for how each engine is set up, `migrate` for the schema.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    CursorResult,
    Executable,
    Select,
    Table,
    and_,
    bindparam,
    case,
    delete,
    exc,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite as lite

from xencr.config import Config, StateLocation
from xencr.credentials import Secret
from xencr.replication.blockmap import BlockMap
from xencr.state import engine as engines
from xencr.state import migrate
from xencr.state.engine import StateError
from xencr.state.rows import (
    FAILBACK_STEPS,
    FAILOVER_STATES,
    MAP_GRACE,
    NATIVE_MODES,
    NATIVE_OUTCOMES,
    PLANNED_OUTCOMES,
    PLANNED_STEPS,
    RUN_OUTCOMES,
    RUNNING,
    TASK_OUTCOMES,
    TRANSFERS,
    FailbackRow,
    FailoverRow,
    JobTotals,
    NativeRecoveryRow,
    PlannedRow,
    PointRow,
    RehearsalRow,
    RehearsedVmRow,
    ResumeDisk,
    ResumeRow,
    RunRow,
    RunSums,
    TaskRow,
    WorkerTotals,
    text_time,
    time_text,
)
from xencr.state.schema import (
    block_maps,
    failbacks,
    failovers,
    history_fulls,
    history_totals,
    map_refs,
    native_recoveries,
    planned_failovers,
    rehearsal_vms,
    rehearsals,
    resume_disks,
    resumes,
    runs,
    schedule_fires,
    schema_version,
    task_disks,
    tasks,
)

# Ids per `IN (...)` query: under SQLite's and PostgreSQL's limits on bound parameters.
_CHUNK = 5000
# pg_advisory_xact_lock key for "forgetting old history" (any fixed number): two workers pruning
# at once take turns, so no forgotten task is counted twice.
_PRUNE_LOCK = 0x78656E6372_01

# The statements every run makes many of, built once: values go in as parameters (building an
# expression with its values costs more than SQLite takes to run it).
_INSERT_RUN, _INSERT_TASK, _INSERT_DISKS = insert(runs), insert(tasks), insert(task_disks)
_FINISH_RUN = update(runs).where(runs.c.id == bindparam("run"))
_FINISH_TASK = update(tasks).where(tasks.c.id == bindparam("task"))
_DROP_DISKS = delete(task_disks).where(task_disks.c.task_id == bindparam("task"))
_DISKS = select(
    task_disks.c.task_id, task_disks.c.disk, task_disks.c.reason, task_disks.c.map, task_disks.c.path
).order_by(task_disks.c.disk)
_DISKS_OF = _DISKS.where(task_disks.c.task_id.in_(bindparam("ids", expanding=True)))
_DISKS_OF_ONE = _DISKS.where(task_disks.c.task_id == bindparam("id"))  # an expanding IN costs more
_LAST_TASK = (
    select(tasks)
    .where(tasks.c.vm_uuid == bindparam("vm"), tasks.c.target_sr == bindparam("sr"))
    .order_by(tasks.c.id.desc())
    .limit(1)
)
_LAST_TASK_OF = _LAST_TASK.where(tasks.c.outcome == bindparam("outcome"))


def _now() -> datetime:
    return datetime.now(UTC)


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


def _job(job: str) -> ColumnElement[bool]:
    """Runs of a job named by name or id."""
    return or_(runs.c.job_id == job, runs.c.job_name == job)


class RolledBack(StateError):
    """An operational error inside a PostgreSQL transaction before its commit (the server
    dropped the connection, a deadlock): it did not happen. A `StateDB` with `patience` makes the
    whole call again (every public method is one call's worth of transactions that may be made
    again); others see a `StateError`. An error at the commit itself stays a plain `StateError`
    (whether it happened is unknown)."""


P = ParamSpec("P")
R = TypeVar("R")


def _again_when_rolled_back(
    method: Callable[Concatenate[StateDB, P], R],
) -> Callable[Concatenate[StateDB, P], R]:
    @functools.wraps(method)
    def call(self: StateDB, /, *args: P.args, **kwargs: P.kwargs) -> R:
        deadline = time.monotonic() + self.patience
        delay = 0.1
        while True:
            try:
                return method(self, *args, **kwargs)
            except RolledBack:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    return call


def open_state(
    config: Config,
    *,
    clock: Callable[[], datetime] | None = None,
    worker: str | None = None,
    patience: float = 0.0,
) -> StateDB:
    """The state database the configuration names (SQLite file or PostgreSQL), migrated; see
    `StateDB` for ``worker`` and ``patience``."""
    return StateDB(config.state, clock=clock, worker=worker, patience=patience)


class StateDB:
    """The state database at ``where``: an SQLite file path (created with its directories), or a
    configured `StateLocation` (SQLite or PostgreSQL); migrated to the newest schema on open.

    Thread-safe (one transaction at a time per instance, behind a lock); ``clock`` returns aware
    datetimes (tests pass a fake one). ``worker``: the cluster worker recorded on the runs and
    tasks this instance starts (`xencr.coordination`). ``patience``: seconds a PostgreSQL
    transaction waits for an unreachable server to come back (a database restart) before it
    fails; 0 fails at once, as a command should.
    """

    def __init__(
        self,
        where: Path | str | StateLocation,
        *,
        clock: Callable[[], datetime] | None = None,
        worker: str | None = None,
        patience: float = 0.0,
    ) -> None:
        self.location = where if isinstance(where, StateLocation) else StateLocation(path=Path(where))
        self.worker = worker
        self.patience = patience
        self.path = self.location.path  # None for PostgreSQL
        self._where = self.location.describe()  # the path, or "PostgreSQL user@host:port/db"
        self._clock = clock or _now
        self._lock = threading.RLock()
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._process_start = _process_start(self._pid)
        self._password: Secret | None = None
        self._conn: Connection | None = None  # SQLite's (`_begun`)
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            else:
                self._password = self.location.password()
            self._engine = engines.create(self.location, self._password)
        except OSError as err:
            raise StateError(f"{self._where}: cannot open it: {err.strerror or err}") from None
        try:
            self._setup_with_retries()
        except exc.DatabaseError as err:
            self._engine.dispose()
            if isinstance(err, exc.OperationalError) and self.path is None:
                raise StateError(f"{self._where}: cannot connect: {self._reason(err)}") from None
            raise StateError(f"{self._where}: not a usable state database: {self._reason(err)}") from None
        except migrate.NewerDatabase as err:
            self._engine.dispose()
            raise StateError(f"{self._where}: written by a newer xencr ({err})") from None
        except migrate.NotStateDatabase as err:
            self._engine.dispose()
            raise StateError(f"{self._where}: not a usable state database: {err}") from None
        except BaseException:
            self._engine.dispose()
            raise

    def _reason(self, err: BaseException) -> str:
        return engines.reason(err, self._password)

    def _setup_with_retries(self, seconds: float = 30.0) -> None:
        """Switching a new file to WAL needs it to itself, and SQLite answers "locked" at once
        rather than waiting on the busy timeout: several processes opening a fresh database
        together (a daemon and a manual run) take turns here. PostgreSQL with `patience`: a
        server restarting is waited for as long."""
        if self.path is None:
            seconds = self.patience
        deadline = time.monotonic() + seconds
        delay = 0.01
        while True:
            try:
                if self.path is not None:
                    engines.use_wal(self._engine)
                with self._engine.connect() as conn:
                    conn.info[engines.WRITE] = True
                    with conn.begin():
                        migrate.upgrade(conn, self._clock)
                return
            except exc.OperationalError as err:
                transient = self.path is None or engines.is_transient(err)
                if not transient or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    # -- plumbing

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._engine.dispose()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction, committed when the block ends (rolled back on an exception).
        SQLite: ``BEGIN IMMEDIATE`` (the write lock up front, so two processes wait for each
        other instead of failing on lock upgrade). PostgreSQL: an ordinary transaction, where
        ``SELECT ... FOR UPDATE SKIP LOCKED`` works (SQLite ignores it: its one writer at a time
        already excludes). For modules that keep their own tables beside these (`schema.metadata`)."""
        with self._begun(write=True) as conn:
            yield conn

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """One read transaction: every query in it sees the same committed state (SQLite's WAL
        snapshot; PostgreSQL at REPEATABLE READ), and writers are not held up."""
        with self._begun(write=False, isolation="REPEATABLE READ") as conn:
            yield conn

    @contextmanager
    def _begun(self, *, write: bool, isolation: str | None = None) -> Iterator[Connection]:
        """A connection in a transaction, committed when the block ends. SQLite: the instance's one
        connection (its lock already serialises them; a checkout per call would cost more than
        most queries); PostgreSQL: one from the pool, checked first (a restarted server costs a
        ping, not a failed write). The engine's operational errors (unreachable, locked for too
        long) come out as one `StateError` line naming the database."""
        with self._lock:
            try:
                if self.path is not None:
                    if self._conn is None or self._conn.closed:
                        self._conn = self._engine.connect()
                    self._conn.info[engines.WRITE] = write
                    with self._conn.begin():
                        yield self._conn
                    return
                with self._connect() as conn:
                    if isolation is not None:
                        conn.execution_options(isolation_level=isolation)
                    trans = conn.begin()
                    try:
                        yield conn
                    except BaseException as err:
                        with contextlib.suppress(exc.SQLAlchemyError):
                            trans.rollback()
                        if isinstance(err, exc.OperationalError):
                            # Before the commit (a connection the server dropped, a deadlock):
                            # nothing of it happened, so the whole call may be made again.
                            raise RolledBack(f"{self._where}: {self._reason(err)}") from None
                        raise
                    trans.commit()
            except exc.OperationalError as err:
                raise StateError(f"{self._where}: {self._reason(err)}") from None

    def _connect(self) -> Connection:
        """A PostgreSQL connection, waited for up to `patience` seconds while the server does not
        answer (each pooled connection is pinged first: one a restart broke is replaced)."""
        deadline = time.monotonic() + self.patience
        delay = 0.1
        while True:
            try:
                return self._engine.connect()
            except exc.OperationalError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _read(self, query: Executable) -> list[Any]:
        """The rows of one query (each a `Row`: by position or column name)."""
        with self._begun(write=False) as conn:
            return list(conn.execute(query).all())

    def _upsert(
        self, conn: Connection, table: Table, row: Mapping[str, Any], *, keep: Iterable[str] = ()
    ) -> None:
        """Insert ``row``, or replace the columns of the row with its primary key (but ``keep``)."""
        key = [c.name for c in table.primary_key.columns]
        dialect = pg if conn.dialect.name == "postgresql" else lite
        stmt = dialect.insert(table).values(**row)
        changed = {c: stmt.excluded[c] for c in row if c not in key and c not in set(keep)}
        conn.execute(stmt.on_conflict_do_update(index_elements=key, set_=changed))

    @property
    def schema_version(self) -> int:
        """The numbered schema of before Alembic (10 since: the baseline revision's)."""
        (row,) = self._read(select(func.max(schema_version.c.version)))
        return int(row[0])

    @property
    def revision(self) -> str | None:
        """The Alembic revision the database is at."""
        with self._begun(write=False) as conn:
            return migrate.revision(conn)

    # -- runs

    def start_run(self, job_id: str, job_name: str, schedule_id: str | None, trigger: str) -> int:
        """Record a run starting now, owned by this process; its id."""
        row = {
            "job_id": job_id,
            "job_name": job_name,
            "schedule_id": schedule_id,
            "trigger": trigger,
            "started_at": time_text(self._clock()),
            "host": self._host,
            "pid": self._pid,
            "process_start": self._process_start,
            "worker": self.worker,
        }
        with self.transaction() as db:
            return _new_id(db.execute(_INSERT_RUN, row))

    def finish_run(self, run_id: int, outcome: str, error: str | None = None) -> None:
        if outcome not in RUN_OUTCOMES:
            raise ValueError(f"unknown run outcome {outcome!r} (one of {', '.join(sorted(RUN_OUTCOMES))})")
        values = {"run": run_id, "outcome": outcome, "error": error, "finished_at": time_text(self._clock())}
        with self.transaction() as db:
            result = db.execute(_FINISH_RUN, values)
            if result.rowcount != 1:
                raise KeyError(f"no run {run_id}")

    def runs(
        self, job: str | None = None, since: datetime | None = None, *, limit: int | None = None
    ) -> list[RunRow]:
        """Runs in start order (oldest first); ``job`` is a job name or id; ``since`` keeps the runs
        started at or after it; ``limit`` keeps the newest N."""
        query = select(runs)
        if job is not None:
            query = query.where(_job(job))
        if since is not None:
            query = query.where(runs.c.started_at >= time_text(since))
        query = query.order_by(runs.c.id.desc()).limit(limit)
        return [_run_row(r) for r in reversed(self._read(query))]

    def run(self, run_id: int) -> RunRow:
        rows = self._read(select(runs).where(runs.c.id == run_id))
        if not rows:
            raise KeyError(f"no run {run_id}")
        return _run_row(rows[0])

    # -- tasks

    def start_task(self, run_id: int, vm_uuid: str, vm_name: str, target_sr: str, target: str = "") -> int:
        """Record one VM's transfer to one target starting now; its id."""
        row = {
            "run_id": run_id,
            "vm_uuid": vm_uuid,
            "vm_name": vm_name,
            "target_sr": target_sr,
            "target": target,
            "started_at": time_text(self._clock()),
            "worker": self.worker,
        }
        with self.transaction() as db:
            return _new_id(db.execute(_INSERT_TASK, row))

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
        maps = dict(maps or {})
        values = {
            "task": task_id,
            "outcome": outcome,
            "finished_at": time_text(self._clock()),
            "transfer": transfer,
            "bytes_sent": bytes_sent,
            "error": error,
            "restore_point": restore_point,
            "snapshot_time": None if snapshot_time is None else time_text(snapshot_time),
            "cleaned": cleaned,
            "detached": detached,
            "health_check": health_check,
        }
        with self.transaction() as db:
            result = db.execute(_FINISH_TASK, values)
            if result.rowcount != 1:
                raise KeyError(f"no task {task_id}")
            db.execute(_DROP_DISKS, {"task": task_id})
            disks = [
                {"task_id": task_id, "disk": d, "reason": r, "map": maps.get(d), "path": (paths or {}).get(d)}
                for d, r in (reasons or {}).items()
            ]
            if disks:
                db.execute(_INSERT_DISKS, disks)
            if restore_point is not None:
                for disk, digest in maps.items():
                    self._upsert(
                        db, map_refs, {"restore_point": restore_point, "disk": disk, "digest": digest}
                    )

    def skip_task(
        self, run_id: int, vm_uuid: str, vm_name: str, target_sr: str, reason: str, target: str = ""
    ) -> int:
        """Record a VM/target this run did not attempt (e.g. still busy from a previous run): a
        finished task with outcome 'skipped' and ``reason`` as its error; its id."""
        now = time_text(self._clock())
        row = {
            "run_id": run_id,
            "vm_uuid": vm_uuid,
            "vm_name": vm_name,
            "target_sr": target_sr,
            "target": target,
            "started_at": now,
            "finished_at": now,
            "outcome": "skipped",
            "error": reason,
            "worker": self.worker,
        }
        with self.transaction() as db:
            return _new_id(db.execute(_INSERT_TASK, row))

    def tasks(self, run_id: int) -> list[TaskRow]:
        return self._tasks(tasks.c.run_id == run_id)

    def all_tasks(self, job: str | None = None, since: datetime | None = None) -> list[TaskRow]:
        """Tasks in id order, of the runs of ``job`` (name or id) started at or after ``since``."""
        of_runs = select(runs.c.id)
        if job is not None:
            of_runs = of_runs.where(_job(job))
        if since is not None:
            of_runs = of_runs.where(runs.c.started_at >= time_text(since))
        return self._tasks(tasks.c.run_id.in_(of_runs))

    def last_task(self, vm_uuid: str, target_sr: str, *, outcome: str | None = None) -> TaskRow | None:
        """The newest task of this VM to this SR (of any outcome, or only ``outcome``)."""
        args = {"vm": vm_uuid, "sr": target_sr}
        if outcome is None:
            rows = self._task_rows(_LAST_TASK, args)
        else:
            rows = self._task_rows(_LAST_TASK_OF, {**args, "outcome": outcome})
        return rows[0] if rows else None

    def health_checks(self, job: str) -> tuple[list[TaskRow], int]:
        """The newest checked task of each (VM, target SR) among the runs of ``job`` (name or id),
        in id order, and how many of the job's checks ever failed."""
        of_job = tasks.c.run_id.in_(select(runs.c.id).where(_job(job)))
        newest = (
            select(func.max(tasks.c.id))
            .where(tasks.c.health_check.is_not(None), of_job)
            .group_by(tasks.c.vm_uuid, tasks.c.target_sr)
        )
        with self._lock:
            checked = self._tasks(tasks.c.id.in_(newest))
            (failed,) = self._read(
                select(func.count()).select_from(tasks).where(tasks.c.health_check.like("failed:%"), of_job)
            )
        return checked, int(failed[0])

    def newest_tasks(self, job: str, *, outcome: str | None = None) -> list[TaskRow]:
        """The newest task of each (VM, target SR) among the runs of ``job`` (name or id), of any
        outcome or only ``outcome``; in id order."""
        # The job's runs first, then their tasks by run (indexed): a join would scan every task.
        newest = select(func.max(tasks.c.id)).where(tasks.c.run_id.in_(select(runs.c.id).where(_job(job))))
        if outcome is not None:
            newest = newest.where(tasks.c.outcome == outcome)
        return self._tasks(tasks.c.id.in_(newest.group_by(tasks.c.vm_uuid, tasks.c.target_sr)))

    def run_sums(self, job: str, since: datetime) -> dict[int, RunSums]:
        """Run id -> its tasks' bytes by transfer and counts by outcome, for the runs of ``job``
        (name or id) started at or after ``since``; running tasks are not counted."""
        of_runs = select(runs.c.id).where(_job(job), runs.c.started_at >= time_text(since))
        rows = self._read(
            select(
                tasks.c.run_id,
                func.coalesce(tasks.c.transfer, ""),
                tasks.c.outcome,
                func.count(),
                func.sum(tasks.c.bytes_sent),
            )
            .where(tasks.c.run_id.in_(of_runs), tasks.c.outcome != RUNNING)
            .group_by(tasks.c.run_id, tasks.c.transfer, tasks.c.outcome)
        )
        out: dict[int, RunSums] = {}
        for run_id, transfer, outcome, n, sent in rows:
            sums = out.setdefault(run_id, RunSums(run_id, {}, {}))
            sums.bytes_sent[transfer] = sums.bytes_sent.get(transfer, 0) + int(sent)
            sums.tasks[outcome] = sums.tasks.get(outcome, 0) + int(n)
        return out

    def points(self, job: str, since: datetime) -> list[PointRow]:
        """The successful tasks of ``job`` (name or id) that made a restore point: every one of
        a run started at or after ``since``, and before it the newest of each (VM, target SR)
        (what was protecting it when the period began); in id order."""
        t = tasks.c
        cols = (
            t.id,
            t.run_id,
            t.vm_uuid,
            t.vm_name,
            t.target_sr,
            t.target,
            t.restore_point,
            func.coalesce(t.snapshot_time, t.started_at).label("snap"),
            t.finished_at,
            t.transfer,
            t.bytes_sent,
        )
        made = and_(t.outcome == "success", t.restore_point.is_not(None))
        of_job = select(runs.c.id, runs.c.started_at).where(_job(job)).cte("r")
        cut = time_text(since)
        # The job's runs first (by id, then tasks by run: both indexed), the two periods apart.
        within = select(*cols).where(
            t.run_id.in_(select(of_job.c.id).where(of_job.c.started_at >= cut)), made
        )
        before = select(*cols).where(
            t.id.in_(
                select(func.max(t.id))
                .where(t.run_id.in_(select(of_job.c.id).where(of_job.c.started_at < cut)), made)
                .group_by(t.vm_uuid, t.target_sr)
            )
        )
        rows = self._read(union_all(within, before).order_by(text("1")))
        parse = datetime.fromisoformat  # `text_time`, without a call per column
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
        r = runs.c
        with self._lock:
            per_job = self._read(
                select(
                    r.job_id,
                    func.max(r.id),
                    func.max(case((r.outcome != RUNNING, r.id))),
                )
                .group_by(r.job_id)
                .order_by(r.job_id)
            )
            counts = self._read(_counts(None))
            # A disk's reason is "delta" (or continues a Xen Orchestra chain) unless it went full.
            fulls = self._read(_fulls(None))
            # What forgotten runs added up to (`prune_history`).
            h, hf = history_totals.c, history_fulls.c
            counts += self._read(
                select(h.job_id, h.worker, h.outcome, h.transfer, h.tasks, h.bytes_sent, h.cleaned).where(
                    h.tasks > 0
                )
            )
            fulls += self._read(select(hf.job_id, hf.reason, hf.disks))
        out = []
        for job_id, newest_id, done_id in per_job:
            newest = self.run(newest_id)
            job_counts = [c for c in counts if c[0] == job_id]
            tasks_by: dict[str, int] = {}
            sent: dict[str, int] = {}
            full_disks: dict[str, int] = {}
            for _, _worker, outcome, transfer, n, sent_bytes, _cleaned in job_counts:
                tasks_by[outcome] = tasks_by.get(outcome, 0) + int(n)
                sent[transfer] = sent.get(transfer, 0) + int(sent_bytes)
            for _, reason, n in (f for f in fulls if f[0] == job_id):
                full_disks[reason] = full_disks.get(reason, 0) + int(n)
            out.append(
                JobTotals(
                    job_id=job_id,
                    job_name=newest.job_name,
                    tasks=tasks_by,
                    bytes_sent=sent,
                    full_disks=full_disks,
                    cleaned=sum(int(c[6]) for c in job_counts),
                    last_started=newest.started_at,
                    last_finished=self.run(done_id) if done_id is not None else None,
                )
            )
        return out

    def worker_totals(self) -> list[WorkerTotals]:
        """Per cluster worker ever recorded (tasks run by a host alone are not counted here), what
        its finished tasks add up to, forgotten history included, in worker name order."""
        h = history_totals.c
        with self._lock:
            rows = self._read(_counts(None)) + self._read(
                select(h.job_id, h.worker, h.outcome, h.transfer, h.tasks, h.bytes_sent, h.cleaned)
            )
        out: dict[str, WorkerTotals] = {}
        for _job, worker, outcome, _transfer, n, sent, _cleaned in rows:
            if not worker:
                continue
            w = out.setdefault(worker, WorkerTotals(worker, {}, 0))
            w.tasks[outcome] = w.tasks.get(outcome, 0) + int(n)
            w.bytes_sent += int(sent)
        return [out[name] for name in sorted(out)]

    def _tasks(self, where: ColumnElement[bool]) -> list[TaskRow]:
        """The tasks ``where`` selects, in id order, with their disks."""
        return self._task_rows(select(tasks).where(where).order_by(tasks.c.id), {})

    def _task_rows(self, query: Executable, args: Mapping[str, Any]) -> list[TaskRow]:
        with self._begun(write=False) as conn:
            rows = list(conn.execute(query, dict(args)).all())
            ids = [r.id for r in rows]
            reasons: dict[int, dict[str, str]] = {i: {} for i in ids}
            maps: dict[int, dict[str, str]] = {i: {} for i in ids}
            paths: dict[int, dict[str, str]] = {i: {} for i in ids}
            chunks = [(_DISKS_OF_ONE, {"id": ids[0]})] if len(ids) == 1 else []
            if len(ids) > 1:
                chunks = [(_DISKS_OF, {"ids": ids[i : i + _CHUNK]}) for i in range(0, len(ids), _CHUNK)]
            for query_disks, ids_args in chunks:
                for task_id, disk, reason, map_, path in conn.execute(query_disks, ids_args):
                    reasons[task_id][disk] = reason
                    if map_ is not None:
                        maps[task_id][disk] = map_
                    if path is not None:
                        paths[task_id][disk] = path
        return [_task_row(r, reasons[r.id], maps[r.id], paths[r.id]) for r in rows]

    # -- block maps

    def put_map(self, block_map: BlockMap) -> str:
        """Keep a block map (once per content); its digest."""
        digest = block_map.digest
        row = {
            "digest": digest,
            "data": block_map.to_bytes(),
            "blocks": len(block_map.blocks),
            "touched_at": time_text(self._clock()),
        }
        with self.transaction() as db:
            # Touched again when put again: an attempt about to use it keeps it from `release_maps`.
            self._upsert(db, block_maps, row, keep=("data", "blocks"))
        return digest

    def get_map(self, digest: str) -> BlockMap | None:
        rows = self._read(select(block_maps.c.data).where(block_maps.c.digest == digest))
        return BlockMap.from_bytes(bytes(rows[0][0])) if rows else None

    def release_maps(self, restore_points: Iterable[str]) -> int:
        """These restore points are gone (retention destroyed them): forget which maps they used,
        and drop the maps no restore point uses any more (those untouched for `MAP_GRACE`: a
        running attempt's map is not used by anything yet). Returns the number dropped."""
        points = list(restore_points)
        cutoff = time_text(self._clock() - MAP_GRACE)
        with self.transaction() as db:
            for start in range(0, len(points), _CHUNK):
                db.execute(
                    delete(map_refs).where(map_refs.c.restore_point.in_(points[start : start + _CHUNK]))
                )
            result = db.execute(
                delete(block_maps).where(
                    block_maps.c.touched_at < cutoff, block_maps.c.digest.not_in(select(map_refs.c.digest))
                )
            )
            return int(result.rowcount)

    def map_bytes(self) -> int:
        """What the kept block maps take in the database (compressed)."""
        total = select(func.coalesce(func.sum(func.length(block_maps.c.data)), 0))
        return int(self._read(total)[0][0])

    # -- schedules

    def set_fire(
        self, job_id: str, schedule_id: str, *, last: datetime | None, next: datetime | None
    ) -> None:
        """Record a schedule's last and next fire times (the daemon's view, shown by status)."""
        with self.transaction() as db:
            self._upsert(
                db,
                schedule_fires,
                {
                    "job_id": job_id,
                    "schedule_id": schedule_id,
                    "last_fire": None if last is None else time_text(last),
                    "next_fire": None if next is None else time_text(next),
                },
            )

    def fires(self) -> dict[tuple[str, str], tuple[datetime | None, datetime | None]]:
        """(job_id, schedule_id) -> (last fire, next fire) as recorded by ``set_fire``."""
        f = schedule_fires.c
        return {
            (r.job_id, r.schedule_id): (text_time(r.last_fire), text_time(r.next_fire))
            for r in self._read(select(schedule_fires).order_by(f.job_id, f.schedule_id))
        }

    # -- failovers

    def record_failover(self, rows: Iterable[FailoverRow]) -> None:
        """Record a failover's VMs before anything is done to them (one transaction)."""
        now = time_text(self._clock())
        values = [
            {
                "plan": r.plan,
                "vm_uuid": r.vm_uuid,
                "vm_name": r.vm_name,
                "job": r.job,
                "pool": r.pool,
                "restore_point": r.restore_point,
                "grp": r.group,
                "start_delay": r.start_delay,
                "clone": int(r.clone),
                "token": r.token,
                "vm": r.vm,
                "state": r.state,
                "started_at": None if r.started_at is None else time_text(r.started_at),
                "detail": r.detail,
                "recorded_at": now,
            }
            for r in rows
        ]
        with self.transaction() as db:
            if values:
                db.execute(insert(failovers), values)

    def failover_rows(self, plan: str) -> list[FailoverRow]:
        """The recorded VMs of a plan's failover, in start order (group, then name)."""
        f = failovers.c
        rows = self._read(select(failovers).where(f.plan == plan).order_by(f.grp, f.vm_name, f.vm_uuid))
        return [
            FailoverRow(
                plan=r.plan,
                vm_uuid=r.vm_uuid,
                vm_name=r.vm_name,
                job=r.job,
                pool=r.pool,
                restore_point=r.restore_point,
                group=r.grp,
                start_delay=r.start_delay,
                clone=bool(r.clone),
                token=r.token,
                vm=r.vm,
                state=r.state,
                started_at=text_time(r.started_at),
                detail=r.detail,
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
        f = failovers.c
        changes: dict[str, Any] = {"state": state}
        if vm is not None:
            changes["vm"] = vm
        if started_at is not None:
            changes["started_at"] = time_text(started_at)
        if detail is not None:
            changes["detail"] = detail
        with self.transaction() as db:
            result = db.execute(
                update(failovers).where(f.plan == plan, f.vm_uuid == vm_uuid).values(**changes)
            )
            if result.rowcount != 1:
                raise KeyError(f"no failover of VM {vm_uuid} in plan {plan!r}")

    def forget_failover(self, plan: str, vm_uuid: str) -> None:
        """Drop a VM's failover row (it failed back): a later failover of the plan chooses anew."""
        with self.transaction() as db:
            db.execute(delete(failovers).where(failovers.c.plan == plan, failovers.c.vm_uuid == vm_uuid))

    # -- failbacks

    def record_failback(self, row: FailbackRow) -> None:
        """Record (replace) where one VM's failback is."""
        if row.step not in ("", *FAILBACK_STEPS):
            raise ValueError(f"unknown failback step {row.step!r}")
        with self.transaction() as db:
            self._upsert(
                db,
                failbacks,
                {
                    "plan": row.plan,
                    "vm_uuid": row.vm_uuid,
                    "step": row.step,
                    "attempt": row.attempt,
                    "d1": row.d1,
                    "d2": row.d2,
                    "disks": " ".join(row.disks),
                    "old_disks": " ".join(row.old_disks),
                    "snapshot": row.snapshot,
                    "detail": row.detail,
                    "updated_at": time_text(self._clock()),
                },
            )

    def failbacks(self, plan: str) -> dict[str, FailbackRow]:
        """Source VM UUID -> its recorded failback, for a plan."""
        rows = self._read(select(failbacks).where(failbacks.c.plan == plan))
        return {
            r.vm_uuid: FailbackRow(
                plan=r.plan,
                vm_uuid=r.vm_uuid,
                attempt=r.attempt,
                step=r.step,
                d1=r.d1,
                d2=r.d2,
                disks=tuple(r.disks.split()),
                old_disks=tuple(r.old_disks.split()),
                snapshot=r.snapshot,
                detail=r.detail,
            )
            for r in rows
        }

    # -- planned failovers

    def record_planned(self, row: PlannedRow) -> None:
        """Record where a plan's planned failover is (replacing what was recorded); ``started_at``
        is kept from the recorded row of a running attempt, else now."""
        if row.step not in PLANNED_STEPS or row.outcome not in PLANNED_OUTCOMES:
            raise ValueError(f"unknown planned failover step {row.step!r} / outcome {row.outcome!r}")
        now = time_text(self._clock())
        with self.transaction() as db:
            self._upsert(
                db,
                planned_failovers,
                {
                    "plan": row.plan,
                    "step": row.step,
                    "outcome": row.outcome,
                    "halted": " ".join(row.halted),
                    "detail": row.detail,
                    "started_at": now if row.started_at is None else time_text(row.started_at),
                    "updated_at": now,
                },
            )

    def planned(self, plan: str) -> PlannedRow | None:
        """The recorded planned failover of a plan (None: never run)."""
        rows = self._read(select(planned_failovers).where(planned_failovers.c.plan == plan))
        if not rows:
            return None
        r = rows[0]
        return PlannedRow(
            plan=r.plan,
            step=r.step,
            outcome=r.outcome,
            halted=tuple(r.halted.split()),
            detail=r.detail,
            started_at=text_time(r.started_at),
            updated_at=text_time(r.updated_at),
        )

    # -- test failovers

    def record_rehearsal(self, r: RehearsalRow) -> None:
        """Record (replace) a finished test failover's VMs."""
        vms = [
            {
                "run_id": r.run_id,
                "vm_uuid": v.vm_uuid,
                "name": v.name,
                "clone": v.clone,
                "ok": int(v.ok),
                "grp": v.group,
                "started_at": time_text(v.started_at) if v.started_at else None,
                "boot_seconds": v.boot_seconds,
                "detail": v.detail,
            }
            for v in r.vms
        ]
        with self.transaction() as db:
            self._upsert(
                db,
                rehearsals,
                {
                    "run_id": r.run_id,
                    "plan": r.plan,
                    "booted": int(r.booted),
                    "ok": int(r.ok),
                    "kept": int(r.kept),
                },
            )
            db.execute(delete(rehearsal_vms).where(rehearsal_vms.c.run_id == r.run_id))
            if vms:
                db.execute(insert(rehearsal_vms), vms)

    def rehearsal(self, run_id: int) -> RehearsalRow | None:
        """A test failover's record (None: none kept, e.g. a test cut short)."""
        with self._lock:
            rows = self._read(select(rehearsals).where(rehearsals.c.run_id == run_id))
            if not rows:
                return None
            v = rehearsal_vms.c
            found = self._read(select(rehearsal_vms).where(v.run_id == run_id).order_by(v.name))
        r = rows[0]
        vms = tuple(
            RehearsedVmRow(
                name=x.name,
                vm_uuid=x.vm_uuid,
                clone=x.clone,
                ok=bool(x.ok),
                group=x.grp,
                started_at=text_time(x.started_at),
                boot_seconds=x.boot_seconds,
                detail=x.detail,
            )
            for x in found
        )
        return RehearsalRow(r.plan, r.run_id, bool(r.booted), bool(r.ok), bool(r.kept), vms)

    # -- native DR recoveries

    def record_native(self, row: NativeRecoveryRow) -> None:
        """Record (replace) where a native recovery attempt is."""
        if row.mode not in NATIVE_MODES or row.outcome not in NATIVE_OUTCOMES:
            raise ValueError(f"native recovery: unknown mode/outcome {row.mode!r}/{row.outcome!r}")
        now = time_text(self._clock())
        with self.transaction() as db:
            self._upsert(
                db,
                native_recoveries,
                {
                    "attempt": row.attempt,
                    "pool": row.pool,
                    "mode": row.mode,
                    "outcome": row.outcome,
                    "srs_before": " ".join(row.srs_before),
                    "vms_before": " ".join(row.vms_before),
                    "apps_before": " ".join(row.apps_before),
                    "introduced": " ".join(row.introduced),
                    "tasks": " ".join(row.tasks),
                    "selected": " ".join(row.selected),
                    "started": " ".join(row.started),
                    "network": row.network,
                    "detail": row.detail,
                    "started_at": now if row.started_at is None else time_text(row.started_at),
                    "updated_at": now,
                },
            )

    def native_recoveries(self, pool: str | None = None, *, running: bool = False) -> list[NativeRecoveryRow]:
        """Native recovery attempts, oldest first (of one pool; only unfinished ones)."""
        n = native_recoveries.c
        query = select(native_recoveries).order_by(n.started_at, n.attempt)
        if pool is not None:
            query = query.where(n.pool == pool)
        if running:
            query = query.where(n.outcome == "running")
        return [
            NativeRecoveryRow(
                attempt=r.attempt,
                pool=r.pool,
                mode=r.mode,
                outcome=r.outcome,
                srs_before=tuple(r.srs_before.split()),
                vms_before=tuple(r.vms_before.split()),
                apps_before=tuple(r.apps_before.split()),
                introduced=tuple(r.introduced.split()),
                tasks=tuple(r.tasks.split()),
                selected=tuple(r.selected.split()),
                started=tuple(r.started.split()),
                network=r.network,
                detail=r.detail,
                started_at=text_time(r.started_at),
            )
            for r in self._read(query)
        ]

    # -- incomplete attempts kept for a resume

    def record_resume(self, row: ResumeRow) -> None:
        """Record (replace) an attempt that may be resumed, with its disks at their positions."""
        now = time_text(self._clock())
        key = {"job_id": row.job_id, "vm_uuid": row.vm_uuid, "target_sr": row.target_sr}
        with self.transaction() as db:
            db.execute(delete(resumes).where(*(resumes.c[k] == v for k, v in key.items())))
            db.execute(
                insert(resumes).values(
                    **key,
                    attempt=row.attempt,
                    snapshot=row.snapshot,
                    replica=row.replica,
                    shape=row.shape,
                    started_at=now if row.started_at is None else time_text(row.started_at),
                )
            )
            disks = [
                {
                    **key,
                    "userdevice": d.userdevice,
                    "vdi": d.vdi,
                    "position": d.position,
                    "blocks": d.blocks,
                    "stream_bytes": d.stream_bytes,
                    "updated_at": now,
                }
                for d in row.disks
            ]
            if disks:
                db.execute(insert(resume_disks), disks)

    def update_resume_disk(
        self, job_id: str, vm_uuid: str, target_sr: str, attempt: str, disk: ResumeDisk
    ) -> None:
        """A disk's progress, recorded only while ``attempt`` is still the one recorded."""
        d, r = resume_disks.c, resumes.c
        still = (
            select(literal(1))
            .select_from(resumes)
            .where(r.job_id == job_id, r.vm_uuid == vm_uuid, r.target_sr == target_sr, r.attempt == attempt)
            .exists()
        )
        with self.transaction() as db:
            db.execute(
                update(resume_disks)
                .where(
                    d.job_id == job_id,
                    d.vm_uuid == vm_uuid,
                    d.target_sr == target_sr,
                    d.userdevice == disk.userdevice,
                    still,
                )
                .values(
                    position=disk.position,
                    blocks=disk.blocks,
                    stream_bytes=disk.stream_bytes,
                    updated_at=time_text(self._clock()),
                )
            )

    def resumes(self, job_id: str | None = None) -> list[ResumeRow]:
        """The incomplete attempts recorded (of one job), oldest first."""
        return self._resumes(None if job_id is None else resumes.c.job_id == job_id)

    def resume_of(self, job_id: str, vm_uuid: str, target_sr: str) -> ResumeRow | None:
        r = resumes.c
        found = self._resumes(and_(r.job_id == job_id, r.vm_uuid == vm_uuid, r.target_sr == target_sr))
        return found[0] if found else None

    def _resumes(self, where: ColumnElement[bool] | None) -> list[ResumeRow]:
        # The disks of the chosen attempts only: a run asks this for each VM and target.
        r, d = resumes.c, resume_disks.c
        query = select(resumes).order_by(r.started_at)
        disk_query = select(resume_disks).order_by(d.userdevice)
        if where is not None:
            query = query.where(where)
            chosen = select(r.job_id, r.vm_uuid, r.target_sr).where(where)
            disk_query = disk_query.where(tuple_(d.job_id, d.vm_uuid, d.target_sr).in_(chosen))
        disks: dict[tuple[str, str, str], list[ResumeDisk]] = {}
        with self._lock:
            for row in self._read(disk_query):
                disks.setdefault((row.job_id, row.vm_uuid, row.target_sr), []).append(
                    ResumeDisk(
                        row.userdevice, row.vdi, int(row.position), int(row.blocks), int(row.stream_bytes)
                    )
                )
            found = self._read(query)
        return [
            ResumeRow(
                job_id=x.job_id,
                vm_uuid=x.vm_uuid,
                target_sr=x.target_sr,
                attempt=x.attempt,
                snapshot=x.snapshot,
                replica=x.replica,
                shape=x.shape,
                disks=tuple(disks.get((x.job_id, x.vm_uuid, x.target_sr), ())),
                started_at=text_time(x.started_at),
            )
            for x in found
        ]

    def forget_resume(self, job_id: str, vm_uuid: str, target_sr: str, attempt: str | None = None) -> None:
        """Drop the record (only if it is still ``attempt``'s, when given)."""
        r = resumes.c
        stmt = delete(resumes).where(r.job_id == job_id, r.vm_uuid == vm_uuid, r.target_sr == target_sr)
        if attempt is not None:
            stmt = stmt.where(r.attempt == attempt)
        with self.transaction() as db:
            db.execute(stmt)

    # -- retention

    def prune_history(self, older_than: timedelta, *, batch: int = _CHUNK) -> int:
        """Forget the finished runs started longer than ``older_than`` ago, by the clock that
        stamps this database's records (``clock``), with their tasks, disks and DR-test
        records with them), adding what their tasks counted to ``history_totals`` in the same
        transaction: `job_totals`, the metrics' counters, is the same after as before. Kept
        whatever their age (`_kept_runs`): each job's newest run and newest finished run, and the
        runs of each (job, VM, target)'s newest task and newest successful task, which the RPO,
        `xencr status` and the status page read. ``batch`` runs per transaction; two processes
        pruning at once take turns (PostgreSQL: an advisory lock; SQLite: its one writer), so
        nothing is counted twice. Returns how many runs were forgotten."""
        cut = time_text(self._clock() - older_than)
        # Read once: a run kept now stays kept (newer runs only make fewer runs the newest), and
        # the grouping reads the whole `tasks` table, too much for every batch of a long history.
        kept = {int(row[0]) for row in self._read(_kept_runs())}
        forgotten, after = 0, 0
        while True:
            with self.transaction() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(select(func.pg_advisory_xact_lock(_PRUNE_LOCK)))
                r = runs.c
                window = conn.execute(
                    select(r.id)
                    .where(r.started_at < cut, r.outcome != RUNNING, r.id > after)
                    .order_by(r.id)
                    .limit(batch)
                ).all()
                if not window:
                    return forgotten
                after = int(window[-1][0])
                ids = [int(row[0]) for row in window if int(row[0]) not in kept]
                if not ids:
                    continue
                dialect = pg if conn.dialect.name == "postgresql" else lite
                h, hf = history_totals.c, history_fulls.c
                for job_id, worker, outcome, transfer, n, sent, cleaned in conn.execute(_counts(ids)).all():
                    stmt = dialect.insert(history_totals).values(
                        job_id=job_id,
                        worker=worker,
                        outcome=outcome,
                        transfer=transfer,
                        tasks=n,
                        bytes_sent=sent,
                        cleaned=cleaned,
                    )
                    conn.execute(
                        stmt.on_conflict_do_update(
                            index_elements=[h.job_id, h.worker, h.outcome, h.transfer],
                            set_={
                                "tasks": h.tasks + stmt.excluded.tasks,
                                "bytes_sent": h.bytes_sent + stmt.excluded.bytes_sent,
                                "cleaned": h.cleaned + stmt.excluded.cleaned,
                            },
                        )
                    )
                for job_id, reason, n in conn.execute(_fulls(ids)).all():
                    stmt = dialect.insert(history_fulls).values(job_id=job_id, reason=reason, disks=n)
                    conn.execute(
                        stmt.on_conflict_do_update(
                            index_elements=[hf.job_id, hf.reason],
                            set_={"disks": hf.disks + stmt.excluded.disks},
                        )
                    )
                # Children first: the same on both engines, whatever their foreign keys cascade.
                of_runs = select(tasks.c.id).where(tasks.c.run_id.in_(ids))
                conn.execute(delete(task_disks).where(task_disks.c.task_id.in_(of_runs)))
                conn.execute(delete(tasks).where(tasks.c.run_id.in_(ids)))
                conn.execute(delete(rehearsal_vms).where(rehearsal_vms.c.run_id.in_(ids)))
                conn.execute(delete(rehearsals).where(rehearsals.c.run_id.in_(ids)))
                conn.execute(delete(runs).where(runs.c.id.in_(ids)))
                forgotten += len(ids)
            if len(window) < batch:
                return forgotten

    # -- recovery

    def mark_interrupted(self, *, force: bool = False) -> int:
        """Close the runs (and their tasks) left 'running' by processes that no longer exist, as
        'interrupted'; call it when a process starts. Runs of live processes (the daemon while a
        `xencr run` starts, or this process itself) are left alone, and so are those recorded on
        another host; ``force`` closes every running run. Returns the number of runs closed."""
        with self.transaction() as db:
            running = db.execute(
                select(runs.c.id, runs.c.host, runs.c.pid, runs.c.process_start).where(
                    runs.c.outcome == RUNNING
                )
            ).all()
            dead = [
                r.id
                for r in running
                if force or (r.host == self._host and not _process_alive(r.pid, r.process_start))
            ]
            now = time_text(self._clock())
            message = "the process running it ended before it finished"
            for start in range(0, len(dead), _CHUNK):
                db.execute(
                    update(runs)
                    .where(runs.c.id.in_(dead[start : start + _CHUNK]))
                    .values(
                        outcome="interrupted", finished_at=now, error=func.coalesce(runs.c.error, message)
                    )
                )
            # Tasks still 'running' under a run that is no longer running cannot be running either.
            db.execute(
                update(tasks)
                .where(
                    tasks.c.outcome == RUNNING,
                    tasks.c.run_id.in_(select(runs.c.id).where(runs.c.outcome != RUNNING)),
                )
                .values(outcome="interrupted", finished_at=now, error=func.coalesce(tasks.c.error, message))
            )
            return len(dead)


# Every public method of StateDB, made again when its transaction was rolled back by a dropped
# connection (`RolledBack`; with `patience` 0 the deadline has passed at once: no retry).
# `transaction` and `reading` hand the transaction to their caller, who decides.
for _name, _method in list(vars(StateDB).items()):
    if (
        inspect.isfunction(_method)
        and not _name.startswith("_")
        and _name not in ("transaction", "reading", "close")
    ):
        setattr(StateDB, _name, _again_when_rolled_back(_method))


def _counts(run_ids: list[int] | None) -> Select[Any]:
    """Per (job, worker, task outcome, transfer) of the finished tasks (of ``run_ids``; None:
    all): how many, bytes sent, orphans cleaned (`job_totals`, `worker_totals`, `prune_history`).
    The worker and the transfer are "" when none."""
    t, r = tasks.c, runs.c
    worker, transfer = func.coalesce(t.worker, ""), func.coalesce(t.transfer, "")
    query = (
        select(
            r.job_id, worker, t.outcome, transfer, func.count(), func.sum(t.bytes_sent), func.sum(t.cleaned)
        )
        .select_from(tasks.join(runs, t.run_id == r.id))
        .where(t.outcome != RUNNING)
        .group_by(r.job_id, worker, t.outcome, transfer)
    )
    return query if run_ids is None else query.where(r.id.in_(run_ids))


def _fulls(run_ids: list[int] | None) -> Select[Any]:
    """Per (job, reason): disks sent in full by successful tasks (of ``run_ids``; None: all). A
    disk's reason is "delta" (or continues a Xen Orchestra chain) unless it went full."""
    t, r, d = tasks.c, runs.c, task_disks.c
    query = (
        select(r.job_id, d.reason, func.count())
        .select_from(task_disks.join(tasks, d.task_id == t.id).join(runs, t.run_id == r.id))
        .where(
            t.outcome == "success",
            d.reason != "delta",
            d.reason.not_like("continues Xen Orchestra replica %"),
        )
        .group_by(r.job_id, d.reason)
    )
    return query if run_ids is None else query.where(r.id.in_(run_ids))


def _kept_runs() -> Executable:
    """The runs `prune_history` keeps whatever their age: each job's newest run and newest
    finished run, and the run of each (job, VM, target)'s newest task and newest successful task."""
    r, t = runs.c, tasks.c
    per_target = (
        select(func.max(t.id))
        .select_from(tasks.join(runs, t.run_id == r.id))
        .group_by(r.job_id, t.vm_uuid, t.target_sr)
    )
    newest_tasks = select(t.run_id).where(
        or_(t.id.in_(per_target), t.id.in_(per_target.where(t.outcome == "success")))
    )
    newest_runs = select(func.max(r.id)).group_by(r.job_id)
    newest_done = select(func.max(r.id)).where(r.outcome != RUNNING).group_by(r.job_id)
    return union_all(newest_tasks, newest_runs, newest_done)


def _new_id(result: CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


# A row's values by column name, in a plain dict: SQLAlchemy's own by-name access costs more
# than the rest of building a TaskRow, and histories read thousands.
_RUN_COLUMNS = tuple(c.name for c in runs.columns)
_TASK_COLUMNS = tuple(c.name for c in tasks.columns)


def _run_row(row: Any) -> RunRow:
    r = dict(zip(_RUN_COLUMNS, row, strict=True))
    started = text_time(r["started_at"])
    assert started is not None
    return RunRow(
        id=r["id"],
        job_id=r["job_id"],
        job_name=r["job_name"],
        schedule_id=r["schedule_id"],
        trigger=r["trigger"],
        started_at=started,
        finished_at=text_time(r["finished_at"]),
        outcome=r["outcome"],
        error=r["error"],
        host=r["host"],
        pid=r["pid"],
        process_start=r["process_start"],
        worker=r["worker"],
    )


def _task_row(row: Any, reasons: dict[str, str], maps: dict[str, str], paths: dict[str, str]) -> TaskRow:
    r = dict(zip(_TASK_COLUMNS, row, strict=True))
    started = text_time(r["started_at"])
    assert started is not None
    return TaskRow(
        id=r["id"],
        run_id=r["run_id"],
        vm_uuid=r["vm_uuid"],
        vm_name=r["vm_name"],
        target_sr=r["target_sr"],
        started_at=started,
        finished_at=text_time(r["finished_at"]),
        outcome=r["outcome"],
        transfer=r["transfer"],
        reasons=reasons,
        bytes_sent=r["bytes_sent"],
        error=r["error"],
        restore_point=r["restore_point"],
        snapshot_time=text_time(r["snapshot_time"]),
        cleaned=r["cleaned"],
        detached=r["detached"],
        target=r["target"],
        maps=maps,
        health_check=r["health_check"],
        paths=paths,
        worker=r["worker"],
    )
