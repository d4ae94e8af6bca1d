"""The Prometheus exposition of recorded history, read back with prometheus_client's parser, and
the atomic textfile."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from monitortest import T0, Clock, config, families, value

from xencr.monitor import metrics
from xencr.monitor.metrics import render, write_textfile
from xencr.monitor.rpo import Breach, breaches, job_rpo, protection
from xencr.state import StateDB


def fill(db: StateDB, clock: Clock, web_id: str, db_id: str) -> None:
    """Three runs of 'web' and one of 'db', ten minutes apart."""
    # Run 1 (T0): both VMs full.
    r = db.start_run(web_id, "web", None, "schedule")
    for vm in ("1", "2"):
        t = db.start_task(r, f"vm-{vm}", f"web-{vm}", "sr-b")
        clock.advance(seconds=30)
        db.finish_task(
            t,
            "success",
            transfer="full",
            reasons={"0": "first run", "1": "first run"},
            bytes_sent=1000,
            snapshot_time=clock.now - timedelta(seconds=25),
            restore_point=f"rp-{vm}-1",
        )
    db.finish_run(r, "success")  # 60 s
    # Run 2 (T0 + 10m): web-1 delta with one disk added, web-2 fails, 3 orphans cleaned.
    clock.now = T0 + timedelta(minutes=10)
    r = db.start_run(web_id, "web", None, "schedule")
    t = db.start_task(r, "vm-1", "web-1", "sr-b")
    clock.advance(seconds=5)
    db.finish_task(
        t,
        "success",
        transfer="mixed",
        reasons={"0": "delta", "1": "delta", "2": "disk added"},
        bytes_sent=300,
        snapshot_time=clock.now - timedelta(seconds=4),
        cleaned=3,
    )
    t = db.start_task(r, "vm-2", "web-2", "sr-b")
    clock.advance(seconds=5)
    db.finish_task(t, "failure", transfer="delta", reasons={"0": "delta"}, bytes_sent=50, error="SR_FULL")
    db.finish_run(r, "partial")  # 10 s
    # Run 3 (T0 + 20m): web-1 delta; web-2 skipped (busy); still running at render time.
    clock.now = T0 + timedelta(minutes=20)
    r = db.start_run(web_id, "web", None, "schedule")
    t = db.start_task(r, "vm-1", "web-1", "sr-b")
    clock.advance(seconds=2)
    db.finish_task(
        t,
        "success",
        transfer="delta",
        reasons={"0": "delta", "1": "delta", "2": "delta"},
        bytes_sent=20,
        snapshot_time=clock.now - timedelta(seconds=1),
    )
    db.skip_task(r, "vm-2", "web-2", "sr-b", "skipped: previous run still running")
    db.start_task(r, "vm-3", "web-3", "sr-b")  # in flight: counted nowhere yet
    # 'db' (T0 + 20m + 2s): one interrupted task.
    d = db.start_run(db_id, "db", None, "manual")
    t = db.start_task(d, "vm-9", "db-9", "sr-b")
    db.finish_task(t, "interrupted", error="cancelled: shutting down")
    db.finish_run(d, "interrupted")


def test_exposition_after_recorded_runs(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    web, dbjob = cfg.jobs["web"], cfg.jobs["db"]
    clock = Clock()
    with StateDB(cfg.state.path, clock=clock) as db:
        fill(db, clock, web.id, dbjob.id)
        now = T0 + timedelta(minutes=25)
        text = render(db, cfg, now)
    assert text.endswith("\n")
    for name in (
        "xencr_restore_point_age_seconds",
        "xencr_rpo_seconds",
        "xencr_rpo_breached",
        "xencr_last_success_timestamp_seconds",
        "xencr_bytes_sent_total",
        "xencr_run_duration_seconds",
        "xencr_tasks_total",
        "xencr_full_transfers_total",
        "xencr_orphans_cleaned_total",
        "xencr_last_run_timestamp_seconds",
    ):
        assert f"# HELP {name} " in text and f"# TYPE {name} " in text
    f = families(text)
    w1 = {"job": "web", "vm": "web-1", "vm_uuid": "vm-1", "target_sr": "sr-b"}
    w2 = {"job": "web", "vm": "web-2", "vm_uuid": "vm-2", "target_sr": "sr-b"}
    w3 = {"job": "web", "vm": "web-3", "vm_uuid": "vm-3", "target_sr": "sr-b"}
    # web-1: newest restore point taken at T0+20m+1s -> 299 s old; RPO = the 10m interval.
    assert value(f, "xencr_restore_point_age_seconds", **w1) == 299
    assert value(f, "xencr_rpo_seconds", **w1) == 600
    assert value(f, "xencr_rpo_breached", **w1) == 0
    assert (
        value(f, "xencr_last_success_timestamp_seconds", **w1)
        == (T0 + timedelta(minutes=20, seconds=2)).timestamp()
    )
    # web-2: last success in run 1 (snapshot at T0+35s) -> 1465 s old > 600: breached.
    assert value(f, "xencr_restore_point_age_seconds", **w2) == 25 * 60 - 35
    assert value(f, "xencr_rpo_breached", **w2) == 1
    assert value(f, "xencr_last_success_timestamp_seconds", **w2) == (T0 + timedelta(seconds=60)).timestamp()
    # web-3: in flight, never succeeded: no age, no last success, breached.
    assert value(f, "xencr_restore_point_age_seconds", **w3) is None
    assert value(f, "xencr_last_success_timestamp_seconds", **w3) is None
    assert value(f, "xencr_rpo_breached", **w3) == 1
    # db: job-level rpo 1h; its VM never succeeded.
    d9 = {"job": "db", "vm": "db-9", "vm_uuid": "vm-9", "target_sr": "sr-b"}
    assert value(f, "xencr_rpo_seconds", **d9) == 3600 and value(f, "xencr_rpo_breached", **d9) == 1
    # Counters over the whole history (running tasks excluded; mixed counts as full).
    assert value(f, "xencr_bytes_sent_total", job="web", kind="full") == 2300
    assert value(f, "xencr_bytes_sent_total", job="web", kind="delta") == 70
    assert value(f, "xencr_tasks_total", job="web", outcome="success") == 4
    assert value(f, "xencr_tasks_total", job="web", outcome="failure") == 1
    assert value(f, "xencr_tasks_total", job="web", outcome="skipped") == 1
    assert value(f, "xencr_tasks_total", job="web", outcome="interrupted") == 0
    assert value(f, "xencr_tasks_total", job="db", outcome="interrupted") == 1
    assert value(f, "xencr_full_transfers_total", job="web", reason="first run") == 4
    assert value(f, "xencr_full_transfers_total", job="web", reason="disk added") == 1
    assert value(f, "xencr_full_transfers_total", job="web", reason="delta") is None
    assert value(f, "xencr_orphans_cleaned_total", job="web") == 3
    assert value(f, "xencr_orphans_cleaned_total", job="db") == 0
    # The last *finished* run of web is run 2 (10 s); its newest run started at T0+20m.
    assert value(f, "xencr_run_duration_seconds", job="web") == 10
    assert value(f, "xencr_last_run_timestamp_seconds", job="web") == (T0 + timedelta(minutes=20)).timestamp()
    assert value(f, "xencr_run_duration_seconds", job="db") == 0


def test_counters_survive_restarts_and_renames(tmp_path: Path) -> None:
    """The counters are the history's: a new process (or a renamed job, same id) sees them all."""
    cfg = config(tmp_path)
    clock = Clock()
    with StateDB(cfg.state.path, clock=clock) as db:
        fill(db, clock, cfg.jobs["web"].id, cfg.jobs["db"].id)
    renamed = config(tmp_path, job_extra=f'id = "{cfg.jobs["web"].id}"')
    text = renamed.path.read_text().replace("[jobs.web", "[jobs.frontend")
    renamed.path.write_text(text)
    from xencr.config import parse_config

    renamed = parse_config(text, renamed.path)
    with StateDB(cfg.state.path) as db:
        f = families(render(db, renamed, T0 + timedelta(hours=1)))
    assert value(f, "xencr_tasks_total", job="frontend", outcome="success") == 4
    assert value(f, "xencr_tasks_total", job="web", outcome="success") is None


def test_empty_and_missing_database(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    f = families(render(None, cfg, T0))
    # Every configured job has its counters at zero, so alerts and rate() have a series.
    assert value(f, "xencr_tasks_total", job="web", outcome="failure") == 0
    assert value(f, "xencr_bytes_sent_total", job="db", kind="delta") == 0
    assert "xencr_rpo_breached" not in f and "xencr_last_run_timestamp_seconds" not in f
    with StateDB(cfg.state.path) as db:
        assert families(render(db, cfg, T0)) == f


def test_disabled_jobs_keep_counters_but_no_rpo_series(tmp_path: Path) -> None:
    cfg = config(tmp_path, job_extra="enabled = false")
    clock = Clock()
    with StateDB(cfg.state.path, clock=clock) as db:
        fill(db, clock, cfg.jobs["web"].id, cfg.jobs["db"].id)
        f = families(render(db, cfg, T0 + timedelta(hours=5)))
    assert {lab["job"] for lab, _ in f["xencr_rpo_breached"]} == {"db"}
    assert value(f, "xencr_tasks_total", job="web", outcome="success") == 4


def test_label_values_are_escaped(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    with StateDB(cfg.state.path) as db:
        r = db.start_run(cfg.jobs["web"].id, "web", None, "manual")
        name = 'web "quoted" \\ back\nslash'
        t = db.start_task(r, "vm-x", name, "sr")
        db.finish_task(t, "success", transfer="full", snapshot_time=T0)
        f = families(render(db, cfg, T0 + timedelta(seconds=5)))
    assert value(f, "xencr_restore_point_age_seconds", vm=name) == 5


def test_rpo_breaches_and_horizon(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    web = cfg.jobs["web"]
    clock = Clock()
    with StateDB(cfg.state.path, clock=clock) as db:
        assert job_rpo(web) == 600 and job_rpo(cfg.jobs["db"]) == 3600
        assert breaches(db, web, T0) == []  # nothing recorded: nothing known
        fill(db, clock, web.id, cfg.jobs["db"].id)
        now = T0 + timedelta(minutes=25)
        assert breaches(db, web, now) == [
            Breach("web-2", "vm-2", "sr-b", 25 * 60 - 35, 600),
            Breach("web-3", "vm-3", "sr-b", None, 600),
        ]
        # A VM last seen more than the horizon before the job's newest task has left the job.
        clock.now = T0 + timedelta(days=2)
        r = db.start_run(web.id, "web", None, "schedule")
        t = db.start_task(r, "vm-1", "web-1", "sr-b")
        db.finish_task(t, "success", transfer="delta", snapshot_time=clock.now)
        assert [p.vm for p in protection(db, web)] == ["web-1"]
        # A job that stopped running keeps its VMs, and their breaches grow.
        later = clock.now + timedelta(days=30)
        assert breaches(db, web, later) == [Breach("web-1", "vm-1", "sr-b", 30 * 86400, 600)]


def test_write_textfile_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "xencr.prom"
    write_textfile(path, "old 1\n")
    assert path.read_text() == "old 1\n" and oct(path.stat().st_mode & 0o777) == "0o644"
    # A reader at any moment sees the old file or the new one, never a part: the new content is
    # complete in another file before one rename replaces the old.
    seen: list[str] = []
    real_replace = os.replace

    def watching_replace(src: str, dst: Path) -> None:
        seen.append(Path(dst).read_text())  # just before the switch: still the old file
        seen.append(Path(src).read_text())  # the new one, complete, under another name
        assert Path(src).parent == path.parent and not str(src).endswith(".prom")
        real_replace(src, dst)

    monkeypatch.setattr(metrics.os, "replace", watching_replace)
    big = "x_total 1\n" * 10000
    write_textfile(path, big)
    assert seen == ["old 1\n", big] and path.read_text() == big
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xencr.prom"]  # no temporary left


def test_write_textfile_failure_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "xencr.prom"
    write_textfile(path, "old 1\n")

    def broken(src: str, dst: Path) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(metrics.os, "replace", broken)
    with pytest.raises(OSError, match="disk on fire"):
        write_textfile(path, "new 2\n")
    assert path.read_text() == "old 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xencr.prom"]


def test_concurrent_writers_never_leave_a_torn_file(tmp_path: Path) -> None:
    path = tmp_path / "xencr.prom"
    texts = [f"v {i}\n" * 2000 for i in range(4)]
    threads = [threading.Thread(target=write_textfile, args=(path, t)) for t in texts for _ in range(5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert path.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["xencr.prom"]
