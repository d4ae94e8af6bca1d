"""Issue 11: the health-check column (schema 5), added in place, and what reads it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from xencr.state import MIGRATIONS, StateDB


def test_a_v4_database_gains_the_column_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    for i, migration in enumerate(MIGRATIONS[:4]):
        for statement in migration:
            con.execute(statement)
        con.execute("INSERT INTO schema_version VALUES (?, '2026-01-01T00:00:00.000000Z')", (i + 1,))
    con.execute(
        "INSERT INTO runs (job_id, job_name, trigger, started_at, finished_at, outcome, host, pid)"
        " VALUES ('j', 'web', 'manual', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:01:00.000000Z',"
        " 'success', 'h', 1)"
    )
    con.execute(
        "INSERT INTO tasks (run_id, vm_uuid, vm_name, target_sr, started_at, finished_at, outcome)"
        " VALUES (1, 'vm', 'web-1', 'sr', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:01:00.000000Z',"
        " 'success')"
    )
    con.close()

    with StateDB(path) as db:
        assert db.schema_version >= 5
        [old] = db.tasks(1)
        assert (old.vm_name, old.health_check) == ("web-1", None)  # not checked: unknown
        assert db.health_checks("web") == ([], 0)
        run = db.start_run("j", "web", None, "manual")
        for vm, line in [("vm", "failed: the VM is Halted"), ("vm2", "passed: running after 0.2s")]:
            t = db.start_task(run, vm, vm, "sr", "b/Local storage")
            db.finish_task(t, "success", health_check=line)
        t = db.start_task(run, "vm", "vm", "sr", "b/Local storage")
        db.finish_task(t, "success", health_check="passed: guest tools reported after 1.0s")
        skipped = db.start_task(run, "vm", "vm", "sr")
        db.finish_task(skipped, "skipped")  # no check: the newest check stays the one before
        newest, failed = db.health_checks("j")
        assert [(r.vm_uuid, r.health_check) for r in newest] == [
            ("vm2", "passed: running after 0.2s"),
            ("vm", "passed: guest tools reported after 1.0s"),
        ]
        assert failed == 1
    con = sqlite3.connect(path)
    assert "health_check" in [r[1] for r in con.execute("PRAGMA table_info(tasks)")]
    con.close()
