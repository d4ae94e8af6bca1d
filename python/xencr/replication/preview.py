"""What a run would do (`xencr plan`) and where each VM stands (`xencr status`). Both only read:
no snapshot is taken, nothing is written on either side."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from xencr.config import JobConfig
from xencr.monitor.rpo import job_rpo, protection
from xencr.replication import ownership, resume
from xencr.replication import path as paths
from xencr.replication import source as srcmod
from xencr.replication.decide import plan_target
from xencr.replication.jobs import Connected, selected_vms, spec_of, targets_of
from xencr.replication.metadata import parse_stamp
from xencr.schedule import next_fire
from xencr.state import StateDB, TaskRow
from xencr.units import human_bytes
from xencr.xapi.session import XapiSession
from xencr.xapi.transfer import changed_blocks

BLOCK = 2 * 1024 * 1024


@dataclass
class DiskPreview:
    userdevice: str
    name: str
    kind: str
    reason: str
    estimated_bytes: int
    path: str = "stream"
    path_reason: str = ""


@dataclass
class TargetPreview:
    vm_name: str
    vm_uuid: str
    target: str
    disks: list[DiskPreview] = field(default_factory=list)
    sr_free_after: int = 0
    problems: list[str] = field(default_factory=list)
    source_data_freed: int = 0  # purge_snapshot_data: snapshot data the run destroys on the source
    # An incomplete attempt recorded for this VM and target: "resumes attempt X: disk 0 at 78%..."
    # or "cleans up incomplete attempt X (why) and starts over" (`resume`).
    resume: str = ""

    @property
    def estimated_bytes(self) -> int:
        return sum(d.estimated_bytes for d in self.disks)


def plan(
    c: Connected,
    only: list[str] | None = None,
    *,
    full: bool = False,
    resumes: resume.ResumeStore | None = None,
) -> list[TargetPreview]:
    spec = spec_of(c.job, None)
    src = c.source
    targets = targets_of(c)
    out = []
    free = {
        t.sr_uuid: int(t.session.api.SR.get_physical_size(t.sr))
        - int(t.session.api.SR.get_physical_utilisation(t.sr))
        for t in targets
    }
    offered = paths.offer(src, c.job.pool, c.job.transfer)
    for vm, rec in selected_vms(c, only):
        disks = srcmod.disks_of(src, vm)
        previous = srcmod.job_snapshots(src, vm, c.job.id)
        foreign = srcmod.foreign_snapshots(src, vm, c.job.id)
        nets = {src.api.network.get_name_label(src.api.VIF.get_network(v)) for v in rec["VIFs"]}
        for t in targets:
            row = resumes.resume_of(c.job.id, rec["uuid"], t.sr_uuid) if resumes else None
            snap, why = None, None
            if row is not None:
                s = ownership.survey(t.session, c.job.id, rec["uuid"], t.sr_uuid, keep=row.attempt)
                devices = {d.userdevice for d in disks}
                snap, why = resume.judge(src, vm, c.job.id, row, s.kept, s.kept_problem, devices)
            resuming = snap is not None
            p = plan_target(
                src,
                t.session,
                job_id=c.job.id,
                vm_uuid=rec["uuid"],
                sr_uuid=t.sr_uuid,
                previous=[(r, x) for r, x in previous if r != snap] if resuming else previous,
                disks=srcmod.disks_of(src, snap) if snap is not None else disks,
                full_interval=spec.full_interval,
                force_full=full,
                xo_snapshots=foreign,
            )
            if row is not None and snap is not None:
                try:
                    chosen = paths.choose(src, p, offered, c.job.transfer)
                    why = resume.changed(
                        resume.Shape.parse(row.shape), resume.shape_of(src, t.session, chosen)
                    )
                except paths.NbdRequired as err:
                    why = str(err)
                resuming = why is None
            tp = TargetPreview(rec["name_label"], rec["uuid"], t.name)
            if row is not None and resuming:
                starts = ", ".join(
                    f"disk {d.userdevice} " + resume.progress_line(d, resume.recorded_start(d))
                    for d in row.disks
                )
                tp.resume = f"resumes incomplete attempt {row.attempt} of snapshot {row.snapshot}: {starts}"
            elif row is not None:
                tp.resume = f"cleans up incomplete attempt {row.attempt} ({why}) and starts over"
            if c.job.purge_snapshot_data and offered.nbd is None:
                tp.source_data_freed = _snapshot_data(src, previous)
            for dp in (paths.predict(src, d, offered, c.job.transfer) for d in p.disks):
                if dp.path == "none":
                    tp.problems.append(f"disk {dp.disk.userdevice}: {dp.path_reason}")
                if dp.base_source_vdi and dp.path == "nbd":
                    est = paths.changed_estimate(src, dp.base_source_vdi, dp.disk)
                elif dp.base_source_vdi:
                    # The live disk against the base snapshot: what the new snapshot will carry.
                    est = changed_blocks(src, dp.disk.vdi, dp.base_source_vdi) * BLOCK
                else:
                    est = int(src.api.VDI.get_physical_utilisation(dp.disk.vdi))
                if row is not None and resuming:
                    rd = next((d for d in row.disks if d.userdevice == dp.disk.userdevice), None)
                    if rd is not None and rd.blocks:
                        start = resume.recorded_start(rd)
                        est = int(rd.stream_bytes * (1 - min(start, rd.blocks) / rd.blocks))
                tp.disks.append(
                    DiskPreview(
                        dp.disk.userdevice, dp.disk.name, dp.kind, dp.reason, est, dp.path, dp.path_reason
                    )
                )
            # Retention frees the oldest restore point once the new one is committed.
            released = 0
            if p.points and len(p.points) + 1 > spec.retention:
                for live, snap, _ in p.points[0].disks.values():
                    for vdi in (live, snap):
                        if vdi:
                            released += int(t.session.api.VDI.get_physical_utilisation(vdi))
            free[t.sr_uuid] -= tp.estimated_bytes
            tp.sr_free_after = free[t.sr_uuid] + released
            if free[t.sr_uuid] < 0:
                tp.problems.append(f"insufficient space on {t.name}: {human_bytes(-free[t.sr_uuid])} short")
            target_nets = {r["name_label"] for r in t.session.api.network.get_all_records().values()}
            for n in sorted(nets):
                mapped = t.network_map.get(n, n)
                if mapped not in target_nets:
                    tp.problems.append(f"network {n!r} has no match on {t.name} (map it in the job)")
            out.append(tp)
    return out


def _snapshot_data(src: XapiSession, snapshots: list[tuple[str, dict[str, Any]]]) -> int:
    """Bytes the job's snapshots still hold as data (not yet reduced to their CBT logs)."""
    total = 0
    for snap, _ in snapshots:
        for d in srcmod.disks_of(src, snap):
            if src.api.VDI.get_type(d.vdi) != "cbt_metadata":
                total += int(src.api.VDI.get_physical_utilisation(d.vdi))
    return total


@dataclass
class StatusRow:
    vm_name: str
    vm_uuid: str
    target: str  # as the job names it (pool/SR), or the SR UUID when read from history
    newest: str | None  # the newest restore point's UUID
    age_seconds: int | None
    rpo_seconds: int | None
    last_outcome: str | None  # of the newest task, skipped and interrupted included
    last_error: str | None
    target_sr: str = ""
    snapshot_time: datetime | None = None  # when the newest restore point was taken
    last_finished: datetime | None = None  # when the newest task ended
    next_run: datetime | None = None  # None: the job is disabled or has no schedule
    source: str = "pool"  # "pool": restore points as the target holds them; "history": as recorded
    detached: int = 0  # objects of the job on the target that xencr leaves alone (`ownership`)
    health_check: str | None = None  # the newest health check: "passed: ..." / "failed: ..."
    worker: str | None = None  # the cluster worker of the newest task (None: one host, or none yet)
    # A cluster's pending task of this VM that no live worker may take: the fire it waits since.
    unserved_since: datetime | None = None

    @property
    def breach(self) -> bool:
        if self.rpo_seconds is None:
            return False
        return self.age_seconds is None or self.age_seconds > self.rpo_seconds


def next_run(
    job: JobConfig, fires: Mapping[tuple[str, str], tuple[datetime | None, datetime | None]], now: datetime
) -> datetime | None:
    """When the job runs next: the daemon's recorded fire time per schedule (one in the past
    says the daemon did not fire it: stopped, or behind), else the schedule's next fire after
    ``now`` (no daemon records it: `xencr run` from timers)."""
    if not job.enabled:
        return None
    times = []
    for s in job.schedules:
        recorded = fires.get((job.id, s.id), (None, None))[1]
        times.append(recorded if recorded is not None else next_fire(s, now))
    return min(times, default=None)


def _last(db: StateDB | None, vm_uuid: str, sr_uuid: str) -> TaskRow | None:
    return db.last_task(vm_uuid, sr_uuid) if db is not None else None


def _health_checks(db: StateDB | None, job_id: str) -> dict[tuple[str, str], str | None]:
    """(VM UUID, SR UUID) -> the newest health check recorded."""
    checked = db.health_checks(job_id)[0] if db is not None else []
    return {(t.vm_uuid, t.target_sr): t.health_check for t in checked}


def status(c: Connected, db: StateDB | None, now: datetime | None = None) -> list[StatusRow]:
    """Per selected VM and target: the newest restore point on the target (asked of the pool),
    the last task recorded in ``db`` (``None``: no history yet), and the next run."""
    now = now or datetime.now(UTC)
    rpo = job_rpo(c.job)
    upcoming = next_run(c.job, db.fires() if db is not None else {}, now)
    rows = []
    targets = targets_of(c)
    checks = _health_checks(db, c.job.id)
    for _vm, rec in selected_vms(c):
        for t in targets:
            found = ownership.survey(t.session, c.job.id, rec["uuid"], t.sr_uuid)
            points = found.points
            newest = points[-1] if points else None
            when = parse_stamp(newest.snapshot_time) if newest else None
            last = _last(db, rec["uuid"], t.sr_uuid)
            rows.append(
                StatusRow(
                    rec["name_label"],
                    rec["uuid"],
                    t.name,
                    newest.uuid if newest else None,
                    max(0, int((now - when).total_seconds())) if when else None,
                    rpo,
                    last.outcome if last else None,
                    last.error if last else None,
                    target_sr=t.sr_uuid,
                    snapshot_time=when,
                    last_finished=last.finished_at if last else None,
                    next_run=upcoming,
                    detached=len(found.detached),
                    health_check=checks.get((rec["uuid"], t.sr_uuid)),
                    worker=last.worker if last else None,
                )
            )
    return rows


def status_from_history(job: JobConfig, db: StateDB, now: datetime | None = None) -> list[StatusRow]:
    """The same rows from the state database alone, for when a pool cannot be asked: the VMs
    and targets the job's recent runs covered, the newest restore point a successful task wrote."""
    now = now or datetime.now(UTC)
    upcoming = next_run(job, db.fires(), now)
    good = {(t.vm_uuid, t.target_sr): t for t in db.newest_tasks(job.id, outcome="success")}
    # History knows SR UUIDs; a target the job names by UUID can still be shown as pool/SR.
    named = {t.sr.lower(): f"{t.pool}/{t.sr}" for t in job.targets}
    rows = []
    checks = _health_checks(db, job.id)
    for p in protection(db, job):
        ok = good.get((p.vm_uuid, p.target_sr))
        rows.append(
            StatusRow(
                p.vm,
                p.vm_uuid,
                named.get(p.target_sr.lower(), p.target_sr),
                ok.restore_point if ok else None,
                p.age(now),
                p.rpo,
                p.last.outcome,
                p.last.error,
                target_sr=p.target_sr,
                snapshot_time=p.snapshot_time,
                last_finished=p.last.finished_at,
                next_run=upcoming,
                source="history",
                detached=p.detached,
                health_check=checks.get((p.vm_uuid, p.target_sr)),
                worker=p.last.worker,
            )
        )
    return rows
