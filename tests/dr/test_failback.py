"""`xencr failback PLAN` after an unplanned failover and guest writes on the DR side: only the
changed blocks reach the primary (its own import statistics), the primary VM's disks equal the
halted DR VM's, it runs, the user's former disks are kept (renamed), the job's next run is a
delta; a running primary VM is refused with nothing changed; a rerun does nothing."""

from __future__ import annotations

import json
from pathlib import Path

from drtest import cli, write_config
from xapitest import Pools, disk_hashes

from xencr.cli.app import app
from xencr.config import load_config
from xencr.dr.connect import dr_sessions
from xencr.dr.failback import failback
from xencr.dr.planned import pools_of
from xencr.replication.jobs import run_configured
from xencr.state import StateDB

PLAN = '[[plan]]\nname = "back"\nvms = ["vm0"]\n'


def test_failback_sends_the_changed_blocks_and_the_job_continues_as_deltas(
    pools: Pools, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, pools, PLAN)
    config = load_config(cfg)
    assert run_configured(config, "jb").outcome == "success"
    s, b = pools.session(0), pools.session(1)
    vm0 = s.api.VM.get_by_name_label("vm0")[0]
    r = cli.invoke(app, ["failover", "back", "--yes", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    with StateDB(config.state.path) as db:
        (row,) = db.failover_rows("back")
    dr_vm = b.api.VM.get_by_uuid(row.vm)
    assert b.api.VM.get_power_state(dr_vm) == "Running"
    dr_disks = {
        str(b.api.VBD.get_userdevice(x)): str(b.api.VDI.get_uuid(b.api.VBD.get_VDI(x)))
        for x in b.api.VM.get_VBDs(dr_vm)
        if b.api.VBD.get_type(x) == "Disk"
    }
    b.api.sim.write(dr_disks["0"], 0, 4096, 7)  # a guest write on the DR side: one 2 MiB block

    # The primary VM running: refused, one line, nothing changed.
    if s.api.VM.get_power_state(vm0) != "Running":
        s.api.VM.start(vm0, False, False)
    before = (sorted(b.api.VM.get_snapshots(dr_vm)), sorted(s.api.VM.get_VBDs(vm0)))
    r = cli.invoke(app, ["failback", "back", "--yes", "--config", str(cfg)])
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        f"xencr: error: VM vm0 ({row.vm_uuid}) on pool a is Running: shut it down first (its disks"
        " are replaced by the failed-over VM's); nothing changed"
    )
    assert (sorted(b.api.VM.get_snapshots(dr_vm)), sorted(s.api.VM.get_VBDs(vm0))) == before
    assert b.api.VM.get_power_state(dr_vm) == "Running"
    s.api.VM.hard_shutdown(vm0)
    former = {
        str(s.api.VDI.get_uuid(s.api.VBD.get_VDI(x))): str(s.api.VDI.get_name_label(s.api.VBD.get_VDI(x)))
        for x in s.api.VM.get_VBDs(vm0)
        if s.api.VBD.get_type(x) == "Disk"
    }
    former_hashes = {u: s.api.sim.hash(u) for u in former}

    # Step 1's imports, as the primary pool counted them, read when the step is recorded.
    step1: dict[str, dict[str, int]] = {}
    with StateDB(config.state.path) as db, dr_sessions(config, pools_of(config), interactive=False) as dr:

        def say(line: str) -> None:
            if line.endswith("failback step copied"):
                fb = db.failbacks("back")[row.vm_uuid]
                for dev, uuid in (x.split("=") for x in fb.disks):
                    step1[dev] = {k: int(v) for k, v in s.api.sim.import_stats(uuid).items()}

        report = failback(config, config.plan("back"), db, dr, say=say)
        fb = db.failbacks("back")[row.vm_uuid]
        assert db.failover_rows("back") == []
    (v,) = report.vms
    assert v.step == "done" and fb.step == "done"
    assert {dev: x["blocks"] for dev, x in step1.items()} == {dev: int(dev == "0") for dev in dr_disks}
    assert [(c.step, c.userdevice, c.kind, c.blocks) for c in v.copies if c.step == "copied"] == [
        ("copied", dev, "delta", int(dev == "0")) for dev in sorted(dr_disks)
    ]
    assert all(c.blocks == 0 for c in v.copies if c.step == "switched")  # no write after D1
    assert b.api.VM.get_power_state(dr_vm) == "Halted"
    assert s.api.VM.get_power_state(vm0) == "Running"
    assert disk_hashes(s, vm0) == disk_hashes(b, dr_vm)
    assert set(fb.old_disks) == set(former)
    for uuid, name in former.items():  # the user's disks: kept, detached, renamed, unchanged
        ref = s.api.VDI.get_by_uuid(uuid)
        assert s.api.VDI.get_VBDs(ref) == []
        assert s.api.VDI.get_name_label(ref).startswith(f"{name} (before failback ")
        assert s.api.sim.hash(uuid) == former_hashes[uuid]
    assert b.api.VM.get_snapshots(dr_vm) == []  # D1 and D2 gone
    # The restore point the job continues from: a never-started clone of the halted DR VM.
    (linked,) = [
        ref
        for ref, rec in b.api.VM.get_all_records().items()
        if rec["other_config"].get("xencr:copy_of") == fb.snapshot and not rec["is_a_snapshot"]
    ]
    assert "xencr:failed_over" not in b.api.VM.get_other_config(linked)
    assert b.api.VM.get_power_state(linked) == "Halted"
    assert disk_hashes(b, linked) == disk_hashes(b, dr_vm)

    # The job continues as a delta from the failed-back content.
    run = run_configured(load_config(cfg), "jb")
    assert run.outcome == "success"
    (t,) = next(x for x in run.vms if x.vm_uuid == row.vm_uuid).targets
    assert t.kind == "delta", (t.detached, t.warnings, [d.reason for d in t.disks])
    snap = s.api.VM.get_by_uuid(next(x for x in run.vms if x.vm_uuid == row.vm_uuid).snapshot)
    assert disk_hashes(b, b.api.VM.get_by_uuid(t.restore_point)) == disk_hashes(s, snap)

    # A rerun after success does nothing.
    r = cli.invoke(app, ["failback", "back", "--yes", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["plan back: no failed-over VM to fail back; nothing done"]
    s.api.VM.hard_shutdown(vm0)


def test_failback_after_a_planned_failover(pools: Pools, tmp_path: Path) -> None:
    """Planned failover (the source halted cleanly), writes on the DR side, failback: the primary
    VM runs with the DR VM's content, only the written block crossed, and the job goes on as
    deltas."""
    cfg = write_config(tmp_path, pools, '[[plan]]\nname = "round"\nvms = ["vm1"]\n')
    config = load_config(cfg)
    s, b = pools.session(0), pools.session(1)
    vm1 = s.api.VM.get_by_name_label("vm1")[0]
    pool = s.api.pool.get_all()[0]
    s.api.pool.set_other_config(pool, dict(s.api.pool.get_other_config(pool)) | {"sim_delay_scale": "0.01"})
    s.call_async("VM.start", vm1, False, False)
    assert run_configured(config, "jb").outcome == "success"
    r = cli.invoke(app, ["failover", "round", "--planned", "--yes", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert s.api.VM.get_power_state(vm1) == "Halted"
    with StateDB(config.state.path) as db:
        (row,) = db.failover_rows("round")
    dr_vm = b.api.VM.get_by_uuid(row.vm)
    disk0 = next(
        str(b.api.VDI.get_uuid(b.api.VBD.get_VDI(x)))
        for x in b.api.VM.get_VBDs(dr_vm)
        if b.api.VBD.get_type(x) == "Disk" and str(b.api.VBD.get_userdevice(x)) == "0"
    )
    b.api.sim.write(disk0, str(2 * 1024 * 1024), "4096", "written on the DR side")
    r = cli.invoke(app, ["failback", "round", "--yes", "--json", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert s.api.VM.get_power_state(vm1) == "Running"
    assert b.api.VM.get_power_state(dr_vm) == "Halted"
    assert disk_hashes(s, vm1) == disk_hashes(b, dr_vm)
    with StateDB(config.state.path) as db:
        fb = db.failbacks("round")[row.vm_uuid]
    assert fb.step == "done"
    (v,) = json.loads(r.stdout)["vms"]
    sent = {(d["step"], d["userdevice"]): (d["kind"], d["blocks"]) for d in v["disks"]}
    assert sent[("copied", "0")] == ("delta", 1), sent  # only the block written on the DR side
    assert all(blocks == 0 for (step, _), (_, blocks) in sent.items() if step == "switched"), sent
    pairs = (x.split("=") for x in fb.disks)
    last = {dev: int(s.api.sim.import_stats(uuid)["blocks"]) for dev, uuid in pairs}
    assert set(last.values()) == {0}, last  # the primary's own count of the last copy
    run = run_configured(load_config(cfg), "jb")
    (t,) = next(x for x in run.vms if x.vm_uuid == row.vm_uuid).targets
    assert run.outcome == "success" and t.kind == "delta", (t.outcome, t.error, t.detached)
    s.api.VM.hard_shutdown(vm1)
