"""The continuous-replication call sequence (SPEC §3, xo-compat.md), driven by hand through the SDK
between the two simulated pools: the simulator must support every step and keep contents exact."""

from __future__ import annotations

from typing import Any

from simtest import MIB, Sim, export_path, first_vm, http_request, import_path, put_stream, vm_disk, wait_task

BLOCK_MSG = "Start operation for this vm is blocked, clone it if you want to use it."
# VM.create's required fields (xapi.md 1.9), taken from the source record.
VM_FIELDS = (
    "user_version",
    "is_a_template",
    "affinity",
    "memory_static_max",
    "memory_dynamic_max",
    "memory_dynamic_min",
    "memory_static_min",
    "VCPUs_params",
    "VCPUs_max",
    "VCPUs_at_startup",
    "actions_after_shutdown",
    "actions_after_reboot",
    "actions_after_crash",
    "PV_bootloader",
    "PV_kernel",
    "PV_ramdisk",
    "PV_args",
    "PV_bootloader_args",
    "PV_legacy_args",
    "HVM_boot_policy",
    "HVM_boot_params",
    "platform",
    "PCI_bus",
    "other_config",
    "recommendations",
    "NVRAM",
    "name_label",
    "name_description",
)


def replicate(
    sim: Sim, src: Any, dst: Any, vm: str, base: dict[str, str] | None
) -> tuple[str, dict[str, str]]:
    """One run: snapshot, per disk clone-and-delta or create-and-full, replica VM; returns the replica
    and the map source-snapshot-VDI-uuid -> replica VDI (the next run's base)."""
    x, y = src.xenapi, dst.xenapi
    snap = x.VM.snapshot(vm, "xencr snapshot")
    record = x.VM.get_record(snap)
    fields = {k: record[k] for k in VM_FIELDS}
    fields.update(
        is_a_template=False,
        name_label=f"{record['name_label']} replica",
        affinity="OpaqueRef:NULL",
        other_config={"xencr:incomplete": "true"},
    )
    replica = y.VM.create(fields)
    y.VM.add_to_blocked_operations(replica, "start", BLOCK_MSG)
    y.VM.add_to_blocked_operations(replica, "start_on", BLOCK_MSG)
    target_sr = y.pool.get_default_SR(y.pool.get_all()[0])
    new_base: dict[str, str] = {}
    for vbd in x.VM.get_VBDs(snap):
        if x.VBD.get_type(vbd) != "Disk":
            continue
        vdi = x.VBD.get_VDI(vbd)
        uuid = x.VDI.get_uuid(vdi)
        prev = base and next(iter(base.items()))
        if prev:
            source_base = x.VDI.get_by_uuid(prev[0])
            target = y.VDI.clone(prev[1])
            query = export_path(src, vdi, "vhd", f"&base={source_base}")
        else:
            target = y.VDI.create(
                {
                    "SR": target_sr,
                    "virtual_size": x.VDI.get_virtual_size(vdi),
                    "type": "user",
                    "sharable": False,
                    "read_only": False,
                    "other_config": {},
                }
            )
            query = export_path(src, vdi, "vhd")
        status, headers, stream = http_request(sim, "GET", query)
        assert status == 200 and x.task.get_status(headers["task-id"]) == "success"
        status, headers = put_stream(sim, import_path(dst, target, "vhd"), stream, pool=1)
        assert status == 200 and wait_task(y, headers["task-id"])["status"] == "success"
        # a clone carries the previous copy_of: add_to_ on an existing key is MAP_DUPLICATE_KEY
        y.VDI.remove_from_other_config(target, "xencr:copy_of")
        y.VDI.add_to_other_config(target, "xencr:copy_of", uuid)
        y.VBD.create(
            {
                "VM": replica,
                "VDI": target,
                "userdevice": x.VBD.get_userdevice(vbd),
                "bootable": True,
                "mode": "RW",
                "type": "Disk",
                "empty": False,
                "other_config": {},
                "qos_algorithm_type": "",
                "qos_algorithm_params": {},
            }
        )
        new_base[uuid] = target
    net = y.network.get_by_name_label("Pool-wide network associated with eth0")[0]
    for vif in x.VM.get_VIFs(snap):
        y.VIF.create(
            {
                "VM": replica,
                "network": net,
                "device": x.VIF.get_device(vif),
                "MAC": "",
                "MTU": x.VIF.get_MTU(vif),
                "other_config": {},
                "qos_algorithm_type": "",
                "qos_algorithm_params": {},
            }
        )
    y.VM.remove_from_other_config(replica, "xencr:incomplete")  # the commit point
    return replica, new_base


def test_two_runs_full_then_delta(sim: Sim) -> None:
    src, dst = sim.session(0), sim.session(1)
    x, y = src.xenapi, dst.xenapi
    vm = first_vm(x, "vm1")
    disk_uuid = x.VDI.get_uuid(vm_disk(x, vm))
    replica1, base = replicate(sim, src, dst, vm, None)
    snap_vdi_uuid = next(iter(base))
    assert y.sim.hash(y.VDI.get_uuid(base[snap_vdi_uuid])) == x.sim.hash(snap_vdi_uuid)
    x.sim.write(disk_uuid, str(3 * MIB), str(MIB), "run2")
    x.sim.write(disk_uuid, "0", "512", "run2-boot")
    replica2, base2 = replicate(sim, src, dst, vm, base)
    new_uuid = next(iter(base2))
    assert y.sim.hash(y.VDI.get_uuid(base2[new_uuid])) == x.sim.hash(new_uuid)
    assert y.sim.hash(y.VDI.get_uuid(base2[new_uuid])) != y.sim.hash(y.VDI.get_uuid(base[snap_vdi_uuid]))
    # the older restore point is untouched by the delta applied to its clone
    assert y.sim.hash(y.VDI.get_uuid(base[snap_vdi_uuid])) == x.sim.hash(snap_vdi_uuid)
    for replica in (replica1, replica2):
        assert y.VM.get_blocked_operations(replica) == {"start": BLOCK_MSG, "start_on": BLOCK_MSG}
        assert "start" not in y.VM.get_allowed_operations(replica)
    # failover test: a clone of the newest replica boots
    test_vm = y.VM.clone(replica2, "failover test")
    y.VM.start(test_vm, False, False)
    assert y.VM.get_power_state(test_vm) == "Running"
    y.VM.hard_shutdown(test_vm)
