"""`xencr dr recover` / `probe` / `metadata`: VMs and a vApp recovered on pool b from the mirror of
pool a's iSCSI LUN equal pool a's VMs as they were when the mirror was taken (records, disks),
start in vApp order with their delays, and newest information wins."""

from __future__ import annotations

from nativetest import Site, as_json, by_uuid, disks, record

MIB = 2**20


def _write(site: Site, vm: str, seed: str) -> None:
    for uuid in disks(site.a, site.vms[vm]).values():
        site.a.api.sim.write(uuid, str(MIB), str(MIB), seed)


def test_recovered_vms_equal_the_primary_at_the_mirror_time(site: Site) -> None:
    a, b = site.a, site.b
    _write(site, "web", "before-the-mirror")
    site.mirror()
    at_mirror = {name: record(a, vm) for name, vm in site.vms.items()}
    # After the mirror: the primary changes, the mirrored LUN does not.
    a.api.VM.set_memory_limits(
        site.vms["web"], str(256 * MIB), str(256 * MIB), str(256 * MIB), str(256 * MIB)
    )
    a.api.VM.set_order(site.vms["web"], "5")
    _write(site, "web", "after-the-mirror")
    assert record(a, site.vms["web"]) != at_mirror["web"]

    code, out = site.xencr("dr", "probe", "--pool", "b", "--sr-config", site.lun_config(), "--json")
    assert code == 0, out
    found = as_json(out)
    assert {v["name"] for v in found["vms"]} >= {"db", "web"} and [a["name"] for a in found["vapps"]] == [
        "shop"
    ]
    assert b.api.DR_task.get_all() == [] and site.sr_uuid not in {
        b.api.SR.get_uuid(s) for s in b.api.SR.get_all()
    }

    code, out = site.xencr(
        "dr", "recover", "--pool", "b", "--sr-config", site.lun_config(), "--vapp", "shop", "--yes"
    )
    assert code == 0, out
    assert "2 of 2 VMs recovered, 2 started: done" in out
    for name, expected in at_mirror.items():
        vm = by_uuid(b, expected["uuid"])
        got = record(b, vm)
        assert got == expected, name
        assert b.api.VM.get_power_state(vm) == "Running"
        assert int(b.api.VM.get_version(vm)) == int(a.api.VM.get_version(site.vms[name])) + 1
    # The SR the recovered VMs use stays attached; the DR task is gone.
    assert b.api.DR_task.get_all() == []
    sr = b.api.SR.get_by_uuid(site.sr_uuid)
    assert all(b.api.PBD.get_currently_attached(p) for p in b.api.SR.get_PBDs(sr))

    # vApp order and delays: db (order 0, start_delay 100 s x 0.01) before web (order 1), which
    # starts only once db's VM.start has slept its delay.
    starts = {e["vm"]: e["time"] for e in b.api.sim.start_log()}
    db, web = starts[at_mirror["db"]["uuid"]], starts[at_mirror["web"]["uuid"]]
    assert web - db >= 1.0


def _second_sr(site: Site, lun: str) -> str:
    """Another LVM-over-iSCSI SR on pool a, on LUN ``lun``, with metadata replication."""
    a = site.a
    dc = dict(a.api.PBD.get_device_config(a.api.SR.get_PBDs(site.sr)[0])) | {"SCSIid": lun}
    master = a.api.pool.get_master(a.api.pool.get_all()[0])
    sr = str(a.api.SR.create(master, dc, str(2**30), f"iSCSI {lun}", "", "lvmoiscsi", "", True, {}))
    a.api.SR.enable_database_replication(sr)
    return sr


def test_newest_information_wins(site: Site) -> None:
    a, b = site.a, site.b
    web = site.vms["web"]
    uuid = a.api.VM.get_uuid(web)
    _second_sr(site, "lun-2")
    # The array mirrors the second LUN first, the VM's LUN later: two copies of pool a's
    # database of different ages, on two SRs pool b attaches together.
    a.api.VM.set_VCPUs_max(web, "4")
    site.mirror("lun-2", "mirror-2")
    a.api.VM.set_VCPUs_max(web, "8")
    a.api.VM.set_VCPUs_at_startup(web, "8")
    site.mirror()
    both = ["--sr-config", site.lun_config("mirror-2"), "--sr-config", site.lun_config()]
    code, out = site.xencr("dr", "probe", "--pool", "b", *both, "--json")
    assert code == 0, out
    found = as_json(out)
    assert sorted(d["latest"] for d in found["databases"]) == [False, True]
    older = next(d for d in found["databases"] if not d["latest"])
    assert older["sr_name"] == "iSCSI lun-2"
    assert any("older copy" in n and older["vdi_uuid"] in n for n in found["notes"])
    assert next(v for v in found["vms"] if v["uuid"] == uuid)["vcpus"] == 8

    code, out = site.xencr("dr", "recover", "--pool", "b", *both, "--vm", "web", "--yes")
    assert code == 0, out
    assert b.api.VM.get_VCPUs_max(by_uuid(b, uuid)) == "8"

    # The copy now in pool b is newer than the one on the LUNs: XAPI keeps it.
    b.api.VM.hard_shutdown(by_uuid(b, uuid))
    code, out = site.xencr("dr", "recover", "--pool", "b", *both, "--vm", "web", "--yes")
    assert code == 1
    assert "VM web: VM_TO_IMPORT_IS_NOT_NEWER_VERSION [" in out and "kept" in out
    assert b.api.VM.get_VCPUs_max(by_uuid(b, uuid)) == "8"
    # --force replaces a halted VM even so (the user said so).
    code, out = site.xencr("dr", "recover", "--pool", "b", *both, "--vm", "web", "--force", "--yes")
    assert code == 0, out


def test_errors_are_xapis_in_one_line(site: Site) -> None:
    a = site.a
    local = a.api.SR.get_name_label(a.api.pool.get_default_SR(a.api.pool.get_all()[0]))
    code, out = site.xencr("dr", "metadata", "enable", "--pool", "a", "--sr", local)
    assert code == 1 and out.count("\n") == 1
    assert f"pool a: SR {local}: SR_OPERATION_NOT_SUPPORTED [" in out
    # At most 8 SRs: the iSCSI one and 7 more pass, the ninth is refused by XAPI.
    for i in range(7):
        _second_sr(site, f"lun-x{i}")
    dc = dict(a.api.PBD.get_device_config(a.api.SR.get_PBDs(site.sr)[0])) | {"SCSIid": "lun-x9"}
    master = a.api.pool.get_master(a.api.pool.get_all()[0])
    a.api.SR.create(master, dc, str(2**30), "ninth", "", "lvmoiscsi", "", True, {})
    code, out = site.xencr("dr", "metadata", "enable", "--pool", "a", "--sr", "ninth")
    assert code == 1 and out.strip() == "xencr: error: pool a: SR ninth: NO_MORE_REDO_LOGS_ALLOWED"
    prom = site.tmp / "dr.prom"
    code, out = site.xencr("dr", "metadata", "status", "--pool", "a", "--json", "--textfile", str(prom))
    assert code == 0 and out.count('"replicating": true') == 8
    code, out = site.xencr("status")
    assert code == 0 and out.count("pool a: SR iSCSI ") == 8 and "written continuously" in out
    metrics = prom.read_text()
    assert (
        'xencr_dr_metadata_srs{pool="a"} 8' in metrics and 'xencr_dr_metadata_pool_up{pool="a"} 1' in metrics
    )
    assert metrics.count('xencr_dr_metadata_written{pool="a",sr="iSCSI ') == 8
    # A type that cannot hold metadata, as DR_task.create refuses it.
    code, out = site.xencr(
        "dr", "recover", "--pool", "b", "--sr-type", "ext", "--sr-config", site.lun_config(), "--yes"
    )
    assert code == 1
    assert out.strip() == (
        "xencr: error: OPERATION_NOT_ALLOWED [Disaster recovery not supported on SRs of type ext]"
    )
    # A LUN without the SR: nothing found, said.
    code, out = site.xencr("dr", "probe", "--pool", "b", "--sr-config", site.lun_config("no-such-lun"))
    assert code == 1 and "no SR with DR metadata found on LUN" in out and out.count("\n") == 1
