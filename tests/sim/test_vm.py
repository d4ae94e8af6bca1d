"""VM lifecycle semantics (xapi.md 3.1-3.5, 5.4): snapshot/clone/copy/destroy, power rules, blocking."""

from __future__ import annotations

import pytest
import XenAPI
from simtest import Sim, failure, first_vm, vm_disk, wait_task


def test_snapshot_fields(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    x.VM.add_to_other_config(vm, "xencr:job", "j1")
    x.VM.add_tags(vm, "protected")
    x.VM.set_blocked_operations(vm, {"start": "no boot"})
    x.VM.set_order(vm, "2")
    src_vdi = vm_disk(x, vm)
    x.VDI.add_to_other_config(src_vdi, "disk-key", "1")
    snap = x.VM.snapshot(vm, "snap-a")  # ignore_vdis defaulted
    rec = x.VM.get_record(snap)
    assert rec["is_a_snapshot"] is True and rec["is_a_template"] is True
    assert rec["snapshot_of"] == vm and rec["snapshot_time"].value != "19700101T00:00:00Z"
    assert rec["blocked_operations"] == {} and rec["order"] == "0" and rec["appliance"] == "OpaqueRef:NULL"
    assert rec["other_config"]["xencr:job"] == "j1" and "protected" in rec["tags"]
    assert rec["snapshot_info"] == {
        "disk-snapshot-type": "crash_consistent",
        "power-state-at-snapshot": "Halted",
    }
    assert snap in x.VM.get_snapshots(vm)
    assert x.VM.get_parent(vm) == snap
    snap_vdi = vm_disk(x, snap)
    vrec = x.VDI.get_record(snap_vdi)
    assert vrec["is_a_snapshot"] is True and vrec["snapshot_of"] == src_vdi
    assert vrec["other_config"] == {"disk-key": "1"} and vrec["name_label"] == x.VDI.get_name_label(src_vdi)
    assert snap_vdi in x.VDI.get_snapshots(src_vdi)
    vbd = x.VM.get_VBDs(snap)[0]
    assert x.VBD.get_userdevice(vbd) == "0" and x.VBD.get_other_config(vbd)["owner"] == ""
    macs = sorted(x.VIF.get_MAC(v) for v in x.VM.get_VIFs(vm))
    assert sorted(x.VIF.get_MAC(v) for v in x.VM.get_VIFs(snap)) == macs
    x.VM.set_blocked_operations(vm, {})


def test_snapshot_ignore_vdis(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    snap = x.VM.snapshot(vm, "no-disks", [vm_disk(x, vm)])
    assert [x.VBD.get_type(v) for v in x.VM.get_VBDs(snap)] == []


def test_clone_of_snapshot_is_template(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    snap = x.VM.snapshot(vm, "snap-b")
    clone = x.VM.clone(snap, "from-snap")
    rec = x.VM.get_record(clone)
    assert rec["is_a_template"] is True and rec["is_a_snapshot"] is False
    assert rec["snapshot_of"] == "OpaqueRef:NULL" and rec["blocked_operations"] == {}
    assert rec["parent"] == "OpaqueRef:NULL"
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.start(clone, False, False)
    assert failure(exc) == ["VM_IS_TEMPLATE", clone, "start"]
    x.VM.set_is_a_template(clone, False)
    x.VM.start(clone, False, False)
    assert x.VM.get_power_state(clone) == "Running"
    assert all(x.VBD.get_currently_attached(v) for v in x.VM.get_VBDs(clone))
    x.VM.hard_shutdown(clone)
    clone_vdi = vm_disk(x, clone)
    assert x.VDI.get_is_a_snapshot(clone_vdi) is False
    assert sorted(x.VIF.get_MAC(v) for v in x.VM.get_VIFs(clone)) != sorted(
        x.VIF.get_MAC(v) for v in x.VM.get_VIFs(snap)
    )


def test_start_snapshot_is_refused(sim: Sim) -> None:
    x = sim.session().xenapi
    snap = x.VM.snapshot(first_vm(x), "snap-c")
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.start(snap, False, False)
    assert failure(exc) == ["VM_IS_SNAPSHOT", snap, "start"]


def test_clone_of_running_vm_and_power_rules(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x, "vm1")
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.clean_shutdown(vm)
    assert failure(exc) == ["VM_BAD_POWER_STATE", vm, "running", "halted"]
    x.VM.start(vm, False, False)
    assert x.VM.get_domid(vm) != "-1"
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.start(vm, False, False)
    assert failure(exc) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.clone(vm, "nope")
    assert failure(exc) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.destroy(vm)
    assert failure(exc) == ["VM_BAD_POWER_STATE", vm, "halted, suspended", "running"]
    disk = vm_disk(x, vm)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.destroy(disk)
    assert failure(exc) == ["VDI_IN_USE", disk, "destroy"]
    vbd = x.VM.get_VBDs(vm)[0]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VBD.destroy(vbd)
    assert failure(exc) == [
        "OPERATION_NOT_ALLOWED",
        f"VBD '{x.VBD.get_uuid(vbd)}' still attached to '{x.VM.get_uuid(vm)}'",
    ]
    assert "clean_shutdown" in x.VM.get_allowed_operations(vm)
    assert "start" not in x.VM.get_allowed_operations(vm)
    snap = x.VM.snapshot(vm, "live")  # allowed in every power state
    assert x.VM.get_snapshot_info(snap)["power-state-at-snapshot"] == "Running"
    x.VM.suspend(vm)
    assert x.VM.get_power_state(vm) == "Suspended"
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.unpause(vm)
    assert failure(exc) == ["VM_BAD_POWER_STATE", vm, "paused", "suspended"]
    x.VM.resume(vm, False, False)
    x.VM.pause(vm)
    x.VM.unpause(vm)
    x.VM.clean_shutdown(vm)
    assert x.VM.get_power_state(vm) == "Halted"
    assert not any(x.VBD.get_currently_attached(v) for v in x.VM.get_VBDs(vm))


def test_checkpoint(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x, "vm1")
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.checkpoint(vm, "cp")
    assert failure(exc) == ["VM_BAD_POWER_STATE", vm, "paused, suspended, running", "halted"]
    x.VM.start(vm, False, False)
    cp = x.VM.checkpoint(vm, "cp")
    assert x.VM.get_power_state(cp) == "Suspended" and x.VM.get_is_a_snapshot(cp) is True
    x.VM.hard_shutdown(vm)


def test_blocked_start(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    msg = "Start operation for this vm is blocked, clone it if you want to use it."
    x.VM.add_to_blocked_operations(vm, "start", msg)
    host = x.pool.get_master(x.pool.get_all()[0])
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.start(vm, False, False)
    assert failure(exc) == ["OPERATION_BLOCKED", vm, msg]
    assert "start" not in x.VM.get_allowed_operations(vm)
    task = x.Async.VM.start(vm, False, False)
    rec = wait_task(x, task)
    assert rec["status"] == "failure" and rec["error_info"] == ["OPERATION_BLOCKED", vm, msg]
    x.VM.start_on(vm, host, False, False)  # start_on is only blocked by its own key
    x.VM.hard_shutdown(vm)
    x.VM.add_to_blocked_operations(vm, "start_on", msg)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.start_on(vm, host, False, False)
    assert failure(exc) == ["OPERATION_BLOCKED", vm, msg]
    # blocking is advisory data: clones and snapshots still work and carry no blocks
    clone = x.VM.clone(vm, "unblocked")
    assert x.VM.get_blocked_operations(clone) == {}
    # blocked is checked before the power state
    x.VM.remove_from_blocked_operations(vm, "start")
    x.VM.start(vm, False, False)
    x.VM.add_to_blocked_operations(vm, "start", msg)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.start(vm, False, False)
    assert failure(exc) == ["OPERATION_BLOCKED", vm, msg]
    x.VM.hard_shutdown(vm)
    x.VM.set_blocked_operations(vm, {})


def test_destroy_keeps_vdis_and_snapshots(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = x.VM.clone(first_vm(x), "to-destroy")
    disk = vm_disk(x, vm)
    snap = x.VM.snapshot(vm, "orphan")
    vbds, vifs = x.VM.get_VBDs(vm), x.VM.get_VIFs(vm)
    x.VM.destroy(vm)
    assert x.VDI.get_uuid(disk)  # still there
    assert x.VM.get_snapshot_of(snap) == vm  # dangling: an orphan snapshot
    for vbd in vbds:
        with pytest.raises(XenAPI.Failure) as exc:
            x.VBD.get_record(vbd)
        assert failure(exc) == ["HANDLE_INVALID", "VBD", vbd]
    for vif in vifs:
        with pytest.raises(XenAPI.Failure) as exc:
            x.VIF.get_record(vif)
        assert failure(exc) == ["HANDLE_INVALID", "VIF", vif]
    assert x.VDI.get_VBDs(disk) == []


def test_copy_is_independent(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x, "vm1")
    second = next(s for s, r in x.SR.get_all_records().items() if r["name_label"] == "Second storage")
    copy = x.VM.copy(vm, "copied", second)
    disk = vm_disk(x, copy)
    rec = x.VDI.get_record(disk)
    assert rec["SR"] == second and rec["sm_config"] == {} and rec["read_only"] is False
    assert x.sim.hash(rec["uuid"]) == x.sim.hash(x.VDI.get_uuid(vm_disk(x, vm)))


def test_dom0_operations_refused(sim: Sim) -> None:
    x = sim.session().xenapi
    dom0 = next(v for v, r in x.VM.get_all_records().items() if r["is_control_domain"])
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.destroy(dom0)
    assert failure(exc) == ["VM_BAD_POWER_STATE", dom0, "halted, suspended", "running"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.clean_reboot(dom0)
    assert failure(exc) == ["OPERATION_NOT_ALLOWED", "This operation is not allowed on dom0"]


def test_appliance_start_order(sim: Sim) -> None:
    x = sim.session().xenapi
    app = x.VM_appliance.create({"name_label": "app"})
    vms = [x.VM.clone(first_vm(x, "vm1"), f"app-{i}") for i in range(3)]
    for i, vm in enumerate(vms):
        x.VM.set_appliance(vm, app)
        x.VM.set_order(vm, str(2 - i))
    assert sorted(x.VM_appliance.get_VMs(app)) == sorted(vms)
    token = x.event_from(["vm"], "", 0.0)["token"]
    x.VM_appliance.start(app, False)
    batch = x.event_from(["vm"], token, 5.0)
    last_change = {ev["ref"]: int(ev["id"]) for ev in batch["events"] if ev["ref"] in vms}
    # groups by ascending order: order 0 (vms[2]) first, then 1, then 2
    assert sorted(vms, key=lambda v: last_change[v]) == [vms[2], vms[1], vms[0]]
    assert all(x.VM.get_power_state(v) == "Running" for v in vms)
    x.VM_appliance.clean_shutdown(app)
    assert all(x.VM.get_power_state(v) == "Halted" for v in vms)
    x.VM.add_to_blocked_operations(vms[0], "start", "no")
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM_appliance.start(app, False)
    assert failure(exc) == ["OPERATION_PARTIALLY_FAILED", "VM_appliance.start", vms[0]]
    x.VM_appliance.hard_shutdown(app)


def test_running_vm_writes_on_its_own(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = x.VM.clone(first_vm(x, "vm1"), "busy")
    disk = vm_disk(x, vm)
    before = x.sim.hash(x.VDI.get_uuid(disk))
    x.VM.add_to_other_config(vm, "sim_writes_per_minute", "60")
    assert x.sim.guest_tick("10") == "0"  # halted VMs do not write
    x.VM.start(vm, False, False)
    assert x.sim.guest_tick("3") == "3"  # 60 per minute = 3 writes in 3 s
    x.VM.hard_shutdown(vm)
    assert x.sim.hash(x.VDI.get_uuid(disk)) != before


def test_other_operation_in_progress(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = x.VM.clone(first_vm(x, "vm1"), "slow starter")
    x.VM.set_start_delay(vm, "1")
    token = x.event_from([f"vm/{vm}"], "", 0.0)["token"]
    task = x.Async.VM.start(vm, False, False)
    # wait (by events, not sleeps) until the start is recorded as in progress
    while "start" not in x.VM.get_current_operations(vm).values():
        token = x.event_from([f"vm/{vm}"], token, 5.0)["token"]
    assert x.VM.get_current_operations(vm) == {task: "start"}
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.clean_shutdown(vm)
    assert failure(exc) == ["OTHER_OPERATION_IN_PROGRESS", "VM", vm, "start", task]
    assert wait_task(x, task)["status"] == "success"
    assert x.VM.get_current_operations(vm) == {}
    x.VM.clean_shutdown(vm)


def test_metrics_and_guest_tools(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = x.VM.clone(first_vm(x), "metered")
    metrics = x.VM.get_metrics(vm)
    assert x.VM_metrics.get_VCPUs_number(metrics) == "2"
    assert x.VM.get_guest_metrics(vm) == "OpaqueRef:NULL"
    x.VM.start(vm, False, False)
    gm = x.VM.get_guest_metrics(vm)
    rec = x.VM_guest_metrics.get_record(gm)
    assert rec["PV_drivers_detected"] is True and rec["live"] is True
    assert rec["networks"]["0/ip"].startswith("10.0.")
    x.VM.hard_shutdown(vm)
    x.VM.add_to_other_config(vm, "sim_guest_tools", "false")
    x.VM.start(vm, False, False)  # a restart clears the stale guest metrics
    assert x.VM.get_guest_metrics(vm) == "OpaqueRef:NULL"
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM_guest_metrics.get_record(gm)
    assert failure(exc) == ["HANDLE_INVALID", "VM_guest_metrics", gm]
    x.VM.hard_shutdown(vm)
    x.VM.destroy(vm)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM_metrics.get_record(metrics)
    assert failure(exc) == ["HANDLE_INVALID", "VM_metrics", metrics]


def test_health_check_script(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = x.VM.clone(first_vm(x), "health")
    key = "vm-data/xo-backup-health-check"
    x.VM.add_to_xenstore_data(vm, key, "planned")
    x.VM.start(vm, False, False)
    assert x.VM.get_xenstore_data(vm)[key] == "success"
    x.VM.hard_shutdown(vm)
    x.VM.set_xenstore_data(vm, {key: "planned"})
    x.VM.add_to_other_config(vm, "sim_health_check", "failure")
    x.VM.start(vm, False, False)
    data = x.VM.get_xenstore_data(vm)
    assert data[key] == "failure" and data[f"{key}-error"] == "simulated health-check failure"
    x.VM.hard_shutdown(vm)
