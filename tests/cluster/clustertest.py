"""Helpers of the cluster tests: one simulator (pools a and c hold the VMs, b is the target),
`xencr daemon` worker processes sharing a PostgreSQL state and a test clock file, and the checks
the tests share (hash-equal restore points, no overlapping attempts, no orphans)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from xencr.config import StateLocation
from xencr.coordination import queue as q
from xencr.coordination.worker import worker_rows
from xencr.replication import metadata as md
from xencr.schedule.clock import CLOCK_FILE_ENV
from xencr.sim.harness import RunningSimulator
from xencr.state import StateDB, TaskRow
from xencr.xapi.session import Endpoint, XapiSession

MIB = 1024 * 1024
PASSWORD = "cluster-pw"
POOLS = {"a": 0, "b": 1, "c": 2}  # configured name -> simulator pool
T0 = datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)


def session(sim: RunningSimulator, pool: str) -> XapiSession:
    return XapiSession(Endpoint(sim.urls[POOLS[pool]]), "root", PASSWORD, retries=1, backoff=0.05)


def wait_for(cond: Callable[[], object], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@dataclass
class Job:
    name: str
    pool: str  # the source pool
    vms: list[str]
    concurrency: int = 4


@dataclass
class WorkerProc:
    """`xencr daemon` as one worker of the cluster; its log collected by a thread."""

    name: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def has(self, *words: str) -> bool:
        return any(all(w in line for w in words) for line in self.lines)


class Cluster:
    """The configuration, clock and workers of one test."""

    def __init__(
        self, tmp: Path, sim: RunningSimulator, state: StateLocation, password: str, jobs: list[Job]
    ) -> None:
        self.tmp, self.sim, self.state, self.pg_password = tmp, sim, state, password
        self.jobs = jobs
        self.clock = tmp / "clock"
        self.set_clock(T0)
        self.pw = tmp / "pool-pw"
        self.pw.write_text(PASSWORD)
        os.chmod(self.pw, 0o600)
        t = session(sim, "b")
        try:
            self.sr = str(t.api.SR.get_uuid(t.api.pool.get_default_SR(t.api.pool.get_all()[0])))
        finally:
            t.logout()
        self.workers: dict[str, WorkerProc] = {}

    def set_clock(self, t: datetime) -> None:
        """Every worker's time (written whole, then renamed: never read half-written)."""
        part = self.clock.with_suffix(".new")
        part.write_text(t.isoformat())
        part.replace(self.clock)

    def now(self) -> datetime:
        return datetime.fromisoformat(self.clock.read_text())

    def config(self, worker: str, pools: list[str], *, lease: str, slots: int) -> Path:
        text = f'[state]\nurl = "{self.state.url}"\npassword_env = "XENCR_TEST_PG_PASSWORD"\n'
        for name in POOLS:
            text += f'[pools.{name}]\nurl = "{self.sim.urls[POOLS[name]]}"\npassword_file = "{self.pw}"\n'
            text += "max_exports = 1\n" if name == "a" else ""
        for j in self.jobs:
            text += (
                f'[jobs.{j.name}]\npool = "{j.pool}"\nvms = {json.dumps(j.vms)}\n'
                f'transfer = "stream"\nconcurrency = {j.concurrency}\n'
                f'[[jobs.{j.name}.targets]]\npool = "b"\nsr = "{self.sr}"\n'
                f'[[jobs.{j.name}.schedules]]\nid = "tick"\nevery = "1m"\nretention = 2\n'
            )
        text += f'[daemon]\ngrace = 0\n[worker]\nname = "{worker}"\npools = {json.dumps(pools)}\n'
        text += f'lease = "{lease}"\nslots = {slots}\n'
        path = self.tmp / f"{worker}.toml"
        path.write_text(text)
        return path

    def start(
        self, name: str, pools: list[str] | None = None, *, lease: str = "6s", slots: int = 3
    ) -> WorkerProc:
        cfg = self.config(name, pools or [], lease=lease, slots=slots)
        env = {k: v for k, v in os.environ.items() if not k.startswith("XENCR_")}
        env |= {CLOCK_FILE_ENV: str(self.clock), "XENCR_TEST_PG_PASSWORD": self.pg_password}
        env |= {"HOME": str(self.tmp / "home"), "XDG_DATA_HOME": str(self.tmp / f"data-{name}")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "xencr.cli", "daemon", "--config", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        w = WorkerProc(name, proc)
        threading.Thread(target=w.read, daemon=True).start()
        self.workers[name] = w
        return w

    def alive(self, *names: str) -> None:
        """Wait until these workers heartbeat."""

        def up() -> bool:
            for n in names:
                w = self.workers[n]
                assert w.proc.poll() is None, "\n".join(w.lines)
            with StateDB(self.state) as db:
                now, rows = worker_rows(db)
            return {r.name for r in rows if r.alive(now)} >= set(names)

        wait_for(up, f"workers {names} alive", 60)

    def stop_all(self) -> None:
        for w in self.workers.values():
            w.stop()

    def tasks_of(self, fire_at: datetime) -> list[q.QueueRow]:
        with StateDB(self.state) as db:
            return [r for r in q.rows(db) if r.fire_at == fire_at]

    def fire(self, at: datetime, *, expect: int, timeout: float = 180) -> list[q.QueueRow]:
        """Move every clock to ``at`` and wait until the fire's ``expect`` VM tasks are done."""
        self.set_clock(at)

        def done() -> bool:
            for w in self.workers.values():
                assert w.proc.poll() is None or w.proc.returncode == -signal.SIGKILL, "\n".join(w.lines[-40:])
            rows = [r for r in self.tasks_of(at) if not r.whole_job]
            return len(rows) >= expect and all(r.state == "done" for r in self.tasks_of(at))

        wait_for(done, f"the {expect} tasks of the fire at {at}", timeout)
        return [r for r in self.tasks_of(at) if not r.whole_job]


def tick(n: int) -> datetime:
    """The n-th minute's fire after T0."""
    return T0.replace(second=0) + timedelta(minutes=n)


def tasks_by_target(tasks: list[TaskRow]) -> dict[tuple[str, str], list[TaskRow]]:
    out: dict[tuple[str, str], list[TaskRow]] = {}
    for t in tasks:
        out.setdefault((t.vm_uuid, t.target_sr), []).append(t)
    return out


def assert_no_overlap(tasks: list[TaskRow]) -> None:
    """No (VM, target) ever had two attempts at once: per pair, each task started after the one
    before it finished (skipped tasks never attempted anything)."""
    for key, ts in tasks_by_target([t for t in tasks if t.outcome != "skipped"]).items():
        ts.sort(key=lambda t: t.started_at)
        for before, after in itertools.pairwise(ts):
            assert before.finished_at is not None and before.finished_at <= after.started_at, (
                key,
                before,
                after,
            )


def disk_hashes(x: XapiSession, vm_uuid: str) -> dict[str, str]:
    vm = x.api.VM.get_by_uuid(vm_uuid)
    return {
        str(x.api.VBD.get_userdevice(b)): str(x.api.sim.hash(x.api.VDI.get_uuid(x.api.VBD.get_VDI(b))))
        for b in x.api.VM.get_VBDs(vm)
        if x.api.VBD.get_type(b) == "Disk"
    }


def assert_hash_equal(sim: RunningSimulator, source: str, restore_point: str) -> None:
    """The restore point's disks equal those of the source snapshot it is a copy of."""
    s, t = session(sim, source), session(sim, "b")
    try:
        snap = t.api.VM.get_other_config(t.api.VM.get_by_uuid(restore_point))[md.COPY_OF]
        assert disk_hashes(s, snap) == disk_hashes(t, restore_point), restore_point
    finally:
        s.logout()
        t.logout()


def incomplete(sim: RunningSimulator) -> list[str]:
    """Replica VMs and disks on the target marked incomplete (in flight, or left behind)."""
    t = session(sim, "b")
    try:
        records = [*t.api.VM.get_all_records().values(), *t.api.VDI.get_all_records().values()]
        return [r["uuid"] for r in records if r["other_config"].get(md.COMPLETE) == "false"]
    finally:
        t.logout()


def write(sim: RunningSimulator, pool: str, vm: str, seed: str, blocks: list[int]) -> None:
    """Guest writes into the VM's first disk, one 2 MiB block each."""
    s = session(sim, pool)
    try:
        ref = s.api.VM.get_by_name_label(vm)[0]
        vbd = next(b for b in s.api.VM.get_VBDs(ref) if s.api.VBD.get_type(b) == "Disk")
        uuid = s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd))
        for b in blocks:
            s.api.sim.write(uuid, str(b * 2 * MIB), str(2 * MIB), f"{seed}-{b}")
    finally:
        s.logout()


def gauge(sim: RunningSimulator, pool: str) -> dict[str, int]:
    s = session(sim, pool)
    try:
        return {k: int(v) for k, v in s.api.sim.transfer_gauge().items()}
    finally:
        s.logout()
