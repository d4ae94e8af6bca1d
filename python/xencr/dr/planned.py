"""Planned failover (`xencr failover PLAN --planned`), both sites up: the plan's VMs move to the
DR side with nothing written on the source lost.

1. ``final-delta``: a delta run of each job the failover starts a VM from (the preview's choice),
   for the plan's VMs only (`jobs.run_configured`); every VM and target must succeed.
2. ``shutdown``: `VM.clean_shutdown` of each running source VM, the last group first, each within
   a timeout. A VM that refuses (`VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT`, `VM_SHUTDOWN_TIMEOUT`, the
   timeout) stops the plan here.
3. ``last-delta``: the same runs again, the VMs halted: their restore points hold exactly the
   halted disks.
4. ``failover``: `failover.failover` from exactly the restore points of step 3 (pinned: never an
   older one, nor a newer one of another target).

Nothing on a target pool changes before step 4, and nothing ever blocks a source VM: an abort at
any step (an error, Ctrl-C or SIGTERM through ``cancel``) leaves the source VMs startable and
names each one this planned failover shut down with the `xe` command and XAPI call that restarts
it. The step reached and the VMs shut down are recorded (`StateDB.record_planned`), so a later
attempt still lists a VM an earlier one halted. Once step 4 has recorded its failover, running
again continues that failover as `failover` does: no more runs, no shutdown."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from xencr.config import Config, PlanConfig
from xencr.dr import choose
from xencr.dr.connect import DrSessions
from xencr.dr.failover import FailoverError, FailoverReport, Pin, checked_preview, failover
from xencr.dr.preview import FailoverPreview
from xencr.replication.jobs import run_configured
from xencr.state import PlannedRow, StateDB
from xencr.xapi.errors import PoolUnreachable, XapiError

# How long one VM may take to shut down: above xapi's own limits for a cooperating guest (60 s to
# acknowledge, then 1200 s to halt), so a guest xapi still waits for is not cut short by default.
SHUTDOWN_TIMEOUT = 1300.0


@dataclass(frozen=True)
class SourceVm:
    """One VM of the plan on the primary site, and where the failover starts it from."""

    vm_uuid: str
    name: str
    pool: str  # the source pool (its job's)
    job: str
    group: int
    target_pool: str
    sr_uuid: str  # the target SR whose restore point is started

    def restart_line(self) -> str:
        """How to start it again without xencr: the xe command, and the XAPI call it makes."""
        return (
            f"{self.name} ({self.vm_uuid}) on pool {self.pool} is halted; restart it with: "
            f'xe vm-start uuid={self.vm_uuid}  (XAPI: VM.start(VM.get_by_uuid("{self.vm_uuid}"), '
            "false, false))"
        )


@dataclass
class PlannedReport:
    plan: str
    resumed: bool  # a recorded failover was continued (no runs, no shutdown)
    failover: FailoverReport
    halted: list[SourceVm] = field(default_factory=list)  # the source VMs it shut down
    final: dict[str, str] = field(default_factory=dict)  # source VM UUID -> step 1's restore point
    last: dict[str, str] = field(default_factory=dict)  # source VM UUID -> the one started from


class PlannedAbort(Exception):
    """A planned failover stopped at ``step``; ``restart`` has one line per source VM it shut
    down. The message is one line."""

    def __init__(
        self, plan: str, step: str, reason: str, restart: Sequence[str], recorded: bool = False
    ) -> None:
        self.plan, self.step, self.reason, self.restart = plan, step, reason, list(restart)
        self.recorded = recorded  # step 4 recorded its failover (it may have started VMs)
        super().__init__(self.line())

    def line(self) -> str:
        if self.recorded:
            after = (
                "its recorded failover continues when the same command is run again (to go back "
                "instead: shut down what it started, then restart the source VMs as listed)"
            )
        elif self.restart:
            after = (
                f"nothing on the target was changed; {len(self.restart)} source VM(s) it shut down "
                "can be restarted as listed"
            )
        else:
            after = "nothing on the target was changed and no source VM was shut down"
        return f"plan {self.plan}: planned failover stopped at step {self.step}: {self.reason}; {after}"


class _Stop(Exception):
    """A step's own refusal (a run not successful, a VM that did not shut down): one line."""


def pools_of(config: Config) -> list[str]:
    """The pools a planned failover talks to: every target, and every job's source pool."""
    return [*(p.pool for p in choose.places(config)), *(j.pool for j in config.jobs.values())]


def sources(config: Config, p: FailoverPreview) -> list[SourceVm]:
    """The plan's VMs, in start order, with their source pool."""
    return [
        SourceVm(v.vm_uuid, v.vm_name, config.jobs[v.job].pool, v.job, v.group, v.pool, v.sr_uuid)
        for v in p.vms
    ]


class _Record:
    """The state DB row of this attempt, written at each step and each VM shut down."""

    def __init__(self, db: StateDB, plan: str, halted: Sequence[str]) -> None:
        self.db = db
        self.row = PlannedRow(plan, "final-delta", halted=tuple(halted), started_at=datetime.now(UTC))

    def step(self, step: str, outcome: str = "running", detail: str | None = None) -> None:
        self.row = replace(self.row, step=step, outcome=outcome, detail=detail)
        self.db.record_planned(self.row)

    def halted(self, vm_uuid: str) -> None:
        if vm_uuid not in self.row.halted:
            self.row = replace(self.row, halted=(*self.row.halted, vm_uuid))
            self.db.record_planned(self.row)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise _Stop("interrupted (Ctrl-C or SIGTERM)")


def _deltas(
    config: Config,
    vms: Sequence[SourceVm],
    what: str,
    *,
    cancel: threading.Event | None,
    interactive: bool,
    say: Callable[[str], None],
) -> dict[str, Pin]:
    """One run of each job for its VMs of the plan; every VM/target must succeed. The restore
    point each VM is started from: the run's on the target the preview chose."""
    by_job: dict[str, list[SourceVm]] = {}
    for v in vms:
        by_job.setdefault(v.job, []).append(v)
    pins: dict[str, Pin] = {}
    for job, members in by_job.items():
        _check_cancel(cancel)
        say(f"{what}: job {job}: {', '.join(v.name for v in members)}")
        report = run_configured(
            config,
            job,
            only=[v.vm_uuid for v in members],
            interactive=interactive,
            progress=say,
            cancel=cancel,
        )
        _check_cancel(cancel)
        ran = {r.vm_uuid: r for r in report.vms}
        for v in members:
            r = ran.get(v.vm_uuid)
            if r is None:
                raise _Stop(f"{what} of job {job}: {v.name} was not replicated")
            if r.error or not r.targets:
                raise _Stop(f"{what} of job {job}: {v.name}: {r.error or 'no target replicated'}")
            for t in r.targets:
                if t.outcome != "success":
                    raise _Stop(f"{what} of job {job}: {v.name} -> {t.target}: {t.error or t.outcome}")
            point = next((t.restore_point for t in r.targets if t.sr_uuid == v.sr_uuid), None)
            if point is None:
                raise _Stop(f"{what} of job {job}: {v.name}: no restore point on pool {v.target_pool}")
            pins[v.vm_uuid] = Pin(job, v.target_pool, point)
    return pins


def _shutdown(
    dr: DrSessions,
    vms: Sequence[SourceVm],
    record: _Record,
    *,
    timeout: float,
    cancel: threading.Event | None,
    say: Callable[[str], None],
) -> None:
    """Clean shutdown of each running source VM, the last group first (the reverse of the start
    order, as `VM_appliance.clean_shutdown` does)."""
    for v in sorted(vms, key=lambda v: (-v.group, v.name, v.vm_uuid)):
        _check_cancel(cancel)
        t = dr.sessions[v.pool]
        ref = str(t.api.VM.get_by_uuid(v.vm_uuid))
        if t.api.VM.get_power_state(ref) == "Halted":
            continue
        say(f"shutdown: group {v.group}: {v.name} on pool {v.pool}")
        try:
            t.call_async("VM.clean_shutdown", ref, timeout=timeout)
        except (XapiError, PoolUnreachable) as err:
            # A timeout cancels the task, which may still have halted the VM: then it is ours too.
            try:
                if t.api.VM.get_power_state(ref) == "Halted":
                    record.halted(v.vm_uuid)
            except (XapiError, PoolUnreachable):
                pass  # the pool stopped answering: the VM's state is unknown, not listed
            raise _Stop(f"VM {v.name} ({v.vm_uuid}) on pool {v.pool} did not shut down: {err}") from None
        record.halted(v.vm_uuid)


def _prepare(
    config: Config, plan: PlanConfig, db: StateDB, dr: DrSessions
) -> tuple[list[SourceVm], list[str]]:
    """The plan's source VMs, and those an earlier aborted attempt shut down that are still halted;
    refused (`FailoverError`, nothing changed) when the plan has a problem, a source pool does not
    answer or a source VM is neither running nor halted."""
    vms = sources(config, checked_preview(config, plan, dr, "planned"))
    states: dict[str, str] = {}
    for v in vms:
        t = dr.sessions.get(v.pool)
        if t is None:
            why = dr.unreachable.get(v.pool, "not connected")
            raise FailoverError(
                f"pool {v.pool} (the source of job {v.job}) unreachable ({why}): a planned failover "
                f"needs both sites (with the primary lost: xencr failover {plan.name}); nothing changed"
            )
        try:
            ref = str(t.api.VM.get_by_uuid(v.vm_uuid))
            states[v.vm_uuid] = str(t.api.VM.get_power_state(ref))
        except XapiError as err:
            raise FailoverError(
                f"VM {v.name} ({v.vm_uuid}) not found on pool {v.pool} ({err}); nothing changed"
            ) from None
        if states[v.vm_uuid] not in ("Running", "Halted"):
            raise FailoverError(
                f"VM {v.name} ({v.vm_uuid}) on pool {v.pool} is {states[v.vm_uuid]}: start or shut "
                "it down first; nothing changed"
            )
    prior = db.planned(plan.name)
    earlier = [] if prior is None or prior.outcome == "done" else list(prior.halted)
    return vms, [u for u in earlier if states.get(u) == "Halted"]


def planned_failover(
    config: Config,
    plan: PlanConfig,
    db: StateDB,
    dr: DrSessions,
    *,
    clone: bool = False,
    continue_on_failure: bool = False,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    cancel: threading.Event | None = None,
    interactive: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> PlannedReport:
    """Fail ``plan`` over with both sites up (see the module's rule). ``dr`` holds sessions on
    the target pools and the source pools (`pools_of`). Raises `FailoverError` when refused
    before anything changed, `PlannedAbort` when stopped later."""
    if db.failover_rows(plan.name):
        # Step 4 recorded its failover: the sources are halted and restore points pinned there.
        say(f"plan {plan.name}: a failover of this plan is recorded: continuing it (no run, no shutdown)")
        r = failover(config, plan, db, dr, continue_on_failure=continue_on_failure, say=say)
        return PlannedReport(plan.name, True, r)
    vms, earlier = _prepare(config, plan, db, dr)
    record = _Record(db, plan.name, earlier)
    by_uuid = {v.vm_uuid: v for v in vms}
    try:
        record.step("final-delta")
        final = _deltas(config, vms, "final delta", cancel=cancel, interactive=interactive, say=say)
        record.step("shutdown")
        _shutdown(dr, vms, record, timeout=shutdown_timeout, cancel=cancel, say=say)
        record.step("last-delta")
        last = _deltas(config, vms, "last delta", cancel=cancel, interactive=interactive, say=say)
        _check_cancel(cancel)
        record.step("failover")
        r = failover(
            config, plan, db, dr, clone=clone, continue_on_failure=continue_on_failure, pins=last, say=say
        )
    except (Exception, KeyboardInterrupt) as err:
        reason = (
            "interrupted (Ctrl-C)" if isinstance(err, KeyboardInterrupt) else str(err) or type(err).__name__
        )
        step = record.row.step
        record.step(step, "aborted", reason)
        halted = [by_uuid[u] for u in record.row.halted if u in by_uuid]
        restart = [v.restart_line() for v in _in_start_order(halted)]
        raise PlannedAbort(plan.name, step, reason, restart, bool(db.failover_rows(plan.name))) from err
    ok = r.start.ok
    record.step("done" if ok else "failover", "done" if ok else "aborted", None if ok else "a gate failed")
    halted = _in_start_order([by_uuid[u] for u in record.row.halted if u in by_uuid])
    return PlannedReport(
        plan.name,
        False,
        r,
        halted,
        {u: p.restore_point for u, p in final.items()},
        {u: p.restore_point for u, p in last.items()},
    )


def _in_start_order(vms: Sequence[SourceVm]) -> list[SourceVm]:
    return sorted(vms, key=lambda v: (v.group, v.name, v.vm_uuid))
