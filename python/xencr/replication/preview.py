"""What a run would do (`xencr plan`) and where each VM stands (`xencr status`). Both only read:
no snapshot is taken, nothing is written on either side."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from xencr.replication import source as srcmod
from xencr.replication.decide import plan_target
from xencr.replication.jobs import Connected, selected_vms, spec_of, targets_of
from xencr.replication.metadata import parse_stamp
from xencr.replication.target import restore_points
from xencr.state import StateDB
from xencr.xapi.transfer import changed_blocks

BLOCK = 2 * 1024 * 1024


@dataclass
class DiskPreview:
    userdevice: str
    name: str
    kind: str
    reason: str
    estimated_bytes: int


@dataclass
class TargetPreview:
    vm_name: str
    vm_uuid: str
    target: str
    disks: list[DiskPreview] = field(default_factory=list)
    sr_free_after: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def estimated_bytes(self) -> int:
        return sum(d.estimated_bytes for d in self.disks)


def plan(c: Connected, only: list[str] | None = None, *, full: bool = False) -> list[TargetPreview]:
    spec = spec_of(c.job, None)
    src = c.source
    targets = targets_of(c)
    out = []
    free = {
        t.sr_uuid: int(t.session.api.SR.get_physical_size(t.sr))
        - int(t.session.api.SR.get_physical_utilisation(t.sr))
        for t in targets
    }
    for vm, rec in selected_vms(c, only):
        disks = srcmod.disks_of(src, vm)
        previous = srcmod.job_snapshots(src, vm, c.job.id)
        foreign = srcmod.foreign_snapshots(src, vm, c.job.id)
        nets = {src.api.network.get_name_label(src.api.VIF.get_network(v)) for v in rec["VIFs"]}
        for t in targets:
            p = plan_target(
                src,
                t.session,
                job_id=c.job.id,
                vm_uuid=rec["uuid"],
                sr_uuid=t.sr_uuid,
                previous=previous,
                disks=disks,
                full_interval=spec.full_interval,
                force_full=full,
                xo_snapshots=foreign,
            )
            tp = TargetPreview(rec["name_label"], rec["uuid"], t.name)
            for dp in p.disks:
                if dp.base_source_vdi:
                    # The live disk against the base snapshot: what the new snapshot will carry.
                    est = changed_blocks(src, dp.disk.vdi, dp.base_source_vdi) * BLOCK
                else:
                    est = int(src.api.VDI.get_physical_utilisation(dp.disk.vdi))
                tp.disks.append(DiskPreview(dp.disk.userdevice, dp.disk.name, dp.kind, dp.reason, est))
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
                tp.problems.append(f"insufficient space on {t.name}: {-free[t.sr_uuid]} bytes short")
            target_nets = {r["name_label"] for r in t.session.api.network.get_all_records().values()}
            for n in sorted(nets):
                mapped = t.network_map.get(n, n)
                if mapped not in target_nets:
                    tp.problems.append(f"network {n!r} has no match on {t.name} (map it in the job)")
            out.append(tp)
    return out


@dataclass
class StatusRow:
    vm_name: str
    vm_uuid: str
    target: str
    newest: str | None
    age_seconds: int | None
    rpo_seconds: int | None
    last_outcome: str | None
    last_error: str | None

    @property
    def breach(self) -> bool:
        if self.rpo_seconds is None:
            return False
        return self.age_seconds is None or self.age_seconds > self.rpo_seconds


def status(c: Connected, db: StateDB, now: datetime | None = None) -> list[StatusRow]:
    now = now or datetime.now(UTC)
    sched = c.job.schedules[0] if c.job.schedules else None
    rpo = sched.rpo_seconds if sched else None
    rows = []
    targets = targets_of(c)
    for _vm, rec in selected_vms(c):
        for t in targets:
            points = restore_points(t.session, c.job.id, rec["uuid"], t.sr_uuid)
            newest = points[-1] if points else None
            when = parse_stamp(newest.snapshot_time) if newest else None
            last = db.last_task(rec["uuid"], t.sr_uuid)
            rows.append(
                StatusRow(
                    rec["name_label"],
                    rec["uuid"],
                    t.name,
                    newest.uuid if newest else None,
                    int((now - when).total_seconds()) if when else None,
                    rpo,
                    last.outcome if last else None,
                    last.error if last else None,
                )
            )
    return rows
