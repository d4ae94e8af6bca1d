"""History retention (`StateDB.prune_history`, `xencr state prune`), on both engines: old runs
are forgotten with their tasks, while the metrics' totals stay exactly what they were, and the
runs the RPO and status read (each job's newest, each VM and target's newest task and newest
success) stay whatever their age. Two processes pruning at once count nothing twice."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from typer.testing import CliRunner

from xencr.cli.app import app
from xencr.config import StateLocation
from xencr.state import StateDB

NOW = datetime(2031, 6, 1, tzinfo=UTC)
SR = "sr-1"


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.base = self.now = now

    def __call__(self) -> datetime:
        return self.now


def _history(db: StateDB, clock: Clock) -> dict[str, list[int]]:
    """200 days before the clock's time of a job "web" (vm-a every day, vm-b failing for its last
    150 days), a job "gone" last run 120 days before, a DR test of a plan 100 days before, and
    three runs of web by cluster worker w1 around 160 days before. The run ids of each, oldest
    first."""
    ids: dict[str, list[int]] = {"web": [], "gone": [], "dr": [], "w1": []}
    w1 = StateDB(db.location, clock=clock, worker="w1")  # a cluster worker (`worker_totals`)
    for day in range(200, 0, -1):
        clock.now = clock.base - timedelta(days=day)
        run = db.start_run("job-web", "web", "daily", "schedule")
        ids["web"].append(run)
        full = day % 7 == 0
        a = db.start_task(run, "vm-a", "a", SR, "b/sr")
        db.finish_task(
            a,
            "success",
            transfer="full" if full else "delta",
            reasons={"xvda": "full: every 7th" if full else "delta"},
            bytes_sent=1000 + day,
            restore_point=f"rp-a-{day}",
            snapshot_time=clock.now,
            cleaned=day % 3,
        )
        b = db.start_task(run, "vm-b", "b", SR, "b/sr")
        if day > 150:
            db.finish_task(b, "success", transfer="delta", reasons={"xvda": "delta"}, bytes_sent=7)
        else:
            db.finish_task(b, "failure", error="SR_FULL", bytes_sent=3)
        db.finish_run(run, "partial" if day <= 150 else "success")
        if day == 120:
            gone = db.start_run("job-gone", "gone", None, "manual")
            ids["gone"].append(gone)
            t = db.start_task(gone, "vm-c", "c", SR)
            db.finish_task(t, "success", transfer="full", reasons={"xvda": "first run"}, bytes_sent=5)
            db.finish_run(gone, "success")
        if day == 100:
            dr = db.start_run("plan-x", "plan x", None, "dr-test")
            ids["dr"].append(dr)
            db.finish_run(dr, "success")
        if day in (160, 159, 158):
            run = w1.start_run("job-web", "web", "daily", "schedule")
            ids["w1"].append(run)
            w1.finish_task(w1.start_task(run, "vm-a", "a", SR), "success", transfer="delta", bytes_sent=100)
            w1.finish_run(run, "success")
    clock.now = clock.base
    w1.close()
    return ids


def _read_views(db: StateDB) -> tuple[object, ...]:
    """What metrics, status and the RPO read."""
    return (
        db.job_totals(),
        db.worker_totals(),
        [t.id for t in db.newest_tasks("web")],
        [t.id for t in db.newest_tasks("web", outcome="success")],
        db.last_task("vm-b", SR, outcome="success"),
        db.last_task("vm-c", SR),
    )


def test_old_runs_are_forgotten_and_the_totals_and_newest_tasks_stay(state_where: StateLocation) -> None:
    clock = Clock()
    with StateDB(state_where, clock=clock) as db:
        ids = _history(db, clock)
        before = _read_views(db)
        totals_before = db.job_totals()
        vm_b_success = db.last_task("vm-b", SR, outcome="success")
        assert vm_b_success is not None

        forgotten = db.prune_history(timedelta(days=90), batch=7)

        # Kept besides the last 90 days: vm-b's last success (day 151), job gone's only run,
        # plan x's only run. Everything else older than 90 days goes.
        recent = ids["web"][-90:]
        kept_old = {vm_b_success.run_id, *ids["gone"], *ids["dr"]}
        old = [r for r in ids["web"] + ids["gone"] + ids["dr"] + ids["w1"] if r not in recent]
        assert {r.id for r in db.runs()} == set(recent) | kept_old
        assert forgotten == 112
        assert [(w.worker, w.tasks, w.bytes_sent) for w in db.worker_totals()] == [
            ("w1", {"success": 3}, 300)
        ]
        assert forgotten == len(old) - len(kept_old)
        assert _read_views(db) == before, "the counters, the newest tasks and the RPO unchanged"
        assert db.tasks(ids["web"][0]) == []

        assert db.prune_history(timedelta(days=90)) == 0
        assert _read_views(db) == before

        # Counting goes on from there.
        run = db.start_run("job-web", "web", "daily", "schedule")
        db.finish_task(db.start_task(run, "vm-a", "a", SR), "success", transfer="delta", bytes_sent=11)
        db.finish_run(run, "success")
        web = {j.job_id: j for j in db.job_totals()}["job-web"]
        web_before = {j.job_id: j for j in totals_before}["job-web"]
        assert web.tasks["success"] == web_before.tasks["success"] + 1
        assert web.bytes_sent["delta"] == web_before.bytes_sent["delta"] + 11
        assert web.full_disks == web_before.full_disks and web.full_disks["full: every 7th"] == 28


def test_two_pruning_at_once_count_nothing_twice(state_where: StateLocation) -> None:
    clock = Clock()
    with StateDB(state_where, clock=clock) as db:
        _history(db, clock)
        before = _read_views(db)
    results: list[int] = []
    errors: list[BaseException] = []
    go = threading.Barrier(2)

    def prune() -> None:
        try:
            with StateDB(state_where, clock=clock) as other:
                go.wait()
                results.append(other.prune_history(timedelta(days=30), batch=5))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=prune) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with StateDB(state_where, clock=clock) as db:
        assert _read_views(db) == before
        assert sum(results) == 200 + 2 + 3 - 30 - 3  # 30 recent, vm-b's last success, gone, plan x
        assert len(db.runs()) == 33


def test_state_prune_command(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    cfg = tmp_path / "xencr.toml"
    # The command forgets relative to the real time: a history ending an hour ago.
    clock = Clock(datetime.now(UTC) - timedelta(hours=1))
    with StateDB(state, clock=clock) as db:
        _history(db, clock)
        totals = db.job_totals()
    runner = CliRunner()

    def prune(*args: str, keep: str | None = None) -> tuple[int, str]:
        cfg.write_text(f'state = "{state}"\n' + (f"[daemon]\nkeep_history = {keep}\n" if keep else ""))
        r = runner.invoke(app, ["state", "prune", "--config", str(cfg), *args])
        return r.exit_code, r.output

    code, out = prune(keep='"forever"')
    assert code != 0 and 'keep_history is "forever": give --keep DURATION' in out, out
    code, out = prune("--keep", "soon")
    assert code != 0 and "--keep: invalid duration 'soon'" in out, out
    code, out = prune(keep='"1m"')
    assert code != 0 and "daemon.keep_history" in out and "at least 3600" in out, out
    # The default, 90 days: days 90 to 200 of web but vm-b's last success (day 151), and w1's.
    code, out = prune()
    assert code == 0 and out.startswith("forgot 113 run(s) started before ") and "(older than 90d)" in out, (
        out
    )
    code, out = prune(keep='"100d"')
    assert code == 0 and out.startswith("forgot 0 run(s)"), out
    with StateDB(state) as db:
        assert db.job_totals() == totals
