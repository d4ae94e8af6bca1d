"""The simulator side of XenServer native DR across two pools: SRs created on array LUNs, the
array's mirror (a point-in-time copy of a LUN), metadata_latest chosen by database generation,
recovery of VMs and vApps as they were at the mirror time, and the errors on each path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import XenAPI
from simtest import MIB, Sim, failure, first_vm, vm_disk

from xencr.sim.array import copy_sparse

NULL = "OpaqueRef:NULL"
ISCSI = {"target": "127.0.0.1", "targetIQN": "iqn.2026-01.sim:array"}
# What a recovered VM must carry over from the primary at the metadata time.
VM_FIELDS = (
    "uuid",
    "name_label",
    "name_description",
    "memory_static_min",
    "memory_static_max",
    "memory_dynamic_min",
    "memory_dynamic_max",
    "VCPUs_max",
    "VCPUs_at_startup",
    "order",
    "start_delay",
    "shutdown_delay",
    "ha_restart_priority",
    "HVM_boot_policy",
    "platform",
)
VBD_FIELDS = ("uuid", "userdevice", "bootable", "mode", "type", "unpluggable")
VIF_FIELDS = ("uuid", "device", "MAC", "MTU", "locking_mode")


def master(x: Any) -> str:
    return str(x.pool.get_master(x.pool.get_all()[0]))


def create_lun_sr(x: Any, name: str, lun: str) -> str:
    """``SR.create`` of a shared LVM-over-iSCSI SR on LUN ``lun`` of the array."""
    return str(x.SR.create(master(x), {**ISCSI, "SCSIid": lun}, "0", name, "", "lvmoiscsi", "user", True, {}))


def metadata_vdis(x: Any, sr: str) -> list[str]:
    return [v for v in x.SR.get_VDIs(sr) if x.VDI.get_type(v) == "metadata"]


def foreign(sim: Sim, pool: int, db_session: str) -> Any:
    """The SDK bound to a database session (it reads the foreign pool's database)."""
    session = XenAPI.Session(sim.urls[pool])
    session._session = db_session
    return session.xenapi


def lun_info(x: Any, lun: str) -> dict[str, Any]:
    return next(entry for entry in x.sim.array() if entry["scsiid"] == lun)


def knob(x: Any, **values: str) -> None:
    pool = x.pool.get_all()[0]
    x.pool.set_other_config(pool, {**x.pool.get_other_config(pool), **values})


@pytest.fixture(scope="module")
def recovered(sim: Sim) -> dict[str, Any]:
    """Pool 0: a vApp of two VMs on a new DR SR (LUN lun-a), replicated, then mirrored onto
    lun-a-m, then changed. Pool 1: the mirror attached, the vApp recovered from its metadata."""
    x, y = sim.session(0).xenapi, sim.session(1).xenapi
    sr = create_lun_sr(x, "DR storage A", "lun-a")
    net = x.network.create({"name_label": "dr-only", "name_description": "", "MTU": "0", "other_config": {}})
    vm = x.VM.copy(first_vm(x), "dr-web", sr)
    db_vm = x.VM.copy(first_vm(x, "vm1"), "dr-db", sr)
    x.VIF.create(
        {
            "device": "1",
            "network": net,
            "VM": vm,
            "MAC": "",
            "MTU": "1500",
            "other_config": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
        }
    )
    x.VM.set_memory_limits(vm, str(256 * MIB), str(768 * MIB), str(512 * MIB), str(768 * MIB))
    x.VM.set_VCPUs_max(vm, "4")
    x.VM.set_VCPUs_at_startup(vm, "2")
    x.VM.set_order(vm, "1")
    x.VM.set_start_delay(vm, "3")
    x.VM.set_shutdown_delay(vm, "4")
    x.VM.set_ha_restart_priority(vm, "best-effort")
    x.VM.set_order(db_vm, "0")
    x.VM.set_start_delay(db_vm, "30")
    app = x.VM_appliance.create({"name_label": "dr-app", "name_description": "web and db"})
    x.VM.set_appliance(vm, app)
    x.VM.set_appliance(db_vm, app)
    snapshot = x.VM.snapshot(vm, "before the disaster")
    disk = x.VDI.get_uuid(vm_disk(x, vm))
    x.sim.write(disk, "0", "65536", "at-the-mirror")
    x.SR.enable_database_replication(sr)
    before = {
        "vm": x.VM.get_record(vm),
        "vbds": [x.VBD.get_record(v) for v in x.VM.get_VBDs(vm)],
        "vifs": [x.VIF.get_record(v) for v in x.VM.get_VIFs(vm)],
        "hash": x.sim.hash(disk),
    }
    x.sim.array_mirror("lun-a", "lun-a-m")
    # what happens on the primary after the mirror broke must not reach the recovery site
    x.VM.set_memory_limits(vm, str(256 * MIB), str(1024 * MIB), str(512 * MIB), str(1024 * MIB))
    x.VM.set_order(vm, "7")
    x.VM.set_appliance(db_vm, NULL)
    x.sim.write(disk, "0", "65536", "after-the-mirror")
    assert x.sim.hash(disk) != before["hash"]

    sr_uuid = x.SR.get_uuid(sr)
    task = y.DR_task.create("lvmoiscsi", {**ISCSI, "SCSIid": "lun-a-m"}, [sr_uuid])
    ysr = y.SR.get_by_uuid(sr_uuid)
    metadata = metadata_vdis(y, ysr)
    session_to = sim.sessions[-1]._session
    db_session = y.VDI.open_database(metadata[0])
    fx = foreign(sim, 1, db_session)
    fapp = fx.VM_appliance.get_by_uuid(x.VM_appliance.get_uuid(app))
    assert sorted(fx.VM.get_name_label(v) for v in fx.VM_appliance.get_VMs(fapp)) == ["dr-db", "dr-web"]
    fx.VM_appliance.assert_can_be_recovered(fapp, session_to)
    fx.VM_appliance.recover(fapp, session_to, False)
    return {
        "x": x,
        "y": y,
        "sr": sr,
        "ysr": ysr,
        "task": task,
        "vm": vm,
        "db_vm": db_vm,
        "app": app,
        "net": net,
        "snapshot": snapshot,
        "before": before,
        "metadata": metadata,
        "fx": fx,
        "session_to": session_to,
        "db_session": db_session,
    }


def test_mirror_holds_the_lun_at_its_time(sim: Sim, recovered: dict[str, Any]) -> None:
    x, y = recovered["x"], recovered["y"]
    sr_uuid = x.SR.get_uuid(recovered["sr"])
    mirror, source = lun_info(x, "lun-a-m"), lun_info(x, "lun-a")
    assert mirror["sr_uuid"] == source["sr_uuid"] == sr_uuid and int(mirror["vhds"]) >= 1
    assert [p["pool"] for p in mirror["plugged"]] == ["1"] and [p["pool"] for p in source["plugged"]] == ["0"]
    # the primary kept writing its database to lun-a after the mirror broke
    assert int(source["databases"][0]["generation"]) > int(mirror["databases"][0]["generation"])
    assert y.SR.get_introduced_by(recovered["ysr"]) == NULL  # a recovered VM needs it: kept
    assert y.VDI.get_metadata_latest(recovered["metadata"][0]) is True
    assert y.VDI.get_metadata_of_pool(recovered["metadata"][0]) == x.pool.get_all()[0]
    assert y.VDI.read_database_pool_uuid(recovered["metadata"][0]) == x.pool.get_uuid(x.pool.get_all()[0])
    # the pool's own metadata VDI is not in its cache
    assert x.VDI.read_database_pool_uuid(metadata_vdis(x, recovered["sr"])[0]) == ""


def test_recovered_records_equal_the_primary_at_metadata_time(recovered: dict[str, Any]) -> None:
    y, before = recovered["y"], recovered["before"]
    vm = y.VM.get_by_uuid(before["vm"]["uuid"])
    rec = y.VM.get_record(vm)
    assert {k: rec[k] for k in VM_FIELDS} == {k: before["vm"][k] for k in VM_FIELDS}
    assert rec["memory_static_max"] == str(768 * MIB) and rec["order"] == "1"
    assert rec["power_state"] == "Halted" and rec["version"] == str(int(before["vm"]["version"]) + 1)
    assert rec["other_config"]["import_task"].startswith("OpaqueRef:")
    vbds = sorted((y.VBD.get_record(v) for v in rec["VBDs"]), key=lambda r: r["userdevice"])
    old_vbds = sorted(before["vbds"], key=lambda r: r["userdevice"])
    assert [{k: r[k] for k in VBD_FIELDS} for r in vbds] == [{k: r[k] for k in VBD_FIELDS} for r in old_vbds]
    assert all(r["device"] == "" and r["currently_attached"] is False for r in vbds)  # import.ml
    disk = next(r["VDI"] for r in vbds if r["type"] == "Disk")
    assert y.sim.hash(y.VDI.get_uuid(disk)) == before["hash"]
    vifs = sorted((y.VIF.get_record(v) for v in rec["VIFs"]), key=lambda r: r["device"])
    old_vifs = sorted(before["vifs"], key=lambda r: r["device"])
    assert [{k: r[k] for k in VIF_FIELDS} for r in vifs] == [{k: r[k] for k in VIF_FIELDS} for r in old_vifs]
    names = [y.network.get_name_label(r["network"]) for r in vifs]
    assert names == ["Pool-wide network associated with eth0", "dr-only"]
    # no network of that name or bridge in pool 1: the import made one, tagged with its task
    assert y.network.get_other_config(vifs[1]["network"])["import_task"].startswith("OpaqueRef:")
    # the snapshot came along, linked to the recovered VM
    snap = y.VM.get_by_uuid(recovered["x"].VM.get_uuid(recovered["snapshot"]))
    assert y.VM.get_snapshot_of(snap) == vm and y.VM.get_is_a_snapshot(snap) is True


def test_vapp_recovered_with_its_uuid_and_members(recovered: dict[str, Any]) -> None:
    x, y = recovered["x"], recovered["y"]
    app = y.VM_appliance.get_by_uuid(x.VM_appliance.get_uuid(recovered["app"]))
    assert y.VM_appliance.get_name_description(app) == "web and db"
    members = sorted(y.VM.get_name_label(v) for v in y.VM_appliance.get_VMs(app))
    assert members == ["dr-db", "dr-web"]  # the membership at the mirror time


def test_recovered_vapp_starts_in_order_with_delays(recovered: dict[str, Any]) -> None:
    y = recovered["y"]
    knob(y, sim_delay_scale="0.01")
    app = y.VM_appliance.get_by_uuid(recovered["x"].VM_appliance.get_uuid(recovered["app"]))
    web, db = (y.VM.get_by_uuid(recovered["x"].VM.get_uuid(recovered[k])) for k in ("vm", "db_vm"))
    y.VM_appliance.start(app, False)
    uuids = [y.VM.get_uuid(db), y.VM.get_uuid(web)]
    log = [e for e in y.sim.start_log() if e["vm"] in uuids]
    assert [e["vm"] for e in log] == uuids  # order 0 (db) first, then order 1 (web)
    assert float(log[1]["time"]) - float(log[0]["time"]) >= 30 * 0.01  # db's start_delay
    y.VM_appliance.hard_shutdown(app)
    assert {y.VM.get_power_state(v) for v in (web, db)} == {"Halted"}


def test_recovering_again_is_refused_unless_newer(recovered: dict[str, Any]) -> None:
    y, fx = recovered["y"], recovered["fx"]
    fvm = fx.VM.get_by_uuid(recovered["before"]["vm"]["uuid"])
    local = y.VM.get_by_uuid(recovered["before"]["vm"]["uuid"])
    with pytest.raises(XenAPI.Failure) as exc:
        fx.VM.recover(fvm, recovered["session_to"], False)
    version = recovered["before"]["vm"]["version"]
    assert failure(exc) == ["VM_TO_IMPORT_IS_NOT_NEWER_VERSION", local, str(int(version) + 1), version]
    with pytest.raises(XenAPI.Failure) as exc:
        fx.VM.recover(fvm, recovered["db_session"], False)
    assert failure(exc) == [
        "RBAC_PERMISSION_DENIED",
        "VM.recover",
        "The supplied session does not have the required permissions for VM recovery.",
    ]
    y.VM.start(local, False, False)
    with pytest.raises(XenAPI.Failure) as exc:
        fx.VM.recover(fvm, recovered["session_to"], False)
    assert failure(exc) == ["VM_BAD_POWER_STATE", local, "Halted", "Running"]
    fx.VM.recover(fvm, recovered["session_to"], True)  # forced: a VM not halted is skipped
    assert y.VM.get_by_uuid(recovered["before"]["vm"]["uuid"]) == local
    y.VM.hard_shutdown(local)
    fx.VM.recover(fvm, recovered["session_to"], True)  # forced and halted: replaced
    assert y.VM.get_by_uuid(recovered["before"]["vm"]["uuid"]) != local


def test_newest_metadata_wins(sim: Sim) -> None:
    """Two DR SRs of pool 0 mirrored at different times: on pool 1 the metadata VDI with the
    higher database generation is the one flagged metadata_latest, re-evaluated on plug/unplug."""
    x, y = sim.session(0).xenapi, sim.session(1).xenapi
    old_sr, new_sr = create_lun_sr(x, "DR B1", "lun-b1"), create_lun_sr(x, "DR B2", "lun-b2")
    vm = x.VM.copy(first_vm(x), "dr-versions", old_sr)
    x.VM.set_name_description(vm, "v1")
    x.SR.enable_database_replication(old_sr)
    x.SR.enable_database_replication(new_sr)
    x.sim.array_mirror("lun-b1", "lun-b1-m")
    x.VM.set_name_description(vm, "v2")
    x.sim.array_mirror("lun-b2", "lun-b2-m")
    uuids = [x.SR.get_uuid(s) for s in (old_sr, new_sr)]
    tasks = [
        y.DR_task.create("lvmoiscsi", {**ISCSI, "SCSIid": lun}, [uuid])
        for lun, uuid in zip(("lun-b1-m", "lun-b2-m"), uuids, strict=True)
    ]
    old_md, new_md = (metadata_vdis(y, y.SR.get_by_uuid(u))[0] for u in uuids)
    assert (y.VDI.get_metadata_latest(old_md), y.VDI.get_metadata_latest(new_md)) == (False, True)
    generations = [int(lun_info(x, lun)["databases"][0]["generation"]) for lun in ("lun-b1-m", "lun-b2-m")]
    assert generations[0] < generations[1]
    session_to = sim.sessions[-1]._session
    fx = foreign(sim, 1, y.VDI.open_database(new_md))
    fx.VM.recover(fx.VM.get_by_uuid(x.VM.get_uuid(vm)), session_to, False)
    local = y.VM.get_by_uuid(x.VM.get_uuid(vm))
    assert y.VM.get_name_description(local) == "v2"
    old = foreign(sim, 1, y.VDI.open_database(old_md))
    with pytest.raises(XenAPI.Failure) as exc:
        old.VM.recover(old.VM.get_by_uuid(x.VM.get_uuid(vm)), session_to, False)
    assert failure(exc)[:2] == ["VM_TO_IMPORT_IS_NOT_NEWER_VERSION", local]
    # the newer SR unplugged from the master: the older metadata is the latest known again
    new_pbd = next(p for p in y.SR.get_PBDs(y.SR.get_by_uuid(uuids[1])) if y.PBD.get_host(p) == master(y))
    y.PBD.unplug(new_pbd)
    assert (y.VDI.get_metadata_latest(old_md), y.VDI.get_metadata_latest(new_md)) == (True, False)
    y.PBD.plug(new_pbd)
    assert (y.VDI.get_metadata_latest(old_md), y.VDI.get_metadata_latest(new_md)) == (False, True)
    y.DR_task.destroy(tasks[1])  # forgets lun-b2-m's SR (no recovered VM needs it)
    assert y.VDI.get_metadata_latest(old_md) is True
    y.DR_task.destroy(tasks[0])  # the recovered VM keeps lun-b1-m's SR
    assert y.SR.get_by_uuid(uuids[0])


def test_at_most_eight_redo_logs_and_sr_create_errors(sim: Sim) -> None:
    y = sim.session(1).xenapi
    host = master(y)
    srs = [create_lun_sr(y, f"DR C{i}", f"lun-c{i}") for i in range(9)]
    assert y.SR.get_shared(srs[0]) is True and y.SR.get_sm_config(srs[0])["devserial"] == "scsi-lun-c0"
    assert [y.PBD.get_currently_attached(p) for p in y.SR.get_PBDs(srs[0])] == [True]
    for sr in srs[:8]:
        y.SR.enable_database_replication(sr)
    for sr in (srs[8], srs[0]):  # xapi checks the limit even for an SR it already replicates to
        with pytest.raises(XenAPI.Failure) as exc:
            y.SR.enable_database_replication(sr)
        assert failure(exc) == ["NO_MORE_REDO_LOGS_ALLOWED"]
    y.SR.disable_database_replication(srs[0])
    assert metadata_vdis(y, srs[0]) == []
    y.SR.enable_database_replication(srs[8])
    md = metadata_vdis(y, srs[8])
    assert y.VDI.get_metadata_latest(md[0]) is True
    dom0_vbds = y.VDI.get_VBDs(md[0])
    assert len(dom0_vbds) == 1 and y.VM.get_is_control_domain(y.VBD.get_VM(dom0_vbds[0])) is True
    for sr in srs[1:]:
        y.SR.disable_database_replication(sr)
    assert y.pool.get_metadata_VDIs(y.pool.get_all()[0]) == []

    with pytest.raises(XenAPI.Failure) as exc:
        y.SR.create(host, {"SCSIid": "lun-x"}, "0", "n", "", "lvmoiscsi", "user", True, {})
    assert failure(exc) == ["SR_BACKEND_FAILURE_95", "", "The request is missing the target parameter", ""]
    with pytest.raises(XenAPI.Failure) as exc:
        y.SR.create(host, {"target": "t", "SCSIid": "lun-x"}, "0", "n", "", "lvmoiscsi", "user", True, {})
    assert failure(exc)[0] == "SR_BACKEND_FAILURE_96"
    with pytest.raises(XenAPI.Failure) as exc:
        y.SR.create(host, {}, "0", "n", "", "lvmohba", "user", True, {})
    assert failure(exc) == ["SR_BACKEND_FAILURE_107", "", "The SCSIid parameter is missing or incorrect", ""]
    with pytest.raises(XenAPI.Failure) as exc:  # a LUN this pool already uses
        create_lun_sr(y, "again", "lun-c3")
    assert failure(exc) == ["SR_BACKEND_FAILURE_16", "", "The SR device is currently in use", ""]

    pbd = y.SR.get_PBDs(srs[1])[0]
    with pytest.raises(XenAPI.Failure) as exc:
        y.SR.destroy(srs[1])
    assert failure(exc) == ["SR_HAS_PBD", srs[1]]
    y.PBD.unplug(pbd)
    with pytest.raises(XenAPI.Failure) as exc:  # every PBD must be plugged
        y.SR.assert_supports_database_replication(srs[1])
    assert failure(exc) == ["SR_HAS_NO_PBDS", srs[1]]
    y.PBD.plug(pbd)
    y.VDI.create(
        {
            "SR": srs[1],
            "virtual_size": str(4 * MIB),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
    )
    y.PBD.unplug(pbd)
    with pytest.raises(XenAPI.Failure) as exc:
        y.SR.destroy(srs[1])
    assert failure(exc) == ["SR_NOT_EMPTY"]
    y.PBD.unplug(y.SR.get_PBDs(srs[2])[0])
    y.SR.destroy(srs[2])
    assert lun_info(y, "lun-c2")["sr_uuid"] == "" and lun_info(y, "lun-c2")["vhds"] == "0"


def test_an_sr_attached_to_two_pools(sim: Sim) -> None:
    """LVHD checks no ownership: a second pool attaches a LUN the first has plugged (the sim shows
    both in sim.array); the array refuses to mirror onto a LUN in use; SR.create in another pool
    formats the LUN, as sm does."""
    x, y = sim.session(0).xenapi, sim.session(1).xenapi
    sr = create_lun_sr(x, "shared by mistake", "lun-d")
    x.VDI.create(
        {"SR": sr, "virtual_size": str(4 * MIB), "type": "user", "sharable": False, "read_only": False}
        | {"other_config": {}}
    )
    uuid = x.SR.get_uuid(sr)
    task = y.DR_task.create("lvmoiscsi", {**ISCSI, "SCSIid": "lun-d"}, [uuid])
    plugged = lun_info(x, "lun-d")["plugged"]
    assert [(p["pool"], p["sr_uuid"]) for p in plugged] == [("0", uuid), ("1", uuid)]
    with pytest.raises(XenAPI.Failure) as exc:
        x.sim.array_mirror("lun-a", "lun-d")
    assert failure(exc) == ["SIM_LUN_IN_USE", "lun-d", f"pool0 SR {uuid}", f"pool1 SR {uuid}"]
    for bad in (("no-such-lun", "lun-z"), ("lun-a", "lun-a"), ("../etc", "lun-z")):
        with pytest.raises(XenAPI.Failure) as exc:
            x.sim.array_mirror(*bad)
        assert failure(exc)[0] == "INVALID_VALUE"
    y.DR_task.destroy(task)
    assert [p["pool"] for p in lun_info(x, "lun-d")["plugged"]] == ["0"]
    other = create_lun_sr(y, "formats it", "lun-d")  # pool 1 does not know pool 0 uses it
    assert lun_info(x, "lun-d")["sr_uuid"] == y.SR.get_uuid(other) != uuid


def test_sr_create_of_an_unsimulated_type(sim: Sim) -> None:
    x = sim.session(0).xenapi
    with pytest.raises(XenAPI.Failure) as exc:
        x.SR.create(master(x), {"device": "/dev/sdz"}, "0", "n", "", "ext", "user", False, {})
    assert failure(exc) == ["NOT_IMPLEMENTED", "SR.create"]


def test_copy_sparse_keeps_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "a", tmp_path / "b"
    with open(src, "wb") as f:
        f.write(b"head")
        f.seek(64 * MIB)
        f.write(b"tail")
    copy_sparse(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks * 512 < MIB


def test_restart_rebuilds_redo_logs_and_cache(sim: Sim, recovered: dict[str, Any]) -> None:
    """After xapi restarts: replication to its own metadata VDIs resumes, foreign metadata VDIs
    are read again (metadata_latest and read_database_pool_uuid as before)."""
    x, y = sim.session(0).xenapi, sim.session(1).xenapi
    generation = int(lun_info(x, "lun-a")["databases"][0]["generation"])
    foreign_md = [
        v
        for v, rec in y.VDI.get_all_records().items()
        if rec["type"] == "metadata" and rec["metadata_of_pool"] == x.pool.get_all()[0]
    ]
    latest = {v: y.VDI.get_metadata_latest(v) for v in foreign_md}
    assert sum(latest.values()) == 1  # one foreign pool: one latest
    sim.restart()
    x, y = sim.session(0).xenapi, sim.session(1).xenapi
    x.VM.set_name_description(first_vm(x, "vm0"), "after restart")
    assert int(lun_info(x, "lun-a")["databases"][0]["generation"]) > generation
    assert {v: y.VDI.get_metadata_latest(v) for v in foreign_md} == latest
    pool_uuid = x.pool.get_uuid(x.pool.get_all()[0])
    assert {y.VDI.read_database_pool_uuid(v) for v in foreign_md} == {pool_uuid}
