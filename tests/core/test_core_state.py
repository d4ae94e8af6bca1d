"""Run history: migrations, round trips, interrupted runs, several connections, time filters."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from xencr.config import StateLocation
from xencr.state import MIGRATIONS, SCHEMA_VERSION, RunRow, StateDB, StateError, TaskRow

T0 = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)


class FakeClock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(state_where: StateLocation, clock: FakeClock) -> Iterator[StateDB]:
    """A fresh database on each engine (SQLite, PostgreSQL: tests/conftest.py)."""
    with StateDB(state_where, clock=clock) as db:
        yield db


def test_migrations_from_empty(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.sqlite"
    with StateDB(path) as db:
        assert db.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    con = sqlite3.connect(path)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"schema_version", "runs", "tasks", "task_disks", "schedule_fires"} <= tables
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[0] for r in con.execute("SELECT version FROM schema_version")] == list(
        range(1, SCHEMA_VERSION + 1)
    )
    con.close()
    # Reopening applies nothing twice.
    with StateDB(path) as db:
        assert db.schema_version == SCHEMA_VERSION


def test_newer_schema_and_garbage_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    StateDB(path).close()
    con = sqlite3.connect(path)
    con.execute("INSERT INTO schema_version VALUES (?, 'later')", (SCHEMA_VERSION + 1,))
    con.commit()
    con.close()
    with pytest.raises(
        StateError,
        match=rf"written by a newer xencr \(schema {SCHEMA_VERSION + 1}, this one knows {SCHEMA_VERSION}\)",
    ):
        StateDB(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StateError, match="not a usable state database"):
        StateDB(junk)


def test_run_and_task_round_trip(db: StateDB, clock: FakeClock) -> None:
    run_id = db.start_run("job-uuid", "web", "sched-1", "schedule")
    clock.advance(seconds=1)
    task_id = db.start_task(run_id, "vm-uuid", "web-1", "sr-uuid")
    [running] = db.tasks(run_id)
    assert running.outcome == "running" and running.finished_at is None and running.duration is None
    clock.advance(seconds=41)
    db.finish_task(
        task_id,
        "success",
        transfer="mixed",
        reasons={"xvda": "delta", "xvdb": "disk added"},
        bytes_sent=12 << 20,
        restore_point="replica-uuid",
    )
    clock.advance(seconds=2)
    db.finish_run(run_id, "success")

    [run] = db.runs()
    assert run == RunRow(
        id=run_id,
        job_id="job-uuid",
        job_name="web",
        schedule_id="sched-1",
        trigger="schedule",
        started_at=T0,
        finished_at=T0 + timedelta(seconds=44),
        outcome="success",
        error=None,
        host=run.host,
        pid=run.pid,
        process_start=run.process_start,
    )
    assert run.started_at.tzinfo is UTC and run.duration == timedelta(seconds=44)
    [task] = db.tasks(run_id)
    assert task == TaskRow(
        id=task_id,
        run_id=run_id,
        vm_uuid="vm-uuid",
        vm_name="web-1",
        target_sr="sr-uuid",
        started_at=T0 + timedelta(seconds=1),
        finished_at=T0 + timedelta(seconds=42),
        outcome="success",
        transfer="mixed",
        reasons={"xvda": "delta", "xvdb": "disk added"},
        bytes_sent=12 << 20,
        error=None,
        restore_point="replica-uuid",
    )
    assert task.duration == timedelta(seconds=41)
    assert db.run(run_id) == run


def test_failures_and_bad_values(db: StateDB) -> None:
    run_id = db.start_run("j", "web", None, "manual")
    task_id = db.start_task(run_id, "vm", "web-1", "sr")
    db.finish_task(task_id, "failure", transfer="full", reasons={"xvda": "first run"}, error="SR_FULL [sr]")
    db.finish_run(run_id, "failure", "1 of 1 VMs failed")
    [task] = db.tasks(run_id)
    assert (task.outcome, task.error, task.bytes_sent, task.restore_point) == (
        "failure",
        "SR_FULL [sr]",
        0,
        None,
    )
    assert db.run(run_id).error == "1 of 1 VMs failed" and db.run(run_id).schedule_id is None
    with pytest.raises(ValueError, match="unknown run outcome 'ok'"):
        db.finish_run(run_id, "ok")
    with pytest.raises(ValueError, match="unknown transfer 'incremental'"):
        db.finish_task(task_id, "success", transfer="incremental")
    with pytest.raises(KeyError):
        db.finish_run(999, "success")
    with pytest.raises(KeyError):
        db.finish_task(999, "success")


def test_last_task(db: StateDB) -> None:
    assert db.last_task("vm", "sr") is None
    r1 = db.start_run("j", "web", None, "manual")
    t1 = db.start_task(r1, "vm", "web-1", "sr")
    db.finish_task(t1, "success", transfer="full")
    db.start_task(r1, "vm", "web-1", "other-sr")
    db.finish_run(r1, "partial")
    r2 = db.start_run("j", "web", None, "manual")
    t2 = db.start_task(r2, "vm", "web-1", "sr")
    db.finish_task(t2, "failure", error="boom")
    last = db.last_task("vm", "sr")
    assert last is not None and last.id == t2 and last.outcome == "failure"
    success = db.last_task("vm", "sr", outcome="success")
    assert success is not None and success.id == t1


def test_runs_filters(db: StateDB, clock: FakeClock) -> None:
    ids = []
    for job in ("web", "db", "web"):
        ids.append(db.start_run(f"{job}-id", job, None, "schedule"))
        clock.advance(hours=1)
    assert [r.id for r in db.runs()] == ids
    assert [r.id for r in db.runs(job="web")] == [ids[0], ids[2]]
    assert [r.id for r in db.runs(job="db-id")] == [ids[1]]
    assert [r.id for r in db.runs(since=T0 + timedelta(hours=1))] == ids[1:]
    assert [r.id for r in db.runs(job="web", since=T0 + timedelta(minutes=1))] == [ids[2]]
    # Any zone, or none (UTC), means the same instant.
    # (T0 is just before Paris's DST change: aware arithmetic there is wall-clock, so convert last.)
    paris = (T0 + timedelta(hours=2)).astimezone(ZoneInfo("Europe/Paris"))
    assert [r.id for r in db.runs(since=paris)] == [ids[2]]
    assert [r.id for r in db.runs(since=(T0 + timedelta(hours=2)).replace(tzinfo=None))] == [ids[2]]
    assert [r.id for r in db.runs(limit=2)] == ids[1:]


def test_two_connections_at_once(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    a, b = StateDB(path), StateDB(path)
    ra = a.start_run("j", "web", None, "manual")
    rb = b.start_run("j", "web", None, "schedule")
    ta = a.start_task(rb, "vm", "web-1", "sr")
    b.finish_task(ta, "success", transfer="delta", reasons={"xvda": "delta"})
    a.finish_run(rb, "success")
    assert [r.id for r in b.runs()] == [ra, rb]
    assert b.tasks(rb)[0].reasons == {"xvda": "delta"}
    assert a.run(rb).outcome == "success"
    a.close()
    b.close()


def run_in_child(path: Path, body: str) -> None:
    """Run ``body`` with ``db`` open in a separate process that then exits without cleaning up."""
    code = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from xencr.state import StateDB
        db = StateDB(Path({str(path)!r}))
        """
    ) + textwrap.dedent(body)
    subprocess.run([sys.executable, "-c", code + "\nos._exit(0)\n"], check=True, timeout=60)


def test_writes_from_another_process(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    db = StateDB(path)
    mine = db.start_run("j", "mine", None, "manual")
    run_in_child(path, "r = db.start_run('j', 'theirs', None, 'manual'); db.finish_run(r, 'success')")
    assert [(r.id, r.job_name, r.outcome) for r in db.runs()] == [
        (mine, "mine", "running"),
        (mine + 1, "theirs", "success"),
    ]


def test_several_processes_create_and_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "state.sqlite"
    code = (
        "import sys\nfrom pathlib import Path\nfrom xencr.state import StateDB\n"
        "db = StateDB(Path(sys.argv[1]))\n"
        "for i in range(20):\n"
        "    r = db.start_run('j', sys.argv[2], None, 'manual')\n"
        "    t = db.start_task(r, 'vm', 'v', 'sr')\n"
        "    db.finish_task(t, 'success', reasons={'0': 'delta'})\n"
        "    db.finish_run(r, 'success')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), f"p{i}"]) for i in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    with StateDB(path) as db:
        assert db.schema_version == SCHEMA_VERSION
        runs = db.runs()
        assert len(runs) == 80 and {r.outcome for r in runs} == {"success"}
        assert sorted({r.job_name for r in runs}) == ["p0", "p1", "p2", "p3"]
        assert all(db.tasks(r.id)[0].reasons == {"0": "delta"} for r in runs)


def test_mark_interrupted_closes_runs_of_dead_processes_only(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    # A process that dies in the middle of a run (as after SIGKILL).
    run_in_child(
        path,
        """
        r = db.start_run('j', 'web', 's', 'schedule')
        done = db.start_task(r, 'vm1', 'web-1', 'sr')
        db.finish_task(done, 'success', transfer='delta')
        db.start_task(r, 'vm2', 'web-2', 'sr')
        """,
    )
    db = StateDB(path)
    alive = db.start_run("j", "web", None, "manual")
    alive_task = db.start_task(alive, "vm3", "web-3", "sr")
    assert db.mark_interrupted() == 1
    dead, mine = db.runs()
    assert dead.outcome == "interrupted" and dead.finished_at is not None
    assert dead.error == "the process running it ended before it finished"
    assert [(t.vm_uuid, t.outcome) for t in db.tasks(dead.id)] == [("vm1", "success"), ("vm2", "interrupted")]
    assert mine.id == alive and mine.outcome == "running"
    assert db.tasks(alive)[0].outcome == "running"
    assert db.mark_interrupted() == 0  # idempotent
    # force closes even a live process's run (for repair).
    assert db.mark_interrupted(force=True) == 1
    assert db.run(alive).outcome == "interrupted"
    assert db.tasks(alive)[0].id == alive_task and db.tasks(alive)[0].outcome == "interrupted"


def test_readers_are_not_blocked_by_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    writer, reader = StateDB(path), StateDB(path)
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    raw.execute(
        "INSERT INTO runs (job_id, job_name, trigger, started_at, host, pid)"
        " VALUES ('j', 'web', 'manual', '2026-01-01T00:00:00.000000Z', 'h', 1)"
    )
    assert reader.runs() == []  # WAL: a reader sees the last commit, at once
    raw.execute("COMMIT")
    assert [r.job_name for r in reader.runs()] == ["web"]
    assert writer.start_run("j", "db", None, "manual") == 2
    raw.close()


def test_v1_database_migrates_in_place(tmp_path: Path) -> None:
    """A database written by the first schema keeps its history and gains the v2 columns/table."""
    path = tmp_path / "state.sqlite"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    for statement in MIGRATIONS[0]:
        con.execute(statement)
    con.execute("INSERT INTO schema_version VALUES (1, '2026-01-01T00:00:00.000000Z')")
    con.execute(
        "INSERT INTO runs (job_id, job_name, trigger, started_at, finished_at, outcome, host, pid)"
        " VALUES ('j', 'web', 'manual', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:01:00.000000Z',"
        " 'success', 'h', 1)"
    )
    con.execute(
        "INSERT INTO tasks (run_id, vm_uuid, vm_name, target_sr, started_at, finished_at, outcome,"
        " transfer, bytes_sent, restore_point) VALUES (1, 'vm', 'web-1', 'sr',"
        " '2026-01-01T00:00:00.000000Z', '2026-01-01T00:01:00.000000Z', 'success', 'full', 42, 'rp')"
    )
    con.execute("INSERT INTO task_disks VALUES (1, 'xvda', 'first run')")
    con.close()

    with StateDB(path) as db:
        assert db.schema_version == SCHEMA_VERSION  # every migration since, in place
        [run] = db.runs()
        assert (run.job_name, run.outcome) == ("web", "success")
        [task] = db.tasks(run.id)
        assert (task.bytes_sent, task.restore_point, task.reasons) == (42, "rp", {"xvda": "first run"})
        assert (task.snapshot_time, task.cleaned) == (None, 0)  # unknown for old rows
        # The new columns and table work on the migrated file.
        t = db.start_task(run.id, "vm", "web-1", "sr")
        snap = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        db.finish_task(t, "success", transfer="delta", snapshot_time=snap, cleaned=2)
        assert (db.tasks(run.id)[1].snapshot_time, db.tasks(run.id)[1].cleaned) == (snap, 2)
        db.set_fire("j", "s", last=None, next=snap)
        assert db.fires() == {("j", "s"): (None, snap)}
    con = sqlite3.connect(path)
    versions = [r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    con.close()


def test_snapshot_time_cleaned_and_skips(db: StateDB, clock: FakeClock) -> None:
    run_id = db.start_run("j", "web", "s1", "schedule")
    t = db.start_task(run_id, "vm1", "web-1", "sr")
    snap = T0 - timedelta(seconds=3)
    paris = snap.astimezone(ZoneInfo("Europe/Paris"))
    db.finish_task(t, "success", transfer="delta", snapshot_time=paris, cleaned=3, restore_point="rp")
    clock.advance(seconds=5)
    s = db.skip_task(run_id, "vm2", "web-2", "sr", "skipped: previous run still running")
    done, skipped = db.tasks(run_id)
    assert done.snapshot_time == snap and done.snapshot_time.tzinfo is UTC and done.cleaned == 3
    assert skipped.id == s
    assert (skipped.outcome, skipped.error, skipped.vm_name, skipped.transfer, skipped.bytes_sent) == (
        "skipped",
        "skipped: previous run still running",
        "web-2",
        None,
        0,
    )
    assert skipped.started_at == skipped.finished_at == T0 + timedelta(seconds=5)
    assert skipped.duration == timedelta(0) and (skipped.snapshot_time, skipped.cleaned) == (None, 0)
    last = db.last_task("vm2", "sr")
    assert last is not None and last.outcome == "skipped"


def test_all_tasks_filters(db: StateDB, clock: FakeClock) -> None:
    r1 = db.start_run("web-id", "web", None, "manual")
    t1 = db.start_task(r1, "vm", "web-1", "sr")
    clock.advance(hours=1)
    r2 = db.start_run("db-id", "db", None, "manual")
    t2 = db.start_task(r2, "vm2", "db-1", "sr")
    clock.advance(hours=1)
    r3 = db.start_run("web-id", "web", None, "manual")
    t3 = db.skip_task(r3, "vm", "web-1", "sr", "skipped: previous run still running")
    assert [t.id for t in db.all_tasks()] == [t1, t2, t3]
    assert [t.id for t in db.all_tasks("web")] == [t1, t3]
    assert [t.id for t in db.all_tasks("db-id")] == [t2]
    assert [t.id for t in db.all_tasks(since=T0 + timedelta(minutes=30))] == [t2, t3]
    assert [t.id for t in db.all_tasks("web", since=T0 + timedelta(minutes=30))] == [t3]


def test_schedule_fires(db: StateDB) -> None:
    assert db.fires() == {}
    nxt = T0 + timedelta(minutes=10)
    db.set_fire("j1", "s1", last=None, next=nxt)
    db.set_fire("j1", "s2", last=T0, next=None)
    db.set_fire("j1", "s1", last=T0, next=nxt + timedelta(minutes=10))  # replaces
    assert db.fires() == {
        ("j1", "s1"): (T0, nxt + timedelta(minutes=10)),
        ("j1", "s2"): (T0, None),
    }
