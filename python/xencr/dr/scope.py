"""Which VMs a plan covers: every VM that one of its ``jobs`` has a restore point of, and every
VM its ``vms`` select (UUID, name glob, tag) among all the jobs' restore points. The VMs are
known from their restore points (`choose.Candidate`), never from the source pool. A VM covered
by two plans is a problem of both: a failover must not start it twice."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from xencr.config import PlanConfig
from xencr.dr.choose import Choice


@dataclass
class Scope:
    """The source VM UUIDs a plan covers (sorted by name), and what is wrong with it."""

    vms: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def covers(plan: PlanConfig, choice: Choice) -> bool:
    """Whether the plan covers the VM of this choice (by any of its restore points' jobs)."""
    jobs = {c.place.job.name for c in (choice.chosen, *choice.others)}
    c = choice.chosen
    return bool(jobs & set(plan.jobs)) or any(s.matches(c.vm_uuid, c.vm_name, c.tags) for s in plan.selectors)


def scope(plan: PlanConfig, plans: Mapping[str, PlanConfig], choices: Mapping[str, Choice]) -> Scope:
    """The plan's VMs among ``choices`` (every VM with a restore point, all jobs), with a problem
    line for a VM another plan covers too and for a ``vms`` entry that selects nothing."""
    out = Scope()
    mine = [ch for ch in choices.values() if covers(plan, ch)]
    for ch in sorted(mine, key=lambda ch: (ch.vm_name, ch.vm_uuid)):
        out.vms.append(ch.vm_uuid)
        others = [p.name for p in plans.values() if p.name != plan.name and covers(p, ch)]
        if others:
            out.problems.append(
                f"VM {ch.vm_name} ({ch.vm_uuid}) is in plan {plan.name!r} and in plan "
                f"{', '.join(repr(o) for o in others)}: a VM belongs to one plan"
            )
    for i, s in enumerate(plan.selectors):
        if not any(s.matches(ch.vm_uuid, ch.vm_name, ch.chosen.tags) for ch in choices.values()):
            out.problems.append(f"plan {plan.name!r}: vms[{i}] {str(s)!r} selects no VM with a restore point")
    return out
