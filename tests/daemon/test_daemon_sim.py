"""The daemon against the simulator: best effort with a slowed transfer (in-process, fake clock,
the real runner), and `xencr daemon` as a process: /metrics, SIGHUP, a manual run refused while
the daemon transfers, SIGTERM mid-transfer (cancelled cleanly within the grace, exit 0, nothing
left behind) and the next run succeeding."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from daemontest import (
    MIB,
    PASSWORD,
    disk_hashes,
    incomplete,
    job_snapshots,
    session,
    wait_for,
    write_blocks,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from xencr.cli.app import app
from xencr.config import load_config
from xencr.replication.jobs import run_configured
from xencr.replication.runner import SAME_JOB_BUSY
from xencr.schedule import FakeClock
from xencr.service import locks
from xencr.service.daemon import Daemon
from xencr.sim.harness import RunningSimulator, running_simulator
from xencr.state import StateDB

SLOW = 128 * 1024  # bytes/s: four changed blocks (8 MiB) take about a minute


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSimulator]:
    with running_simulator(
        tmp_path_factory.mktemp("sim"), pools=2, vms=2, disk_size=16 * MIB, password=PASSWORD
    ) as s:
        yield s


class InProcess:
    """A daemon loop in a thread on a fake clock, with the real runner."""

    def __init__(self, cfg: Path, clock: FakeClock) -> None:
        self.clock = clock
        self.out = io.StringIO()
        self.daemon = Daemon(lambda: load_config(cfg), stream=self.out, clock=clock)
        self.result: list[int] = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(self.daemon.run_forever()), daemon=True
        )
        self.thread.start()
        assert clock.wait_for_sleeper()

    def tick(self, delta: timedelta) -> None:
        n = self.clock.waits
        self.clock.advance(delta)
        assert self.clock.wait_for_sleeper(since=n)

    def stop(self) -> int:
        self.daemon.request_stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), self.out.getvalue()
        return self.result[0]


def _finished_runs(state: Path, job: str) -> list[int]:
    with StateDB(state) as db:
        return [r.id for r in db.runs(job) if r.outcome != "running"]


def test_best_effort_skips_the_vm_in_flight_and_runs_the_idle_one(
    sim: RunningSimulator, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, sim.urls, job="be", vms=["vm0", "vm1"], every="10m")
    config = load_config(cfg)
    state, job = config.state.path, config.job("be")
    s, t = session(sim.urls[0]), session(sim.urls[1])
    # A year ahead (status trusts a recorded next fire only when it is still to come), at :05.
    start = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(days=365)
    clock = FakeClock(start.replace(minute=start.minute // 10 * 10 + 5))
    d = InProcess(cfg, clock)
    try:
        d.tick(timedelta(minutes=5))  # tick 1: both VMs, full
        wait_for(lambda: len(_finished_runs(state, "be")) == 1, "the first run")
        write_blocks(s, "vm0", 4, "be")
        s.api.sim.fault_rate(str(SLOW))
        d.tick(timedelta(minutes=10))  # tick 2: vm1 (nothing changed) ends, vm0 crawls

        def vm1_done_vm0_in_flight() -> bool:
            with StateDB(state) as db:
                runs = db.runs("be")
                if len(runs) < 2:
                    return False
                tasks = {x.vm_name: x for x in db.tasks(runs[1].id)}
            vm1 = tasks.get("vm1")
            if vm1 is None or vm1.finished_at is None:
                return False
            # Its task is recorded finished just before the run lets go of its lock: wait for both,
            # or the next tick may find vm1 still held (and skip it, rightly).
            free = locks.read_holder(locks.lock_dir(state), vm1.vm_uuid, vm1.target_sr, wait=0) is None
            return free and bool(incomplete(t))

        wait_for(vm1_done_vm0_in_flight, "vm0 in flight while vm1 is done")
        d.tick(timedelta(minutes=10))  # tick 3: vm0 still busy -> skipped, vm1 runs
        wait_for(lambda: len(_finished_runs(state, "be")) == 2, "the third run")
        with StateDB(state) as db:
            runs = db.runs("be")
            third = next(r for r in runs if r.id == _finished_runs(state, "be")[1])
            tasks = {x.vm_name: x for x in db.tasks(third.id)}
        assert third.outcome == "success", "a skip is not a failure"
        assert (tasks["vm0"].outcome, tasks["vm0"].error) == ("skipped", SAME_JOB_BUSY)
        assert tasks["vm1"].outcome == "success"
        # The skip as history and status show it; status's next run is the daemon's recorded fire.
        r = CliRunner().invoke(app, ["history", "be", "--json", "--config", str(cfg)])
        shown = next(x for x in json.loads(r.stdout) if x["id"] == third.id)
        assert shown["outcome"] == "success"
        assert ("vm0", "skipped", SAME_JOB_BUSY) in {
            (x["vm_name"], x["outcome"], x["error"]) for x in shown["tasks"]
        }
        r = CliRunner().invoke(app, ["status", "be", "--json", "--config", str(cfg)])
        rows = {x["vm_name"]: x for x in json.loads(r.stdout)}
        assert rows["vm0"]["last_outcome"] == "skipped" and rows["vm1"]["last_outcome"] == "success"
        assert rows["vm0"]["next_run"] == (clock.now() + timedelta(minutes=10)).isoformat()
        # Stop with grace 0: the crawling transfer is cancelled and cleaned up.
        s.api.sim.fault_clear()
        assert d.stop() == 0
    finally:
        s.api.sim.fault_clear()
        if d.thread.is_alive():
            d.stop()
    with StateDB(state) as db:
        second = db.runs("be")[1]
        tasks = {x.vm_name: x for x in db.tasks(second.id)}
    assert tasks["vm0"].outcome == "interrupted" and "cancelled" in (tasks["vm0"].error or "")
    assert tasks["vm1"].outcome == "success"
    assert incomplete(t) == [], "nothing of the cancelled transfer is left on the target"
    assert len(job_snapshots(s, "vm0", job.id)) == 1, "only the base snapshot stays on the source"
    # The next tick finds vm0 idle and runs it.
    d = InProcess(cfg, clock)
    d.tick(timedelta(minutes=10))
    wait_for(lambda: len(_finished_runs(state, "be")) == 4, "the fourth run")
    assert d.stop() == 0
    with StateDB(state) as db:
        fourth = db.runs("be")[-1]
        tasks = {x.vm_name: x for x in db.tasks(fourth.id)}
    assert fourth.outcome == "success"
    assert (tasks["vm0"].outcome, tasks["vm0"].transfer) == ("success", "delta")
    vm0 = s.api.VM.get_by_name_label("vm0")[0]
    newest_snapshot = s.api.VM.get_uuid(next(iter(job_snapshots(s, "vm0", job.id))))
    assert tasks["vm0"].restore_point
    assert disk_hashes(s, newest_snapshot) == disk_hashes(t, tasks["vm0"].restore_point)
    assert disk_hashes(s, s.api.VM.get_uuid(vm0)) == disk_hashes(t, tasks["vm0"].restore_point)
    s.logout()
    t.logout()


class Process:
    """`xencr daemon` as a child process; its stdout lines collected by a thread."""

    def __init__(self, cfg: Path) -> None:
        argv = [sys.executable, "-m", "xencr.cli", "daemon", "--config", str(cfg)]
        self.proc = subprocess.Popen(
            [*argv, "--metrics-listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, *words: str, timeout: float = 60) -> str:
        found: list[str] = []

        def seen() -> bool:
            found[:] = [x for x in self.lines if all(w in x for w in words)]
            return bool(found) or self.proc.poll() is not None

        wait_for(seen, f"a daemon line with {words}", timeout)
        assert found, "\n".join(self.lines)
        return found[0]

    def count(self, *words: str) -> int:
        return sum(all(w in x for w in words) for x in self.lines)


def test_daemon_process_metrics_reload_refusal_and_sigterm(sim: RunningSimulator, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, sim.urls, job="svc", vms=["vm0"], every="3s", daemon="grace = 1")
    config = load_config(cfg)
    state, job = config.state.path, config.job("svc")
    s, t = session(sim.urls[0]), session(sim.urls[1])
    p = Process(cfg)
    try:
        started = p.wait_line("event=started")
        address = started.split("metrics=")[1].split()[0]
        p.wait_line("event=run_finished", "job=svc", "outcome=success")
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
            families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        tasks = {
            x.labels["outcome"]: x.value for x in families["xencr_tasks"].samples if x.labels["job"] == "svc"
        }
        assert tasks.get("success", 0) >= 1
        ages = [x for x in families["xencr_restore_point_age_seconds"].samples if x.labels["vm"] == "vm0"]
        assert ages and ages[0].value >= 0
        sent = {x.labels["kind"]: x.value for x in families["xencr_bytes_sent"].samples}
        assert sent.get("full", 0) > 0

        # SIGHUP: a bad file is refused and the old one kept; a good one is taken.
        good = cfg.read_text()
        cfg.write_text(good + "bogus = 1\n")
        p.proc.send_signal(signal.SIGHUP)
        assert "bogus" in p.wait_line("event=reload_failed")
        yearly = '[[jobs.svc.schedules]]\nid = "yearly"\ncron = "@yearly"\n'
        cfg.write_text(good.replace("[daemon]", yearly + "[daemon]"))
        p.proc.send_signal(signal.SIGHUP)
        assert "schedules=2" in p.wait_line("event=reloaded")

        # A slow transfer in the daemon; a manual run of the same VM and target is refused.
        write_blocks(s, "vm0", 4, "svc")
        s.api.sim.fault_rate(str(SLOW))
        slowed_at = datetime.now(UTC)

        def slow_task_in_flight() -> bool:
            with StateDB(state) as db:
                flying = [
                    x
                    for r in db.runs("svc")
                    for x in db.tasks(r.id)
                    if x.started_at > slowed_at and x.finished_at is None
                ]
            return bool(flying) and bool(incomplete(t))

        wait_for(slow_task_in_flight, "the daemon's slowed transfer")
        r = CliRunner().invoke(app, ["run", "svc", "--config", str(cfg)])
        assert r.exit_code == 1
        refusal = [line for line in r.stderr.splitlines() if "refused" in line]
        assert len(refusal) == 1, r.stderr
        assert f"pid {p.proc.pid}" in refusal[0] and "job svc" in refusal[0]

        # SIGTERM mid-transfer: grace 1 s, then cancelled cleanly; exit 0.
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(60) == 0
        p.reader.join(10)
        assert p.count("event=stopping") == 1 and p.count("event=cancelling") == 1
        assert p.count("event=stopped") == 1
        assert PASSWORD not in "\n".join(p.lines)
    finally:
        s.api.sim.fault_clear()
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
    with StateDB(state) as db:
        runs = db.runs("svc")
        assert all(r.outcome != "running" for r in runs)
        outcomes = [x.outcome for r in runs for x in db.tasks(r.id)]
        fires = db.fires()
    assert "interrupted" in outcomes and "skipped" in outcomes
    assert fires[(job.id, "tick")][0] is not None, "the daemon recorded its fires"
    assert incomplete(t) == [], "nothing orphaned on the target"
    assert len(job_snapshots(s, "vm0", job.id)) == 1, "only the base snapshot stays on the source"
    report = run_configured(load_config(cfg), "svc")
    assert report.outcome == "success"
    tr = report.vms[0].targets[0]
    assert tr.kind == "delta" and tr.restore_point and report.vms[0].snapshot
    assert disk_hashes(s, report.vms[0].snapshot) == disk_hashes(t, tr.restore_point)
    s.logout()
    t.logout()
