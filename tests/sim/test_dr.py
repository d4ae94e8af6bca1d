"""XenServer native DR across the two simulated pools (xapi.md 5): metadata replication to an
iSCSI SR on the shared array, DR_task on the recovery pool, VDI.open_database, VM.recover."""

from __future__ import annotations

from typing import Any

import pytest
import XenAPI
from simtest import Sim, failure, first_vm, vm_disk


def lun_sr(x: Any) -> str:
    return next(r for r, v in x.SR.get_all_records().items() if v["type"] == "lvmoiscsi")


def device_config(x: Any, sr: str) -> dict[str, str]:
    return dict(x.PBD.get_device_config(x.SR.get_PBDs(sr)[0]))


@pytest.fixture(scope="module")
def primary(sim: Sim) -> dict[str, Any]:
    """Pool 0 with a VM and a vApp on its iSCSI SR, metadata replicated there."""
    x = sim.session(0).xenapi
    sr = lun_sr(x)
    vm = x.VM.copy(first_vm(x), "dr-vm", sr)
    x.VM.set_order(vm, "1")
    app = x.VM_appliance.create({"name_label": "dr-app"})
    app_vm = x.VM.copy(first_vm(x, "vm1"), "dr-app-vm", sr)
    x.VM.set_appliance(app_vm, app)
    x.sim.write(x.VDI.get_uuid(vm_disk(x, vm)), "0", "65536", "primary-data")
    x.SR.enable_database_replication(sr)
    return {"x": x, "sr": sr, "vm": vm, "app": app, "app_vm": app_vm}


def test_enable_database_replication(sim: Sim, primary: dict[str, Any]) -> None:
    x = primary["x"]
    pool = x.pool.get_all()[0]
    metadata = [v for v in x.SR.get_VDIs(primary["sr"]) if x.VDI.get_type(v) == "metadata"]
    assert len(metadata) == 1
    rec = x.VDI.get_record(metadata[0])
    assert rec["name_label"] == "Metadata for DR" and rec["virtual_size"] == "3988783104"
    assert rec["metadata_of_pool"] == pool and x.pool.get_metadata_VDIs(pool) == metadata
    x.SR.enable_database_replication(primary["sr"])  # idempotent: the same VDI is reused
    assert len([v for v in x.SR.get_VDIs(primary["sr"]) if x.VDI.get_type(v) == "metadata"]) == 1
    local = x.pool.get_default_SR(pool)
    with pytest.raises(XenAPI.Failure) as exc:
        x.SR.enable_database_replication(local)
    assert failure(exc) == ["SR_OPERATION_NOT_SUPPORTED", local]
    with pytest.raises(XenAPI.Failure) as exc:
        x.SR.assert_supports_database_replication(local)
    assert failure(exc) == ["SR_OPERATION_NOT_SUPPORTED", local]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.open_database(vm_disk(x, primary["vm"]))
    assert failure(exc) == ["VDI_INCOMPATIBLE_TYPE", vm_disk(x, primary["vm"]), "user"]


def test_failover_to_the_other_pool(sim: Sim, primary: dict[str, Any]) -> None:
    x, y = primary["x"], sim.session(1).xenapi
    sr_uuid = x.SR.get_uuid(primary["sr"])
    config = device_config(x, primary["sr"])
    probe = y.SR.probe(y.pool.get_master(y.pool.get_all()[0]), config, "lvmoiscsi", {"metadata": "true"})
    assert f"<UUID>{sr_uuid}</UUID>" in probe and "<SRlist>" in probe
    with pytest.raises(XenAPI.Failure) as exc:
        y.DR_task.create("ext", config, [sr_uuid])
    assert failure(exc) == ["OPERATION_NOT_ALLOWED", "Disaster recovery not supported on SRs of type ext"]
    task = y.DR_task.create("lvmoiscsi", config, [sr_uuid])
    sr = y.SR.get_by_uuid(sr_uuid)
    assert y.SR.get_introduced_by(sr) == task and y.DR_task.get_introduced_SRs(task) == [sr]
    metadata = [v for v in y.SR.get_VDIs(sr) if y.VDI.get_type(v) == "metadata"]
    assert len(metadata) == 1 and y.VDI.get_metadata_latest(metadata[0]) is True
    assert y.VDI.read_database_pool_uuid(metadata[0]) == x.pool.get_uuid(x.pool.get_all()[0])
    db_session = y.VDI.open_database(metadata[0])
    # a database session reads the foreign pool
    foreign = XenAPI.Session(sim.urls[1])
    foreign._session = db_session
    fx = foreign.xenapi
    names = {r["name_label"]: ref for ref, r in fx.VM.get_all_records().items()}
    assert "dr-vm" in names and "dr-app-vm" in names
    with pytest.raises(XenAPI.Failure) as exc:
        fx.VM.assert_can_be_recovered(names["vm0"], sim.sessions[-1]._session)
    foreign_local_sr = fx.VDI.get_SR(vm_disk(fx, names["vm0"]))
    assert failure(exc) == ["VM_REQUIRES_SR", names["vm0"], foreign_local_sr]
    assert fx.VM.get_SRs_required_for_recovery(names["vm0"], sim.sessions[-1]._session) == [foreign_local_sr]
    session_to = sim.sessions[-1]._session
    fx.VM.assert_can_be_recovered(names["dr-vm"], session_to)
    fx.VM.recover(names["dr-vm"], session_to, False)
    recovered = y.VM.get_by_uuid(x.VM.get_uuid(primary["vm"]))
    assert y.VM.get_name_label(recovered) == "dr-vm" and y.VM.get_power_state(recovered) == "Halted"
    assert y.VM.get_version(recovered) == str(int(x.VM.get_version(primary["vm"])) + 1)
    disk = vm_disk(y, recovered)
    assert y.VDI.get_uuid(disk) == x.VDI.get_uuid(vm_disk(x, primary["vm"]))
    assert y.sim.hash(y.VDI.get_uuid(disk)) == x.sim.hash(x.VDI.get_uuid(vm_disk(x, primary["vm"])))
    assert y.SR.get_introduced_by(sr) == "OpaqueRef:NULL"  # kept after the DR task goes
    with pytest.raises(XenAPI.Failure) as exc:
        fx.VM.recover(names["dr-vm"], session_to, False)
    assert failure(exc) == [
        "VM_TO_IMPORT_IS_NOT_NEWER_VERSION",
        recovered,
        y.VM.get_version(recovered),
        x.VM.get_version(primary["vm"]),
    ]
    fx.VM_appliance.recover(fx.VM_appliance.get_by_name_label("dr-app")[0], session_to, True)
    app = y.VM_appliance.get_by_uuid(x.VM_appliance.get_uuid(primary["app"]))
    assert [y.VM.get_name_label(v) for v in y.VM_appliance.get_VMs(app)] == ["dr-app-vm"]
    y.VM.start(recovered, False, False)
    assert y.VM.get_power_state(recovered) == "Running"
    y.VM.hard_shutdown(recovered)
    assert sim.raw(1).session.logout(db_session)["Status"] == "Success"
    y.DR_task.destroy(task)
    assert y.SR.get_uuid(sr) == sr_uuid


def test_test_failover_cleanup_forgets_the_sr(sim: Sim, primary: dict[str, Any]) -> None:
    x = primary["x"]
    second = sim.session(1).xenapi
    # a fresh LUN SR in pool 0, replicated, then attached and dropped by a DR task in pool 1
    sr_uuid = x.SR.get_uuid(primary["sr"])
    existing = [r for r, v in second.SR.get_all_records().items() if v["uuid"] == sr_uuid]
    for sr in existing:  # the previous test's failover left it attached: detach and forget it
        for pbd in second.SR.get_PBDs(sr):
            second.PBD.unplug(pbd)
        second.SR.forget(sr)
    task = second.DR_task.create("lvmoiscsi", device_config(x, primary["sr"]), [sr_uuid])
    sr = second.SR.get_by_uuid(sr_uuid)
    with pytest.raises(XenAPI.Failure) as exc:
        second.SR.forget(sr)
    assert failure(exc) == ["SR_HAS_PBD", sr]
    second.DR_task.destroy(task)
    with pytest.raises(XenAPI.Failure) as exc:
        second.SR.get_by_uuid(sr_uuid)
    assert failure(exc) == ["UUID_INVALID", "SR", sr_uuid]


def test_at_most_eight_metadata_srs(sim: Sim) -> None:
    x = sim.session(1).xenapi
    host = x.pool.get_master(x.pool.get_all()[0])
    srs = [lun_sr(x)]
    for i in range(8):
        sr = x.SR.introduce("", f"extra {i}", "", "lvmoiscsi", "user", True, {})
        pbd = x.PBD.create(
            {"host": host, "SR": sr, "device_config": {"SCSIid": f"extra-lun-{i}"}, "other_config": {}}
        )
        x.PBD.plug(pbd)
        srs.append(sr)
    for sr in srs[:8]:
        x.SR.enable_database_replication(sr)
    with pytest.raises(XenAPI.Failure) as exc:
        x.SR.enable_database_replication(srs[8])
    assert failure(exc) == ["NO_MORE_REDO_LOGS_ALLOWED"]
    for sr in srs[:8]:
        x.SR.disable_database_replication(sr)
    assert x.pool.get_metadata_VDIs(x.pool.get_all()[0]) == []
    with pytest.raises(XenAPI.Failure) as exc:
        x.SR.introduce(x.SR.get_uuid(srs[1]), "dup", "", "lvmoiscsi", "user", True, {})
    assert failure(exc) == ["SR_UUID_EXISTS", x.SR.get_uuid(srs[1])]
    with pytest.raises(XenAPI.Failure) as exc:
        x.PBD.destroy(x.SR.get_PBDs(srs[1])[0])
    assert failure(exc) == ["OPERATION_NOT_ALLOWED", "PBD is currently attached"]


def test_open_database_without_a_database(sim: Sim) -> None:
    x = sim.session(1).xenapi
    empty = x.VDI.create(
        {
            "SR": lun_sr(x),
            "virtual_size": str(4 * 2**20),
            "type": "metadata",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
    )
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.open_database(empty)
    assert failure(exc) == ["COULD_NOT_IMPORT_DATABASE", "no database found in the VDI"]
    assert x.VDI.read_database_pool_uuid(empty) == ""
