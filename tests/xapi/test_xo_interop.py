"""A chain Xen Orchestra laid out (classic keys, built here through the SDK as XO would) is
continued as a delta, and XO's replica is left as it was."""

from __future__ import annotations

from test_replication import _check_replica, _disk_hashes, _vm
from xapitest import MIB, Pools

from xencr.replication import metadata as md
from xencr.replication.runner import JobSpec, Target, run_job
from xencr.replication.source import disks_of
from xencr.replication.target import attach, create_disk, create_replica
from xencr.xapi.transfer import copy_vdi

JOB = JobSpec(id="33333333-2222-3333-4444-555555555555", name="after-xo")


def test_xo_classic_chain_is_continued(pools: Pools) -> None:
    src, ts = pools.session(0), pools.session(1)
    sr = str(ts.api.pool.get_default_SR(ts.api.pool.get_all()[0]))
    sr_uuid = str(ts.api.SR.get_uuid(sr))
    vm = _vm(src, "vm0")
    vm_uuid = src.api.VM.get_uuid(vm)
    # XO's side of the source: its snapshot with its keys.
    snap = src.call_async("VM.snapshot", vm, "[XO Backup nightly] vm0")
    snap_uuid = src.api.VM.get_uuid(snap)
    xo_keys = {
        md.XO_JOB: "xo-job",
        md.XO_SCHEDULE: "xo-schedule",
        md.XO_VM: vm_uuid,
        md.XO_DATETIME: "20260101T00:00:00Z",
        md.XO_EXPORTED: "true",
    }
    src.api.VM.set_other_config(snap, dict(src.api.VM.get_other_config(snap)) | xo_keys)
    # XO's side of the target: a replica VM whose disks are full copies of that snapshot.
    made = {md.ATTEMPT: "made-by-xo"}  # the helpers insist on an attempt id; XO's keys replace it
    replica = create_replica(ts, src.api.VM.get_record(snap) | {"name_label": "vm0 - nightly"}, made)
    ts.api.VM.set_other_config(replica, {md.XO_COPY_OF: snap_uuid, md.XO_SR: sr_uuid} | xo_keys)
    for d in disks_of(src, snap):
        vdi = create_disk(ts, sr, d, None, made)
        ts.api.VDI.set_other_config(vdi, {md.XO_COPY_OF: d.uuid, md.XO_SR: sr_uuid})
        attach(ts, replica, vdi, d)
        copy_vdi(src, d.vdi, ts, vdi)
    xo_hashes = _disk_hashes(ts, replica)
    # The guest writes; our job runs for the first time: a delta on top of XO's replica.
    disk = next(b for b in src.api.VM.get_VBDs(vm) if src.api.VBD.get_type(b) == "Disk")
    src.api.sim.write(src.api.VDI.get_uuid(src.api.VBD.get_VDI(disk)), str(11 * MIB), "2048", "after-xo")
    t = Target("b", ts, sr, sr_uuid)
    tr = _check_replica(src, t, run_job(src, [vm], [t], JOB))
    assert tr.kind == "delta"
    assert {d.reason for d in tr.disks} == {f"continues Xen Orchestra replica {ts.api.VM.get_uuid(replica)}"}
    assert [d.blocks for d in tr.disks] == [1]
    # XO's replica and its snapshot are untouched.
    assert _disk_hashes(ts, replica) == xo_hashes
    assert "start" in ts.api.VM.get_blocked_operations(replica)
    assert src.api.VM.get_uuid(snap) == snap_uuid
    # And our chain goes on from our own restore point.
    tr2 = _check_replica(src, t, run_job(src, [vm], [t], JOB))
    assert {d.reason for d in tr2.disks} == {"delta"}
