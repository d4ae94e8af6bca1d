"""Issue 14: never destroy what a user made or touched. A user works on the replicas through the
SDK between runs; xencr must leave every such object (and its disks) exactly as it is, say so,
and keep its own restore points going."""

from __future__ import annotations

import json
from pathlib import Path

from safetytest import (
    JOB,
    disks,
    new_vm_with_disk,
    points,
    run,
    write_config,
    xencr,
)
from xapitest import Pools, disk_hashes

from xencr.replication import metadata as md


def _start_time(t: object, vm: str) -> str:
    api = t.api  # type: ignore[attr-defined]
    return str(api.VM_metrics.get_start_time(api.VM.get_metrics(vm)))


def test_adversarial_user_keeps_everything(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools)
    t = pools.session(1)
    run(cfg, pools, "r1")
    run(cfg, pools, "r2")
    rp1, rp2 = (t.api.VM.get_by_uuid(u) for u in points(pools, cfg))
    user: dict[str, str] = {}  # what the user made or touched: name -> VM ref
    # A clone and a copy (any tool: here the SDK), and a replica disk cloned into a VM of theirs.
    user["clone"] = t.api.VM.clone(rp2, "user clone")
    user["copy"] = t.call_async("VM.copy", rp1, "user copy", t.api.VDI.get_SR(disks(t, rp1)[0]))
    disk_clone = t.api.VDI.clone(disks(t, rp2)[0], {})
    user["own"] = new_vm_with_disk(t, rp2, disk_clone, "user vm with a replica disk")
    t.api.VM.start(user["clone"], False, False)  # and boots the clone
    run(cfg, pools, "r3")
    # A replica unprotected and started (what a manual failover does).
    for op in md.PROTECTED_OPS:
        t.api.VM.remove_from_blocked_operations(rp2, op)
    t.api.VM.start(rp2, False, False)
    user["started"] = rp2
    run(cfg, pools, "r4")
    newest = t.api.VM.get_by_uuid(points(pools, cfg)[-1])
    t.api.VM.set_name_label(newest, "keep me: renamed by a user")
    user["renamed"] = newest
    run(cfg, pools, "r5")
    newest = t.api.VM.get_by_uuid(points(pools, cfg)[-1])
    user["snapshotted"] = newest
    user["snapshot"] = t.api.VM.snapshot(newest, "user snapshot of a replica")
    before = {name: disk_hashes(t, vm) for name, vm in user.items()}
    started = {name: _start_time(t, user[name]) for name in ("clone", "started")}
    last = None
    for i in range(5):
        last = run(cfg, pools, f"after-{i}")
    # Every object the user made or touched is still there, disks hash-equal, running ones running.
    for name, vm in user.items():
        assert t.api.VM.get_uuid(vm), name
        assert disk_hashes(t, vm) == before[name], f"{name}: disks changed"
    for name in ("clone", "started"):
        assert t.api.VM.get_power_state(user[name]) == "Running", name
        assert _start_time(t, user[name]) == started[name], f"{name} was restarted"
    assert t.api.VM.get_name_label(user["renamed"]) == "keep me: renamed by a user"
    # Each is reported detached by the run, and marked once.
    assert last is not None
    lines = "\n".join(last.vms[0].targets[0].detached)
    for name in ("clone", "copy", "started", "renamed", "snapshotted", "snapshot"):
        uuid = t.api.VM.get_uuid(user[name])
        assert uuid in lines, f"{name} not reported detached:\n{lines}"
        assert md.DETACHED in t.api.VM.get_other_config(user[name]), name
    assert t.api.VDI.get_uuid(disk_clone) in lines
    # The job still has exactly two restore points, and each verifies.
    kept = points(pools, cfg)
    assert len(kept) == 2
    for uuid in kept:
        r = xencr("verify", uuid, "--config", str(cfg))
        assert r.exit_code == 0, r.output
    # The replica list shows the detached ones too, with why.
    r = xencr("replica", "list", JOB, "--json", "--config", str(cfg))
    assert r.exit_code == 0, r.output
    rows = {row["uuid"]: row for row in json.loads(r.stdout)}
    assert rows[t.api.VM.get_uuid(user["started"])]["detached"].endswith("started")
    assert rows[t.api.VM.get_uuid(user["renamed"])]["detached"].startswith("20")
    assert all(rows[u]["detached"] is None for u in kept)


def test_replica_clone_is_a_plain_vm_that_survives_runs(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools, vm="vm1")
    t = pools.session(1)
    run(cfg, pools, "c1", "vm1")
    [rp] = points(pools, cfg, "vm1")
    r = xencr("replica", "clone", rp, "--name", "test", "--config", str(cfg))
    assert r.exit_code == 0, r.output
    clone = t.api.VM.get_by_name_label("test")[0]
    uuid = t.api.VM.get_uuid(clone)
    assert uuid in r.stdout and "test" in r.stdout
    for obj in [t.api.VM.get_other_config(clone), *(t.api.VDI.get_other_config(v) for v in disks(t, clone))]:
        assert not [k for k in obj if k.startswith(("xencr:", "xo:"))], obj
    hashes = disk_hashes(t, clone)
    run(cfg, pools, "c2", "vm1")
    t.api.VM.start(clone, False, False)
    for i in range(3):
        report = run(cfg, pools, f"c3-{i}", "vm1")
        assert not report.vms[0].targets[0].cleaned, "nothing of the clone is cleaned"
    assert t.api.VM.get_power_state(clone) == "Running"
    t.api.VM.hard_shutdown(clone)
    run(cfg, pools, "c4", "vm1")
    assert disk_hashes(t, clone) == hashes
    assert len(points(pools, cfg, "vm1")) == 2


def test_a_destroy_xapi_refuses_is_in_use_not_cleaned(pools: Pools, tmp_path: Path) -> None:
    """Retention's destroy refused by XAPI (the object is in use): no retry, reported detached,
    not counted as expired, and the replica and its disks stay, also through later runs."""
    cfg = write_config(tmp_path, pools, retention=1, vm="vm1")
    t = pools.session(1)
    run(cfg, pools, "refused-1", "vm1")
    [oldest] = points(pools, cfg, "vm1")
    vm = t.api.VM.get_by_uuid(oldest)
    vdis = [t.api.VDI.get_uuid(v) for v in disks(t, vm)]
    t.api.sim.fault_fail_next_call("VM.destroy", ["OPERATION_NOT_ALLOWED", "in use by a test"])
    report = run(cfg, pools, "refused-2", "vm1")
    tr = report.vms[0].targets[0]
    assert tr.expired == [], "a refused destroy is not an expiry"
    assert any(oldest in d and "OPERATION_NOT_ALLOWED" in d for d in tr.detached), tr.detached
    for seed in ("refused-3", "refused-4"):
        run(cfg, pools, seed, "vm1")
    assert t.api.VM.get_uuid(vm) == oldest
    for uuid in vdis:
        oc = t.api.VDI.get_other_config(t.api.VDI.get_by_uuid(uuid))
        assert md.DETACHED in oc and md.EXPIRING not in oc, oc
    assert oldest not in points(pools, cfg, "vm1") and len(points(pools, cfg, "vm1")) == 1
