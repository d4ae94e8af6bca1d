"""`xencr failover PLAN --planned` against the simulator: the preview changes nothing; a source VM
that refuses to shut down, or a SIGTERM during the shutdowns, stops the plan with a restart line
for each VM already halted and nothing started on the target; a planned failover carries the
writes made just before the shutdown (the failed-over VMs' disks hash equal to the halted
sources'), the sources end halted and the failed-over VMs run from exactly the last delta's
restore points; run again, it continues without running or starting anything twice."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from drtest import cli, preview, write_config
from xapitest import Pools, disk_hashes

from xencr.cli.app import app
from xencr.config import job_id_for, load_config
from xencr.dr.connect import dr_sessions
from xencr.dr.planned import planned_failover, pools_of
from xencr.replication.jobs import run_configured
from xencr.state import StateDB
from xencr.xapi.session import XapiSession

PLAN = """
[[plan]]
name = "move"
jobs = ["jb"]
[[plan.groups]]
vms = ["vm0"]
[[plan.groups]]
vms = ["vm1"]
"""


def _scale(t: XapiSession, factor: str) -> None:
    pool = t.api.pool.get_all()[0]
    t.api.pool.set_other_config(pool, dict(t.api.pool.get_other_config(pool)) | {"sim_delay_scale": factor})


def _vm(s: XapiSession, name: str) -> str:
    return str(s.api.VM.get_by_name_label(name)[0])


def _uuid(s: XapiSession, name: str) -> str:
    return str(s.api.VM.get_uuid(_vm(s, name)))


def _restart_line(name: str, uuid: str) -> str:
    return (
        f"{name} ({uuid}) on pool a is halted; restart it with: xe vm-start uuid={uuid}  "
        f'(XAPI: VM.start(VM.get_by_uuid("{uuid}"), false, false))'
    )


def _replicas(t: XapiSession) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each of job jb's replica VMs on a pool: (blocked operations, other_config)."""
    return {
        str(r["uuid"]): (sorted(r["blocked_operations"]), dict(r["other_config"]))
        for r in t.api.VM.get_all_records().values()
        if r["other_config"].get("xencr:job") == job_id_for("jb") and not r["is_a_snapshot"]
    }


@pytest.fixture
def running(pools: Pools) -> Iterator[XapiSession]:
    """vm0 and vm1 running on the source pool (fast shutdowns); halted again afterwards."""
    s = pools.session(0)
    _scale(s, "0.01")
    for name in ("vm0", "vm1"):
        s.call_async("VM.start", _vm(s, name), False, False)
    yield s
    for name in ("vm0", "vm1"):
        if s.api.VM.get_power_state(_vm(s, name)) != "Halted":
            s.api.VM.hard_shutdown(_vm(s, name))


def test_plan_planned_only_previews(pools: Pools, tmp_path: Path, running: XapiSession) -> None:
    cfg = write_config(tmp_path, pools, PLAN)
    assert run_configured(load_config(cfg), "jb").outcome == "success"
    b = pools.session(1)
    before, mark = _replicas(b), len(b.api.sim.start_log())
    code, lines = preview(cfg, "move", "--planned")
    assert code == 0, lines
    assert lines[0] == "plan move: planned failover of 2 VM(s), nothing changed"
    assert [running.api.VM.get_power_state(_vm(running, n)) for n in ("vm0", "vm1")] == ["Running"] * 2
    assert _replicas(b) == before and len(b.api.sim.start_log()) == mark
    with StateDB(load_config(cfg).state.path) as db:
        assert db.planned("move") is None and db.failover_rows("move") == []


def test_a_source_vm_refusing_to_shut_down_stops_the_plan(
    pools: Pools, tmp_path: Path, running: XapiSession
) -> None:
    s, b = running, pools.session(1)
    cfg = write_config(tmp_path, pools, PLAN)
    assert run_configured(load_config(cfg), "jb").outcome == "success"
    vm0, vm1 = _uuid(s, "vm0"), _uuid(s, "vm1")
    # vm0 (group 1, shut down last) is a PV guest that never acknowledges a shutdown request.
    s.api.VM.hard_shutdown(_vm(s, "vm0"))
    s.api.VM.set_domain_type(_vm(s, "vm0"), "pv")
    oc = dict(s.api.VM.get_other_config(_vm(s, "vm0")))
    s.api.VM.set_other_config(_vm(s, "vm0"), oc | {"sim_guest_shutdown": "ignore"})
    s.call_async("VM.start", _vm(s, "vm0"), False, False)
    mark = len(b.api.sim.start_log())
    try:
        r = cli.invoke(app, ["failover", "move", "--planned", "--yes", "--config", str(cfg)])
    finally:
        s.api.VM.set_other_config(_vm(s, "vm0"), oc)
    assert r.exit_code == 1, r.output
    assert r.stderr.strip() == (
        f"xencr: error: plan move: planned failover stopped at step shutdown: VM vm0 ({vm0}) on pool a "
        f"did not shut down: VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT [{_vm(s, 'vm0')}]; nothing on the target "
        "was changed; 1 source VM(s) it shut down can be restarted as listed"
    )
    out = r.stdout.splitlines()
    assert out[-1] == _restart_line("vm1", vm1)
    assert "shutdown: group 2: vm1 on pool a" in out and "shutdown: group 1: vm0 on pool a" in out
    assert not any(vm0 in line and "restart it" in line for line in out)
    # Nothing started nor unprotected on the target (the final delta added a restore point).
    assert len(b.api.sim.start_log()) == mark
    for blocked, other in _replicas(b).values():
        assert "start" in blocked and "xencr:failed_over" not in other
    with StateDB(load_config(cfg).state.path) as db:
        row = db.planned("move")
        assert row is not None and db.failover_rows("move") == []
    assert (row.step, row.outcome, row.halted) == ("shutdown", "aborted", (vm1,))
    assert row.detail is not None and row.detail.startswith(f"VM vm0 ({vm0}) on pool a did not shut down")
    # vm0 still runs; vm1 starts again with the XAPI call of its restart line.
    assert s.api.VM.get_power_state(_vm(s, "vm0")) == "Running"
    assert s.api.VM.get_power_state(_vm(s, "vm1")) == "Halted"
    s.api.VM.start(s.api.VM.get_by_uuid(vm1), False, False)
    assert s.api.VM.get_power_state(_vm(s, "vm1")) == "Running"
    s.api.VM.hard_shutdown(_vm(s, "vm0"))
    s.api.VM.set_domain_type(_vm(s, "vm0"), "hvm")


def test_planned_failover_carries_the_last_writes(pools: Pools, tmp_path: Path, running: XapiSession) -> None:
    s, b = running, pools.session(1)
    _scale(b, "0.01")
    cfg = write_config(tmp_path, pools, PLAN)
    config = load_config(cfg)
    assert run_configured(config, "jb").outcome == "success"
    uuids = {n: _uuid(s, n) for n in ("vm0", "vm1")}
    said: list[str] = []

    def say(line: str) -> None:
        # Just before each shutdown (after the final delta): the guest writes once more.
        said.append(line)
        if line.startswith("shutdown: "):
            name = line.split(": ")[2].split(" on ")[0]
            vbd = next(v for v in s.api.VM.get_VBDs(_vm(s, name)) if s.api.VBD.get_type(v) == "Disk")
            s.api.sim.write(s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd)), 65536, 65536, f"last/{name}")

    mark = len(b.api.sim.start_log())
    with StateDB(config.state.path) as db, dr_sessions(config, pools_of(config), interactive=False) as dr:
        runs = len(db.runs("jb"))
        report = planned_failover(config, config.plan("move"), db, dr, say=say)
        rows = {r.vm_name: r for r in db.failover_rows("move")}
        planned = db.planned("move")
        assert len(db.runs("jb")) == runs + 2  # the final and the last delta
    assert [x for x in said if x.startswith("shutdown: ")] == [
        "shutdown: group 2: vm1 on pool a",
        "shutdown: group 1: vm0 on pool a",
    ]
    assert report.failover.start.ok and not report.resumed
    assert sorted(v.name for v in report.halted) == ["vm0", "vm1"]
    assert planned is not None and (planned.step, planned.outcome) == ("done", "done")
    assert sorted(planned.halted) == sorted(uuids.values())
    started = [str(e["vm"]) for e in b.api.sim.start_log()[mark:]]
    assert started == [report.last[uuids["vm0"]], report.last[uuids["vm1"]]]  # group order
    for name, uuid in uuids.items():
        source = _vm(s, name)
        assert s.api.VM.get_power_state(source) == "Halted"
        last, final = report.last[uuid], report.final[uuid]
        assert rows[name].restore_point == last and rows[name].state == "passed" and last != final
        replica = b.api.VM.get_by_uuid(last)
        assert b.api.VM.get_power_state(replica) == "Running"
        halted = disk_hashes(s, source)
        assert disk_hashes(b, replica) == halted
        # The final delta did not have the last write: only the last delta carried it.
        assert disk_hashes(b, b.api.VM.get_by_uuid(final)) != halted
    # Run again: the recorded failover is continued, nothing run, shut down or started twice.
    with StateDB(config.state.path) as db, dr_sessions(config, pools_of(config), interactive=False) as dr:
        again = planned_failover(config, config.plan("move"), db, dr)
        assert len(db.runs("jb")) == runs + 2
    assert again.resumed and again.failover.start.ok
    assert len(b.api.sim.start_log()) == mark + 2
    for uuid in report.last.values():
        b.api.VM.hard_shutdown(b.api.VM.get_by_uuid(uuid))


def test_sigterm_during_the_shutdown_stops_with_the_restart_lines(
    pools: Pools, tmp_path: Path, running: XapiSession
) -> None:
    s, b = running, pools.session(1)
    cfg = write_config(tmp_path, pools, PLAN.replace('"move"', '"term"'))
    assert run_configured(load_config(cfg), "jb").outcome == "success"
    vm0, vm1 = _uuid(s, "vm0"), _uuid(s, "vm1")
    oc = dict(s.api.VM.get_other_config(_vm(s, "vm1")))
    s.api.VM.set_other_config(_vm(s, "vm1"), oc | {"sim_clean_shutdown_delay": "200"})  # 2 s
    mark = len(b.api.sim.start_log())
    proc = subprocess.Popen(
        [sys.executable, "-m", "xencr.cli", "failover", "term", "--planned", "--yes", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not s.api.VM.get_current_operations(_vm(s, "vm1")):  # vm1 is shutting down
            assert time.monotonic() < deadline and proc.poll() is None, "vm1 never shut down"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        s.api.VM.set_other_config(_vm(s, "vm1"), oc)
    assert proc.returncode == 1, (out, err)
    assert err.splitlines()[-1] == (
        "xencr: error: plan term: planned failover stopped at step shutdown: interrupted (Ctrl-C or "
        "SIGTERM); nothing on the target was changed; 1 source VM(s) it shut down can be restarted as listed"
    )
    assert out.splitlines()[-1] == _restart_line("vm1", vm1)
    assert s.api.VM.get_power_state(_vm(s, "vm1")) == "Halted"
    assert s.api.VM.get_power_state(s.api.VM.get_by_uuid(vm0)) == "Running"  # never asked
    assert len(b.api.sim.start_log()) == mark
    with StateDB(load_config(cfg).state.path) as db:
        row = db.planned("term")
    assert row is not None and (row.step, row.outcome, row.halted) == ("shutdown", "aborted", (vm1,))
