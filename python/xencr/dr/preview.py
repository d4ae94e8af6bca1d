"""What `xencr plan --failover PLAN` shows, changing nothing on any pool: per VM of the plan the
restore point it would be recovered from (`choose`: newest across all targets), its age against
its job's RPO, its start group (`groups`), the network each VIF lands on (the replica's network
through the plan's network map), the memory each target pool needs against its hosts' free
memory, and every problem found. A problem means the failover, as planned, would not go through
(the CLI exits 1); nothing here needs the source pool."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from xencr.config import Config, PlanConfig, TargetConfig, format_duration
from xencr.dr import choose as choosemod
from xencr.dr.choose import Choice
from xencr.dr.groups import Group, carried, start_order
from xencr.dr.scope import scope
from xencr.schedule import rpo_of
from xencr.units import human_bytes
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import XapiSession

Mode = Literal["failover", "test", "planned"]
NULL = "OpaqueRef:NULL"


@dataclass(frozen=True)
class Landing:
    """One VIF of the replica and the network the failed-over VM's VIF would be on."""

    device: str
    replica_network: str
    network: str
    mapped: bool  # the plan's network map moved it


@dataclass
class VmPlan:
    vm_uuid: str
    vm_name: str
    job: str
    pool: str
    sr_uuid: str
    target: str  # pool/SR name
    restore_point: str  # the replica VM's UUID
    snapshot_time: datetime
    age_seconds: int
    rpo_seconds: int | None
    group: int
    order: int | None  # carried order of its group (None: a group of the plan)
    memory: int  # bytes needed to start (XAPI's Dynamic_min policy, with the VM's overhead)
    tie: str | None = None
    others: list[str] = field(default_factory=list)  # "pool/SR at TIME" of the other candidates
    vifs: list[Landing] = field(default_factory=list)

    @property
    def breach(self) -> bool:
        return self.rpo_seconds is not None and self.age_seconds > self.rpo_seconds


@dataclass(frozen=True)
class PoolMemory:
    pool: str
    needed: int
    free: int  # sum of the enabled hosts' `host.compute_free_memory`
    largest: int  # the most free memory on one host


@dataclass
class FailoverPreview:
    plan: str
    mode: Mode
    vms: list[VmPlan] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    memory: list[PoolMemory] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _when(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _job_networks(target: TargetConfig) -> dict[str, list[str]]:
    """Target network -> the source networks the job maps onto it."""
    out: dict[str, list[str]] = {}
    for src, dst in sorted(target.network_map.items()):
        out.setdefault(dst, []).append(src)
    return out


def landings(
    t: XapiSession, record: Mapping[str, Any], plan: PlanConfig, target: TargetConfig | None
) -> list[Landing]:
    """Each VIF of a replica and where it lands: the plan's map by the replica's network name,
    else by the source network the job mapped onto it, else the replica's network unchanged."""
    via_job = _job_networks(target) if target is not None else {}
    out = []
    for vif in record.get("VIFs", []):
        r = t.api.VIF.get_record(vif)
        net = str(t.api.network.get_name_label(r["network"])) if str(r["network"]) != NULL else ""
        dst = plan.network_map.get(net)
        if dst is None:
            dst = next((plan.network_map[s] for s in via_job.get(net, []) if s in plan.network_map), None)
        out.append(Landing(str(r["device"]), net, dst if dst is not None else net, dst is not None))
    return sorted(out, key=lambda v: v.device)


def start_memory(record: Mapping[str, Any]) -> int:
    """What `VM.start` reserves on a host (xapi memory_check.ml `vm_compute_start_memory`, default
    policy Dynamic_min): the VM's dynamic minimum, plus its overhead."""
    return int(record.get("memory_dynamic_min", 0)) + int(record.get("memory_overhead", 0))


def host_free(t: XapiSession) -> list[int]:
    """`host.compute_free_memory` of each enabled host, largest first."""
    out = []
    for ref, h in t.api.host.get_all_records().items():
        if h.get("enabled", True):
            out.append(int(t.api.host.compute_free_memory(ref)))
    return sorted(out, reverse=True)


def _target_of(choice: Choice) -> TargetConfig | None:
    place = choice.chosen.place
    return next((x for x in place.job.targets if x.pool == place.pool and x.sr == place.sr), None)


def failover_preview(
    config: Config,
    plan: PlanConfig,
    sessions: Mapping[str, XapiSession],
    unreachable: Mapping[str, str],
    *,
    mode: Mode = "failover",
    now: datetime | None = None,
) -> FailoverPreview:
    """The preview of ``plan`` from the target pools in ``sessions``; ``unreachable`` names the
    pools that could not be reached (pool -> why), each a problem: a newer restore point may be
    there. Reads only."""
    now = now or datetime.now(UTC)
    out = FailoverPreview(plan.name, mode)
    where = choosemod.places(config)
    found = choosemod.gather(sessions, [p for p in where if p.pool not in unreachable])
    out.problems += [
        f"pool {pool} unreachable ({why}): its restore points are not considered"
        for pool, why in sorted(unreachable.items())
    ]
    out.problems += found.problems
    choices = choosemod.choose(found.candidates)
    sc = scope(plan, config.plans, choices)
    out.problems += sc.problems
    # A job of the plan whose VMs were never replicated (or whose every replica is detached)
    # shows as a job with no restore point at all.
    for j in plan.jobs:
        if not any(
            c.chosen.place.job.name == j or any(o.place.job.name == j for o in c.others)
            for c in choices.values()
        ):
            out.problems.append(f"job {j}: no restore point on any reachable target")
    order = start_order(
        plan, [carried(v, choices[v].vm_name, choices[v].chosen.point.record) for v in sc.vms]
    )
    out.groups = order.groups
    out.problems += order.problems
    pools_used: dict[str, list[VmPlan]] = {}
    for group in order.groups:
        for vm_uuid in group.vms:
            ch = choices[vm_uuid]
            c = ch.chosen
            t = sessions[c.place.pool]
            vp = VmPlan(
                vm_uuid=vm_uuid,
                vm_name=c.vm_name,
                job=c.place.job.name,
                pool=c.place.pool,
                sr_uuid=c.sr_uuid,
                target=c.target,
                restore_point=c.point.uuid,
                snapshot_time=c.snapshot_time,
                age_seconds=max(0, int((now - c.snapshot_time).total_seconds())),
                rpo_seconds=rpo_of(c.place.job),
                group=group.number,
                order=group.order,
                memory=start_memory(c.point.record),
                tie=ch.tie,
                others=[f"{o.target} at {_when(o.snapshot_time)}" for o in ch.others],
            )
            try:
                vp.vifs = landings(t, c.point.record, plan, _target_of(ch))
                nets = {str(r["name_label"]) for r in t.api.network.get_all_records().values()}
            except (XapiError, PoolUnreachable) as err:
                out.problems.append(f"VM {vp.vm_name}: networks on pool {vp.pool} not read: {err}")
                nets = set()
            for v in vp.vifs:
                if nets and v.network not in nets:
                    out.problems.append(
                        f"VM {vp.vm_name}: VIF {v.device} on {v.replica_network!r} maps to network "
                        f"{v.network!r}, which pool {vp.pool} does not have"
                    )
            out.vms.append(vp)
            pools_used.setdefault(vp.pool, []).append(vp)
    for pool, vms in sorted(pools_used.items()):
        out.memory.append(_memory(sessions[pool], pool, vms, out.problems))
    return out


def _memory(t: XapiSession, pool: str, vms: list[VmPlan], problems: list[str]) -> PoolMemory:
    """First fit in start order over the enabled hosts' free memory: a VM fits nowhere is a problem."""
    try:
        free = host_free(t)
    except (XapiError, PoolUnreachable) as err:
        problems.append(f"pool {pool}: free memory not read: {err}")
        return PoolMemory(pool, sum(v.memory for v in vms), 0, 0)
    left = list(free)
    for v in vms:
        i = next((k for k, f in enumerate(left) if f >= v.memory), None)
        if i is None:
            problems.append(
                f"not enough memory on pool {pool}: VM {v.vm_name} needs {human_bytes(v.memory)}, "
                f"the most left on a host is {human_bytes(max(left, default=0))}"
            )
            continue
        left[i] -= v.memory
    return PoolMemory(pool, sum(v.memory for v in vms), sum(free), max(free, default=0))


# ----------------------------------------------------------------------------------- output


def _age(seconds: int) -> str:
    return format_duration(seconds - seconds % 60) if seconds >= 60 else f"{seconds}s"


def render(p: FailoverPreview) -> list[str]:
    """The preview as text lines (sizes in binary units; ``to_json`` gives exact bytes)."""
    label = {"failover": "failover", "test": "test failover", "planned": "planned failover"}[p.mode]
    lines = [f"plan {p.plan}: {label} of {len(p.vms)} VM(s), nothing changed"]
    by_group: dict[int, list[VmPlan]] = {}
    for v in p.vms:
        by_group.setdefault(v.group, []).append(v)
    for g in p.groups:
        how = "from the plan" if g.source == "plan" else f"carried order {g.order}"
        gate = g.gate.describe() if g.gate is not None else "no gate"
        lines.append(f"group {g.number} ({how}), then wait {format_duration(g.start_delay)}, gate: {gate}")
        for v in by_group.get(g.number, []):
            rpo = f"RPO {_age(v.rpo_seconds)}" if v.rpo_seconds is not None else "no RPO"
            flag = ", BREACH" if v.breach else ""
            lines.append(
                f"  {v.vm_name}: restore point {v.restore_point} on {v.target} (job {v.job}), "
                f"snapshot {_when(v.snapshot_time)}, {_age(v.age_seconds)} old ({rpo}{flag}), "
                f"memory {human_bytes(v.memory)}"
            )
            if v.tie:
                lines.append(f"    tie: {v.tie}")
            for o in v.others:
                lines.append(f"    also: {o}")
            for n in v.vifs:
                arrow = f"{n.replica_network!r} -> {n.network!r}" if n.mapped else f"{n.network!r} (unmapped)"
                lines.append(f"    VIF {n.device}: {arrow}")
    for m in p.memory:
        lines.append(
            f"pool {m.pool}: memory needed {human_bytes(m.needed)}, free {human_bytes(m.free)} "
            f"(largest on one host {human_bytes(m.largest)})"
        )
    lines += [f"PROBLEM: {x}" for x in p.problems]
    return lines


def to_json(p: FailoverPreview) -> dict[str, Any]:
    return {
        "plan": p.plan,
        "mode": p.mode,
        "groups": [
            {
                "number": g.number,
                "source": g.source,
                "order": g.order,
                "start_delay": g.start_delay,
                "gate": (
                    {"kind": g.gate.kind, "timeout": g.gate.timeout, "key": g.gate.key} if g.gate else None
                ),
                "vms": list(g.vms),
            }
            for g in p.groups
        ],
        "vms": [
            {
                "uuid": v.vm_uuid,
                "name": v.vm_name,
                "job": v.job,
                "pool": v.pool,
                "sr": v.sr_uuid,
                "target": v.target,
                "restore_point": v.restore_point,
                "snapshot_time": v.snapshot_time.isoformat(),
                "age_seconds": v.age_seconds,
                "rpo_seconds": v.rpo_seconds,
                "rpo_breach": v.breach,
                "group": v.group,
                "order": v.order,
                "memory": v.memory,
                "tie": v.tie,
                "others": v.others,
                "vifs": [
                    {
                        "device": n.device,
                        "replica_network": n.replica_network,
                        "network": n.network,
                        "mapped": n.mapped,
                    }
                    for n in v.vifs
                ],
            }
            for v in p.vms
        ],
        "memory": [
            {"pool": m.pool, "needed": m.needed, "free": m.free, "largest": m.largest} for m in p.memory
        ],
        "problems": p.problems,
    }
