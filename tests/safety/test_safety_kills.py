"""Issue 14: every object an attempt creates is findable from the moment it exists, so a run
killed anywhere leaves nothing behind once the next run has cleaned up; and what a user made
that merely looks like a leftover is never taken for one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from safetytest import JOB, disks, points, run, write_config
from xapitest import Pools

from xencr.config import load_config
from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.xapi.errors import XapiError
from xencr.xapi.session import XapiSession


def _ours(pools: Pools, cfg: Path) -> tuple[set[str], set[str], list[str], set[str]]:
    """Target VMs and VDIs carrying the job's keys, the source snapshots named or tagged as the
    job's, and every managed VDI on the source."""
    s, t = pools.session(0), pools.session(1)
    job_id = load_config(cfg).job(JOB).id
    vms = {r["uuid"] for r in t.api.VM.get_all_records().values() if r["other_config"].get(md.JOB) == job_id}
    vdis = {
        r["uuid"]
        for r in t.api.VDI.get_all_records().values()
        if r["managed"] and r["other_config"].get(md.JOB) == job_id
    }
    snaps = [
        r["uuid"]
        for r in s.api.VM.get_all_records().values()
        if r["is_a_snapshot"]
        and (r["other_config"].get(md.JOB) == job_id or r["name_label"].startswith(f"[xencr {JOB}]"))
    ]
    src_vdis = {r["uuid"] for r in s.api.VDI.get_all_records().values() if r["managed"]}
    return vms, vdis, snaps, src_vdis


def _restore_point_objects(pools: Pools, cfg: Path) -> tuple[set[str], set[str]]:
    t = pools.session(1)
    vms, vdis = set(), set()
    for uuid in points(pools, cfg):
        vm = t.api.VM.get_by_uuid(uuid)
        vms.add(uuid)
        for vdi in disks(t, vm):
            vdis.add(t.api.VDI.get_uuid(vdi))
            vdis |= {t.api.VDI.get_uuid(x) for x in t.api.VDI.get_snapshots(vdi)}
    return vms, vdis


def test_sigkill_at_twenty_points_leaves_nothing(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools)
    s = pools.session(0)
    run(cfg, pools, "k0")
    _, _, _, src_before = _ours(pools, cfg)
    vm = s.api.VM.get_by_name_label("vm0")[0]
    vbd = next(v for v in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(v) == "Disk")
    disk = s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd))
    # The process needs ~0.5 s to start; spread the kills from its start to past its end.
    for i in range(20):
        s.api.sim.write(disk, str((i % 7) * 2 * 1024 * 1024), "4096", f"kill-{i}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "xencr.cli", "run", JOB, "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.35 + i * 0.06)
        proc.kill()
        proc.wait(30)
    report = run(cfg, pools, "after-kills")
    tr = report.vms[0].targets[0]
    assert not tr.detached, "a killed attempt's object is garbage, never a user's"
    vms, vdis, snaps, src_vdis = _ours(pools, cfg)
    rp_vms, rp_vdis = _restore_point_objects(pools, cfg)
    assert vms == rp_vms, "every replica VM of the job is a restore point"
    assert vdis == rp_vdis, "every disk of the job is a restore point's disk or commit snapshot"
    assert snaps == [report.vms[0].snapshot], "only the next delta's base stays on the source"
    base_vdis = {s.api.VDI.get_uuid(v) for v in disks(s, s.api.VM.get_by_uuid(snaps[0]))}
    assert src_vdis - src_before <= base_vdis, "no snapshot disk of a killed attempt on the source"


def test_each_kill_window_is_found(pools: Pools, tmp_path: Path) -> None:
    """The windows a kill can hit between a create and the keys, made by hand as a kill leaves
    them: an untagged source snapshot, and a clone of a base whose keys were not written yet."""
    cfg = write_config(tmp_path, pools, vm="vm1")
    s, t = pools.session(0), pools.session(1)
    run(cfg, pools, "w0", "vm1")
    job_id = load_config(cfg).job(JOB).id
    vm = s.api.VM.get_by_name_label("vm1")[0]
    attempt = ownership.new_attempt(job_id)
    # Killed between VM.snapshot and the write of its keys.
    untagged = s.call_async("VM.snapshot", vm, ownership.snapshot_name(JOB, "vm1", attempt), [])
    untagged_vdis = disks(s, untagged)
    # Killed between VDI.clone of the base and the clone's keys.
    [rp] = points(pools, cfg, "vm1")
    live = disks(t, t.api.VM.get_by_uuid(rp))[0]
    base = next(
        x
        for x in t.api.VDI.get_snapshots(live)
        if t.api.VDI.get_other_config(x)[md.ROLE] == "commit-snapshot"
    )
    t.api.VDI.set_other_config(base, dict(t.api.VDI.get_other_config(base)) | {md.CLONING: attempt})
    half_clone = t.api.VDI.clone(base, {})
    # A user's clone of the same base, made when no attempt was cloning it: theirs.
    t.api.VDI.set_other_config(
        base, {k: v for k, v in t.api.VDI.get_other_config(base).items() if k != md.CLONING}
    )
    users_clone = t.api.VDI.clone(base, {})
    report = run(cfg, pools, "w1", "vm1")
    tr = report.vms[0].targets[0]
    cleaned = "\n".join(tr.cleaned)
    assert not _exists(s, "VM", untagged), "the untagged snapshot went"
    assert all(not _exists(s, "VDI", v) for v in untagged_vdis), "and its disks"
    assert not _exists(t, "VDI", half_clone), cleaned
    assert _exists(t, "VDI", users_clone), "a user's clone of a base is never destroyed"
    assert any(t.api.VDI.get_uuid(users_clone) in line for line in tr.detached), tr.detached
    assert md.CLONING not in t.api.VDI.get_other_config(base), "the stale marker is gone"
    assert "untagged source snapshot" in cleaned


def _exists(x: XapiSession, cls: str, ref: str) -> bool:
    try:
        x.call(f"{cls}.get_uuid", ref)
    except XapiError as err:
        assert err.code == "HANDLE_INVALID", err
        return False
    return True
