"""`xencr state migrate --to postgresql://...` from an SQLite state that real runs on the
simulator filled (plus every other kind of record): everything reads back the same through
StateDB on PostgreSQL, the checks printed are the ones computed, a second copy is refused, and the
configuration pointed at PostgreSQL goes on from there (history, info, a new run)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pgtest import pg_location
from xencr.cli.app import app
from xencr.config import load_config
from xencr.replication.jobs import run_configured
from xencr.sim.harness import RunningSimulator, running_simulator
from xencr.state import (
    FailbackRow,
    FailoverRow,
    NativeRecoveryRow,
    PlannedRow,
    RehearsalRow,
    RehearsedVmRow,
    ResumeDisk,
    ResumeRow,
    StateDB,
    migrate,
)
from xencr.state.copy import sums
from xencr.xapi.session import Endpoint, XapiSession

MIB = 1024 * 1024
PASSWORD = "state-sim-pw"
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSimulator]:
    with running_simulator(
        tmp_path_factory.mktemp("sim"), pools=2, vms=2, disk_size=8 * MIB, password=PASSWORD
    ) as s:
        yield s


def write_config(tmp: Path, sim: RunningSimulator, state: str) -> Path:
    pw = tmp / "pw"
    pw.write_text(PASSWORD)
    os.chmod(pw, 0o600)
    t = XapiSession(Endpoint(sim.urls[1]), "root", PASSWORD, retries=1, backoff=0.05)
    sr = t.api.SR.get_uuid(t.api.pool.get_default_SR(t.api.pool.get_all()[0]))
    t.logout()
    path = tmp / "xencr.toml"
    path.write_text(
        f'state = "{state}"\n'
        f'[pools.a]\nurl = "{sim.urls[0]}"\npassword_file = "{pw}"\n'
        f'[pools.b]\nurl = "{sim.urls[1]}"\npassword_file = "{pw}"\n'
        f'[jobs.mig]\npool = "a"\nvms = ["vm*"]\n'
        f'[[jobs.mig.targets]]\npool = "b"\nsr = "{sr}"\n'
        '[[jobs.mig.schedules]]\nid = "quarter"\nevery = "15m"\nretention = 3\n'
    )
    return path


def guest_write(sim: RunningSimulator, offset: int) -> None:
    s = XapiSession(Endpoint(sim.urls[0]), "root", PASSWORD, retries=1, backoff=0.05)
    vm = s.api.VM.get_by_name_label("vm0")[0]
    vdi = next(s.api.VBD.get_VDI(b) for b in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(b) == "Disk")
    s.api.sim.write(s.api.VDI.get_uuid(vdi), str(offset), "4096", "migrate")
    s.logout()


def other_records(db: StateDB) -> None:
    """One of every record the runs did not make: fires, a resume, DR rows, a test failover."""
    t = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    db.set_fire("job-id", "sched", last=t, next=t + timedelta(minutes=15))
    db.set_fire("job-id", "never", last=None, next=None)
    db.record_resume(
        ResumeRow(
            "job-id",
            "vm-uuid",
            "sr-uuid",
            "attempt-1",
            "snap",
            "replica",
            "shape text",
            (ResumeDisk("0", "vdi-0", 7, 64, 5 << 32), ResumeDisk("1", "vdi-1")),
            t,
        )
    )
    db.record_failover(
        [FailoverRow("plan", "vm-a", "web", "job", "b", "rp-a", 0, 30, True, "tok", started_at=t)]
    )
    db.update_failover("plan", "vm-a", "started", vm="clone-a", detail="started")
    db.record_failback(
        FailbackRow("plan", "vm-a", "att", "copied", "d1", None, ("0=x",), ("old",), None, "why")
    )
    db.record_planned(PlannedRow("plan", "shutdown", halted=("vm-a", "vm-b"), detail="halted 2"))
    db.record_native(
        NativeRecoveryRow(
            "att-n", "pool-b", "test", srs_before=("sr1",), selected=("vm1", "vm2"), network="n"
        )
    )
    run = db.start_run("plan-id", "plan", None, "dr-test")
    vm = RehearsedVmRow("web", "vm-a", "clone", True, 0, t, 12.5, "power_state passed")
    db.record_rehearsal(RehearsalRow("plan", run, True, True, False, (vm,)))
    db.finish_run(run, "success")
    skipped = db.start_run("job-id", "mig", "sched", "schedule")
    db.skip_task(skipped, "vm-uuid", "vm0", "sr-uuid", "skipped: previous run still running", "b/SR")
    db.finish_run(skipped, "skipped")


def everything(db: StateDB) -> dict[str, Any]:
    """What StateDB reads back, by every accessor, for the records above and the runs'."""
    tasks = db.all_tasks()
    digests = sorted({d for t in tasks for d in t.maps.values()})
    jobs = sorted({r.job_id for r in db.runs()})
    return {
        "runs": db.runs(),
        "tasks": tasks,
        "maps": {d: db.get_map(d) for d in digests},
        "map_bytes": db.map_bytes(),
        "fires": db.fires(),
        "resumes": db.resumes(),
        "failovers": db.failover_rows("plan"),
        "failbacks": db.failbacks("plan"),
        "planned": db.planned("plan"),
        "rehearsals": [db.rehearsal(r.id) for r in db.runs()],
        "native": db.native_recoveries(),
        "totals": db.job_totals(),
        "points": [db.points(j, EPOCH) for j in jobs],
        "sums": [db.run_sums(j, EPOCH) for j in jobs],
        "newest": [db.newest_tasks(j) for j in jobs],
        "health": [db.health_checks(j) for j in jobs],
    }


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_migrate_to_postgresql_loses_nothing(
    sim: RunningSimulator,
    tmp_path: Path,
    pg_url: str,
    pg_password: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    sqlite_cfg = write_config(tmp_path, sim, str(tmp_path / "state.sqlite"))
    cfg = load_config(sqlite_cfg)
    # History made by real runs: a full, then a delta after a guest write.
    assert run_configured(cfg, "mig", schedule_id="quarter", trigger="schedule").outcome == "success"
    guest_write(sim, 3 * MIB)
    assert run_configured(cfg, "mig", schedule_id="quarter", trigger="schedule").outcome == "success"
    with StateDB(cfg.state) as db:
        other_records(db)
        before = everything(db)
        source_sums = sums(db)
    assert len(before["runs"]) == 4 and len(before["tasks"]) == 5
    assert before["maps"] and all(m is not None for m in before["maps"].values())
    assert {t.transfer for t in before["tasks"]} >= {"full", "delta"}

    monkeypatch.setenv("XENCR_STATE_PASSWORD", pg_password)  # where `state migrate` reads it
    code, out, err = cli("state", "migrate", "--config", str(sqlite_cfg), "--to", pg_url)
    assert code == 0, err
    target = pg_location(pg_url)
    with StateDB(target) as pg:
        after = everything(pg)
        target_sums = sums(pg)
    assert after == before  # every record, as StateDB reads it, on both engines
    assert target_sums == source_sums
    lines = out.splitlines()
    assert lines[0] == f"copied {tmp_path / 'state.sqlite'} -> {target.describe()}"
    for s in source_sums:  # the checks printed are the ones computed, and all equal
        assert f"{s.table} " in out and any(
            line.split()[:5] == [s.table, str(s.rows), str(s.rows), s.digest[:16], "equal"] for line in lines
        ), s
    assert "every table equal on both sides" in out
    assert f'state = "{pg_url}"' in out
    assert pg_password not in out + err + caplog.text

    # A second copy into the same database is refused: nothing merges two histories.
    code, out, err = cli("state", "migrate", "--config", str(sqlite_cfg), "--to", pg_url)
    assert code == 1 and out == ""
    assert err.startswith(f"xencr: error: {target.describe()} already holds records (")
    assert ", 4 runs, " in err and ", 5 tasks, " in err and "empty database only" in err
    assert len(err.strip().splitlines()) == 1

    # The configuration pointed at PostgreSQL: the same history, and runs go on from there.
    pg_cfg = write_config(tmp_path, sim, pg_url)
    code, pg_history, err = cli("history", "--config", str(pg_cfg), "--json")
    assert code == 0, err
    code, sqlite_history, _ = cli("history", "--config", str(sqlite_cfg), "--json")
    assert json.loads(pg_history) == json.loads(sqlite_history) and json.loads(pg_history)
    code, info, err = cli("state", "info", "--config", str(pg_cfg), "--json")
    assert code == 0, err
    shown = json.loads(info)
    assert (shown["engine"], shown["location"], shown["revision"]) == (
        "postgresql",
        target.describe(),
        migrate.HEAD,
    )
    assert shown["password_from"] == "env XENCR_STATE_PASSWORD"
    assert shown["tables"] == {s.table: s.rows for s in source_sums}
    guest_write(sim, 5 * MIB)
    third = run_configured(load_config(pg_cfg), "mig", schedule_id="quarter", trigger="schedule")
    assert third.outcome == "success"
    with StateDB(target) as pg:
        runs = pg.runs()
        newest = pg.tasks(runs[-1].id)
    # Ids go on past the copied ones (the sequences were moved), and the delta found its base.
    assert [r.id for r in runs] == [r.id for r in before["runs"]] + [before["runs"][-1].id + 1]
    assert min(t.id for t in newest) == max(t.id for t in before["tasks"]) + 1
    assert {t.vm_name: (t.outcome, t.transfer) for t in newest} == {
        "vm0": ("success", "delta"),
        "vm1": ("success", "delta"),
    }
    assert pg_password not in caplog.text
