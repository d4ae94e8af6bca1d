"""Best effort against the simulator: overlapping runs of a VM/target (threads and processes)
skip it rather than collide, the skip is recorded and is no failure, another job is refused with
one line naming the holder; a per-VM timeout and a cancel leave nothing behind on either pool and
the next run succeeds."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import typer
from runnertest import JOB, OTHER, exporting, snapshot, spawn_held, wait_for, write_config
from typer.testing import CliRunner
from xapitest import Pools, change

from xencr.cli.run import run_command
from xencr.config import load_config
from xencr.replication.jobs import run_configured
from xencr.replication.runner import CANCELLED, SAME_JOB_BUSY, RunReport
from xencr.state import RunRow, StateDB, TaskRow

app = typer.Typer()
app.command("run")(run_command)


@app.command("version")
def _version() -> None:
    """A second command, so that `run` stays a sub-command as in the real CLI."""


SLOW = 64 * 1024  # bytes/s: one changed 2 MiB block takes half a minute


@pytest.fixture(scope="module")
def cfg(pools: Pools, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job over both VMs with one restore point each already (the runs below are deltas)."""
    c = write_config(tmp_path_factory.mktemp("be"), pools)
    assert run_configured(load_config(c), JOB).outcome == "success"
    return c


def _run_of(cfg: Path, report: RunReport) -> RunRow:
    """The state database's run that produced ``report`` (the newest started before it)."""
    with StateDB(load_config(cfg).state.path) as db:
        return next(r for r in reversed(db.runs(report.job)) if r.started_at <= report.started)


def _tasks(cfg: Path, report: RunReport) -> dict[str, TaskRow]:
    """The tasks of the run that produced ``report``, by VM name."""
    with StateDB(load_config(cfg).state.path) as db:
        return {t.vm_name: t for t in db.tasks(_run_of(cfg, report).id)}


def _sr(cfg: Path) -> str:
    return load_config(cfg).job(JOB).targets[0].sr


def _sr_name(pools: Pools, cfg: Path) -> str:
    """How runs name the target SR: as the pool names it (the job names it by UUID)."""
    t = pools.session(1)
    return str(t.api.SR.get_name_label(t.api.SR.get_by_uuid(_sr(cfg))))


def test_overlapping_runs_in_threads_skip_the_busy_vm_and_cancel_leaves_nothing(
    pools: Pools, cfg: Path
) -> None:
    config = load_config(cfg)
    change(pools, "vm0", 2, "threads")
    before = snapshot(pools)
    s = pools.session(0)
    cancel = threading.Event()
    first: list[RunReport] = []
    # vm0's transfer is slowed; vm1 has no change, so its delta is a few KiB even at this rate.
    s.api.sim.fault_rate(str(SLOW))
    worker = threading.Thread(
        target=lambda: first.append(
            run_configured(config, JOB, only=["vm0"], trigger="schedule", cancel=cancel)
        )
    )
    worker.start()
    try:
        wait_for(lambda: exporting(pools), "the first run to export vm0")
        second = run_configured(config, JOB, trigger="schedule")
    finally:
        cancel.set()
        worker.join(120)
        s.api.sim.fault_clear()
    assert not worker.is_alive()

    # The second run skipped vm0 (still in flight) and replicated the idle vm1: not a failure.
    vm0, vm1 = second.vms
    assert (vm0.vm_name, vm0.outcome, vm0.snapshot) == ("vm0", "skipped", None)
    assert (vm0.targets[0].outcome, vm0.targets[0].error) == ("skipped", SAME_JOB_BUSY)
    assert vm0.targets[0].holder and vm0.targets[0].holder.startswith(f"job {JOB} (pid ")
    assert vm1.outcome == "success" and second.outcome == "success"
    tasks = _tasks(cfg, second)
    assert (tasks["vm0"].outcome, tasks["vm0"].error) == ("skipped", SAME_JOB_BUSY)
    assert tasks["vm1"].outcome == "success" and tasks["vm1"].snapshot_time is not None

    # The first run was cancelled mid-transfer: interrupted, and nothing of it remains.
    (a,) = first
    assert (a.vms[0].targets[0].outcome, a.vms[0].targets[0].error) == ("interrupted", CANCELLED)
    assert a.outcome == "interrupted" and _run_of(cfg, a).outcome == "interrupted"
    assert _run_of(cfg, second).outcome == "success"
    a_task = _tasks(cfg, a)["vm0"]
    assert (a_task.outcome, a_task.error, a_task.restore_point) == ("interrupted", CANCELLED, None)
    after = snapshot(pools)
    assert not after.incomplete, "no partial replica or disk left on the target"
    assert after.tasks == before.tasks, "both pools' transfer tasks were cancelled and destroyed"
    assert len(after.target_vms - before.target_vms) == 1, "only vm1's new restore point"
    assert len(after.source_snapshots) == len(before.source_snapshots), "one base per VM, no extra"

    # The next run finds vm0 idle and sends it.
    third = run_configured(config, JOB)
    assert [v.outcome for v in third.vms] == ["success", "success"]
    assert third.vms[0].targets[0].kind == "delta" and not third.vms[0].targets[0].cleaned


def test_a_second_process_holds_the_vm_target(pools: Pools, cfg: Path, tmp_path: Path) -> None:
    config = load_config(cfg)
    change(pools, "vm0", 1, "process")
    proc, marker = spawn_held(cfg, JOB, ["vm0"], "before-transfer", tmp_path)
    try:
        wait_for(marker.exists, "the other process to reach its transfer")
        # The same job in this process: vm0 is skipped as still running, vm1 runs.
        same = run_configured(config, JOB)
        assert [(v.vm_name, v.outcome) for v in same.vms] == [("vm0", "skipped"), ("vm1", "success")]
        assert same.vms[0].targets[0].error == SAME_JOB_BUSY
        assert same.vms[0].targets[0].holder is not None
        assert f"(pid {proc.pid})" in same.vms[0].targets[0].holder

        # Another job, by hand: one refusal line naming the holder, exit code 1.
        result = CliRunner().invoke(app, ["run", OTHER, "--config", str(cfg)])
        assert result.exit_code == 1, result.output
        refusals = [line for line in result.stderr.splitlines() if "refused" in line]
        pattern = (
            rf"xencr: vm0 -> b/{re.escape(_sr_name(pools, cfg))}: refused: being replicated by job {JOB} "
            rf"\(pid {proc.pid}\) since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\dZ"
        )
        assert len(refusals) == 1 and re.fullmatch(pattern, refusals[0]), refusals
        with StateDB(config.state.path) as db:
            run = db.runs(OTHER)[-1]
            (task,) = db.tasks(run.id)
        assert run.outcome == "skipped" and task.outcome == "skipped"
        assert task.error and task.error.startswith(
            f"skipped: being replicated by job {JOB} (pid {proc.pid})"
        )
    finally:
        proc.kill()
        proc.wait(30)
    # The killed holder's lock went with it; the next run cleans its partial replica up.
    after = run_configured(config, JOB)
    assert [v.outcome for v in after.vms] == ["success", "success"]
    assert after.vms[0].targets[0].cleaned, "the killed run's replica was cleaned up"
    assert not snapshot(pools).incomplete


def test_sigterm_stops_xencr_run_cleanly(pools: Pools, cfg: Path) -> None:
    """What systemd does to a timer's `xencr run` when stopped: the run ends with nothing left."""
    change(pools, "vm0", 2, "sigterm")
    before = snapshot(pools)
    pools.session(0).api.sim.fault_rate(str(SLOW))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xencr.cli", "run", JOB, "--vm", "vm0", "--config", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: exporting(pools), "the run to export vm0")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        pools.session(0).api.sim.fault_clear()
    assert proc.returncode == 1, (out, err)
    assert "xencr: stopping" in err and f"vm0 -> b/{_sr_name(pools, cfg)}: interrupted: {CANCELLED}" in out
    assert snapshot(pools) == before, "nothing half-sent on the target, no extra snapshot, no task"
    with StateDB(load_config(cfg).state.path) as db:
        run = db.runs(JOB)[-1]
        (task,) = db.tasks(run.id)
    assert (run.outcome, task.outcome, task.error) == ("interrupted", "interrupted", CANCELLED)


def test_vm_timeout_cancels_the_transfer_and_cleans_up(pools: Pools, cfg: Path) -> None:
    slow = write_config(cfg.parent / "timeout", pools, job_extra='vm_timeout = "2s"')
    change(pools, "vm0", 2, "timeout")
    before = snapshot(pools)
    pools.session(0).api.sim.fault_rate(str(SLOW))
    try:
        report = run_configured(load_config(slow), JOB, only=["vm0"])
    finally:
        pools.session(0).api.sim.fault_clear()
    tr = report.vms[0].targets[0]
    assert tr.outcome == "failure" and tr.error and tr.error.startswith("timed out after 2s"), tr.error
    assert not tr.warnings, "a timeout is not retried"
    task = _tasks(slow, report)["vm0"]
    assert task.outcome == "failure" and task.error == tr.error
    assert snapshot(pools) == before, "no orphan VM/VDI on the target, no extra snapshot, no task"
    again = run_configured(load_config(slow), JOB, only=["vm0"])
    assert again.outcome == "success" and again.vms[0].targets[0].kind == "delta"


def test_a_cancelled_run_starts_nothing(pools: Pools, cfg: Path) -> None:
    before = snapshot(pools)
    cancel = threading.Event()
    cancel.set()
    report = run_configured(load_config(cfg), JOB, cancel=cancel, trigger="schedule")
    assert report.outcome == "interrupted"
    assert [(v.snapshot, v.targets[0].outcome, v.targets[0].error) for v in report.vms] == [
        (None, "interrupted", CANCELLED)
    ] * 2
    assert snapshot(pools) == before
    tasks = _tasks(cfg, report)
    assert {t.outcome for t in tasks.values()} == {"interrupted"} and len(tasks) == 2
    assert _run_of(cfg, report).outcome == "interrupted"
