"""Job options and the replica's record: full_interval, checkpoint and offline snapshots, the
network map, the VM settings carried over, and replicas never replicated themselves."""

from __future__ import annotations

import dataclasses

from test_replication import _check_replica, _target, _vm
from xapitest import MIB, Pools

from xencr.replication import metadata as md
from xencr.replication.runner import JobSpec, run_job
from xencr.replication.select import is_candidate

JOB = JobSpec(id="44444444-2222-3333-4444-555555555555", name="options", retention=5)


def _write(pools: Pools, name: str, seed: str) -> None:
    s = pools.session(0)
    vm = s.api.VM.get_by_name_label(name)[0]
    vdi = next(s.api.VBD.get_VDI(b) for b in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(b) == "Disk")
    s.api.sim.write(s.api.VDI.get_uuid(vdi), str(3 * MIB), "512", seed)


def test_full_interval_forces_a_full_every_n_runs(pools: Pools) -> None:
    src, t = pools.session(0), _target(pools)
    vm = _vm(src, "vm0")
    job = dataclasses.replace(JOB, full_interval=3)
    kinds = []
    for i in range(5):
        _write(pools, "vm0", f"fi-{i}")
        tr = _check_replica(src, t, run_job(src, [vm], [t], job))
        kinds.append((tr.kind, tr.disks[0].reason))
    assert kinds == [
        ("full", "first run"),
        ("delta", "delta"),
        ("delta", "delta"),
        ("full", "full interval reached"),
        ("delta", "delta"),
    ]


def test_checkpoint_and_offline_snapshots(pools: Pools) -> None:
    src, t = pools.session(0), _target(pools)
    vm = _vm(src, "vm1")
    src.api.VM.start(vm, False, False)
    try:
        report = run_job(src, [vm], [t], dataclasses.replace(JOB, snapshot_mode="checkpoint"))
        _check_replica(src, t, report)
        snap = src.api.VM.get_by_uuid(report.vms[0].snapshot)
        assert src.api.VM.get_power_state(snap) == "Suspended", "a checkpoint carries the memory"
        report = run_job(src, [vm], [t], dataclasses.replace(JOB, snapshot_mode="offline"))
        _check_replica(src, t, report)
        assert src.api.VM.get_power_state(vm) == "Running", "restarted after the offline snapshot"
    finally:
        src.api.VM.hard_shutdown(vm)


def test_replica_record_and_network_map(pools: Pools) -> None:
    src, t = pools.session(0), _target(pools)
    vm = _vm(src, "vm0")
    src.api.VM.set_platform(vm, dict(src.api.VM.get_platform(vm)) | {"viridian": "true"})
    src.api.VM.set_HVM_boot_params(vm, {"order": "dc", "firmware": "uefi"})
    src.api.VM.set_ha_restart_priority(vm, "restart")
    src.api.VM.set_order(vm, "3")
    nets = {src.api.network.get_name_label(src.api.VIF.get_network(v)) for v in src.api.VM.get_VIFs(vm)}
    target_nets = sorted(r["name_label"] for r in t.session.api.network.get_all_records().values())
    mapping = {n: target_nets[-1] for n in nets}
    target = dataclasses.replace(t, network_map=mapping)
    tr = _check_replica(src, target, run_job(src, [vm], [target], JOB))
    ts = t.session
    r = ts.api.VM.get_record(ts.api.VM.get_by_uuid(tr.restore_point))
    s = src.api.VM.get_record(vm)
    for k in ("memory_static_max", "memory_dynamic_max", "VCPUs_max", "VCPUs_at_startup", "HVM_boot_policy"):
        assert r[k] == s[k], k
    assert r["platform"]["viridian"] == "true" and r["HVM_boot_params"] == {"order": "dc", "firmware": "uefi"}
    assert r["ha_restart_priority"] == "" and {"xencr", "Continuous Replication"} <= set(r["tags"])
    assert r["other_config"]["xencr:order"] == "3" and r["order"] == "3"
    assert r["other_config"]["xencr:ha_restart_priority"] == "restart"
    assert r["blocked_operations"] == {"start": md.START_BLOCKED, "start_on": md.START_BLOCKED}
    assert r["name_label"].startswith("vm0 (") and "transferred" in r["name_description"]
    assert {ts.api.network.get_name_label(ts.api.VIF.get_network(v)) for v in r["VIFs"]} == {target_nets[-1]}
    assert [ts.api.VIF.get_MAC(v) for v in r["VIFs"]] == [src.api.VIF.get_MAC(v) for v in s["VIFs"]]
    # A replica is never a candidate for replication itself.
    assert not is_candidate(r)
