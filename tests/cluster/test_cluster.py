"""Several `xencr daemon` workers sharing one PostgreSQL state, on the simulator, driven by a test
clock they all read: every fire runs once cluster-wide, every VM's task on one worker, per-pool
limits and affinity hold across workers, a killed worker's task is taken over and resumed, a
database restart loses and doubles nothing, and tasks no worker may take are reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from clustertest import (
    MIB,
    POOLS,
    Cluster,
    Job,
    assert_hash_equal,
    assert_no_overlap,
    gauge,
    incomplete,
    session,
    tick,
    wait_for,
    write,
)
from typer.testing import CliRunner

import pgcluster
from xencr.cli.app import app
from xencr.config import StateLocation, job_id_for
from xencr.coordination import queue as q
from xencr.coordination.worker import worker_rows
from xencr.sim.harness import RunningSimulator
from xencr.state import StateDB


def test_three_workers_share_the_fires_the_limits_and_respect_affinity(
    sim: RunningSimulator, tmp_path: Path, fresh_pg: StateLocation, pg_password: str
) -> None:
    jobs = [Job("ja", "a", [f"vm{i}" for i in range(5)]), Job("jc", "c", [f"vm{i}" for i in range(6)])]
    jobs[0].vms.append("vm5")  # 6 VMs on each source pool
    c = Cluster(tmp_path, sim, fresh_pg, pg_password, jobs)
    try:
        c.start("w1", ["a", "b"])  # site a only: never a task of pool c
        c.start("w2")
        c.start("w3")
        c.alive("w1", "w2", "w3")
        cycles = [tick(1), tick(2)]
        for n, at in enumerate(cycles):
            if n:
                for pool in ("a", "c"):
                    for i in range(6):
                        write(sim, pool, f"vm{i}", f"{pool}{i}-{n}", [i, 7])
            done = c.fire(at, expect=12)
            assert Counter((r.job_id, r.vm_uuid) for r in done).most_common(1)[0][1] == 1, "one task per VM"
            assert {r.outcome for r in done} == {"success"}, [(r.vm_name, r.outcome) for r in done]
    finally:
        c.stop_all()
    with StateDB(fresh_pg) as db:
        runs = db.runs()
        tasks = db.all_tasks()
        fires = db.fires()
    # One run per task, named by the worker that claimed it; fires recorded once for everyone.
    assert len(runs) == 24 and all(r.worker in c.workers for r in runs)
    assert {r.schedule_id for r in runs} == {"tick"}
    assert len(tasks) == 24 and all(t.worker is not None and t.outcome == "success" for t in tasks)
    by_job = {r.id: r.job_name for r in runs}
    assert "w1" not in {t.worker for t in tasks if by_job[t.run_id] == "jc"}, "w1 may not touch pool c"
    assert len({t.worker for t in tasks}) > 1, "the work spread over several workers"
    assert {k[0]: v[0] for k, v in fires.items()} and all(last == cycles[-1] for last, _ in fires.values())
    assert_no_overlap(tasks)
    newest = {}
    for t in sorted(tasks, key=lambda t: t.id):
        newest[(by_job[t.run_id], t.vm_uuid)] = t
    assert len(newest) == 12
    for (job, _), t in newest.items():
        assert t.restore_point is not None
        assert_hash_equal(sim, "a" if job == "ja" else "c", t.restore_point)
    # max_exports = 1 on pool a held across the three workers; the pools' own counters say so.
    assert gauge(sim, "a")["exports_peak"] == 1
    assert 1 <= gauge(sim, "b")["imports_peak"] <= 2 * len(POOLS)
    assert incomplete(sim) == []
    for w in c.workers.values():
        assert w.has("event=worker_stopped"), w.lines[-20:]


def _vm_uuid(sim: RunningSimulator, pool: str, name: str) -> str:
    s = session(sim, pool)
    try:
        return str(s.api.VM.get_uuid(s.api.VM.get_by_name_label(name)[0]))
    finally:
        s.logout()


def test_a_killed_workers_task_is_taken_over_after_its_lease_and_resumed(
    sim: RunningSimulator, tmp_path: Path, fresh_pg: StateLocation, pg_password: str
) -> None:
    write(sim, "a", "vm5", "kill", list(range(12)))  # a full of 24 MiB
    c = Cluster(tmp_path, sim, fresh_pg, pg_password, [Job("jk", "a", ["vm5"])])
    job_id, vm = job_id_for("jk"), _vm_uuid(sim, "a", "vm5")
    src = session(sim, "a")
    try:
        c.start("k1", slots=1)
        c.start("k2", slots=1)
        c.alive("k1", "k2")
        src.api.sim.fault_rate(str(3 * MIB))  # slow exports: the transfer is killed midway
        c.set_clock(tick(1))

        def midway() -> bool:
            with StateDB(fresh_pg) as db:
                row = db.resume_of(job_id, vm, c.sr)
            d = row.disks[0] if row is not None and row.disks else None
            return d is not None and d.blocks > 0 and d.position * 10 >= d.blocks * 3

        wait_for(midway, "the transfer a third through")
        with StateDB(fresh_pg) as db:
            (claimed,) = q.rows(db, state="claimed")
        victim = c.workers[claimed.worker or ""]
        victim.kill()
        src.api.sim.fault_clear()
        (done,) = c.fire(tick(1), expect=1)
    finally:
        src.logout()
        c.stop_all()
    survivor = "k2" if victim.name == "k1" else "k1"
    assert (done.state, done.outcome, done.worker) == ("done", "success", survivor)
    with StateDB(fresh_pg) as db:
        runs = db.runs()
        tasks = db.all_tasks()
        _, workers = worker_rows(db)
    killed_run, taken_run = runs
    assert (killed_run.worker, killed_run.outcome) == (victim.name, "interrupted")
    assert (taken_run.worker, taken_run.outcome) == (survivor, "success")
    # Nobody took the task before the dead worker's lease had lapsed (the database's clock).
    beat = next(w for w in workers if w.name == victim.name)
    assert done.claimed_at is not None and done.claimed_at >= beat.heartbeat_at + timedelta(seconds=6)
    (task,) = [t for t in tasks if t.run_id == taken_run.id]
    # The killed worker's attempt, with its record, is continued rather than sent again.
    assert any("resumed at" in r for r in task.reasons.values()) and not task.cleaned, task
    assert task.restore_point is not None
    assert_hash_equal(sim, "a", task.restore_point)
    assert_no_overlap(tasks)
    assert incomplete(sim) == []


def _pg_ctl(root: Path, *args: str) -> None:
    bins = pgcluster.bindir()
    assert bins is not None
    # The server's output to its log: a pipe it inherited would never reach end of file.
    argv = [str(bins / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"), *args]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)


@pytest.fixture
def own_pg(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, StateLocation, str]]:
    """A PostgreSQL server of this test alone (it restarts it)."""
    root = Path(tempfile.mkdtemp(prefix="xencr-pg-restart-"))
    try:
        cluster = pgcluster.start(root)
        monkeypatch.setenv("XENCR_RESTART_PG_PASSWORD", cluster.password)
        yield root, StateLocation(url=cluster.url, password_env="XENCR_RESTART_PG_PASSWORD"), cluster.password
    finally:
        pgcluster.stop(root)
        shutil.rmtree(root, ignore_errors=True)


def test_a_database_restart_mid_run_loses_and_doubles_nothing(
    sim: RunningSimulator, tmp_path: Path, own_pg: tuple[Path, StateLocation, str]
) -> None:
    root, state, password = own_pg
    StateDB(state).close()  # the schema, before the workers race for it
    vms = [f"vm{i}" for i in range(4)]
    c = Cluster(tmp_path, sim, state, password, [Job("jr", "a", vms)])
    try:
        c.start("r1", lease="10s")
        c.start("r2", lease="10s")
        c.alive("r1", "r2")
        c.set_clock(tick(1))

        def running() -> bool:
            with StateDB(state) as db:
                return any(r.run_id is not None for r in q.rows(db, state="claimed"))

        wait_for(running, "a task running")
        _pg_ctl(root, "-m", "fast", "-w", "-t", "60", "restart")
        first = c.fire(tick(1), expect=4)
        for i, vm in enumerate(vms):
            write(sim, "a", vm, f"restart-{i}", [i])
        second = c.fire(tick(2), expect=4)
    finally:
        c.stop_all()
    assert "fast shutdown request" in (root / "server.log").read_text(), "the server did restart"
    assert [(r.state, r.outcome) for r in first + second] == [("done", "success")] * 8
    with StateDB(state) as db:
        runs = db.runs()
        tasks = db.all_tasks()
        rows = q.rows(db)
    # Each fire's whole-job task expanded once into its VMs' tasks.
    assert sorted((r.fire_at, r.outcome) for r in rows if r.whole_job) == [
        (tick(1), q.EXPANDED),
        (tick(2), q.EXPANDED),
    ]
    queued = [r for r in rows if not r.whole_job]
    assert len(queued) == 8 and len({(r.fire_at, r.vm_uuid) for r in queued}) == 8
    # One run per task, each linked from its queue row: nothing lost, nothing run twice.
    assert sorted(r.run_id or 0 for r in queued) == sorted(r.id for r in runs)
    assert {r.outcome for r in runs} == {"success"} and len(tasks) == 8
    assert Counter(t.vm_uuid for t in tasks) == Counter({t.vm_uuid: 2 for t in tasks})
    for t in tasks:
        if t.run_id in {r.run_id for r in second}:
            assert t.restore_point is not None
            assert_hash_equal(sim, "a", t.restore_point)
    assert_no_overlap(tasks)
    assert incomplete(sim) == []


def test_tasks_no_live_worker_may_take_are_reported_until_one_comes(
    sim: RunningSimulator, tmp_path: Path, fresh_pg: StateLocation, pg_password: str
) -> None:
    c = Cluster(tmp_path, sim, fresh_pg, pg_password, [Job("ju", "c", ["vm0"])])
    cfg = c.config("cli", [], lease="6s", slots=1)
    try:
        u1 = c.start("u1", ["a", "b"])
        c.alive("u1")
        c.set_clock(tick(1))
        wait_for(lambda: u1.has("event=task_unserved", "pools=c,b"), "the unserved task in the log", 60)
        code, out = cli("worker", "list", "--json", "--config", str(cfg))
        assert code == 0, out
        listed = json.loads(out)
        assert [(w["name"], w["alive"], w["pools"], w["tasks_running"]) for w in listed["workers"]] == [
            ("u1", True, ["a", "b"], 0)
        ]
        assert [(u["vm_uuid"], u["pools"], u["fire_at"]) for u in listed["unserved"]] == [
            (None, ["c", "b"], tick(1).isoformat())
        ]
        code, out = cli("status", "--json", "--config", str(cfg))
        assert code == 0, out
        (row,) = json.loads(out)
        assert (row["vm_name"], row["unserved_since"]) == ("vm0", tick(1).isoformat())
        code, out = cli("metrics", "--config", str(cfg))
        assert (
            code == 0 and "\nxencr_tasks_unserved 1\n" in out and 'xencr_worker_up{worker="u1"} 1' in out
        ), out
        c.start("u2", ["c", "b"])
        (done,) = c.fire(tick(1), expect=1)
    finally:
        c.stop_all()
    assert (done.vm_name, done.worker, done.outcome) == ("vm0", "u2", "success")
    with StateDB(fresh_pg) as db:
        (whole,) = [r for r in q.rows(db) if r.whole_job]
        assert (whole.outcome, whole.worker) == (q.EXPANDED, "u2")
        assert {t.worker for t in db.all_tasks()} == {"u2"}, "u1 may not touch pool c"
    code, out = cli("history", "--config", str(cfg))
    assert code == 0 and "on worker u2" in out, out
    code, out = cli("metrics", "--config", str(cfg))
    assert code == 0 and 'xencr_worker_tasks_total{worker="u2",outcome="success"} 1\n' in out, out
    assert 'xencr_worker_tasks_total{worker="u1"' not in out, "u1 ran nothing"
    (sent,) = [
        line for line in out.splitlines() if line.startswith('xencr_worker_bytes_sent_total{worker="u2"}')
    ]
    assert float(sent.split()[1]) > 0
    code, out = cli("worker", "list", "--config", str(cfg))
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["u1", "u2"], out
    assert all(line.split()[5] == "stopped" for line in out.splitlines()[1:]), out


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout + result.stderr
