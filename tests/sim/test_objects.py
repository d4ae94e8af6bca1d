"""Records, implicit messages, constructors and VBD/VIF rules (xapi.md 1.8, 1.9, 2, 3.7, 3.8)."""

from __future__ import annotations

from typing import Any

import pytest
import XenAPI
from simtest import Sim, failure, first_vm, vm_disk

from xencr.sim import schema


def vdi_record(sr: str, size: int = 4 * 1024 * 1024) -> dict[str, Any]:
    return {
        "SR": sr,
        "virtual_size": str(size),
        "type": "user",
        "sharable": False,
        "read_only": False,
        "other_config": {},
        "name_label": "test disk",
    }


def vbd_record(vm: str, vdi: str, userdevice: str = "autodetect", **extra: Any) -> dict[str, Any]:
    return {
        "VM": vm,
        "VDI": vdi,
        "userdevice": userdevice,
        "bootable": False,
        "mode": "RW",
        "type": "Disk",
        "empty": False,
        "other_config": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
        **extra,
    }


@pytest.mark.parametrize(
    "cls",
    ["VM", "VDI", "VBD", "VIF", "SR", "PBD", "network", "host", "pool", "session", "VM_metrics", "task"],
)
def test_records_have_every_datamodel_field(sim: Sim, cls: str) -> None:
    s = sim.session()
    x = s.xenapi
    if cls == "task":
        x.task.create("t", "d")
    if cls == "session":  # session has no get_all_records in the datamodel
        records = {s._session: x.session.get_record(s._session)}
    else:
        records = getattr(x, cls).get_all_records()
    assert records
    expected = set(schema.cls(cls).fields)
    for rec in records.values():
        assert set(rec) == expected


def test_reverse_links_are_consistent(sim: Sim) -> None:
    x = sim.session().xenapi
    for vm, rec in x.VM.get_all_records().items():
        for vbd in rec["VBDs"]:
            assert x.VBD.get_VM(vbd) == vm
        for vif in rec["VIFs"]:
            assert x.VIF.get_VM(vif) == vm
    for sr, rec in x.SR.get_all_records().items():
        assert rec["PBDs"] and all(x.PBD.get_SR(p) == sr for p in rec["PBDs"])
        assert all(x.VDI.get_SR(v) == sr for v in rec["VDIs"])
    host = x.pool.get_master(x.pool.get_all()[0])
    dom0 = [v for v in x.host.get_resident_VMs(host) if x.VM.get_is_control_domain(v)]
    assert len(dom0) == 1 and x.VM.get_name_label(dom0[0]) == "Control domain on host: sim-host-0"


def test_map_and_set_helpers(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    x.VM.add_to_other_config(vm, "k", "v")
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.add_to_other_config(vm, "k", "v")  # same value still fails
    assert failure(exc) == ["MAP_DUPLICATE_KEY", "VM", "other_config", vm, "k"]
    x.VM.remove_from_other_config(vm, "k")
    x.VM.remove_from_other_config(vm, "k")  # missing key: silent
    assert "k" not in x.VM.get_other_config(vm)
    x.VM.add_tags(vm, "a")
    x.VM.add_tags(vm, "a")  # idempotent
    assert x.VM.get_tags(vm).count("a") == 1
    x.VM.remove_tags(vm, "a")
    x.VM.remove_tags(vm, "a")
    assert "a" not in x.VM.get_tags(vm)
    x.VM.add_to_blocked_operations(vm, "start", "no")
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.add_to_blocked_operations(vm, "start", "no")
    assert failure(exc) == ["MAP_DUPLICATE_KEY", "VM", "blocked_operations", vm, "start"]
    x.VM.set_blocked_operations(vm, {})


def test_lookups(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    assert x.VM.get_by_uuid(x.VM.get_uuid(vm)) == vm
    assert x.VM.get_by_name_label("no such vm") == []
    assert vm in x.VM.get_all()


def test_constructor_missing_field(sim: Sim) -> None:
    x = sim.session().xenapi
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    record = vdi_record(sr)
    del record["sharable"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.create(record)
    assert failure(exc) == ["INTERNAL_ERROR", 'Server_helpers.Dispatcher_FieldNotFound("sharable")']


def test_vdi_create_rounds_and_checks_size(sim: Sim) -> None:
    x = sim.session().xenapi
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    vdi = x.VDI.create(vdi_record(sr, 3 * 1024 * 1024 + 1))
    assert x.VDI.get_virtual_size(vdi) == str(4 * 1024 * 1024)
    assert vdi in x.SR.get_VDIs(sr)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.create(vdi_record(sr, 2041 * 1024**3))
    assert failure(exc) == [
        "SR_BACKEND_FAILURE_79",
        "",
        "VDI Invalid size [opterr=VDI size must be between 1 MB and 2088960 MB]",
        "",
    ]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.create({**vdi_record(sr), "type": "cbt_metadata"})
    assert failure(exc) == ["VDI_INCOMPATIBLE_TYPE", "", "cbt_metadata"]
    x.VDI.destroy(vdi)


def test_vdi_create_needs_a_plugged_pbd(sim: Sim) -> None:
    x = sim.session().xenapi
    srs = [s for s, r in x.SR.get_all_records().items() if r["name_label"] == "Second storage"]
    pbd = x.SR.get_PBDs(srs[0])[0]
    x.PBD.unplug(pbd)
    try:
        with pytest.raises(XenAPI.Failure) as exc:
            x.VDI.create(vdi_record(srs[0]))
        assert failure(exc) == ["SR_HAS_NO_PBDS", srs[0]]
    finally:
        x.PBD.plug(pbd)


def test_vbd_create_rules(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x, "vm1")
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    vdi = x.VDI.create({**vdi_record(sr), "read_only": True})
    with pytest.raises(XenAPI.Failure) as exc:
        x.VBD.create(vbd_record(vm, vdi))
    assert failure(exc) == ["VDI_READONLY", vdi]
    vbd = x.VBD.create(vbd_record(vm, vdi, mode="RO"))
    assert x.VBD.get_userdevice(vbd) == "1"  # lowest free slot
    with pytest.raises(XenAPI.Failure) as exc:
        x.VBD.create(vbd_record(vm, vdi, "1", mode="RO"))
    assert failure(exc) == ["DEVICE_ALREADY_EXISTS", "1"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VBD.create(vbd_record(vm, vdi, "xvdb", mode="RO"))  # same slot spelled as a device
    assert failure(exc) == ["DEVICE_ALREADY_EXISTS", "xvdb"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VBD.create(vbd_record(vm, vdi, "banana", mode="RO"))
    assert failure(exc) == ["INVALID_DEVICE", "banana"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VBD.create(vbd_record(vm, "OpaqueRef:NULL", "5", empty=True))
    assert failure(exc) == ["VBD_NOT_REMOVABLE_MEDIA", "in constructor"]
    assert "1" not in x.VM.get_allowed_VBD_devices(vm)
    x.VBD.destroy(vbd)
    x.VDI.destroy(vdi)


def test_vif_create_generates_mac(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x, "vm1")
    net = x.network.get_by_name_label("Second network")[0]
    vif = x.VIF.create(
        {
            "VM": vm,
            "network": net,
            "device": "3",
            "MAC": "",
            "MTU": "1500",
            "other_config": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
        }
    )
    rec = x.VIF.get_record(vif)
    assert rec["MAC_autogenerated"] is True and len(rec["MAC"].split(":")) == 6
    assert vif in x.network.get_VIFs(net)
    assert "3" not in x.VM.get_allowed_VIF_devices(vm)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VIF.create({**x.VIF.get_record(vif), "MAC": ""})
    assert failure(exc) == ["DEVICE_ALREADY_EXISTS", "3"]
    x.VIF.destroy(vif)


def test_network_create_picks_bridge(sim: Sim) -> None:
    x = sim.session().xenapi
    net = x.network.create({"name_label": "isolated", "other_config": {}})
    assert x.network.get_bridge(net).startswith("xapi") and x.network.get_MTU(net) == "1500"
    x.network.destroy(net)


def test_invalid_value_on_negative_delay(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.set_start_delay(vm, "-1")
    assert failure(exc) == ["INVALID_VALUE", "start_delay", "-1"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.set_ha_restart_priority(vm, "always")
    assert failure(exc) == ["INVALID_VALUE", "ha_restart_priority", "always"]


def test_not_implemented_message(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.send_sysrq(vm, "b")
    assert failure(exc) == ["NOT_IMPLEMENTED", "VM.send_sysrq"]


def test_vdi_disk_of_vm(sim: Sim) -> None:
    x = sim.session().xenapi
    vdi = vm_disk(x, first_vm(x))
    rec = x.VDI.get_record(vdi)
    assert rec["virtual_size"] == str(8 * 1024 * 1024) and rec["managed"] is True
    assert int(rec["physical_utilisation"]) > 0


def test_mac_generation_matches_xapi() -> None:
    # xapi_vif_helpers.gen_mac, computed by hand: md5^(2*dev+1)(seed)[0:4] + md5(that)[1:3]
    import hashlib

    from xencr.sim.api.vif import generate_mac

    data = b"seed"
    for _ in range(3):
        data = hashlib.md5(data, usedforsecurity=False).digest()
    second = hashlib.md5(data, usedforsecurity=False).digest()
    expected = [(data[0] | 2) & 0xFE, data[1], data[2], data[3], second[1], second[2]]
    assert generate_mac("seed", "1") == ":".join(f"{b:02x}" for b in expected)


def test_get_all_records_where(sim: Sim) -> None:
    x = sim.session().xenapi
    found = x.VM.get_all_records_where('field "name_label"="vm0" and field "is_a_snapshot"="false"')
    assert [r["name_label"] for r in found.values()] == ["vm0"]
    dom0 = x.VM.get_all_records_where('field "is_control_domain"="true"')
    assert len(dom0) == 1
    everything = x.VM.get_all_records_where("true")
    assert set(everything) == set(x.VM.get_all())
    none = x.VM.get_all_records_where('not (field "power_state"="Halted" or field "power_state"="Running")')
    assert none == {}
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.get_all_records_where('field "name_label"=')
    assert exc.value.details[0] == "INTERNAL_ERROR"


def test_init_layout(sim: Sim) -> None:
    x = sim.session().xenapi
    pool = x.pool.get_all()[0]
    host = x.pool.get_master(pool)
    assert x.host_metrics.get_live(x.host.get_metrics(host)) is True
    names = sorted(r["name_label"] for r in x.network.get_all_records().values())
    assert "Pool-wide network associated with eth0" in names
    assert len(x.SR.get_all()) == 3 and x.pool.get_default_SR(pool) in x.SR.get_all()
    uefi = first_vm(x, "vm1")
    assert x.VM.get_HVM_boot_params(uefi)["firmware"] == "uefi"
    assert x.VM.get_NVRAM(uefi)["EFI-variables"]
    assert x.VM.get_HVM_boot_params(first_vm(x))["firmware"] == "bios"
