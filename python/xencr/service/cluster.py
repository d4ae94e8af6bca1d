"""The daemon as a worker of a cluster (a PostgreSQL state; the rules are `xencr.coordination`'s):
it registers, heartbeats, claims the fires that come due (each with one task for the whole job),
and runs ``[worker] slots`` consumer threads that claim tasks: a whole job's task is expanded
into one task per VM, each of those run as one run of its job for one VM (database leases and
slots, the run and its tasks naming the worker). On every heartbeat it puts back the tasks of
workers that stopped answering and reports tasks no live worker may take.

A state database that stops answering is waited for (`PATIENCE` seconds per statement, retried
with backoff); a task that could not start for that reason goes back to the queue. A stop gives
the tasks it cancels back to the queue, so another worker resumes them at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from xencr.config import Config, ConfigError, JobConfig
from xencr.coordination import Holding, Worker, WorkerNameInUse
from xencr.coordination import queue as tasks
from xencr.coordination.queue import Fire, QueuedVm, QueueRow
from xencr.coordination.sql import retried
from xencr.replication.jobs import Placement, job_vms, record_unstarted
from xencr.replication.runner import RunReport
from xencr.state import StateDB, StateError, open_state

# Seconds a statement waits for the state database to answer again (a restart) before failing.
PATIENCE = 120.0
# A consumer with nothing to claim looks again after this long (sooner when this worker queues).
_POLL = 1.0
# Pending tasks of jobs this worker's configuration no longer schedules are dropped after this
# long (time for every worker to reload the same configuration).
_STALE = timedelta(minutes=10)
_PRUNE_EVERY = 3600.0


class TaskRun(Protocol):
    """``run_configured`` as the daemon calls it (tests inject another)."""

    def __call__(
        self,
        config: Config,
        job_ref: str,
        *,
        only: list[str] | None = ...,
        schedule_id: str | None = ...,
        trigger: str = ...,
        progress: Callable[[str], None] = ...,
        cancel: threading.Event | None = ...,
        placement: Placement | None = ...,
    ) -> RunReport: ...


def job_pools(job: JobConfig) -> tuple[str, ...]:
    """Every pool a task of the job touches: its source, then its targets' pools."""
    return tuple(dict.fromkeys([job.pool, *(t.pool for t in job.targets)]))


class ClusterWork:
    """This daemon's part of the cluster. ``config`` returns the current configuration (it may be
    reloaded); ``log`` writes one event line; ``report`` logs a finished run's tasks."""

    def __init__(
        self,
        config: Callable[[], Config],
        *,
        log: Callable[..., None],
        run: TaskRun,
        report: Callable[[JobConfig, str, RunReport], None],
        after_task: Callable[[], None] = lambda: None,
    ) -> None:
        self._config = config
        self.log = log
        self._run = run
        self._report = report
        self._after_task = after_task
        cfg = config()
        self.name = cfg.worker.name
        # Queue statements wait out a database restart; the heartbeat's own connection waits no
        # longer than a heartbeat period, so that losing the database is noticed within a lease.
        self.db: StateDB = open_state(cfg, worker=self.name, patience=PATIENCE)
        self._beat_db: StateDB = open_state(cfg, patience=cfg.worker.lease / 3)
        # Housekeeping after each heartbeat, on a thread and connection of its own: its
        # statements, slow or failing, never hold up the next renewal.
        self._chores_db: StateDB = open_state(cfg, patience=cfg.worker.lease / 3)
        self._chores = threading.Event()
        self.worker = Worker(self._beat_db, cfg.worker, on_lost=self._lost, on_beat=self._chores.set)
        self.holding = Holding.of(self.worker)
        self._stopping = threading.Event()
        self._wake = threading.Condition()
        self._lock = threading.Lock()
        self._cancels: dict[int, threading.Event] = {}  # queue id -> the cancel of its run
        self._cancelled = False  # the daemon's stop cancelled what runs: so is what starts
        self._consumers: list[threading.Thread] = []
        self._busy: set[threading.Thread] = set()
        self._reported: set[int] = set()  # unserved tasks already logged
        self._claimed: set[int] = set()  # queue ids the consumers run now
        self._pruned = 0.0

    # -- life

    def start(self) -> None:
        """Register (a name held by a live worker elsewhere is a configuration error), heartbeat,
        and start the consumers."""
        cfg = self._config()
        try:
            self.worker.start()
        except WorkerNameInUse as err:
            self.close()
            raise ConfigError(str(err), path=cfg.path, key="worker.name") from None
        for i in range(cfg.worker.slots):
            t = threading.Thread(target=self._consume, name=f"task-{i}", daemon=True)
            self._consumers.append(t)
            t.start()
        threading.Thread(target=self._keep_house, name="housekeeping", daemon=True).start()
        self.log(
            "worker_started",
            worker=self.name,
            pools=",".join(cfg.worker.pools) or "all",
            slots=cfg.worker.slots,
            lease=cfg.worker.lease,
        )

    def cancel_for_stop(self) -> None:
        """The stop's grace is over: cut what runs and whatever would still start."""
        with self._lock:
            self._cancelled = True
        self.cancel_all()

    def stop_claiming(self) -> None:
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()

    def busy(self) -> list[threading.Thread]:
        """Threads running a task (or expanding a fire's whole-job task) now."""
        with self._lock:
            return [t for t in self._busy if t.is_alive()]

    def cancel_all(self) -> None:
        """Cut every task running now (and any that starts from now on, until a heartbeat renews
        the claims again: see `_lost`)."""
        with self._lock:
            for cancel in self._cancels.values():
                cancel.set()

    def stop(self) -> None:
        """Release every claim (tasks still claimed go back to the queue) and record the stop."""
        self.stop_claiming()
        self.worker.stop()
        self.log("worker_stopped", worker=self.name)
        self.close()

    def close(self) -> None:
        self.db.close()
        self._beat_db.close()
        self._chores_db.close()

    # -- fires

    def fire(self, job: JobConfig, schedule_id: str, fire_at: datetime, next_fire: datetime | None) -> None:
        """A due fire: claimed once cluster-wide, with one task for the whole job that a
        consumer of any worker that may touch its pools claims and expands into one task per VM
        (reported, while none may)."""
        f = Fire(job.id, schedule_id, fire_at, job_pools(job))
        try:
            won = retried(lambda: tasks.claim_fire(self.db, f, self.name, next_fire), seconds=PATIENCE)
        except StateError as err:
            self.log("state_error", job=job.name, schedule=schedule_id, error=str(err))
            return
        if not won:
            return
        self.log("fired", job=job.name, schedule=schedule_id, fire_at=fire_at, worker=self.name)
        with self._wake:
            self._wake.notify_all()

    def _vms(self, job: JobConfig, schedule_id: str) -> list[QueuedVm] | None:
        """The job's VMs now, or None when the source pool could not be asked (recorded as a
        failed run, as `run_configured` records one that cannot connect)."""
        cfg = self._config()
        try:
            return [QueuedVm(uuid, name) for uuid, name in job_vms(cfg, job)]
        except Exception as err:  # whatever the pool answered, the daemon goes on
            self.log("run_failed", job=job.name, schedule=schedule_id, error=str(err) or type(err).__name__)
            try:
                record_unstarted(cfg, job, schedule_id, err, worker=self.name)
            except Exception as again:
                self.log("state_error", job=job.name, error=str(again))
            return None

    def _queue(self, f: Fire, vms: list[QueuedVm]) -> bool:
        """Queue the VMs' tasks; False when the database did not take them (logged)."""
        try:
            n = retried(lambda: tasks.enqueue(self.db, f, vms), seconds=PATIENCE)
        except StateError as err:
            self.log("state_error", job=self._name(f.job_id), schedule=f.schedule_id, error=str(err))
            return False
        self.log("queued", job=self._name(f.job_id), schedule=f.schedule_id, fire_at=f.fire_at, tasks=n)
        with self._wake:
            self._wake.notify_all()
        return True

    def record_fires(self, nexts: dict[tuple[str, str], datetime | None]) -> None:
        """Every pair's next fire (the same on every worker); the last fire stays the winner's."""
        with self.db.transaction() as conn:
            tasks.record_fires(conn, nexts)

    # -- tasks

    def serves(self, pools: tuple[str, ...]) -> bool:
        """Whether this worker may touch every one of ``pools`` (as it registered: a reloaded
        [worker] table takes effect at the next start)."""
        return not self.worker.pools or set(pools) <= set(self.worker.pools)

    def _serving(self, cfg: Config) -> dict[str, int]:
        """Job id -> concurrency, for the enabled jobs whose pools this worker may touch."""
        return {j.id: j.concurrency for j in cfg.jobs.values() if j.enabled and self.serves(job_pools(j))}

    def _consume(self) -> None:
        while not self._stopping.is_set():
            row = None
            if not self.worker.lost.is_set():
                try:
                    row = tasks.claim_next(self.db, self.worker, self._serving(self._config()))
                except StateError as err:
                    self.log("state_error", error=str(err))
            if row is None:
                with self._wake:
                    self._wake.wait(_POLL)
                continue
            with self._lock:
                self._busy.add(threading.current_thread())
                self._claimed.add(row.id)
            try:
                self._task(row)
            finally:
                with self._lock:
                    self._busy.discard(threading.current_thread())
                    self._claimed.discard(row.id)
                self._after_task()

    def _task(self, row: QueueRow) -> None:
        cfg = self._config()
        try:
            job = cfg.job(row.job_id)
        except ConfigError:
            self._done(row, tasks.DROPPED)
            return
        if row.whole_job:
            vms = self._vms(job, row.schedule_id)
            if vms is None:
                self._done(row, "failure")  # recorded as a failed run of the job
            elif self._queue(Fire(row.job_id, row.schedule_id, row.fire_at, row.pools), vms):
                self._done(row, tasks.EXPANDED)
            else:
                self._again(row)  # the database is out of reach: expanded later, here or elsewhere
            return
        cancel = threading.Event()
        with self._lock:
            self._cancels[row.id] = cancel
            if self._cancelled or self.worker.lost.is_set():
                cancel.set()
        placement = Placement(
            worker=self.name,
            locker=self.holding.locker,
            slots=self.holding.slots,
            patience=PATIENCE,
            on_run=lambda run_id: tasks.set_run(self.db, row, run_id),
        )
        self.log("task_started", job=job.name, vm=row.vm_name, fire_at=row.fire_at, worker=self.name)
        outcome = "failure"
        try:
            report = self._run(
                cfg,
                job.name,
                only=[row.vm_uuid],
                schedule_id=row.schedule_id,
                trigger="schedule",
                progress=lambda line: self.log("progress", job=job.name, msg=line),
                cancel=cancel,
                placement=placement,
            )
            outcome = report.outcome
            self._report(job, row.schedule_id, report)
        except StateError as err:
            # The database was gone for longer than we wait: someone runs it again (or resumes it).
            self.log("task_requeued", job=job.name, vm=row.vm_name, error=str(err))
            self._again(row)
            return
        except Exception as err:  # a run's failure must not stop the daemon
            self.log("run_failed", job=job.name, vm=row.vm_name, error=str(err) or type(err).__name__)
        finally:
            with self._lock:
                self._cancels.pop(row.id, None)
        if outcome == "interrupted" and (self._stopping.is_set() or self.worker.lost.is_set()):
            # Cut by this worker's stop or lost claims: back to the queue, where another worker
            # resumes the attempt now rather than at the next fire.
            self._again(row)
        else:
            self._done(row, outcome)

    def _done(self, row: QueueRow, outcome: str) -> None:
        try:
            if not retried(lambda: tasks.finish(self.db, row, outcome), seconds=PATIENCE):
                self.log("task_taken_over", job=self._name(row.job_id), vm=row.vm_name, outcome=outcome)
        except StateError as err:
            self.log("state_error", job=self._name(row.job_id), vm=row.vm_name, error=str(err))

    def _again(self, row: QueueRow) -> None:
        try:
            retried(lambda: tasks.requeue(self.db, row), seconds=PATIENCE)
        except StateError as err:
            self.log("state_error", job=self._name(row.job_id), vm=row.vm_name, error=str(err))

    def _name(self, job_id: str) -> str:
        """A job's name for the log (its id when the configuration no longer has it)."""
        return next((j.name for j in self._config().jobs.values() if j.id == job_id), job_id)

    # -- the heartbeat's

    def _lost(self, why: str) -> None:
        self.log("worker_lost_claims", worker=self.name, msg=why + "; cancelling its tasks")
        self.cancel_all()

    def _keep_house(self) -> None:
        while not self._stopping.is_set():
            if not self._chores.wait(self.worker.period):
                continue
            self._chores.clear()
            try:
                self._housekeeping(self._chores_db)
            except Exception as err:  # logged; the next heartbeat's turn tries again
                self.log("state_error", worker=self.name, msg="housekeeping failed", error=str(err))

    def _housekeeping(self, db: StateDB) -> None:
        """After each renewal: tasks of workers that stopped answering put back, claims this
        worker made without hearing the answer given back, runs of dead workers closed, tasks no
        live worker may take reported, old queue rows pruned."""
        cfg = self._config()
        for r in tasks.requeue_expired(db):
            self.log(
                "task_requeued", job=self._name(r.job_id), vm=r.vm_name, fire_at=r.fire_at, worker=r.worker
            )
        with self._lock:
            running = set(self._claimed)
        stray = tasks.requeue_strays(db, self.name, running, older_than=timedelta(seconds=self.worker.lease))
        if stray:
            self.log("task_requeued", worker=self.name, tasks=stray, msg="claimed without an answer")
        tasks.close_dead_runs(db)
        enabled = [j.id for j in cfg.jobs.values() if j.enabled]
        tasks.drop_unscheduled(db, enabled, older_than=_STALE)
        waiting = tasks.unserved(db)
        for r in waiting:
            if r.id not in self._reported:
                self.log(
                    "task_unserved",
                    job=self._name(r.job_id),
                    vm=r.vm_name,
                    pools=",".join(r.pools),
                    fire_at=r.fire_at,
                    msg="no live worker may touch all of these pools",
                )
        self._reported = {r.id for r in waiting}
        if time.monotonic() - self._pruned > _PRUNE_EVERY:
            tasks.prune(db)
            self._pruned = time.monotonic()
        with self._wake:
            self._wake.notify_all()
