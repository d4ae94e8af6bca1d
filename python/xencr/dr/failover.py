"""Unplanned failover (`xencr failover PLAN`): the plan's VMs recovered from their newest restore
points (`choose`) on the target pools alone, the primary site never asked.

The choice is checked first (`preview`: any problem refuses the whole failover, nothing changed),
then recorded in the state DB (`failovers`), before anything is done: a failover run again after
an interruption continues from those rows, never choosing again (a replica it unprotected is no
longer a restore point, and an older one must not be started beside it). Per VM, just before its
group starts: the replica is marked `xencr:failed_over = <time> <plan>` (the next CR run reports it
as failed over) and unprotected, or with ``clone`` fast-cloned (the clone carries the failover's
token in its name from `VM.clone`, so a kill before it is recorded does not make a second one);
VIFs move to the plan's networks; then `start.start_groups` starts it exactly once."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from xencr.config import Config, PlanConfig, TargetConfig
from xencr.dr.connect import DrSessions
from xencr.dr.preview import FailoverPreview, Mode, failover_preview, landings
from xencr.dr.start import StartGroup, StartReport, StartVm, VmResult, group_gate, start_groups
from xencr.replication import metadata as md
from xencr.replication.ownership import FAILED_OVER
from xencr.replication.target import make_plain
from xencr.state import FailoverRow, StateDB
from xencr.xapi.session import XapiSession

NULL = "OpaqueRef:NULL"


class FailoverError(Exception):
    """A failover refused before anything was changed; the message is one line."""


@dataclass
class FailoverReport:
    plan: str
    resumed: bool  # continued a recorded failover
    rows: list[FailoverRow] = field(default_factory=list)  # as recorded at the end
    start: StartReport = field(default_factory=StartReport)


@dataclass(frozen=True)
class Pin:
    """The restore point a VM must be recovered from, whatever is newer elsewhere (a planned
    failover's last delta)."""

    job: str
    pool: str
    restore_point: str  # the replica VM's UUID


def _matches(row: FailoverRow, wanted: str) -> bool:
    return wanted in (row.vm_uuid, row.vm_name)


def checked_preview(
    config: Config, plan: PlanConfig, dr: DrSessions, mode: Mode = "failover"
) -> FailoverPreview:
    """The failover preview of ``plan``, refused (`FailoverError`) on any problem."""
    p = failover_preview(config, plan, dr.sessions, dr.unreachable, mode=mode)
    if p.problems:
        more = (
            f" (and {len(p.problems) - 1} more: xencr plan --failover {plan.name})"
            if len(p.problems) > 1
            else ""
        )
        raise FailoverError(f"plan {plan.name}: {p.problems[0]}{more}; nothing changed")
    return p


def choose_rows(
    config: Config,
    plan: PlanConfig,
    dr: DrSessions,
    vms: Sequence[str],
    clone: bool,
    pins: Mapping[str, Pin] | None = None,
) -> list[FailoverRow]:
    """The rows of a new failover: the preview's choice, refused on any problem; with ``pins``
    (source VM UUID -> restore point), every VM of the plan from exactly its pinned one."""
    p = checked_preview(config, plan, dr, "failover" if pins is None else "planned")
    delays = {g.number: g.start_delay for g in p.groups}
    token = secrets.token_hex(6)
    rows = [
        FailoverRow(
            plan=plan.name,
            vm_uuid=v.vm_uuid,
            vm_name=v.vm_name,
            job=v.job,
            pool=v.pool,
            restore_point=v.restore_point,
            group=v.group,
            start_delay=delays[v.group],
            clone=clone,
            token=token,
        )
        for v in p.vms
    ]
    if pins is not None:
        rows = [_pinned(plan, r, pins) for r in rows]
    return _selected(plan, rows, vms)


def _pinned(plan: PlanConfig, row: FailoverRow, pins: Mapping[str, Pin]) -> FailoverRow:
    pin = pins.get(row.vm_uuid)
    if pin is None:
        raise FailoverError(
            f"plan {plan.name}: VM {row.vm_name} ({row.vm_uuid}) has no restore point from the "
            "last delta run; nothing changed"
        )
    return replace(row, job=pin.job, pool=pin.pool, restore_point=pin.restore_point)


def _selected(plan: PlanConfig, rows: list[FailoverRow], vms: Sequence[str]) -> list[FailoverRow]:
    for wanted in vms:
        if not any(_matches(r, wanted) for r in rows):
            raise FailoverError(
                f"VM {wanted!r} is not in plan {plan.name!r} or has no restore point; nothing changed"
            )
    return [r for r in rows if not vms or any(_matches(r, w) for w in vms)]


def clone_name(row: FailoverRow) -> str:
    return f"{row.vm_name} (failover {row.plan} {row.token})"


def plain_vm(t: XapiSession, vm: str) -> None:
    """A clone of a replica made an ordinary VM: neither it nor its disks pass for a replica
    (`target.make_plain`, as `xencr replica clone` does), startable."""
    make_plain(t, vm)
    unprotect(t, vm)


def disks(t: XapiSession, vm: str) -> list[str]:
    out = []
    for vbd in t.api.VM.get_VBDs(vm):
        vdi = str(t.api.VBD.get_VDI(vbd))
        if t.api.VBD.get_type(vbd) == "Disk" and vdi != NULL:
            out.append(vdi)
    return out


def unprotect(t: XapiSession, vm: str) -> None:
    for op in md.PROTECTED_OPS:
        t.api.VM.remove_from_blocked_operations(vm, op)


def move_vif(t: XapiSession, vif: str, network: str) -> str:
    """The VIF re-created on ``network`` (same device, MAC, MTU and settings)."""
    r = t.api.VIF.get_record(vif)
    record: dict[str, Any] = {
        "device": r["device"],
        "network": network,
        "VM": r["VM"],
        "MAC": r["MAC"],
        "MTU": r["MTU"],
        "other_config": r["other_config"],
        "qos_algorithm_type": r["qos_algorithm_type"],
        "qos_algorithm_params": r["qos_algorithm_params"],
    }
    t.api.VIF.destroy(vif)
    return str(t.api.VIF.create(record))


def map_networks(t: XapiSession, vm: str, plan: PlanConfig, target: TargetConfig | None) -> None:
    """Each VIF the plan maps elsewhere moved to its network (`preview.landings`); a VIF already
    there is left as it is, so this is safe to repeat."""
    rec = t.api.VM.get_record(vm)
    nets = {str(r["name_label"]): str(ref) for ref, r in t.api.network.get_all_records().items()}
    by_device = {str(t.api.VIF.get_device(v)): str(v) for v in rec["VIFs"]}
    for land in landings(t, rec, plan, target):
        if land.mapped and land.network != land.replica_network:
            move_vif(t, by_device[land.device], nets[land.network])


def _target(config: Config, row: FailoverRow) -> TargetConfig | None:
    job = config.jobs.get(row.job)
    if job is None:
        return None
    return next((x for x in job.targets if x.pool == row.pool), None)


class _Recorded:
    """`start.Progress` on the state DB rows of one failover."""

    def __init__(
        self, config: Config, plan: PlanConfig, db: StateDB, dr: DrSessions, rows: list[FailoverRow]
    ):
        self.config, self.plan, self.db, self.dr = config, plan, db, dr
        self.rows = {r.vm_uuid: r for r in rows}

    def _set(self, vm_uuid: str, state: str, **kw: Any) -> None:
        self.db.update_failover(self.plan.name, vm_uuid, state, **kw)
        self.rows[vm_uuid] = replace(
            self.rows[vm_uuid], state=state, **{k: v for k, v in kw.items() if v is not None}
        )

    def prepare(self, vm: StartVm) -> StartVm:
        row = self.rows[vm.vm_uuid]
        if row.vm is not None:
            return replace(vm, vm=row.vm)
        t = self.dr.sessions[row.pool]
        replica = str(t.api.VM.get_by_uuid(row.restore_point))
        if row.clone:
            found = [str(v) for v in t.api.VM.get_by_name_label(clone_name(row))]
            ref = found[0] if found else str(t.call_async("VM.clone", replica, clone_name(row)))
            plain_vm(t, ref)
        else:
            oc = dict(t.api.VM.get_other_config(replica))
            if FAILED_OVER not in oc:
                stamp = md.precise(datetime.now(UTC))
                t.api.VM.set_other_config(replica, oc | {FAILED_OVER: f"{stamp} {self.plan.name}"})
            unprotect(t, replica)
            ref = replica
        map_networks(t, ref, self.plan, _target(self.config, row))
        uuid = str(t.api.VM.get_uuid(ref))
        self._set(vm.vm_uuid, "prepared", vm=uuid)
        return replace(vm, vm=uuid)

    def done(self, vm: StartVm) -> VmResult | None:
        row = self.rows[vm.vm_uuid]
        if row.state != "passed":
            return None
        return VmResult(vm.vm_uuid, vm.name, row.vm or "", True, row.detail or "passed", True)

    def was_started(self, vm: StartVm) -> bool:
        return self.rows[vm.vm_uuid].started_at is not None

    def started(self, vm: StartVm, when: datetime) -> None:
        self._set(vm.vm_uuid, "started", started_at=when)

    def finished(self, vm: StartVm, result: VmResult) -> None:
        self._set(vm.vm_uuid, "passed" if result.ok else "failed", detail=result.detail)


def groups_of(plan: PlanConfig, rows: Sequence[FailoverRow]) -> list[StartGroup]:
    out: dict[int, list[FailoverRow]] = {}
    for r in rows:
        out.setdefault(r.group, []).append(r)
    return [
        StartGroup(
            n,
            tuple(StartVm(r.vm_uuid, r.vm_name, r.pool, r.vm or "") for r in members),
            members[0].start_delay,
            group_gate(plan, n),
        )
        for n, members in sorted(out.items())
    ]


def failover(
    config: Config,
    plan: PlanConfig,
    db: StateDB,
    dr: DrSessions,
    *,
    vms: Sequence[str] = (),
    clone: bool = False,
    continue_on_failure: bool = False,
    pins: Mapping[str, Pin] | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> FailoverReport:
    """Fail ``plan`` over (see the module's rule): a new failover, or the recorded one continued.
    ``pins`` (a new failover only) fixes the restore point of each VM instead of choosing."""
    rows = db.failover_rows(plan.name)
    resumed = bool(rows)
    if resumed:
        rows = _selected(plan, rows, vms)
        for pool in sorted({r.pool for r in rows} - set(dr.sessions)):
            raise FailoverError(f"pool {pool} unreachable ({dr.unreachable.get(pool, 'not connected')})")
        say(f"plan {plan.name}: continuing the recorded failover of {len(rows)} VM(s)")
    else:
        rows = choose_rows(config, plan, dr, vms, clone, pins)
        db.record_failover(rows)
    progress = _Recorded(config, plan, db, dr, rows)
    report = start_groups(
        plan,
        groups_of(plan, rows),
        lambda pool: dr.sessions[pool],
        progress,
        continue_on_failure=continue_on_failure,
        say=say,
    )
    return FailoverReport(plan.name, resumed, list(progress.rows.values()), report)
