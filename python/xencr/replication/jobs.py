"""A configured job, run: connect to its pools, resolve its targets and VMs, run it, record
each VM/target task in the state database as it starts and ends, and send the job's report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xencr.config import Config, ConfigError, JobConfig, PoolConfig, ScheduleConfig
from xencr.coordination import holding
from xencr.credentials import resolve_password
from xencr.monitor import notify, rpo
from xencr.replication.runner import (
    JobSpec,
    Progress,
    RunReport,
    Target,
    TargetResult,
    TransferMonitor,
    VmResult,
    run_job,
)
from xencr.replication.select import is_candidate
from xencr.schedule import rate_at
from xencr.service import limits
from xencr.service.locks import FileLocker, Locker, lock_dir
from xencr.state import StateDB, open_state
from xencr.xapi import members
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import Endpoint, XapiSession

log = logging.getLogger("xencr.replication")


def connect(pool: PoolConfig, *, interactive: bool, state_path: Path | None = None) -> XapiSession:
    """A session on a configured pool. With ``state_path`` (the configuration's state database),
    the pool's hosts recorded beside it are where the login looks when the configured address is
    down, and the hosts it finds are recorded there again (`members.py`)."""
    record = members.hosts_path(state_path, pool.name) if state_path is not None else None
    endpoint = Endpoint(
        pool.url,
        fingerprint=pool.fingerprint,
        verify_tls=pool.verify_tls,
        name=pool.name,
        known=members.load(record) if record is not None else None,
    )
    session = XapiSession(endpoint, pool.username, resolve_password(pool, interactive=interactive))
    if record is not None:
        try:
            members.save(record, session.pool_hosts())
        except (XapiError, PoolUnreachable, OSError) as err:
            # Only a hint for a later login is lost: the session itself is good.
            log.warning("pool %r: its hosts not recorded in %s: %s", pool.name, record, err)
        except BaseException:
            session.logout()
            raise
    return session


@dataclass
class Connected:
    """The sessions a job needs, by pool name."""

    config: Config
    job: JobConfig
    sessions: dict[str, XapiSession]

    @property
    def source(self) -> XapiSession:
        return self.sessions[self.job.pool]


@contextlib.contextmanager
def connected(config: Config, job: JobConfig, *, interactive: bool) -> Iterator[Connected]:
    sessions: dict[str, XapiSession] = {}
    try:
        for name in [job.pool, *(t.pool for t in job.targets)]:
            if name not in sessions:
                sessions[name] = connect(
                    config.pool(name), interactive=interactive, state_path=config.state.local_path
                )
        yield Connected(config, job, sessions)
    finally:
        for s in sessions.values():
            s.logout()


def resolve_sr(s: XapiSession, sr: str, pool_name: str) -> tuple[str, str]:
    """(ref, uuid) of an SR named by UUID or name_label; one readable error otherwise."""
    for ref, rec in s.api.SR.get_all_records().items():
        if sr in (rec["uuid"], rec["name_label"]):
            return str(ref), str(rec["uuid"])
    raise ConfigError(f"no SR {sr!r} on pool {pool_name!r}")


def targets_of(c: Connected) -> list[Target]:
    out = []
    for t in c.job.targets:
        ref, uuid = resolve_sr(c.sessions[t.pool], t.sr, t.pool)
        sr_name = str(c.sessions[t.pool].api.SR.get_name_label(ref))
        limit = c.config.pool(t.pool).max_imports
        out.append(
            # People read names: the SR as the pool names it now, even when the job says its UUID.
            Target(f"{t.pool}/{sr_name}", c.sessions[t.pool], ref, uuid, dict(t.network_map), t.pool, limit)
        )
    return out


def selected_vms(c: Connected, only: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(ref, record) of the job's VMs now, optionally narrowed to names or UUIDs in ``only``."""
    chosen = []
    for ref, rec in c.source.api.VM.get_all_records().items():
        if not is_candidate(rec) or not c.job.selects(rec["uuid"], rec["name_label"], rec.get("tags", [])):
            continue
        if only and rec["name_label"] not in only and rec["uuid"] not in only:
            continue
        chosen.append((str(ref), rec))
    if only:
        missing = set(only) - {r["name_label"] for _, r in chosen} - {r["uuid"] for _, r in chosen}
        if missing:
            raise ConfigError(f"job {c.job.name!r} selects no VM {', '.join(sorted(missing))}")
    return sorted(chosen, key=lambda x: (x[1]["name_label"], x[1]["uuid"]))


@dataclass(frozen=True)
class Placement:
    """Where a run happens when a cluster worker runs it (`service.cluster`): the worker named on
    its run and tasks, the database leases and slots it holds them by, how long its state
    database waits for a restarting server, and who is told the run's id once recorded."""

    worker: str
    locker: Locker
    slots: limits.SlotProvider
    patience: float = 0.0
    on_run: Callable[[int], None] = lambda run_id: None


def job_vms(config: Config, job: JobConfig) -> list[tuple[str, str]]:
    """(uuid, name) of the VMs the job selects now, asked of its source pool alone."""
    session = connect(config.pool(job.pool), interactive=False, state_path=config.state.local_path)
    try:
        return [
            (rec["uuid"], rec["name_label"])
            for _, rec in selected_vms(Connected(config, job, {job.pool: session}))
        ]
    finally:
        session.logout()


def record_unstarted(
    config: Config, job: JobConfig, schedule_id: str, err: BaseException, *, worker: str | None = None
) -> None:
    """A scheduled run that could not start (its VMs could not be asked for): a failed run with
    its one-line error in the history and the metrics, and the job's report, as `run_configured`
    records a run that failed while connecting."""
    with open_state(config, worker=worker) as db:
        db.finish_run(db.start_run(job.id, job.name, schedule_id, "schedule"), "failure", _error_line(err))
        _notify(config, job, db, _failed_payload(job, err))


def rate_of(sched: ScheduleConfig, now: datetime | None = None) -> int | None:
    """The bandwidth limit of a run of ``sched`` starting ``now``: its rate window then, else its
    rate (fixed for the run: a window opening or closing meanwhile applies from the next run)."""
    return rate_at(sched, now or datetime.now(UTC))


def spec_of(job: JobConfig, schedule_id: str | None, *, now: datetime | None = None) -> JobSpec:
    sched = job.schedule(schedule_id) if schedule_id else (job.schedules[0] if job.schedules else None)
    return JobSpec(
        id=job.id,
        name=job.name,
        schedule_id=sched.id if sched else "manual",
        retention=sched.retention if sched else 3,
        full_interval=(sched.full_interval if sched and sched.full_interval else job.full_interval),
        snapshot_mode=job.snapshot_mode,
        concurrency=job.concurrency,
        rate_limit=rate_of(sched, now) if sched else None,
        vm_timeout=float(job.vm_timeout) if job.vm_timeout else None,
        verify_import=job.verify_import,
        health_check=job.health_check,
        transfer=job.transfer,
        nbd_connections=job.nbd_connections,
        purge_snapshot_data=job.purge_snapshot_data,
    )


def run_configured(
    config: Config,
    job_ref: str,
    *,
    only: list[str] | None = None,
    full: bool = False,
    schedule_id: str | None = None,
    trigger: str = "manual",
    interactive: bool = False,
    progress: Progress = lambda _: None,
    monitor: TransferMonitor | None = None,
    cancel: threading.Event | None = None,
    placement: Placement | None = None,
) -> RunReport:
    """Run a job once and record it. VMs or targets still being replicated by another run are
    skipped (recorded, not failures). ``cancel``, when set, stops the run cleanly: transfers in
    flight are cut and discarded, nothing new starts, and the report is returned as usual.
    The job's report is sent (webhook, email) as its ``report_when`` says; that never fails a run.

    The run is recorded from the moment it starts connecting: a password refused, a pool
    unreachable, an SR or a ``--vm`` not found is a failed run with its one-line error in the
    history and the metrics. A job or schedule that does not exist is not a run of anything:
    only the raised error says so.

    The per-VM/target locks and the transfer slots are this host's (flock files, in-process
    counters) with an SQLite state, the database's with PostgreSQL (`xencr.coordination`: held
    by ``placement``'s worker in a cluster, else by this process for the run's length)."""
    job = config.job(job_ref)
    spec = dataclasses.replace(
        spec_of(job, schedule_id),
        cancel=cancel,
        source_pool=job.pool,
        max_exports=config.pool(job.pool).max_exports,
    )
    worker = placement.worker if placement is not None else None
    patience = placement.patience if placement is not None else 0.0
    with open_state(config, worker=worker, patience=patience) as db, contextlib.ExitStack() as held:
        if placement is not None:
            spec = dataclasses.replace(spec, locker=placement.locker, slots=placement.slots)
        elif config.state.engine == "postgresql":
            h = held.enter_context(holding(db, config.worker))
            spec = dataclasses.replace(spec, locker=h.locker, slots=h.slots)
        else:
            spec = dataclasses.replace(spec, locker=FileLocker(lock_dir(config.state.local_path)))
        if placement is None:  # a cluster's housekeeping closes the runs of dead workers
            db.mark_interrupted()
        run_id = db.start_run(job.id, job.name, spec.schedule_id, trigger)
        try:
            if placement is not None:
                placement.on_run(run_id)
            with connected(config, job, interactive=interactive) as c:
                targets = targets_of(c)
                vms = selected_vms(c, only)
                recorder = _Recorder(db, run_id)
                try:
                    report = run_job(
                        c.source,
                        [ref for ref, _ in vms],
                        targets,
                        # Restore point disks' block maps; incomplete attempts kept for a resume.
                        dataclasses.replace(spec, maps=db, resumes=db),
                        force_full=full,
                        progress=progress,
                        monitor=monitor,
                        observer=recorder,
                    )
                    recorder.close(vms, report)
                    _say_followed(report, c, targets)
                except BaseException as err:
                    recorder.abandon(_error_line(err))
                    raise
                db.finish_run(
                    run_id, report.outcome, None if report.outcome == "success" else _summary(report)
                )
        except BaseException as err:
            # A run that raised is over, whenever it raised: say so now rather than leave it "running".
            db.finish_run(run_id, "failure", _error_line(err))
            # A mistake in a command typed by hand is answered on the terminal, not reported.
            if isinstance(err, Exception) and not (isinstance(err, ConfigError) and trigger == "manual"):
                _notify(config, job, db, _failed_payload(job, err))
            raise
        _notify(config, job, db, report_payload(report))
    return report


def _say_followed(report: RunReport, c: Connected, targets: list[Target]) -> None:
    """How each pool was reached when not at its configured master (HOST_IS_SLAVE followed, a
    recorded host used) goes with each target's warnings: the source's, and its own pool's."""
    pool_of = {t.name: t.pool for t in targets}
    for v in report.vms:
        for t in v.targets:
            pool = pool_of.get(t.target, c.job.pool)
            t.warnings[:0] = c.source.followed + (c.sessions[pool].followed if pool != c.job.pool else [])


def _error_line(err: BaseException) -> str:
    return str(err) or type(err).__name__


class _Recorder:
    """Records each VM/target task as the runner reports it: a row when its work starts, its
    outcome when it ends; a target skipped or interrupted before starting gets a finished row."""

    def __init__(self, db: StateDB, run_id: int) -> None:
        self.db = db
        self.run_id = run_id
        self.open: dict[tuple[str, str], int] = {}  # (vm uuid, sr uuid) -> task id
        self.lock = threading.Lock()

    def started(self, vm: VmResult, target: Target) -> None:
        task = self.db.start_task(self.run_id, vm.vm_uuid, vm.vm_name, target.sr_uuid, target.name)
        with self.lock:
            self.open[(vm.vm_uuid, target.sr_uuid)] = task

    def finished(self, vm: VmResult, tr: TargetResult) -> None:
        with self.lock:
            task = self.open.pop((vm.vm_uuid, tr.sr_uuid), None)
        if task is None and tr.outcome == "skipped":
            self.db.skip_task(
                self.run_id, vm.vm_uuid, vm.vm_name, tr.sr_uuid, tr.error or "skipped", tr.target
            )
            return
        if task is None:
            task = self.db.start_task(self.run_id, vm.vm_uuid, vm.vm_name, tr.sr_uuid, tr.target)
        self.db.finish_task(
            task,
            tr.outcome,
            transfer=tr.kind if tr.disks else None,
            reasons={d.userdevice: d.reason for d in tr.disks},
            paths={d.userdevice: d.path_reason for d in tr.disks if d.path_reason},
            bytes_sent=tr.bytes_sent,
            error=tr.error,
            restore_point=tr.restore_point,
            snapshot_time=vm.snapshot_time if tr.restore_point else None,
            cleaned=len(tr.cleaned),
            detached=len(tr.detached),
            maps={d.userdevice: d.map_digest for d in tr.disks if d.map_digest},
            health_check=tr.health_check.line() if tr.health_check is not None else None,
        )
        if tr.expired:
            # Retention destroyed these restore points: their maps go unless another uses them.
            self.db.release_maps(tr.expired)

    def close(self, vms: list[tuple[str, dict[str, Any]]], report: RunReport) -> None:
        """Tasks a VM started but never finished (its run raised midway) fail with its error."""
        errors = {rec["uuid"]: vr.error for (_, rec), vr in zip(vms, report.vms, strict=True)}
        self._finish_open(lambda vm_uuid: errors.get(vm_uuid) or "not finished")

    def abandon(self, error: str) -> None:
        self._finish_open(lambda _: error)

    def _finish_open(self, error_of: Callable[[str], str]) -> None:
        with self.lock:
            left, self.open = self.open, {}
        for (vm_uuid, _), task in left.items():
            self.db.finish_task(task, "failure", error=error_of(vm_uuid))


def _notify(config: Config, job: JobConfig, db: StateDB, payload: dict[str, Any]) -> None:
    """Send the run's report as the job says (webhook, email); problems are one log line."""
    if job.report_when == "never" or (job.webhook is None and not job.email_to):
        return
    try:
        problems = notify.notify(config, job, payload, rpo.breaches(db, job, datetime.now(UTC)))
    except Exception as err:  # a report that cannot be sent must never fail the run
        # Only the kind of error: its text could quote the webhook's token.
        problems = [f"job {job.name}: report not sent: {type(err).__name__}"]
    if problems:
        log.warning("%s", "; ".join(problems))


def _failed_payload(job: JobConfig, err: BaseException) -> dict[str, Any]:
    """The report of a run that could not run (a pool unreachable, a target SR missing)."""
    now = datetime.now(UTC).isoformat()
    return {
        "job": job.name,
        "outcome": "failure",
        "started": now,
        "finished": now,
        "error": _error_line(err),
        "vms": [],
    }


def _summary(report: RunReport) -> str:
    errors = [f"{v.vm_name}: {v.error}" for v in report.vms if v.error]
    errors += [f"{v.vm_name} -> {t.target}: {t.error}" for v in report.vms for t in v.targets if t.error]
    return "; ".join(errors)[:2000]


def report_json(report: RunReport) -> str:
    return json.dumps(report_payload(report), indent=2)


def report_payload(report: RunReport) -> dict[str, Any]:
    """The run report as JSON-ready data (``xencr run --json``, webhooks, emails)."""

    def disk(d: Any) -> dict[str, Any]:
        return {
            "userdevice": d.userdevice,
            "name": d.name,
            "kind": d.kind,
            "reason": d.reason,
            "path": d.path,
            "path_reason": d.path_reason,
            "bytes": d.bytes_sent,
            "bytes_read": d.bytes_read,
            "blocks": d.blocks,
            "seconds": round(d.seconds, 3),
            "map": d.map_digest or None,  # the restore point disk's block map (`xencr verify`)
        }

    return {
        "job": report.job,
        "outcome": report.outcome,
        "started": report.started.isoformat(),
        "finished": report.finished.isoformat() if report.finished else None,
        "vms": [
            {
                "uuid": v.vm_uuid,
                "name": v.vm_name,
                "outcome": v.outcome,
                "snapshot": v.snapshot,
                "snapshot_time": v.snapshot_time.isoformat() if v.snapshot_time else None,
                "error": v.error,
                "source_snapshots_removed": v.source_pruned,
                "source_snapshots_in_use": v.source_kept,
                "source_snapshot_data_destroyed": v.source_purged,
                "notes": v.notes,
                "targets": [
                    {
                        "target": t.target,
                        "sr": t.sr_uuid,
                        "outcome": t.outcome,
                        "restore_point": t.restore_point,
                        "kind": t.kind,
                        "bytes": t.bytes_sent,
                        "error": t.error,
                        "holder": t.holder,
                        "cleaned": t.cleaned,
                        "expired": t.expired,
                        "warnings": t.warnings,
                        "detached": t.detached,
                        "health_check": (
                            None
                            if t.health_check is None
                            else {
                                "passed": t.health_check.passed,
                                "detail": t.health_check.detail,
                                "seconds": round(t.health_check.seconds, 3),
                            }
                        ),
                        "disks": [disk(d) for d in t.disks],
                    }
                    for t in v.targets
                ],
            }
            for v in report.vms
        ],
    }
