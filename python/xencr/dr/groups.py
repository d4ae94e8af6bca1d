"""The start order of a failover: the plan's groups, in the order written; VMs the groups do not
select, and every VM of a plan without groups, by the order and start delay their replicas
carry (`xencr:order`, `xencr:start_delay`, copied from the source VM at each run).

Carried order follows XAPI's appliance start (`VM_appliance.start`, ocaml/xapi/
xapi_vm_appliance.ml `create_action_list`): ascending `order`, the VMs of the same order start
together. A VM's `start_delay` is how long to wait after starting it before the next in the
sequence; as a group starts together, the next group waits for the longest delay of the group.
A VM that two plan groups select starts with the first and the overlap is a problem."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from xencr.config import HealthGate, PlanConfig

GroupSource = Literal["plan", "order"]


@dataclass(frozen=True)
class StartVm:
    """What the start order needs of one VM: its identity and the startup options it carries."""

    uuid: str  # the source VM's UUID
    name: str
    tags: tuple[str, ...] = ()
    order: int = 0
    start_delay: int = 0


@dataclass(frozen=True)
class Group:
    """VMs started together (source VM UUIDs, sorted by name), the wait after them, the gate."""

    number: int  # 1-based, in start order
    vms: tuple[str, ...]
    start_delay: int
    gate: HealthGate | None
    source: GroupSource  # "plan": a [[plan.groups]] table; "order": the carried order
    order: int | None = None  # the carried order of an "order" group


@dataclass
class StartOrder:
    groups: list[Group] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def group_of(self, vm_uuid: str) -> Group | None:
        return next((g for g in self.groups if vm_uuid in g.vms), None)


def _int(text: object) -> int:
    try:
        return max(0, int(str(text)))
    except ValueError:
        return 0  # no value carried (a replica made before the options travelled): start first


def carried(vm_uuid: str, name: str, record: Mapping[str, Any]) -> StartVm:
    """The startup options a restore point's VM record carries (absent or unreadable: 0)."""
    oc = record.get("other_config", {})
    tags = tuple(sorted(str(t) for t in record.get("tags", [])))
    return StartVm(
        vm_uuid, name, tags, _int(oc.get("xencr:order", "")), _int(oc.get("xencr:start_delay", ""))
    )


def by_order(vms: Sequence[StartVm], gate: HealthGate | None, first: int = 1) -> list[Group]:
    """Groups by carried order, ascending; numbered from ``first``."""
    orders = sorted({v.order for v in vms})
    out = []
    for i, order in enumerate(orders):
        members = sorted((v for v in vms if v.order == order), key=lambda v: (v.name, v.uuid))
        delay = max(v.start_delay for v in members)
        out.append(Group(first + i, tuple(v.uuid for v in members), delay, gate, "order", order))
    return out


def start_order(plan: PlanConfig, vms: Sequence[StartVm]) -> StartOrder:
    """The plan's start order for these VMs (each exactly once)."""
    out = StartOrder()
    placed: dict[str, int] = {}
    for i, g in enumerate(plan.groups):
        members = []
        for v in sorted(vms, key=lambda v: (v.name, v.uuid)):
            if not any(s.matches(v.uuid, v.name, v.tags) for s in g.selectors):
                continue
            if v.uuid in placed:
                out.problems.append(
                    f"VM {v.name} is selected by groups[{placed[v.uuid] - 1}] and groups[{i}] of plan "
                    f"{plan.name!r}: it starts with group {placed[v.uuid]}"
                )
                continue
            placed[v.uuid] = i + 1
            members.append(v.uuid)
        if not members:
            out.problems.append(f"plan {plan.name!r}: groups[{i}] selects no VM of the plan")
        out.groups.append(Group(i + 1, tuple(members), g.start_delay, g.gate or plan.gate, "plan"))
    rest = [v for v in vms if v.uuid not in placed]
    out.groups += by_order(rest, plan.gate, first=len(out.groups) + 1)
    return out
