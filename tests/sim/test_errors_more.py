"""The remaining error codes the simulator can return, each triggered through the SDK with its
parameters checked (xapi.md 3.10)."""

from __future__ import annotations

from typing import Any

import pytest
import XenAPI
from simtest import MIB, Sim, failure, first_vm, vm_disk


def new_vdi(x: Any, **extra: Any) -> str:
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    return str(
        x.VDI.create(
            {
                "SR": sr,
                "virtual_size": str(2 * MIB),
                "type": "user",
                "sharable": False,
                "read_only": False,
                "other_config": {},
                **extra,
            }
        )
    )


def test_vdi_snapshot_refusals(sim: Sim) -> None:
    x = sim.session().xenapi
    sharable = new_vdi(x, sharable=True)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.snapshot(sharable)
    assert failure(exc) == ["VDI_IS_SHARABLE", sharable]
    reset = new_vdi(x)
    x.VDI.set_on_boot(reset, "reset")
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.snapshot(reset)
    assert failure(exc) == ["VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.copy(reset, "OpaqueRef:NULL", "OpaqueRef:NULL", "OpaqueRef:NULL")
    assert failure(exc) == ["VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION"]
    read_only = new_vdi(x, read_only=True)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.copy(sharable, "OpaqueRef:NULL", "OpaqueRef:NULL", read_only)
    assert failure(exc) == ["VDI_READONLY", read_only]


def test_vbd_plug_rules(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    vbd = x.VM.get_VBDs(vm)[0]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VBD.plug(vbd)
    assert failure(exc) == ["VM_BAD_POWER_STATE", vm, "running", "halted"]
    x.VM.start(vm, False, False)
    try:
        with pytest.raises(XenAPI.Failure) as exc:
            x.VBD.plug(vbd)
        assert failure(exc) == ["DEVICE_ALREADY_ATTACHED", vbd]
        x.VBD.unplug(vbd)
        assert x.VBD.get_currently_attached(vbd) is False
        with pytest.raises(XenAPI.Failure) as exc:
            x.VBD.unplug(vbd)
        assert failure(exc) == ["DEVICE_ALREADY_DETACHED", vbd]
        x.VBD.plug(vbd)
        x.VBD.set_unpluggable(vbd, False)
        with pytest.raises(XenAPI.Failure) as exc:
            x.VBD.unplug(vbd)
        assert failure(exc) == ["VBD_NOT_UNPLUGGABLE", vbd]
        x.VBD.set_unpluggable(vbd, True)
    finally:
        x.VM.hard_shutdown(vm)


def test_network_contains_vif(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x, "vm1")
    vif = x.VM.get_VIFs(vm)[0]
    net = x.VIF.get_network(vif)
    x.VM.start(vm, False, False)
    try:
        with pytest.raises(XenAPI.Failure) as exc:
            x.network.destroy(net)
        assert failure(exc) == ["NETWORK_CONTAINS_VIF", vif]
        with pytest.raises(XenAPI.Failure) as exc:
            x.VIF.destroy(vif)
        assert failure(exc) == ["OPERATION_NOT_ALLOWED", "VIF currently attached to a running VM"]
    finally:
        x.VM.hard_shutdown(vm)


def test_memory_limits(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    gib = 1024**3
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.set_memory_limits(vm, str(gib), str(gib // 2), str(gib), str(gib))
    assert failure(exc) == ["MEMORY_CONSTRAINT_VIOLATION_ORDER"]
    x.VM.set_memory_limits(vm, str(gib // 2), str(2 * gib), str(gib), str(2 * gib))
    assert x.VM.get_memory_static_max(vm) == str(2 * gib)
    x.VM.start(vm, False, False)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.set_VCPUs_max(vm, "4")
    assert failure(exc) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    x.VM.hard_shutdown(vm)


def test_revert(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x, "vm1")
    disk = vm_disk(x, vm)
    before = x.sim.hash(x.VDI.get_uuid(disk))
    snap = x.VM.snapshot(vm, "revert point")
    x.sim.write(x.VDI.get_uuid(disk), "0", str(MIB), "after")
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.revert(vm)
    assert failure(exc) == ["REVERT_ONLY_ALLOWED_ON_SNAPSHOT"]
    x.VM.revert(snap)
    new_disk = vm_disk(x, vm)
    assert new_disk != disk and x.sim.hash(x.VDI.get_uuid(new_disk)) == before


def test_sr_forget_with_pbd(sim: Sim) -> None:
    x = sim.session().xenapi
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    with pytest.raises(XenAPI.Failure) as exc:
        x.SR.forget(sr)
    assert failure(exc) == ["SR_HAS_PBD", sr]


def test_vm_is_template_other_ops(sim: Sim) -> None:
    x = sim.session().xenapi
    template = x.VM.clone(first_vm(x), "template")
    x.VM.set_is_a_template(template, True)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.snapshot(template, "s")
    assert failure(exc) == ["VM_IS_TEMPLATE", template, "snapshot"]
    x.VM.destroy(template)  # destroying a non-default template is allowed


def test_sim_call_errors(sim: Sim) -> None:
    x = sim.session().xenapi
    with pytest.raises(XenAPI.Failure) as exc:
        x.sim.fault_drop_after("upload", "1")
    assert failure(exc) == ["INVALID_VALUE", "kind", "upload"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.sim.nothing()
    assert failure(exc) == ["MESSAGE_METHOD_UNKNOWN", "sim.nothing"]
    reply = sim.raw().sim.faults("OpaqueRef:bad")
    assert reply["ErrorDescription"] == ["SESSION_INVALID", "OpaqueRef:bad"]


def test_base_copies_are_not_managed(sim: Sim) -> None:
    x = sim.session().xenapi
    vdi = new_vdi(x)
    x.VDI.snapshot(vdi)
    base = x.VDI.get_by_uuid(x.VDI.get_sm_config(vdi)["vhd-parent"])
    for call in (x.VDI.destroy, x.VDI.snapshot, x.VDI.clone):
        with pytest.raises(XenAPI.Failure) as exc:
            call(base)
        assert failure(exc) == ["VDI_NOT_MANAGED", base]
    assert x.VDI.get_allowed_operations(base) == []
