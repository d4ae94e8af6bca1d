"""`xencr dr recover`: VMs and vApps recovered on a pool from the pool databases on mirrored SRs
(xapi.md §5.2-5.4), then started in order, or, with ``test``, rehearsed and removed again.

Steps, each recorded (`StateDB.record_native`) before it changes anything, so a second run after a
kill continues a recovery or cleans a test up:

1. record what the pool holds (SR, VM, vApp UUIDs); attach the mirrored LUNs' SRs (`DR_task.create`);
2. read the newest database of each foreign pool (`found`: newest information wins);
3. recover: each selected vApp with `VM_appliance.recover`, each other VM with `VM.recover`,
   `assert_can_be_recovered` first; XAPI's answer decides when the VM already exists (a newer or
   running copy is kept: `VM_TO_IMPORT_IS_NOT_NEWER_VERSION`, `VM_BAD_POWER_STATE`), ``force``
   replaces a halted one. A test never touches a VM or vApp the pool had before: skipped;
4. start in order (`VM.order` ascending, each group's VMs together, XAPI's `VM.start` sleeping each
   `start_delay`; the plan's gate and hooks between groups), exactly once per VM; a test starts
   them only with ``boot``, their VIFs moved to an isolated network first;
5. a test then removes what it made (`ownership.native_test_objects`): recovered VMs (shut down,
   their snapshots, VBDs, VIFs, then the VM), recovered vApps, the DR tasks, the SRs they
   introduced (unplugged and forgotten: their disks stay on the LUN), its network. The pool's
   object set is then what it was.

A real recovery destroys its DR tasks at the end: XAPI keeps the SRs the recovered VMs need."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from xencr.config import ConfigError, PlanConfig
from xencr.dr import groups as grouping
from xencr.dr.failover import move_vif
from xencr.dr.native.found import Found, FoundVm, LunSource, destroy_tasks, opened
from xencr.dr.start import StartGroup, StartReport, StartVm, VmResult, start_groups
from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.state import NativeRecoveryRow, StateDB
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import XapiSession

NULL = "OpaqueRef:NULL"


class RecoverError(Exception):
    """The recovery could not go on: one line naming the pool and the object."""


@dataclass(frozen=True)
class RecoverRequest:
    """What `xencr dr recover` was asked (one object for the whole run)."""

    pool: str
    luns: tuple[LunSource, ...] = ()
    from_srs: tuple[str, ...] = ()
    vms: tuple[str, ...] = ()  # names or UUIDs; with vapps, none: everything found
    vapps: tuple[str, ...] = ()
    test: bool = False
    boot: bool = False
    force: bool = False
    plan: PlanConfig | None = None  # gate and hooks
    continue_on_failure: bool = False

    @property
    def mode(self) -> str:
        return "test" if self.test else "recover"


@dataclass
class VmOutcome:
    uuid: str
    name: str
    recovered: bool
    detail: str  # one line: from which database and version, or XAPI's refusal


@dataclass
class RecoverReport:
    pool: str
    attempt: str
    test: bool
    run_id: int
    resumed: bool = False
    notes: list[str] = field(default_factory=list)
    vms: list[VmOutcome] = field(default_factory=list)
    start: StartReport | None = None
    cleaned: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(v.recovered for v in self.vms) and (self.start is None or self.start.ok)


Say = Callable[[str], None]


def _uuids(t: XapiSession, cls: str) -> tuple[str, ...]:
    return tuple(sorted(str(r["uuid"]) for r in getattr(t.api, cls).get_all_records().values()))


def _pick(found: Found, req: RecoverRequest) -> tuple[list[str], list[str]]:
    """(vApp UUIDs, standalone VM UUIDs) to recover: the selection, else everything found."""
    apps, vms = [], []
    for want in req.vapps:
        app = next((a for a in found.apps.values() if want in (a.uuid, a.name)), None)
        if app is None:
            raise ConfigError(f"pool {req.pool}: no vApp {want!r} in the metadata found")
        apps.append(app.uuid)
    for want in req.vms:
        vm = next((v for v in found.vms.values() if want in (v.uuid, v.name)), None)
        if vm is None:
            raise ConfigError(f"pool {req.pool}: no VM {want!r} in the metadata found")
        vms.append(vm.uuid)
    if not req.vms and not req.vapps:
        apps = sorted({v.appliance for v in found.vms.values() if v.appliance and v.appliance in found.apps})
        vms = sorted(v.uuid for v in found.vms.values() if v.appliance not in apps)
    in_apps = {m for a in apps for m in found.apps[a].vms}
    return apps, [v for v in dict.fromkeys(vms) if v not in in_apps]


class _Run:
    """One recovery run: the pool's session, what was found, the record, and the report."""

    def __init__(
        self, t: XapiSession, db: StateDB, req: RecoverRequest, row: NativeRecoveryRow, say: Say
    ) -> None:
        self.t, self.db, self.req, self.row, self.say = t, db, req, row, say
        self.report = RecoverReport(req.pool, row.attempt, req.test, 0)

    def record(self, **changes: object) -> None:
        self.row = replace(self.row, **changes)  # type: ignore[arg-type]
        self.db.record_native(self.row)

    def _foreign(self, found: Found, vm: FoundVm) -> XapiSession:
        return found.sessions[vm.database]

    def _recover_one(self, found: Found, uuid: str, app: str | None = None) -> None:
        """VM.recover or VM_appliance.recover, XAPI's refusal kept as the VM's outcome."""
        req, t = self.req, self.t
        members = [found.vms[m] for m in found.apps[app].vms if m in found.vms] if app else [found.vms[uuid]]
        before = set(self.row.vms_before)
        if req.test and (any(v.uuid in before for v in members) or (app and app in self.row.apps_before)):
            there = ", ".join(v.name for v in members if v.uuid in before) or f"vApp {found.app_name(app)}"
            for v in members:
                why = f"VM {v.name}: skipped: {there} already in pool {req.pool}; a test never replaces a VM"
                self.report.vms.append(VmOutcome(v.uuid, v.name, False, why))
            return
        if not req.test:
            done = [v for v in members if v.uuid in self.row.selected and v.uuid not in before]
            mine = [
                v for v in done if v.uuid in found.existing and found.existing[v.uuid].version > v.version
            ]
            if mine and len(mine) == len(members):  # recovered by this attempt before it was cut short
                for v in members:
                    self.report.vms.append(
                        VmOutcome(v.uuid, v.name, True, "recovered already by this attempt")
                    )
                return
        f = self._foreign(found, members[0])
        try:
            if app:
                ref = f.api.VM_appliance.get_by_uuid(app)
                f.call_once("VM_appliance.assert_can_be_recovered", ref, t.ref)
                f.call_once("VM_appliance.recover", ref, t.ref, req.force)
            else:
                ref = f.api.VM.get_by_uuid(uuid)
                f.call_once("VM.assert_can_be_recovered", ref, t.ref)
                f.call_once("VM.recover", ref, t.ref, req.force)
        except XapiError as err:
            what = f"vApp {found.apps[app].name}" if app else f"VM {members[0].name}"
            why = str(err.about(what))
            if err.code == "VM_TO_IMPORT_IS_NOT_NEWER_VERSION":
                why += f" (pool {req.pool} has a copy as new or newer: kept; --force replaces it if halted)"
            elif err.code == "VM_REQUIRES_SR":
                needs = sorted({s for v in members for s in v.missing_srs})
                why += f" (needs SR {', '.join(needs)}, not attached to pool {req.pool})"
            elif err.code == "VM_BAD_POWER_STATE":
                why += f" (running in pool {req.pool}: kept)"
            for v in members:
                self.report.vms.append(VmOutcome(v.uuid, v.name, False, why))
            return
        for v in members:
            where = f"version {v.version} from pool {v.pool_name}'s database ({v.database})"
            self.report.vms.append(VmOutcome(v.uuid, v.name, True, f"recovered: {where}"))
            self.say(
                f"recovered {v.name}" + (f" (vApp {found.apps[app].name})" if app else "") + f": {where}"
            )

    # Journal: what the DR tasks will introduce and the tasks, recorded around `DR_task.create`.
    def will_attach(self, sr_uuids: Sequence[str]) -> None:
        self.record(introduced=tuple(dict.fromkeys([*self.row.introduced, *sr_uuids])))

    def attached(self, task: str) -> None:
        self.record(tasks=(*self.row.tasks, task))

    def recover(self, found: Found) -> None:
        apps, vms = _pick(found, self.req)
        selected = [*apps, *(m for a in apps for m in found.apps[a].vms), *vms]
        self.record(selected=tuple(dict.fromkeys([*self.row.selected, *selected])))
        self.report.notes += found.notes
        everything = not self.req.vms and not self.req.vapps
        for app in apps:
            if everything and self._elsewhere(found, list(found.apps[app].vms)):
                continue
            self._recover_one(found, "", app)
        for vm in vms:
            if everything and self._elsewhere(found, [vm]):
                continue
            self._recover_one(found, vm)

    def _elsewhere(self, found: Found, uuids: list[str]) -> bool:
        """Whether these VMs need SRs the pool has not attached (disks not on the mirrored SRs):
        not part of "everything found", said once (a VM asked for by name gets XAPI's error)."""
        needs = sorted({s for u in uuids if u in found.vms for s in found.vms[u].missing_srs})
        if needs:
            names = ", ".join(found.vms[u].name for u in uuids if u in found.vms)
            self.report.notes.append(
                f"{names}: not recoverable on pool {self.req.pool}: needs SR {', '.join(needs)}"
            )
        return bool(needs)

    def groups(self, found: Found) -> list[StartGroup]:
        """The recovered VMs by `VM.order` (XAPI's appliance start); the start delay is slept by
        XAPI's own `VM.start`, so the groups add none."""
        ok = [found.vms[v.uuid] for v in self.report.vms if v.recovered]
        vms = [grouping.StartVm(v.uuid, v.name, (), v.order, v.start_delay) for v in ok]
        plan = self.req.plan
        gate = plan.gate if plan else None
        return [
            StartGroup(
                g.number, tuple(StartVm(u, found.vms[u].name, self.req.pool, u) for u in g.vms), 0, gate
            )
            for g in grouping.by_order(vms, gate)
        ]

    def isolate(self, found: Found) -> None:
        """A test's VMs' VIFs moved to a network of their own (made with the attempt's keys)."""
        t = self.t
        net = str(
            t.api.network.create(
                {
                    "name_label": f"xencr test {self.row.attempt}",
                    "name_description": f"isolated network of a native DR test on pool {self.req.pool}",
                    "MTU": "1500",
                    "other_config": {md.ATTEMPT: self.row.attempt, md.ROLE: ownership.DR_TEST},
                }
            )
        )
        self.record(network=str(t.api.network.get_uuid(net)))
        for v in self.report.vms:
            if v.recovered:
                for vif in t.api.VM.get_VIFs(t.api.VM.get_by_uuid(v.uuid)):
                    move_vif(t, str(vif), net)


class _Progress:
    """Exactly-once starts for `start_groups`, kept in the attempt's record."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def prepare(self, vm: StartVm) -> StartVm:
        return vm

    def done(self, vm: StartVm) -> VmResult | None:
        return None

    def was_started(self, vm: StartVm) -> bool:
        return vm.vm in self.run.row.started

    def started(self, vm: StartVm, when: datetime) -> None:
        self.run.record(started=(*self.run.row.started, vm.vm))

    def finished(self, vm: StartVm, result: VmResult) -> None:
        return None


def clean_test(t: XapiSession, row: NativeRecoveryRow, say: Say = lambda _: None) -> list[str]:
    """Remove what a native test made (rule (c), `ownership.native_test_objects`): a line each."""
    found = ownership.native_test_objects(
        t,
        attempt=row.attempt,
        vms_before=set(row.vms_before),
        apps_before=set(row.apps_before),
        srs_before=set(row.srs_before),
        selected=set(row.selected),
        introduced=set(row.introduced),
    )
    out: list[str] = []
    for ref, rec in found.vms:
        if rec["power_state"] != "Halted" and not rec["is_a_snapshot"]:
            with contextlib.suppress(XapiError):  # the destroy below says what is true
                t.call_once("VM.hard_shutdown", ref)
    # XenCenter's clean-up order: the snapshots, then each VM's VBDs and VIFs, then the VM; no VDI
    # is destroyed (they go with the SRs forgotten, or were the pool's own).
    for ref, rec in sorted(found.vms, key=lambda x: not x[1]["is_a_snapshot"]):
        for cls, refs in (("VBD", rec["VBDs"]), ("VIF", rec["VIFs"])):
            for child in refs:
                with contextlib.suppress(XapiError):
                    t.call_once(f"{cls}.destroy", child)
        err = ownership.destroy(t, "VM", ref)
        out.append(
            f"destroyed test VM {rec['name_label']} ({rec['uuid']})"
            if err is None
            else f"test VM {rec['uuid']} not destroyed: {err}"
        )
    for ref, rec in found.apps:
        err = ownership.destroy(t, "VM_appliance", ref)
        out.append(
            f"destroyed test vApp {rec['name_label']}"
            if err is None
            else f"test vApp {rec['uuid']} not destroyed: {err}"
        )
    existing = {str(task) for task in t.api.DR_task.get_all()}
    out += destroy_tasks(t, [task for task in row.tasks if task in existing])
    for ref, rec in found.srs:
        try:
            for pbd in t.api.SR.get_PBDs(ref):
                if t.api.PBD.get_currently_attached(pbd):
                    t.call_once("PBD.unplug", pbd)
            t.call_once("SR.forget", ref)
            out.append(f"forgot SR {rec['name_label']} ({rec['uuid']}) the test attached")
        except XapiError as refused:
            if refused.code != "HANDLE_INVALID":  # gone with its DR task
                out.append(f"SR {rec['uuid']} not forgotten: {refused}")
    for ref, rec in found.networks:
        err = ownership.destroy(t, "network", ref)
        out.append(
            f"destroyed test network {rec['name_label']}"
            if err is None
            else f"test network not destroyed: {err}"
        )
    for line in out:
        say(line)
    return out


def recover(t: XapiSession, db: StateDB, req: RecoverRequest, *, say: Say = lambda _: None) -> RecoverReport:
    """Run the module's steps on ``t`` (the recovery pool); a history run records it."""
    cleaned: list[str] = []
    resumed = None
    for old in db.native_recoveries(req.pool, running=True):
        if old.mode == "test":  # a test cut short: nothing of it may stay
            cleaned += clean_test(t, old, say)
            db.record_native(replace(old, outcome="cleaned", detail="cut short; cleaned up by the next run"))
        elif not req.test and resumed is None:
            resumed = old
    if resumed is not None:
        row = resumed
        say(f"continuing recovery attempt {row.attempt} on pool {req.pool}")
    else:
        row = NativeRecoveryRow(
            attempt=ownership.new_attempt("native00"),
            pool=req.pool,
            mode=req.mode,
            srs_before=_uuids(t, "SR"),
            vms_before=_uuids(t, "VM"),
            apps_before=_uuids(t, "VM_appliance"),
        )
        db.record_native(row)
    run = _Run(t, db, req, row, say)
    run.report.resumed = resumed is not None
    run.report.cleaned = cleaned
    run.report.run_id = db.start_run(
        "native00", f"dr {req.mode} {req.pool}", None, "dr-test" if req.test else "dr-recover"
    )
    error: str | None = None
    try:
        with opened(t, req.pool, req.luns, req.from_srs, keep=req.test, journal=run) as found:
            run.recover(found)
            if not req.test or req.boot:
                if req.test:
                    run.isolate(found)
                groups = run.groups(found)
                if groups:
                    run.report.start = start_groups(
                        req.plan or PlanConfig("dr", [], []),
                        groups,
                        lambda _: t,
                        _Progress(run),
                        continue_on_failure=req.continue_on_failure or req.test,
                        run_hooks=not req.test,
                        say=say,
                    )
    except (XapiError, PoolUnreachable, ConfigError) as err:
        error = f"pool {req.pool}: {err}" if not str(err).startswith("pool ") else str(err)
    except BaseException:
        if req.test:
            run.report.cleaned += clean_test(t, run.row, say)
            run.record(outcome="cleaned", detail="interrupted; cleaned up")
        db.finish_run(run.report.run_id, "interrupted", "interrupted")
        raise
    if req.test:
        run.report.cleaned += clean_test(t, run.row, say)
        run.record(outcome="cleaned", detail=error)
    else:
        run.record(outcome="done" if error is None and run.report.ok else "failed", detail=error)
    failed = [f"{v.name}: {v.detail}" for v in run.report.vms if not v.recovered]
    detail = error or ("; ".join(failed) if failed else None)
    db.finish_run(run.report.run_id, "success" if error is None and run.report.ok else "failure", detail)
    if error is not None:
        raise RecoverError(error)
    return run.report


def probe_only(t: XapiSession, pool: str, luns: Sequence[LunSource], from_srs: Sequence[str]) -> Found:
    """What the SRs hold, the pool left as it was (the DR tasks destroyed again)."""
    with opened(t, pool, luns, from_srs, keep=False) as found:
        found.sessions = {}
        return found
