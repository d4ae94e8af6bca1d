"""A configured job, run: connect to its pools, resolve its targets and VMs, run it, and record
the outcome in the state database."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from xencr.config import Config, ConfigError, JobConfig, PoolConfig
from xencr.credentials import resolve_password
from xencr.replication.runner import JobSpec, Progress, RunReport, Target, TransferMonitor, run_job
from xencr.replication.select import is_candidate
from xencr.state import StateDB
from xencr.xapi.session import Endpoint, XapiSession


def connect(pool: PoolConfig, *, interactive: bool) -> XapiSession:
    endpoint = Endpoint(pool.url, fingerprint=pool.fingerprint, verify_tls=pool.verify_tls)
    return XapiSession(endpoint, pool.username, resolve_password(pool, interactive=interactive))


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
                sessions[name] = connect(config.pool(name), interactive=interactive)
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
        out.append(Target(f"{t.pool}/{t.sr}", c.sessions[t.pool], ref, uuid, dict(t.network_map)))
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


def spec_of(job: JobConfig, schedule_id: str | None) -> JobSpec:
    sched = job.schedule(schedule_id) if schedule_id else (job.schedules[0] if job.schedules else None)
    return JobSpec(
        id=job.id,
        name=job.name,
        schedule_id=sched.id if sched else "manual",
        retention=sched.retention if sched else 3,
        full_interval=(sched.full_interval if sched and sched.full_interval else job.full_interval),
        snapshot_mode=job.snapshot_mode,
        concurrency=job.concurrency,
        rate_limit=sched.rate if sched else None,
        vm_timeout=float(job.vm_timeout) if job.vm_timeout else None,
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
) -> RunReport:
    job = config.job(job_ref)
    spec = spec_of(job, schedule_id)
    with StateDB(config.state_path) as db, connected(config, job, interactive=interactive) as c:
        db.mark_interrupted()
        targets = targets_of(c)
        vms = selected_vms(c, only)
        run_id = db.start_run(job.id, job.name, spec.schedule_id, trigger)
        try:
            report = _run_recorded(db, run_id, c, vms, targets, spec, full, progress, monitor)
        except BaseException as err:
            # A run that raised is over: say so now rather than leave it "running".
            db.finish_run(run_id, "failure", str(err) or type(err).__name__)
            raise
        db.finish_run(run_id, report.outcome, None if report.outcome == "success" else _summary(report))
    return report


def _run_recorded(
    db: StateDB,
    run_id: int,
    c: Connected,
    vms: list[tuple[str, dict[str, Any]]],
    targets: list[Target],
    spec: JobSpec,
    full: bool,
    progress: Progress,
    monitor: TransferMonitor | None,
) -> RunReport:
    tasks = {
        (ref, t.sr_uuid): db.start_task(run_id, rec["uuid"], rec["name_label"], t.sr_uuid)
        for ref, rec in vms
        for t in targets
    }
    report = run_job(
        c.source, [ref for ref, _ in vms], targets, spec, force_full=full, progress=progress, monitor=monitor
    )
    for (ref, _), vr in zip(vms, report.vms, strict=True):
        for t in targets:
            tr = next((x for x in vr.targets if x.sr_uuid == t.sr_uuid), None)
            task = tasks[(ref, t.sr_uuid)]
            if tr is None:
                db.finish_task(task, "failure", error=vr.error or "not attempted")
                continue
            db.finish_task(
                task,
                tr.outcome,
                transfer=tr.kind if tr.disks else None,
                reasons={d.userdevice: d.reason for d in tr.disks},
                bytes_sent=tr.bytes_sent,
                error=tr.error,
                restore_point=tr.restore_point,
            )
    return report


def _summary(report: RunReport) -> str:
    errors = [f"{v.vm_name}: {v.error}" for v in report.vms if v.error]
    errors += [f"{v.vm_name} -> {t.target}: {t.error}" for v in report.vms for t in v.targets if t.error]
    return "; ".join(errors)[:2000]


def report_json(report: RunReport) -> str:
    def disk(d: Any) -> dict[str, Any]:
        return {
            "userdevice": d.userdevice,
            "name": d.name,
            "kind": d.kind,
            "reason": d.reason,
            "bytes": d.bytes_sent,
            "blocks": d.blocks,
            "seconds": round(d.seconds, 3),
        }

    return json.dumps(
        {
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
                    "error": v.error,
                    "source_snapshots_removed": v.source_pruned,
                    "targets": [
                        {
                            "target": t.target,
                            "sr": t.sr_uuid,
                            "outcome": t.outcome,
                            "restore_point": t.restore_point,
                            "kind": t.kind,
                            "bytes": t.bytes_sent,
                            "error": t.error,
                            "cleaned": t.cleaned,
                            "expired": t.expired,
                            "warnings": t.warnings,
                            "disks": [disk(d) for d in t.disks],
                        }
                        for t in v.targets
                    ],
                }
                for v in report.vms
            ],
        },
        indent=2,
    )
