"""`xencr failover PLAN` (unplanned) against the simulator: groups start in order with their
delays and gates, a gate timing out stops the plan; the newest restore point is started with the
source snapshot's content, the primary pool down; a failover killed mid-plan and run again starts
every VM exactly once; bad input changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from drtest import ETH0, cli, write_config
from xapitest import Pools, default_sr, disk_hashes

from xencr.cli.app import app
from xencr.config import job_id_for, load_config
from xencr.replication.jobs import run_configured
from xencr.state import StateDB
from xencr.xapi.session import XapiSession


def _run(cfg: Path, job: str) -> None:
    report = run_configured(load_config(cfg), job)
    assert report.outcome == "success", [t.error for v in report.vms for t in v.targets]


def _failover(cfg: Path, plan: str, *flags: str) -> tuple[int, list[str], str]:
    r = cli.invoke(app, ["failover", plan, "--yes", *flags, "--config", str(cfg)])
    return r.exit_code, r.stdout.splitlines(), r.stderr.strip()


def _started(t: XapiSession, since: int) -> list[str]:
    """UUIDs of the VMs started on a pool since start-log entry ``since``."""
    return [str(e["vm"]) for e in t.api.sim.start_log()[since:]]


def _scale(t: XapiSession, factor: str) -> None:
    pool = t.api.pool.get_all()[0]
    t.api.pool.set_other_config(pool, dict(t.api.pool.get_other_config(pool)) | {"sim_delay_scale": factor})


def _replica(t: XapiSession, job: str, vm_uuid: str) -> str:
    """The newest restore point ref of a job's VM on a pool (by snapshot time)."""
    found = []
    for ref, rec in t.api.VM.get_all_records().items():
        oc = rec["other_config"]
        if (
            oc.get("xencr:role") == "replica"
            and oc.get("xencr:job") == job_id_for(job)
            and oc.get("xencr:vm") == vm_uuid
            and not rec["is_a_snapshot"]
        ):
            found.append((oc.get("xencr:snapshot_time", ""), str(ref)))
    return max(found)[1]


def _three_vm_config(tmp: Path, pools: Pools, plan: str) -> Path:
    """Job jt replicates vm0, vm1 and vm2 (a clone of vm0 on the source) to pool b."""
    s = pools.session(0)
    if not s.api.VM.get_by_name_label("vm2"):
        s.call_async("VM.clone", s.api.VM.get_by_name_label("vm0")[0], "vm2")
    cfg = write_config(tmp, pools, plan)
    text = cfg.read_text().replace(
        "[[plan]]",
        (
            '[jobs.jt]\npool = "a"\nvms = ["vm0", "vm1", "vm2"]\n'
            f'[[jobs.jt.targets]]\npool = "b"\nsr = "{default_sr(pools, 1)}"\n'
            '[[jobs.jt.schedules]]\nevery = "15m"\nretention = 3\n[[plan]]'
        ),
        1,
    )
    cfg.write_text(text)
    return cfg


def test_groups_start_in_order_and_a_gate_timing_out_stops_the_plan(pools: Pools, tmp_path: Path) -> None:
    plan = """
[[plan]]
name = "three"
jobs = ["jt"]
[[plan.groups]]
vms = ["vm0"]
start_delay = "1s"
gate = { kind = "guest_tools", timeout = "10s" }
[[plan.groups]]
vms = ["vm1"]
gate = { kind = "guest_tools", timeout = "1s" }
[[plan.groups]]
vms = ["vm2"]
"""
    cfg = _three_vm_config(tmp_path, pools, plan)
    _run(cfg, "jt")
    s, t = pools.session(0), pools.session(1)
    _scale(t, "0.1")
    uuid = {n: str(s.api.VM.get_uuid(s.api.VM.get_by_name_label(n)[0])) for n in ("vm0", "vm1", "vm2")}
    rp = {n: _replica(t, "jt", u) for n, u in uuid.items()}
    t.api.VM.set_other_config(rp["vm0"], dict(t.api.VM.get_other_config(rp["vm0"])) | {"sim_boot_delay": "5"})
    t.api.VM.set_other_config(rp["vm1"], dict(t.api.VM.get_other_config(rp["vm1"])) | {"sim_boots": "false"})
    mark = len(t.api.sim.start_log())
    code, out, err = _failover(cfg, "three")
    assert code == 1, out
    assert err == (
        "xencr: error: plan three stopped at group 2: vm1 failed its gate; not started: vm2 "
        "(fix it, then run the same command again to continue)"
    )
    assert "vm1: FAILED: guest_tools within 1s: not met after 1s" in out
    log = t.api.sim.start_log()[mark:]
    rp_uuid = {n: str(t.api.VM.get_uuid(r)) for n, r in rp.items()}
    assert [e["vm"] for e in log] == [rp_uuid["vm0"], rp_uuid["vm1"]], "vm2 must not start"
    # vm1 waited for vm0's guest (0.5 s boot) and then the group's 1 s delay.
    assert log[1]["time"] - log[0]["time"] >= 1.5
    assert t.api.VM.get_power_state(rp["vm2"]) == "Halted"
    assert "start" in t.api.VM.get_blocked_operations(rp["vm2"]), "a later group is not even unprotected"
    # Continued past the failure: vm0 and vm1 are not started again, vm2 is.
    code, out, err = _failover(cfg, "three", "--continue-on-failure")
    assert code == 1 and err == "xencr: error: plan three: 1 VM(s) failed their gate", (out, err)
    assert [e["vm"] for e in t.api.sim.start_log()[mark:]] == [rp_uuid[n] for n in ("vm0", "vm1", "vm2")]
    assert t.api.VM.get_other_config(rp["vm2"])["xencr:failed_over"].endswith(" three")
    with StateDB(load_config(cfg).state.path) as db:
        states = {r.vm_name: (r.state, r.vm) for r in db.failover_rows("three")}
    assert states == {
        "vm0": ("passed", rp_uuid["vm0"]),
        "vm1": ("failed", rp_uuid["vm1"]),
        "vm2": ("passed", rp_uuid["vm2"]),
    }
    # The next CR run reports the failed-over replicas as such, and is not an error.
    report = run_configured(load_config(cfg), "jt")
    lines = [d for v in report.vms for x in v.targets for d in x.detached]
    assert any(f"{rp_uuid['vm2']}" in d and "failed over by plan three" in d for d in lines), lines
    # ... and does not replicate a failed-over VM there again (a full copy of a stale source).
    by_vm = {v.vm_name: v.targets[0] for v in report.vms}
    assert by_vm["vm2"].outcome == "skipped", by_vm["vm2"]
    assert by_vm["vm2"].error == (
        "skipped: failed over by plan three: the VM runs from its replica on this target"
    )
    assert report.outcome != "failure"
    for vm in rp.values():
        t.api.VM.hard_shutdown(vm)


def test_newest_wins_with_the_primary_down_and_the_content_is_the_source_snapshot(
    pools: Pools, tmp_path: Path
) -> None:
    plan = '[[plan]]\nname = "newest"\nvms = ["vm0"]\n'
    cfg = write_config(tmp_path, pools, plan)
    _run(cfg, "jb")
    _run(cfg, "jc")  # vm0's newest restore point is on pool c now
    s, b, c = pools.session(0), pools.session(1), pools.session(2)
    vm0 = str(s.api.VM.get_uuid(s.api.VM.get_by_name_label("vm0")[0]))
    older, newer = _replica(b, "jb", vm0), _replica(c, "jc", vm0)
    source_snapshot = c.api.VM.get_other_config(newer)["xencr:copy_of"]
    expected = disk_hashes(s, s.api.VM.get_by_uuid(source_snapshot))
    mark_b, mark_c = len(b.api.sim.start_log()), len(c.api.sim.start_log())
    s.api.sim.fault_unreachable(True)
    try:
        r = cli.invoke(app, ["failover", "newest", "--yes", "--json", "--config", str(cfg)])
    finally:
        s.api.sim.fault_unreachable(False)
    assert r.exit_code == 0, r.output
    out: dict[str, Any] = json.loads(r.stdout)
    (vm,) = out["vms"]
    assert (vm["pool"], vm["restore_point"], vm["state"]) == ("c", c.api.VM.get_uuid(newer), "passed")
    assert _started(c, mark_c) == [vm["vm"]] and _started(b, mark_b) == []
    assert c.api.VM.get_power_state(newer) == "Running"
    assert disk_hashes(c, newer) == expected
    assert b.api.VM.get_power_state(older) == "Halted" and "start" in b.api.VM.get_blocked_operations(older)
    c.api.VM.hard_shutdown(newer)


def test_killed_mid_plan_then_run_again_starts_each_vm_once(pools: Pools, tmp_path: Path) -> None:
    plan = """
[[plan]]
name = "killed"
jobs = ["jb"]
[[plan.groups]]
vms = ["vm0"]
start_delay = "60s"
[[plan.groups]]
vms = ["vm1"]
"""
    cfg = write_config(tmp_path, pools, plan)
    _run(cfg, "jb")
    b = pools.session(1)
    mark = len(b.api.sim.start_log())
    proc = subprocess.Popen(
        [sys.executable, "-m", "xencr.cli", "failover", "killed", "--yes", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ | {"XENCR_CONFIG": str(cfg)},
    )
    try:
        deadline = time.monotonic() + 30
        state_path = load_config(cfg).state.path
        # Killed while it waits the first group's delay: vm0 started and passed, vm1 not yet.
        while time.monotonic() < deadline:
            with StateDB(state_path) as db:
                if any(r.state == "passed" for r in db.failover_rows("killed")):
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("the failover did not start its first group")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(_started(b, mark)) == 1
    code, out, err = _failover(cfg, "killed")
    assert code == 0, (out, err)
    assert out[0] == "plan killed: continuing the recorded failover of 2 VM(s)"
    started = _started(b, mark)
    assert len(started) == 2 and len(set(started)) == 2, started
    code, out, err = _failover(cfg, "killed")  # once more: nothing to start
    assert code == 0 and _started(b, mark) == started, (out, err)
    for u in started:
        b.api.VM.hard_shutdown(b.api.VM.get_by_uuid(u))


def _records(t: XapiSession) -> dict[str, Any]:
    return {
        "VM": {
            r["uuid"]: (r["power_state"], r["blocked_operations"], r["other_config"], sorted(r["VIFs"]))
            for r in t.api.VM.get_all_records().values()
        },
        "network": sorted(r["uuid"] for r in t.api.network.get_all_records().values()),
    }


def test_bad_input_is_one_line_and_changes_nothing(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        pools,
        f'[[plan]]\nname = "bad"\njobs = ["jb"]\nnetwork_map = {{ "{ETH0}" = "No such network" }}\n'
        '[[plan]]\nname = "none"\njobs = ["jn"]\n',
    )
    _run(cfg, "jb")
    b = pools.session(1)
    before = _records(b)
    cases = [
        ("nope", (), f"xencr: error: {cfg}: no plan 'nope' (plans: bad, none)"),
        (
            "none",
            (),
            "xencr: error: plan none: job jn: no restore point on any reachable target; nothing changed",
        ),
        ("bad", (), None),
    ]
    for plan, flags, line in cases:
        code, out, err = _failover(cfg, plan, *flags)
        assert code == 1 and len(err.splitlines()) == 1, (plan, out, err)
        if line is not None:
            assert err == line
    code, out, err = _failover(cfg, "bad")
    assert err.startswith("xencr: error: plan bad: VM vm0: VIF 0 on ") and "'No such network'" in err, err
    assert _records(b) == before
    # Not enough memory on the DR pool for a VM the plan starts: refused before anything changes.
    cfg_mem = write_config(tmp_path / "mem", pools, '[[plan]]\nname = "mem"\nvms = ["vm1"]\n')
    s = pools.session(0)
    rp = _replica(b, "jb", s.api.VM.get_uuid(s.api.VM.get_by_name_label("vm1")[0]))
    rec = b.api.VM.get_record(rp)
    big = str(200 * 1024**3)
    b.api.VM.set_memory_limits(rp, rec["memory_static_min"], big, big, big)
    try:
        mem_before = _records(b)
        code, out, err = _failover(cfg_mem, "mem")
        assert _records(b) == mem_before
    finally:
        limits = ("memory_static_min", "memory_static_max", "memory_dynamic_min", "memory_dynamic_max")
        b.api.VM.set_memory_limits(rp, *(rec[k] for k in limits))
    assert code == 1 and len(err.splitlines()) == 1, (out, err)
    assert "not enough memory on pool b: VM vm1 needs 200.0 GiB" in err, err
    assert err.endswith("nothing changed"), err
    with StateDB(load_config(cfg).state.path) as db:
        assert db.failover_rows("bad") == [] and db.failover_rows("none") == []
    with StateDB(load_config(cfg_mem).state.path) as db:
        assert db.failover_rows("mem") == []
    r = cli.invoke(app, ["failover", "bad", "--config", str(cfg)], input="")
    assert r.exit_code == 1
    assert (
        r.stderr.strip()
        == "xencr: error: failover of plan bad changes VMs: give --yes to run it without a terminal"
    )


def test_a_hook_gets_the_started_vm(pools: Pools, tmp_path: Path) -> None:
    """A hook runs after its VM started and passed the gate, as an argument list, with the new
    VM's UUID, name and IPs in its environment (a failing one: the next test)."""
    out = tmp_path / "hook.txt"
    script = (
        "import os, sys; open(sys.argv[1], 'w').write("
        "' '.join(os.environ[k] for k in ('XENCR_PLAN', 'XENCR_VM_UUID', 'XENCR_VM_NAME', 'XENCR_VM_IPS')))"
    )
    plan = (
        '[[plan]]\nname = "hooked"\nvms = ["vm1"]\ngate = { kind = "guest_tools", timeout = "10s" }\n'
        f'[[plan.hooks]]\nvm = "vm1"\ncommand = [{json.dumps(sys.executable)}, "-c", '
        f"{json.dumps(script)}, {json.dumps(str(out))}]\n"
    )
    cfg = write_config(tmp_path, pools, plan)
    _run(cfg, "jb")
    code, lines, err = _failover(cfg, "hooked")
    assert code == 0, (lines, err)
    with StateDB(load_config(cfg).state.path) as db:
        (row,) = db.failover_rows("hooked")
    b = pools.session(1)
    vm = b.api.VM.get_by_uuid(row.vm)
    networks = b.api.VM_guest_metrics.get_networks(b.api.VM.get_guest_metrics(vm))
    ips = [str(v) for k, v in sorted(networks.items()) if "/ip" in k]
    assert out.read_text() == f"hooked {row.vm} vm1 {' '.join(ips)}"
    assert ips, "the guest reported its addresses before the hook ran"
    b.api.VM.hard_shutdown(vm)


def test_a_failing_hook_fails_its_group(pools: Pools, tmp_path: Path) -> None:
    script = "import sys; open(sys.argv[1], 'w')"  # a directory: the hook fails
    failing = (
        '[[plan]]\nname = "failing"\nvms = ["vm1"]\n'
        f'[[plan.hooks]]\nvm = "vm1"\ncommand = [{json.dumps(sys.executable)}, "-c", '
        f"{json.dumps(script)}, {json.dumps(str(tmp_path))}]\n"
    )
    cfg2 = write_config(tmp_path / "two", pools, failing)
    _run(cfg2, "jb")
    code, lines, err = _failover(cfg2, "failing")
    assert code == 1, (lines, err)
    assert err == (
        "xencr: error: plan failing stopped at group 1: vm1 failed its gate; not started: none"
        " (fix it, then run the same command again to continue)"
    )
    said = [x for x in lines if "hook" in x]
    assert len(said) == 1 and "exited 1" in said[0] and "IsADirectoryError" in said[0], lines
