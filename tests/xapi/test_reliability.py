"""A run killed at any point leaves the previous restore point intact and the next run cleans up
and succeeds (as a delta when its base survived); dropped connections are retried; a corrupt
stream never becomes a restore point; a full SR fails cleanly. Nothing is left behind."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from xapitest import MIB, PASSWORD, Pools

from xencr.config import load_config
from xencr.replication import metadata as md
from xencr.replication.jobs import connected, run_configured, selected_vms, spec_of, targets_of
from xencr.replication.runner import run_job
from xencr.replication.target import restore_points
from xencr.xapi.session import XapiSession

JOB = "rel"


def _config(tmp: Path, pools: Pools) -> Path:
    pw = tmp / "pw"
    pw.write_text(PASSWORD)
    os.chmod(pw, 0o600)
    s = pools.session(1)
    sr = s.api.SR.get_uuid(s.api.pool.get_default_SR(s.api.pool.get_all()[0]))
    cfg = tmp / "xencr.toml"
    cfg.write_text(
        f'state = "{tmp / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{pools.urls[0]}"\npassword_file = "{pw}"\n'
        f'[pools.b]\nurl = "{pools.urls[1]}"\npassword_file = "{pw}"\n'
        f'[jobs.{JOB}]\npool = "a"\nvms = ["vm0"]\n'
        f'[[jobs.{JOB}.targets]]\npool = "b"\nsr = "{sr}"\n'
        f'[[jobs.{JOB}.schedules]]\nevery = "15m"\nretention = 3\n'
    )
    return cfg


@pytest.fixture(scope="module")
def cfg(pools: Pools, tmp_path_factory: pytest.TempPathFactory) -> Path:
    c = _config(tmp_path_factory.mktemp("rel"), pools)
    assert run_configured(load_config(c), JOB).outcome == "success"
    return c


def _state(pools: Pools, cfg: Path) -> tuple[list[str], set[str], set[str], list[str]]:
    """(complete restore points, all VMs and all VDIs on the target, source job snapshots)."""
    config = load_config(cfg)
    job = config.job(JOB)
    s, t = pools.session(0), pools.session(1)
    vm = s.api.VM.get_by_name_label("vm0")[0]
    sr = t.api.pool.get_default_SR(t.api.pool.get_all()[0])
    points = [p.uuid for p in restore_points(t, job.id, s.api.VM.get_uuid(vm), t.api.SR.get_uuid(sr))]
    snaps = [x for x in s.api.VM.get_snapshots(vm) if s.api.VM.get_other_config(x).get(md.JOB) == job.id]
    vdis = {v for v, r in t.api.VDI.get_all_records().items() if r["managed"]}
    return points, set(t.api.VM.get_all()), vdis, snaps


def _write(pools: Pools, seed: str) -> None:
    s = pools.session(0)
    vm = s.api.VM.get_by_name_label("vm0")[0]
    vbd = next(v for v in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(v) == "Disk")
    s.api.sim.write(s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd)), str(3 * MIB), str(8192), seed)


def _spawn(cfg: Path, hold: str | None, tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    marker = tmp / "held"
    env = dict(os.environ)
    if hold:
        env |= {"XENCR_TEST_HOLD": hold, "XENCR_TEST_HOLD_FILE": str(marker)}
    code = (
        f"from xencr.config import load_config; from xencr.replication.jobs import run_configured; "
        f"run_configured(load_config({str(cfg)!r}), {JOB!r})"
    )
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE), marker


def _wait_for(cond: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("point", ["before-replica", "before-transfer", "before-commit", "after-commit"])
def test_kill_at_any_point(pools: Pools, cfg: Path, tmp_path: Path, point: str) -> None:
    _write(pools, f"kill-{point}")
    before_points, before_vms, before_vdis, _ = _state(pools, cfg)
    proc, marker = _spawn(cfg, point, tmp_path)
    _wait_for(marker.exists, f"the run to reach {point}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    points, _, _, _ = _state(pools, cfg)
    if point == "after-commit":
        assert points[:-1] == before_points and len(points) == len(before_points) + 1
    else:
        assert points == before_points, "the previous restore point is still the newest"
    report = run_configured(load_config(cfg), JOB)
    vr = report.vms[0]
    assert vr.outcome == "success", [t.error for t in vr.targets]
    tr = vr.targets[0]
    assert tr.kind == "delta", [d.reason for d in tr.disks]
    if point == "before-transfer":
        assert tr.cleaned, "the killed run's replica was cleaned up (nothing of it had been sent)"
    if point == "before-commit":
        # Everything had been sent: the next run resumes it (`resume`), re-sending a window.
        assert all(d.resumed.startswith("resumed at") for d in tr.disks), [d.reason for d in tr.disks]
    points, vms, vdis, snaps = _state(pools, cfg)
    # Nothing of the killed run remains: only restore points (and retention) changed the target.
    t = pools.session(1)
    for vm in vms - before_vms:
        assert t.api.VM.get_other_config(vm).get(md.COMPLETE) == "true"
    for vdi in vdis - before_vdis:
        assert t.api.VDI.get_other_config(vdi).get(md.COMPLETE) == "true", "no orphan disk"
    assert len(snaps) == 1, "only the next delta's base stays on the source"


def test_a_kill_inside_the_commit_leaves_no_half_made_commit_snapshot(
    pools: Pools, cfg: Path, tmp_path: Path
) -> None:
    """Killed between a commit snapshot and its marking (the commit's first steps are replayed
    here, after a kill right before the commit): the snapshot still carries its disk's
    `xencr:self`, like a copy. The next run resumes the attempt and that snapshot goes with
    the attempt's garbage; it is never left alone as a user's copy."""
    _write(pools, "kill-in-commit")
    proc, marker = _spawn(cfg, "before-commit", tmp_path)
    _wait_for(marker.exists, "the run to reach before-commit")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    t = pools.session(1)
    (disk,) = [
        ref
        for ref, r in t.api.VDI.get_all_records().items()
        if r["other_config"].get(md.COMPLETE) == "false" and r["other_config"].get(md.ROLE) == "replica-disk"
    ]
    t.api.VDI.set_other_config(disk, dict(t.api.VDI.get_other_config(disk)) | {md.COMPLETE: "true"})
    half_made = t.api.VDI.get_uuid(t.api.VDI.snapshot(disk, {}))
    report = run_configured(load_config(cfg), JOB)
    tr = report.vms[0].targets[0]
    assert tr.outcome == "success", tr.error
    assert not tr.detached, tr.detached
    assert half_made not in {r["uuid"] for r in t.api.VDI.get_all_records().values()}


def test_mid_transfer_kill(pools: Pools, cfg: Path, tmp_path: Path) -> None:
    s, t = pools.session(0), pools.session(1)
    before_points, _, _, _ = _state(pools, cfg)
    for i in range(4):  # four changed blocks, slowed: the kill lands inside the stream
        s.api.sim.write(
            s.api.VDI.get_uuid(
                s.api.VBD.get_VDI(
                    next(
                        v
                        for v in s.api.VM.get_VBDs(s.api.VM.get_by_name_label("vm0")[0])
                        if s.api.VBD.get_type(v) == "Disk"
                    )
                )
            ),
            str(i * 2 * MIB + 512),
            "512",
            f"mid-{i}",
        )
    s.api.sim.fault_rate(str(1 * MIB))
    try:
        proc, _ = _spawn(cfg, None, tmp_path)

        def importing() -> bool:
            return any(
                r["other_config"].get(md.COMPLETE) == "false" for r in t.api.VM.get_all_records().values()
            )

        _wait_for(importing, "an incomplete replica")
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        s.api.sim.fault_clear()
    assert _state(pools, cfg)[0] == before_points
    report = run_configured(load_config(cfg), JOB)
    assert report.outcome == "success"
    tr = report.vms[0].targets[0]
    # Resumed when a block had passed before the kill (tests/resume), else cleaned up.
    assert tr.cleaned or all(d.resumed.startswith("resumed at") for d in tr.disks), tr.disks


def test_dropped_connection_is_retried(pools: Pools, cfg: Path) -> None:
    _write(pools, "drop")
    s = pools.session(0)
    s.api.sim.fault_drop_after("export", str(100_000))
    report = run_configured(load_config(cfg), JOB)
    tr = report.vms[0].targets[0]
    assert tr.outcome == "success", tr.error
    assert [d.drops for d in tr.disks] == [1], "resumed inside the disk (tests/resume), not retried"
    assert _check_hashes(pools, report.vms[0].snapshot, tr.restore_point)


def test_corrupt_stream_is_rejected_and_retried(pools: Pools, cfg: Path) -> None:
    _write(pools, "flip")
    pools.session(0).api.sim.fault_flip_byte("export", str(600))  # inside the header: bad checksum
    report = run_configured(load_config(cfg), JOB)
    tr = report.vms[0].targets[0]
    assert tr.outcome == "success", tr.error
    assert any("retried after" in w and "checksum" in w for w in tr.warnings), tr.warnings
    assert _check_hashes(pools, report.vms[0].snapshot, tr.restore_point)


def test_corrupt_stream_never_becomes_a_restore_point(pools: Pools, cfg: Path) -> None:
    config = load_config(cfg)
    _write(pools, "flip-no-retry")
    before_points, before_vms, before_vdis, _ = _state(pools, cfg)
    pools.session(0).api.sim.fault_flip_byte("export", str(600))
    with connected(config, config.job(JOB), interactive=False) as c:
        spec = dataclasses.replace(spec_of(c.job, None), retries=0)
        report = run_job(c.source, [ref for ref, _ in selected_vms(c)], targets_of(c), spec)
    tr = report.vms[0].targets[0]
    assert tr.outcome == "failure" and tr.error and "checksum" in tr.error
    assert _state(pools, cfg)[:3] == (before_points, before_vms, before_vdis), "nothing of it remains"


def test_full_sr_fails_cleanly(pools: Pools, cfg: Path) -> None:
    t = pools.session(1)
    sr_uuid = t.api.SR.get_uuid(t.api.pool.get_default_SR(t.api.pool.get_all()[0]))
    before_points, before_vms, before_vdis, before_snaps = _state(pools, cfg)
    t.api.sim.fault_fill_sr(sr_uuid, "-1")
    try:
        _write(pools, "full-sr")
        report = run_configured(load_config(cfg), JOB)
    finally:
        t.api.sim.fault_clear()
    tr = report.vms[0].targets[0]
    assert tr.outcome == "failure" and tr.error and "SR_BACKEND_FAILURE_44" in tr.error
    points, vms, vdis, snaps = _state(pools, cfg)
    assert (points, vms, vdis) == (before_points, before_vms, before_vdis)
    assert snaps == before_snaps, "the failed run's snapshot is gone; the base stays"


def _check_hashes(pools: Pools, snapshot: str | None, restore_point: str | None) -> bool:
    s, t = pools.session(0), pools.session(1)

    def hashes(x: XapiSession, vm: str) -> dict[str, str]:
        return {
            x.api.VBD.get_userdevice(b): x.api.sim.hash(x.api.VDI.get_uuid(x.api.VBD.get_VDI(b)))
            for b in x.api.VM.get_VBDs(vm)
            if x.api.VBD.get_type(b) == "Disk"
        }

    return hashes(s, s.api.VM.get_by_uuid(snapshot)) == hashes(t, t.api.VM.get_by_uuid(restore_point))


def test_vm_timeout_cuts_a_slow_transfer(pools: Pools, cfg: Path) -> None:
    config = load_config(cfg)
    s = pools.session(0)
    for i in range(6):
        _write(pools, f"slow-{i}")
    before_points, before_vms, before_vdis, _ = _state(pools, cfg)
    s.api.sim.fault_rate(str(256 * 1024))  # a 2 MiB block takes 8 s at this rate
    try:
        with connected(config, config.job(JOB), interactive=False) as c:
            spec = dataclasses.replace(spec_of(c.job, None), vm_timeout=1.5)
            report = run_job(c.source, [ref for ref, _ in selected_vms(c)], targets_of(c), spec)
    finally:
        s.api.sim.fault_clear()
    tr = report.vms[0].targets[0]
    assert tr.outcome == "failure" and tr.error and "deadline" in tr.error
    assert not tr.warnings, "a timeout is not retried"
    assert _state(pools, cfg)[:3] == (before_points, before_vms, before_vdis)
