"""`xencr plan --failover`: real runs make restore points on two target pools, then the preview
chooses, orders, maps and checks, with the primary pool up or lost."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from drtest import ETH0, cli, preview, preview_json, problems, write_config
from xapitest import Pools

from xencr.cli.app import app
from xencr.config import load_config
from xencr.replication.jobs import run_configured
from xencr.replication.metadata import precise
from xencr.replication.runner import RunReport
from xencr.units import human_bytes

PLAN = f"""
[[plan]]
name = "dr"
jobs = ["jb", "jc"]
network_map = {{ "{ETH0}" = "Second network" }}
gate = {{ kind = "power_state", timeout = "2m" }}
"""


@dataclass
class World:
    tmp: Path
    cfg: Path
    uuids: dict[str, str]  # source VM name -> UUID


def run(cfg: Path, job: str) -> RunReport:
    report = run_configured(load_config(cfg), job)
    assert report.outcome == "success", [t.error for v in report.vms for t in v.targets]
    return report


def snap_time(report: RunReport, vm: str) -> str:
    v = next(v for v in report.vms if v.vm_name == vm)
    assert v.snapshot_time is not None
    return v.snapshot_time.isoformat()


@pytest.fixture(scope="module")
def world(pools: Pools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """vm1 starts first (order 1, 10 s delay), vm0 second (order 2, 5 s); jb then jc run once."""
    s = pools.session(0)
    uuids = {}
    for name, order, delay in (("vm0", 2, 5), ("vm1", 1, 10)):
        ref = s.api.VM.get_by_name_label(name)[0]
        s.api.VM.set_order(ref, order)
        s.api.VM.set_start_delay(ref, delay)
        uuids[name] = str(s.api.VM.get_uuid(ref))
    tmp = tmp_path_factory.mktemp("dr")
    cfg = write_config(tmp / "main", pools, PLAN)
    run(cfg, "jb")
    run(cfg, "jc")
    yield World(tmp, cfg, uuids)


def test_newest_information_wins_across_target_pools(world: World, pools: Pools) -> None:
    code, p = preview_json(world.cfg, "dr")
    assert code == 0, p["problems"]
    vms = {v["name"]: v for v in p["vms"]}
    # vm0: jc ran after jb, so pool c holds its newest restore point; vm1 only on b.
    assert (vms["vm0"]["pool"], vms["vm0"]["job"]) == ("c", "jc")
    assert (vms["vm1"]["pool"], vms["vm1"]["job"]) == ("b", "jb")
    assert vms["vm0"]["uuid"] == world.uuids["vm0"]
    assert len(vms["vm0"]["others"]) == 1 and vms["vm0"]["others"][0].startswith("b/")
    assert vms["vm0"]["rpo_seconds"] == 7200 and vms["vm1"]["rpo_seconds"] == 3600
    # A newer run of jb: now pool b is newest for vm0, at exactly that run's snapshot time.
    report = run(world.cfg, "jb")
    code, p = preview_json(world.cfg, "dr")
    assert code == 0, p["problems"]
    vm0 = next(v for v in p["vms"] if v["name"] == "vm0")
    assert (vm0["pool"], vm0["job"]) == ("b", "jb")
    assert vm0["snapshot_time"] == snap_time(report, "vm0")
    t = pools.session(1)
    rp = t.api.VM.get_by_uuid(vm0["restore_point"])
    when = next(v.snapshot_time for v in report.vms if v.vm_name == "vm0")
    assert when is not None
    assert t.api.VM.get_other_config(rp)["xencr:snapshot_time"] == precise(when)
    assert vm0["tie"] is None


def test_groups_from_carried_order(world: World) -> None:
    code, lines = preview(world.cfg, "dr")
    assert code == 0, lines
    assert lines[0] == "plan dr: failover of 2 VM(s), nothing changed"
    groups = [x for x in lines if x.startswith("group ")]
    assert groups == [
        "group 1 (carried order 1), then wait 10s, gate: power_state within 2m",
        "group 2 (carried order 2), then wait 5s, gate: power_state within 2m",
    ]
    first = lines.index(groups[0])
    assert lines[first + 1].startswith("  vm1: restore point ")
    assert f"    VIF 0: '{ETH0}' -> 'Second network'" in lines


def test_groups_from_the_plan_and_modes(world: World, pools: Pools) -> None:
    plan = f"""
[[plan]]
name = "ordered"
vms = ["{world.uuids["vm0"]}", "vm1"]
[[plan.groups]]
vms = ["vm0"]
start_delay = "1m"
gate = {{ kind = "xenstore", key = "data/ready", timeout = "5m" }}
[[plan.groups]]
vms = ["vm1"]
"""
    cfg = write_config(world.tmp / "ordered", pools, plan)
    code, lines = preview(cfg, "ordered", "--test")
    assert code == 0, lines
    assert lines[0] == "plan ordered: test failover of 2 VM(s), nothing changed"
    groups = [x for x in lines if x.startswith("group ")]
    assert groups == [
        "group 1 (from the plan), then wait 1m, gate: xenstore key 'data/ready' within 5m",
        "group 2 (from the plan), then wait 0s, gate: no gate",
    ]
    assert lines[lines.index(groups[0]) + 1].startswith("  vm0: restore point ")
    assert f"    VIF 0: '{ETH0}' (unmapped)" in lines
    code, lines = preview(cfg, "ordered", "--planned")
    assert code == 0 and lines[0] == "plan ordered: planned failover of 2 VM(s), nothing changed"


def test_works_with_the_primary_pool_unreachable(world: World, pools: Pools) -> None:
    source = pools.session(0)
    source.api.sim.fault_unreachable(True)
    try:
        code, p = preview_json(world.cfg, "dr")
    finally:
        source.api.sim.fault_unreachable(False)
    assert code == 0, p["problems"]
    assert sorted(v["name"] for v in p["vms"]) == ["vm0", "vm1"]
    assert {v["uuid"] for v in p["vms"]} == set(world.uuids.values())
    assert [g["vms"] for g in p["groups"]] == [[world.uuids["vm1"]], [world.uuids["vm0"]]]


def test_problem_lines(world: World, pools: Pools) -> None:
    plan = f"""
[[plan]]
name = "bad"
jobs = ["jb", "jn"]
vms = ["ghost"]
network_map = {{ "{ETH0}" = "Nowhere" }}
[[plan]]
name = "other"
vms = ["vm*"]
"""
    cfg = write_config(world.tmp / "bad", pools, plan)
    # The chosen replica of vm1 asks for more memory than pool b's host has.
    code, p = preview_json(cfg, "bad")
    vm1 = next(v for v in p["vms"] if v["name"] == "vm1")
    t = pools.session(1)
    rp = t.api.VM.get_by_uuid(vm1["restore_point"])
    rec = t.api.VM.get_record(rp)
    big = str(200 * 1024**3)
    t.api.VM.set_memory_limits(rp, rec["memory_static_min"], big, big, big)
    try:
        code, lines = preview(cfg, "bad")
    finally:
        t.api.VM.set_memory_limits(
            rp,
            rec["memory_static_min"],
            rec["memory_static_max"],
            rec["memory_dynamic_min"],
            rec["memory_dynamic_max"],
        )
    assert code == 1
    found = problems(lines)
    u0, u1 = world.uuids["vm0"], world.uuids["vm1"]
    assert f"VM vm0 ({u0}) is in plan 'bad' and in plan 'other': a VM belongs to one plan" in found
    assert f"VM vm1 ({u1}) is in plan 'bad' and in plan 'other': a VM belongs to one plan" in found
    assert "plan 'bad': vms[0] 'ghost' selects no VM with a restore point" in found
    assert "job jn: no restore point on any reachable target" in found
    assert f"VM vm1: VIF 0 on '{ETH0}' maps to network 'Nowhere', which pool b does not have" in found
    host = t.api.host.get_all()[0]
    free = human_bytes(int(t.api.host.compute_free_memory(host)))
    assert f"not enough memory on pool b: VM vm1 needs 200.0 GiB, the most left on a host is {free}" in found
    assert len(found) == 7, found  # the six above and vm0's unmappable VIF


def test_bad_input_is_one_line(world: World) -> None:
    cases = [
        (["--failover", "nope"], f"xencr: error: {world.cfg}: no plan 'nope' (plans: dr)"),
        (["--test"], "xencr: error: --test and --planned preview a failover: give --failover PLAN"),
        (
            ["jb", "--failover", "dr"],
            "xencr: error: --failover PLAN previews a plan: give no JOB, --vm or --full with it",
        ),
        (
            ["--failover", "dr", "--test", "--planned"],
            "xencr: error: --test and --planned exclude each other",
        ),
        ([], "xencr: error: give a JOB to plan, or --failover PLAN"),
    ]
    for args, line in cases:
        r = cli.invoke(app, ["plan", *args, "--config", str(world.cfg)])
        assert (r.exit_code, r.output.splitlines()) == (1, [line]), args


def test_a_target_pool_unreachable_is_a_problem_and_the_other_still_serves(
    world: World, pools: Pools
) -> None:
    c = pools.session(2)
    c.api.sim.fault_unreachable(True)
    try:
        code, p = preview_json(world.cfg, "dr")
    finally:
        c.api.sim.fault_unreachable(False)
    assert code == 1
    # jc's only target is on pool c: it has no restore point to offer now.
    assert p["problems"][1:] == ["job jc: no restore point on any reachable target"]
    assert p["problems"][0].startswith("pool c unreachable (")
    assert p["problems"][0].endswith("): its restore points are not considered")
    assert {v["name"]: v["pool"] for v in p["vms"]} == {"vm0": "b", "vm1": "b"}
