"""Failback (`xencr failback PLAN`), both sites up, after `failover` or `failover --planned`: each
failed-over VM (a `failovers` row started or passed) comes back to its original VM on the primary
pool, sending only what changed on the DR side where the primary still holds the base.

1. ``copied``: snapshot D1 of the running DR VM; each disk copied into a new primary VDI, a
   clone of the source snapshot S's disk (S is what the restore point was made from, kept by the
   job) as a delta against the restore point's commit snapshot (which holds exactly S's disk).
   Where S's disk or the commit snapshot is gone: a full copy into a fresh VDI, and why.
2. ``switched``: clean shutdown of the DR VM, snapshot D2, D2 copied against D1 into the same
   VDIs: the primary's new disks now equal the halted DR VM's.
3. ``attached``: the original VM (halted, else refused before anything changed) gets the new
   disks; its former disks (the user's) are detached, never destroyed, renamed
   "<name> (before failback <time>)" and reported.
4. ``snapshot``: the job's source snapshot of the primary VM, still halted (`take_snapshot`).
5. ``linked``: D1 and D2 and the DR disks' old commit snapshots destroyed (ours; a snapshot
   would detach the replica), the DR VM's failover marks removed and the VM linked to that
   snapshot with `seed.link`'s layout: it is a restore point again, the job's next run a delta.
6. ``done``: the primary VM started; the failover row dropped.

Each step is recorded (`StateDB.record_failback`) with the objects it made before the next one,
so a rerun continues; objects are found again by the attempt id in their names."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from xencr.config import Config, JobConfig, PlanConfig
from xencr.dr.connect import DrSessions
from xencr.dr.failover import FailoverError
from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.replication.source import Disk, disks_of, job_snapshots, take_snapshot
from xencr.replication.target import attach, make_plain
from xencr.seed.link import SeedRefused, apply, pair, xencr_steps
from xencr.state import FailbackRow, FailoverRow, StateDB
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.handlers import TransferError
from xencr.xapi.session import XapiSession
from xencr.xapi.transfer import copy_vdi

FAILBACK_DISK = "failback-disk"  # `xencr:role` of a primary VDI a failback made, until attached


class FailbackAbort(Exception):
    """A failback stopped; the message is one line naming the VM, its step and how to continue."""


@dataclass(frozen=True)
class DiskCopy:
    """One disk sent by one step: delta or full (and why), the blocks the copy carried."""

    step: str
    userdevice: str
    kind: str  # "delta" or "full (<why>)"
    blocks: int
    vdi: str  # the primary VDI's UUID


@dataclass
class VmFailback:
    vm_uuid: str
    name: str
    step: str  # the last step done
    copies: list[DiskCopy] = field(default_factory=list)
    old_disks: list[str] = field(default_factory=list)  # "<uuid> <new name>"


@dataclass
class FailbackReport:
    plan: str
    vms: list[VmFailback] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return not self.vms


@dataclass(frozen=True)
class _Sides:
    """One failed-over VM and the objects both sides know it by."""

    row: FailoverRow
    job: JobConfig
    dr: XapiSession  # the DR pool (``row.pool``)
    primary: XapiSession  # the job's source pool
    dr_vm: str  # the VM started by the failover (ref)
    point: str  # the restore point's ref (the DR VM itself unless cloned)
    source_vm: str  # the original VM on the primary (ref)
    s_uuid: str  # the source snapshot the restore point was made from


def _sides(config: Config, dr: DrSessions, row: FailoverRow) -> _Sides:
    job = config.jobs.get(row.job)
    if job is None:
        raise FailoverError(f"VM {row.vm_name}: job {row.job} is no longer configured; nothing changed")
    for pool in (row.pool, job.pool):
        if pool not in dr.sessions:
            why = dr.unreachable.get(pool, "not connected")
            raise FailoverError(
                f"pool {pool} unreachable ({why}): a failback needs both sites; nothing changed"
            )
    t, s = dr.sessions[row.pool], dr.sessions[job.pool]
    try:
        dr_vm = str(t.api.VM.get_by_uuid(row.vm or ""))
        point = str(t.api.VM.get_by_uuid(row.restore_point))
        oc = t.api.VM.get_other_config(point)
        source_vm = str(s.api.VM.get_by_uuid(oc.get(md.VM, row.vm_uuid)))
    except XapiError as err:
        raise FailoverError(f"VM {row.vm_name}: {err}; nothing changed") from None
    return _Sides(row, job, t, s, dr_vm, point, source_vm, str(oc.get(md.COPY_OF, "")))


def _snapshot(t: XapiSession, vm: str, name: str) -> str:
    """A snapshot of ``vm`` named ``name``: the one a previous attempt made, or a new one."""
    for snap in t.api.VM.get_snapshots(vm):
        if t.api.VM.get_name_label(snap) == name:
            return str(t.api.VM.get_uuid(snap))
    return str(t.api.VM.get_uuid(t.call_async("VM.snapshot", vm, name, [])))


def _bases(x: _Sides) -> dict[str, tuple[Disk, str] | str]:
    """User device -> (S's disk, the commit snapshot holding exactly it), or why there is none."""
    try:
        s_disks = {d.userdevice: d for d in disks_of(x.primary, x.primary.api.VM.get_by_uuid(x.s_uuid))}
    except XapiError:
        s_disks = {}
    out: dict[str, tuple[Disk, str] | str] = {}
    for d in disks_of(x.dr, x.point, with_nobak=True):
        sd = s_disks.get(d.userdevice)
        if sd is None:
            out[d.userdevice] = f"source snapshot {x.s_uuid or '?'} or its disk {d.userdevice} is gone"
            continue
        commit = [
            str(v)
            for v in x.dr.api.VDI.get_snapshots(d.vdi)
            if x.dr.api.VDI.get_other_config(v).get(md.ROLE) == "commit-snapshot"
            and x.dr.api.VDI.get_other_config(v).get(md.COPY_OF) == sd.uuid
        ]
        out[d.userdevice] = (sd, commit[0]) if commit else f"no commit snapshot of disk {d.userdevice}"
    return out


def _new_disk(x: _Sides, attempt: str, d: Disk, base: tuple[Disk, str] | str) -> str:
    """The primary VDI for one disk (found again by its attempt): a clone of S's disk, or a fresh
    one of the same size. Its keys: ours only (a clone inherits S's disk's job keys)."""
    s = x.primary
    name = f"{d.name} (failback {attempt})"
    cut_short = None  # a clone a kill left before its keys: it carries the attempt as a marker
    for ref, rec in s.api.VDI.get_all_records().items():
        oc = rec["other_config"]
        if rec["name_label"] == name and oc.get(md.ATTEMPT) == attempt:
            return str(rec["uuid"])
        if oc.get(md.CLONING) == attempt and not rec["is_a_snapshot"] and rec["managed"]:
            cut_short = str(ref)
    if isinstance(base, tuple):
        # As the runner's disks (target.create_disk): the base carries the attempt while it is
        # cloned, so the clone has it from the call that makes it, and a rerun finds it.
        src = base[0].vdi
        base_oc = {k: v for k, v in s.api.VDI.get_other_config(src).items() if k != md.CLONING}
        if cut_short is None:
            s.api.VDI.set_other_config(src, base_oc | {md.CLONING: attempt})
            vdi = str(s.api.VDI.clone(src, {}))
        else:
            vdi = cut_short
        s.api.VDI.set_other_config(src, base_oc)
    else:
        vbds = [b for b in s.api.VM.get_VBDs(x.source_vm) if s.api.VBD.get_userdevice(b) == d.userdevice]
        sr = str(s.api.VDI.get_SR(s.api.VBD.get_VDI(vbds[0]))) if vbds else ""
        if not sr or sr == "OpaqueRef:NULL":
            sr = str(s.api.pool.get_default_SR(s.api.pool.get_all()[0]))
        record = {
            "SR": sr,
            "virtual_size": str(d.size),
            "type": "user",
            "sharable": False,
            "read_only": False,
            # Found again by a rerun from the call that creates it.
            "other_config": {md.ROLE: FAILBACK_DISK, md.ATTEMPT: attempt},
            "name_label": name,
            "name_description": "",
        }
        vdi = str(s.api.VDI.create(record))
    oc = md.strip_ours(dict(s.api.VDI.get_other_config(vdi)))
    s.api.VDI.set_other_config(vdi, oc | {md.ROLE: FAILBACK_DISK, md.ATTEMPT: attempt})
    s.api.VDI.set_name_label(vdi, name)
    return str(s.api.VDI.get_uuid(vdi))


def _disk_map(row: FailbackRow) -> dict[str, str]:
    return dict(x.split("=", 1) for x in row.disks)


class _Failback:
    def __init__(self, db: StateDB, x: _Sides, fb: FailbackRow, say: Callable[[str], None]) -> None:
        self.db, self.x, self.fb, self.say = db, x, fb, say
        self.out = VmFailback(x.row.vm_uuid, x.row.vm_name, fb.step)

    def _record(self, **changes: object) -> None:
        self.fb = replace(self.fb, **changes)  # type: ignore[arg-type]
        self.db.record_failback(self.fb)
        self.out.step = self.fb.step
        self.say(f"{self.x.row.vm_name}: failback step {self.fb.step}")

    def run(self) -> VmFailback:
        steps = (
            ("copied", self.copy),
            ("switched", self.switch),
            ("attached", self.attach),
            ("snapshot", self.snapshot),
            ("linked", self.link),
            ("done", self.start),
        )
        for step, do in steps:
            if not self.fb.reached(step):
                try:
                    do()
                except (XapiError, PoolUnreachable, TransferError, SeedRefused) as err:
                    done = self.fb.step or "nothing"
                    raise FailbackAbort(
                        f"VM {self.x.row.vm_name} ({self.x.row.vm_uuid}): failback stopped at step {step}"
                        f" (done: {done}): {err}; run the same command again to continue"
                    ) from None
        return self.out

    def _copy(self, step: str, snap: str, bases: dict[str, tuple[str, str]]) -> None:
        """Each disk of snapshot ``snap`` (DR) into its primary VDI; ``bases``: device -> (DR base
        VDI ref or "", why it is full)."""
        t, s = self.x.dr, self.x.primary
        targets = _disk_map(self.fb)
        for d in disks_of(t, t.api.VM.get_by_uuid(snap), with_nobak=True):
            base, why = bases[d.userdevice]
            dst = s.api.VDI.get_by_uuid(targets[d.userdevice])
            r = copy_vdi(t, d.vdi, s, str(dst), base_vdi=base or None)
            kind = "delta" if base else f"full ({why})"
            self.out.copies.append(DiskCopy(step, d.userdevice, kind, r.blocks, targets[d.userdevice]))
            self.say(f"{self.x.row.vm_name}: disk {d.userdevice}: {kind}, {r.blocks} block(s)")

    def copy(self) -> None:
        t = self.x.dr
        d1 = self.fb.d1 or _snapshot(t, self.x.dr_vm, f"{self.x.row.vm_name} (failback D1 {self.fb.attempt})")
        self._record(d1=d1)
        found = _bases(self.x)
        bases: dict[str, tuple[str, str]] = {}
        disks: list[str] = []
        for d in disks_of(t, t.api.VM.get_by_uuid(d1), with_nobak=True):
            b = found.get(d.userdevice, f"disk {d.userdevice} is not in the restore point")
            disks.append(f"{d.userdevice}={_new_disk(self.x, self.fb.attempt, d, b)}")
            bases[d.userdevice] = (b[1], "") if isinstance(b, tuple) else ("", b)
        self._record(disks=tuple(disks))
        self._copy("copied", d1, bases)
        fulls = [f"disk {dev}: full ({why})" for dev, (base, why) in bases.items() if not base]
        self._record(step="copied", detail="; ".join(fulls) or None)

    def switch(self) -> None:
        t = self.x.dr
        if t.api.VM.get_power_state(self.x.dr_vm) == "Running":
            self.say(f"{self.x.row.vm_name}: clean shutdown on pool {self.x.row.pool}")
            t.call_async("VM.clean_shutdown", self.x.dr_vm)
        d2 = self.fb.d2 or _snapshot(t, self.x.dr_vm, f"{self.x.row.vm_name} (failback D2 {self.fb.attempt})")
        self._record(d2=d2)
        d1_disks = {
            d.userdevice: d.vdi for d in disks_of(t, t.api.VM.get_by_uuid(self.fb.d1), with_nobak=True)
        }
        self._copy("switched", d2, {dev: (vdi, "") for dev, vdi in d1_disks.items()})
        self._record(step="switched")

    def attach(self) -> None:
        s, vm = self.x.primary, self.x.source_vm
        ours = {s.api.VDI.get_by_uuid(u): dev for dev, u in _disk_map(self.fb).items()}
        when = md.stamp(datetime.now(UTC))
        old = list(self.fb.old_disks)
        for vbd in s.api.VM.get_VBDs(vm):
            r = s.api.VBD.get_record(vbd)
            if r["type"] != "Disk" or r["VDI"] == "OpaqueRef:NULL" or r["VDI"] in ours:
                continue
            uuid = str(s.api.VDI.get_uuid(r["VDI"]))
            if uuid not in old:
                old.append(uuid)
                self._record(old_disks=tuple(old))  # before the detach: never lost from the report
            s.api.VDI.set_name_label(
                r["VDI"], f"{s.api.VDI.get_name_label(r['VDI'])} (before failback {when})"
            )
            s.api.VBD.destroy(vbd)
        attached = {str(s.api.VBD.get_VDI(b)) for b in s.api.VM.get_VBDs(vm)}
        by_dev = {
            d.userdevice: d
            for d in disks_of(self.x.dr, self.x.dr.api.VM.get_by_uuid(self.fb.d2), with_nobak=True)
        }
        for vdi, dev in ours.items():
            if str(vdi) not in attached:
                attach(s, vm, str(vdi), by_dev[dev])
            s.api.VDI.set_other_config(vdi, md.strip_ours(dict(s.api.VDI.get_other_config(vdi))))
            s.api.VDI.set_name_label(vdi, by_dev[dev].name)
        self._record(step="attached")

    def snapshot(self) -> None:
        s, vm, job = self.x.primary, self.x.source_vm, self.x.job
        snap = next(
            (
                r["uuid"]
                for _, r in job_snapshots(s, vm, job.id)
                if r["other_config"].get(md.ATTEMPT) == self.fb.attempt
            ),
            None,
        )
        if snap is None:
            ref, _ = take_snapshot(
                s,
                vm,
                s.api.VM.get_record(vm),
                job.id,
                job.name,
                _schedule(job),
                "normal",
                [],
                self.fb.attempt,
            )
            snap = s.api.VM.get_uuid(ref)
        self._record(step="snapshot", snapshot=str(snap))

    def link(self) -> None:
        t = self.x.dr
        for uuid in (self.fb.d1, self.fb.d2):
            if uuid:
                _destroy_snapshot(t, uuid)
        # A started VM is never a restore point again (`ownership`: started = detached): its fast
        # clone, never started and holding the same disks, becomes the job's restore point.
        name = f"{self.x.row.vm_name} (failback {self.fb.attempt})"
        found = [str(v) for v in t.api.VM.get_by_name_label(name)]
        vm = found[0] if found else str(t.call_async("VM.clone", self.x.dr_vm, name))
        make_plain(t, vm)
        p = pair(self.x.primary, self.fb.snapshot or "", t, str(t.api.VM.get_uuid(vm)))
        apply(xencr_steps(self.x.primary, t, p, self.x.job.id, _schedule(self.x.job)), lambda _: None)
        self._record(step="linked")

    def start(self) -> None:
        s, vm = self.x.primary, self.x.source_vm
        if s.api.VM.get_power_state(vm) == "Halted":
            s.call_async("VM.start", vm, False, False)
        self.db.forget_failover(self.x.row.plan, self.x.row.vm_uuid)
        self._record(step="done")


def _schedule(job: JobConfig) -> str:
    # The snapshot is the job's; its first schedule's retention keeps it (a manual run's id when none).
    return job.schedules[0].id if job.schedules else "manual"


def _destroy_snapshot(t: XapiSession, uuid: str) -> None:
    """One of our D1/D2 snapshots and its disks (gone already is done)."""
    try:
        snap = t.api.VM.get_by_uuid(uuid)
    except XapiError:
        return
    vdis = [str(t.api.VBD.get_VDI(b)) for b in t.api.VM.get_VBDs(snap) if t.api.VBD.get_type(b) == "Disk"]
    ownership.destroy(t, "VM", str(snap))
    for vdi in vdis:
        ownership.destroy(t, "VDI", vdi)


def _selected(plan: PlanConfig, rows: list[FailoverRow], vms: Sequence[str]) -> list[FailoverRow]:
    for wanted in vms:
        if not any(wanted in (r.vm_uuid, r.vm_name) for r in rows):
            raise FailoverError(f"VM {wanted!r} of plan {plan.name} is not failed over; nothing changed")
    return [r for r in rows if not vms or any(w in (r.vm_uuid, r.vm_name) for w in vms)]


def failback(
    config: Config,
    plan: PlanConfig,
    db: StateDB,
    dr: DrSessions,
    *,
    vms: Sequence[str] = (),
    say: Callable[[str], None] = lambda _: None,
) -> FailbackReport:
    """Fail ``plan``'s failed-over VMs back (see the module's rule). Refused (`FailoverError`,
    nothing changed) when a pool does not answer or an original VM is running and its failback
    has not attached disks yet; `FailbackAbort` when a VM's failback stops midway."""
    rows = [r for r in db.failover_rows(plan.name) if r.state in ("started", "passed") and r.vm]
    rows = _selected(plan, rows, vms)
    recorded = db.failbacks(plan.name)
    work: list[tuple[_Sides, FailbackRow]] = []
    for row in rows:
        x = _sides(config, dr, row)
        fb = recorded.get(row.vm_uuid)
        if fb is None or fb.step == "done":  # "done": an earlier failover's, this one is new
            fb = FailbackRow(plan.name, row.vm_uuid, ownership.new_attempt(x.job.id))
        state = x.primary.api.VM.get_power_state(x.source_vm)
        if not fb.reached("attached") and state != "Halted":
            raise FailoverError(
                f"VM {row.vm_name} ({row.vm_uuid}) on pool {x.job.pool} is {state}: shut it down"
                " first (its disks are replaced by the failed-over VM's); nothing changed"
            )
        work.append((x, fb))
    report = FailbackReport(plan.name)
    for x, fb in work:
        db.record_failback(fb)
        report.vms.append(_Failback(db, x, fb, say).run())
    return report
