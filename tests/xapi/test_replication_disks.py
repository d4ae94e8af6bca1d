"""Disks and targets: a disk added to the source (that disk full, others delta), `[NOBAK]`
disks left out, and two targets from one snapshot (delta where a base exists, full where not)."""

from __future__ import annotations

from test_replication import _check_replica, _disk_hashes, _vm
from xapitest import MIB, Pools

from xencr.replication.runner import JobSpec, Target, run_job
from xencr.xapi.session import XapiSession

JOB = JobSpec(id="22222222-2222-3333-4444-555555555555", name="disks", retention=2)


def _targets(p: Pools) -> list[Target]:
    t = p.session(1)
    out = []
    for ref, rec in sorted(t.api.SR.get_all_records().items(), key=lambda x: x[1]["name_label"]):
        if rec["type"] in ("iso", "udev") or rec["content_type"] == "iso":
            continue
        out.append(Target(rec["name_label"], t, str(ref), rec["uuid"]))
    assert len(out) >= 2, "the simulator has two SRs per pool"
    return out[:2]


def _add_disk(s: XapiSession, vm: str, name: str) -> str:
    sr = s.api.pool.get_default_SR(s.api.pool.get_all()[0])
    vdi = s.api.VDI.create(
        {
            "SR": sr,
            "virtual_size": str(8 * MIB),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
            "name_label": name,
        }
    )
    s.api.VBD.create(
        {
            "VM": vm,
            "VDI": vdi,
            "userdevice": "1",
            "bootable": False,
            "mode": "RW",
            "type": "Disk",
            "empty": False,
            "other_config": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
        }
    )
    s.api.sim.write(s.api.VDI.get_uuid(vdi), "0", str(MIB), name)
    return str(vdi)


def test_added_disk_goes_full_the_others_delta(pools: Pools) -> None:
    src, (t1, _) = pools.session(0), _targets(pools)
    vm = _vm(src, "vm1")
    _check_replica(src, t1, run_job(src, [vm], [t1], JOB))
    vdi = _add_disk(src, vm, "data disk")
    tr = _check_replica(src, t1, run_job(src, [vm], [t1], JOB))
    assert {(d.userdevice, d.kind, d.reason) for d in tr.disks} == {
        ("0", "delta", "delta"),
        ("1", "full", "disk added"),
    }
    # Marked [NOBAK]: left out of the snapshot and of the replica.
    src.api.VDI.set_name_label(vdi, "data disk [NOBAK]")
    report = run_job(src, [vm], [t1], JOB)
    tr = report.vms[0].targets[0]
    assert tr.outcome == "success" and [d.userdevice for d in tr.disks] == ["0"]
    replica = t1.session.api.VM.get_by_uuid(tr.restore_point)
    assert set(_disk_hashes(t1.session, str(replica))) == {"0"}


def test_two_targets_each_get_what_they_need(pools: Pools) -> None:
    src, (t1, t2) = pools.session(0), _targets(pools)
    vm = _vm(src, "vm1")
    src.api.sim.write(
        src.api.VDI.get_uuid(src.api.VBD.get_VDI(src.api.VM.get_VBDs(vm)[0])), str(MIB), "4096", "2t"
    )
    report = run_job(src, [vm], [t1, t2], JOB)
    vr = report.vms[0]
    assert vr.outcome == "success", [t.error for t in vr.targets]
    kinds = {t.target: (t.kind, {d.reason for d in t.disks}) for t in vr.targets}
    assert kinds[t1.name] == ("delta", {"delta"})
    assert kinds[t2.name] == ("full", {"first run"})
    snap = src.api.VM.get_by_uuid(vr.snapshot)
    for t, tr in zip((t1, t2), vr.targets, strict=True):
        assert _disk_hashes(t.session, str(t.session.api.VM.get_by_uuid(tr.restore_point))) == _disk_hashes(
            src, str(snap)
        )
    # The next run is a delta on both, from the one snapshot they share.
    report = run_job(src, [vm], [t1, t2], JOB)
    assert {t.kind for t in report.vms[0].targets} == {"delta"}
