"""Test failover (`xencr failover PLAN --test`): the plan rehearsed on fast clones of the chosen
restore points, every VIF on an isolated network made for the test (no PIF), optionally booted
group by group with the gates checked (hooks are not run: they act on the world outside); then
everything the test made is destroyed, also after a failure unless ``keep_on_failure``.

Every object the test makes carries its attempt id from the creating call (`ownership.dr_test_name`
in `VM.clone`, `xencr:attempt` in `network.create`'s record), so `cleanup` (run by every test first,
and by `xencr failover --cleanup`) finds what an interrupted test left, by `ownership`'s rule (c).
Replicas are only read and cloned: their records and disks stay as they were."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from xencr.config import Config, PlanConfig, job_id_for
from xencr.dr.connect import DrSessions
from xencr.dr.failover import FailoverError, disks, groups_of, move_vif, unprotect
from xencr.dr.failover import choose_rows as failover_rows
from xencr.dr.start import StartReport, StartVm, VmResult, start_groups
from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.state import StateDB
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import XapiSession


@dataclass
class RehearsalReport:
    plan: str
    attempt: str
    booted: bool
    run_id: int
    clones: dict[str, str] = field(default_factory=dict)  # source VM name -> clone UUID
    start: StartReport = field(default_factory=StartReport)
    cleaned: list[str] = field(default_factory=list)
    kept: bool = False

    @property
    def ok(self) -> bool:
        return self.start.ok


class _NoRecord:
    """`start.Progress` of a test: the clones are made beforehand and nothing is recorded."""

    def prepare(self, vm: StartVm) -> StartVm:
        return vm

    def done(self, vm: StartVm) -> VmResult | None:
        return None

    def was_started(self, vm: StartVm) -> bool:
        return False

    def started(self, vm: StartVm, when: datetime) -> None:
        pass

    def finished(self, vm: StartVm, result: VmResult) -> None:
        pass


def cleanup(sessions: Mapping[str, XapiSession]) -> list[str]:
    """Destroy every test object on these pools (rule (c)); a line per object destroyed."""
    out = []
    for pool, t in sorted(sessions.items()):
        found = ownership.dr_test_objects(t)
        for ref, rec in found.vms:
            if rec["power_state"] != "Halted":
                with contextlib.suppress(XapiError):  # the destroy below says what is true
                    t.api.VM.hard_shutdown(ref)
        for cls, items in (("VM", found.vms), ("VDI", found.vdis), ("network", found.networks)):
            for ref, rec in items:
                err = ownership.destroy(t, cls, ref)
                if err is None:
                    out.append(f"pool {pool}: destroyed test {cls} {rec['uuid']} {rec['name_label']!r}")
                else:
                    out.append(f"pool {pool}: test {cls} {rec['uuid']} not destroyed: {err}")
    return out


def _clone(t: XapiSession, replica_uuid: str, name: str, attempt: str, network: str) -> str:
    keys = {md.ATTEMPT: attempt, md.ROLE: ownership.DR_TEST}
    ref = str(
        t.call_async("VM.clone", t.api.VM.get_by_uuid(replica_uuid), ownership.dr_test_name(name, attempt))
    )
    t.api.VM.set_other_config(ref, md.strip_ours(dict(t.api.VM.get_other_config(ref))) | keys)
    for vdi in disks(t, ref):
        t.api.VDI.set_other_config(vdi, md.strip_ours(dict(t.api.VDI.get_other_config(vdi))) | keys)
    t.api.VM.set_is_a_template(ref, False)
    unprotect(t, ref)
    for vif in t.api.VM.get_VIFs(ref):
        move_vif(t, str(vif), network)
    return str(t.api.VM.get_uuid(ref))


def rehearse(
    config: Config,
    plan: PlanConfig,
    db: StateDB,
    dr: DrSessions,
    *,
    boot: bool = False,
    keep_on_failure: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> RehearsalReport:
    """Rehearse ``plan`` (see the module's rule); recorded as a run with trigger ``dr-test``."""
    rows = failover_rows(config, plan, dr, (), clone=True)
    job_id = job_id_for(f"plan {plan.name}")
    attempt = ownership.new_attempt(job_id)
    run_id = db.start_run(job_id, f"plan {plan.name}", None, "dr-test")
    out = RehearsalReport(plan.name, attempt, boot, run_id)
    error: str | None = None
    try:
        out.cleaned += cleanup(dr.sessions)
        nets = {}
        for pool in sorted({r.pool for r in rows}):
            t = dr.sessions[pool]
            nets[pool] = str(
                t.api.network.create(
                    {
                        "name_label": f"xencr test {attempt}",
                        "name_description": f"isolated network of a test failover of plan {plan.name}",
                        "MTU": "1500",
                        "other_config": {md.ATTEMPT: attempt, md.ROLE: ownership.DR_TEST},
                    }
                )
            )
        made = []
        for r in rows:
            clone = _clone(dr.sessions[r.pool], r.restore_point, r.vm_name, attempt, nets[r.pool])
            out.clones[r.vm_name] = clone
            say(f"cloned {r.vm_name}'s restore point {r.restore_point} on pool {r.pool}")
            made.append(replace(r, vm=clone))
        if boot:
            out.start = start_groups(
                plan,
                groups_of(plan, made),
                lambda pool: dr.sessions[pool],
                _NoRecord(),
                continue_on_failure=True,
                run_hooks=False,
                say=say,
            )
    except (XapiError, PoolUnreachable) as err:
        error = str(err)
    except BaseException:
        out.cleaned += cleanup(dr.sessions)  # interrupted: leave nothing behind
        db.finish_run(run_id, "interrupted", "interrupted; its test objects were destroyed")
        raise
    failed = error is not None or not out.ok
    if failed and keep_on_failure:
        out.kept = True
    else:
        out.cleaned += cleanup(dr.sessions)
    db.finish_run(run_id, "failure" if failed else "success", error)
    if error is not None:
        raise FailoverError(f"test failover of plan {plan.name}: {error}")
    return out
