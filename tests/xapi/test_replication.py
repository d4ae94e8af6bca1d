"""Continuous replication against the simulator: full then delta, content equal to the source
snapshot, protection, and the reasons for a full."""

from __future__ import annotations

from typing import Any

import pytest
from xapitest import MIB, Pools, disk_hashes

from xencr.replication import metadata as md
from xencr.replication.runner import JobSpec, Target, run_job
from xencr.replication.target import restore_points
from xencr.xapi.errors import XapiError
from xencr.xapi.session import XapiSession


def _target(p: Pools) -> Target:
    t = p.session(1)
    sr = t.api.pool.get_default_SR(t.api.pool.get_all()[0])
    return Target("pool1", t, str(sr), str(t.api.SR.get_uuid(sr)))


def _vm(s: XapiSession, name: str) -> str:
    return str(s.api.VM.get_by_name_label(name)[0])


_disk_hashes = disk_hashes  # shared by the replication test modules


def _snapshot_by_uuid(s: XapiSession, uuid: str) -> str:
    return str(s.api.VM.get_by_uuid(uuid))


JOB = JobSpec(id="11111111-2222-3333-4444-555555555555", name="test", retention=2)


def _check_replica(src: XapiSession, t: Target, result: Any) -> Any:
    vr = result.vms[0]
    assert vr.outcome == "success", (vr.error, [x.error for x in vr.targets])
    tr = vr.targets[0]
    replica = str(t.session.api.VM.get_by_uuid(tr.restore_point))
    assert _disk_hashes(t.session, replica) == _disk_hashes(src, _snapshot_by_uuid(src, vr.snapshot))
    return tr


def test_full_then_delta(pools: Pools) -> None:
    src, t = pools.session(0), _target(pools)
    vm = _vm(src, "vm0")
    first = run_job(src, [vm], [t], JOB)
    tr = _check_replica(src, t, first)
    assert tr.kind == "full" and {d.reason for d in tr.disks} == {"first run"}
    disk = next(v for v in src.api.VM.get_VBDs(vm) if src.api.VBD.get_type(v) == "Disk")
    src.api.sim.write(src.api.VDI.get_uuid(src.api.VBD.get_VDI(disk)), str(5 * MIB), str(4096), "w1")
    second = run_job(src, [vm], [t], JOB)
    tr2 = _check_replica(src, t, second)
    assert tr2.kind == "delta", [d.reason for d in tr2.disks]
    assert [d.blocks for d in tr2.disks] == [1]
    # Counted by the target pool's import, not by us: one 2 MiB block, all its sectors.
    replica = t.session.api.VM.get_by_uuid(tr2.restore_point)
    vdi = next(
        t.session.api.VBD.get_VDI(b)
        for b in t.session.api.VM.get_VBDs(replica)
        if t.session.api.VBD.get_type(b) == "Disk"
    )
    stats = t.session.api.sim.import_stats(t.session.api.VDI.get_uuid(vdi))
    assert (int(stats["blocks"]), int(stats["sectors_written"])) == (1, 4096)
    assert int(stats["bytes_in"]) == tr2.bytes_sent
    # Only the snapshot the next delta needs stays on the source.
    snaps = [r for r in src.api.VM.get_snapshots(vm) if src.api.VM.get_other_config(r).get(md.JOB) == JOB.id]
    assert [src.api.VM.get_uuid(s) for s in snaps] == [second.vms[0].snapshot]


def test_replica_is_protected_and_clone_starts(pools: Pools) -> None:
    src, t = pools.session(0), _target(pools)
    vm = _vm(src, "vm0")
    points = restore_points(t.session, JOB.id, src.api.VM.get_uuid(vm), t.sr_uuid)
    assert points
    newest = points[-1]
    with pytest.raises(XapiError) as e:
        t.session.api.VM.start(newest.ref, False, False)
    assert e.value.code == "OPERATION_BLOCKED"
    assert e.value.params == [newest.ref, md.START_BLOCKED]
    clone = t.session.api.VM.clone(newest.ref, "usable copy")
    t.session.api.VM.start(clone, False, False)
    assert t.session.api.VM.get_power_state(clone) == "Running"
    t.session.api.VM.hard_shutdown(clone)


def test_retention_keeps_the_newest(pools: Pools) -> None:
    src, t = pools.session(0), _target(pools)
    vm = _vm(src, "vm0")
    report = run_job(src, [vm], [t], JOB)
    _check_replica(src, t, report)
    points = restore_points(t.session, JOB.id, src.api.VM.get_uuid(vm), t.sr_uuid)
    assert len(points) == JOB.retention
    assert points[-1].uuid == report.vms[0].targets[0].restore_point
    assert report.vms[0].targets[0].expired


def test_started_replica_forces_a_full(pools: Pools) -> None:
    src, t = pools.session(0), _target(pools)
    vm = _vm(src, "vm0")
    newest = restore_points(t.session, JOB.id, src.api.VM.get_uuid(vm), t.sr_uuid)[-1]
    t.session.api.VM.remove_from_blocked_operations(newest.ref, "start")
    report = run_job(src, [vm], [t], JOB)
    tr = _check_replica(src, t, report)
    assert tr.kind == "full" and {d.reason for d in tr.disks} == {"replica unprotected"}


def test_written_replica_disk_forces_a_full(pools: Pools) -> None:
    src, t = pools.session(0), _target(pools)
    vm = _vm(src, "vm0")
    newest = restore_points(t.session, JOB.id, src.api.VM.get_uuid(vm), t.sr_uuid)[-1]
    live = next(iter(newest.disks.values()))[0]
    t.session.api.sim.write(t.session.api.VDI.get_uuid(live), str(MIB), str(512), "tamper")
    report = run_job(src, [vm], [t], JOB)
    tr = _check_replica(src, t, report)
    assert {d.reason for d in tr.disks} == {"replica disk modified"}


class _Recorder:
    """A TransferMonitor that keeps every counter it handed out."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[int, Any]] = {}
        self.ended: list[str] = []

    def begin(self, label: str, total: int) -> Any:
        from xencr import _engine

        counter = _engine.Progress()
        self.seen[label] = (total, counter)
        return counter

    def end(self, label: str) -> None:
        self.ended.append(label)


def test_transfers_report_progress(pools: Pools) -> None:
    from xencr.cli.live import LiveTransfers

    src, t = pools.session(0), _target(pools)
    vm = _vm(src, "vm1")
    rec = _Recorder()
    report = run_job(src, [vm], [t], JOB, monitor=rec)
    tr = _check_replica(src, t, report)
    assert list(rec.seen) == rec.ended == [f"vm1 -> pool1 disk {d.userdevice}" for d in tr.disks]
    for _, counter in rec.seen.values():
        assert counter.bytes == counter.total > 0, "the counter reached the stream's length"
    _, counter = next(iter(rec.seen.values()))
    total = counter.total
    live = LiveTransfers(enabled=False)
    line = live.line(type("T", (), {"label": "x", "total": total, "counter": counter, "start": 0.0})(), 1.0)
    assert line.startswith("x: 100% ") and "ETA 0:00" in line
