"""The state database on SQLite and PostgreSQL: the schema Alembic builds is the one the code
declares, a pre-Alembic SQLite file is brought there and stamped, a newer database is refused,
several processes open a fresh PostgreSQL database at once, and the PostgreSQL password stays
out of the config file, the messages and the logs."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from typer.testing import CliRunner

from pgtest import pg_location
from xencr.cli.app import app
from xencr.config import ConfigError, StateLocation, parse_config
from xencr.credentials import CredentialError
from xencr.state import MIGRATIONS, SCHEMA_VERSION, ResumeDisk, ResumeRow, StateDB, StateError
from xencr.state import migrate as migrations
from xencr.state.schema import metadata

# What differs between two schemas in a way a query would notice (types, nullability and
# constraint names of a pre-Alembic SQLite file are SQLite's own spellings of the same thing).
SHAPE = {"add_table", "remove_table", "add_column", "remove_column", "add_index", "remove_index"}


def schema_diff(db: StateDB, *, shape_only: bool = False) -> list[object]:
    with db.reading() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        diff = list(compare_metadata(context, metadata))
    if shape_only:
        flat = [d for item in diff for d in (item if isinstance(item, list) else [item])]
        return [d for d in flat if d[0] in SHAPE]
    return diff


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_alembic_builds_the_declared_schema_on_both_engines(
    tmp_path: Path, pg_url: str, pg_password: str
) -> None:
    assert migrations.head() == migrations.HEAD  # the constant the fast path trusts
    for where in (StateLocation(path=tmp_path / "s.sqlite"), pg_location(pg_url)):
        with StateDB(where) as db:
            assert db.revision == migrations.HEAD and db.schema_version == SCHEMA_VERSION
            assert schema_diff(db) == [], where.engine
        with StateDB(where) as db:  # reopened: nothing applied twice
            assert db.revision == migrations.HEAD


def test_a_schema_1_sqlite_file_is_upgraded_and_stamped(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    for statement in MIGRATIONS[0]:
        con.execute(statement)
    con.execute("INSERT INTO schema_version VALUES (1, '2025-01-01T00:00:00.000000Z')")
    con.execute(
        "INSERT INTO runs (job_id, job_name, trigger, started_at, finished_at, outcome, host, pid)"
        " VALUES ('j', 'web', 'manual', '2025-01-01T00:00:00.000000Z', '2025-01-01T00:01:00.000000Z',"
        " 'success', 'h', 1)"
    )
    con.execute(
        "INSERT INTO tasks (run_id, vm_uuid, vm_name, target_sr, started_at, outcome, bytes_sent)"
        " VALUES (1, 'vm', 'web-1', 'sr', '2025-01-01T00:00:00.000000Z', 'success', 42)"
    )
    con.execute("INSERT INTO task_disks VALUES (1, 'xvda', 'first run')")
    con.close()
    with StateDB(path) as db:
        assert (db.schema_version, db.revision) == (SCHEMA_VERSION, migrations.HEAD)
        assert schema_diff(db, shape_only=True) == []  # every table, column and index of today's
        [task] = db.tasks(1)
        assert (task.vm_name, task.bytes_sent, task.reasons, task.target) == (
            "web-1",
            42,
            {"xvda": "first run"},
            "",
        )
        # Today's tables work on it.
        db.record_resume(ResumeRow("j", "vm", "sr", "a1", "snap", "rep", "shape", (ResumeDisk("0", "vdi"),)))
        assert [(r.attempt, r.disks) for r in db.resumes()] == [("a1", (ResumeDisk("0", "vdi"),))]
    con = sqlite3.connect(path)
    assert [r[0] for r in con.execute("SELECT version FROM schema_version")] == list(range(1, 11))
    assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [(migrations.HEAD,)]
    con.close()


def test_resume_of_reads_one_attempt_and_its_disks_only(state_where: StateLocation) -> None:
    with StateDB(state_where) as db:
        for job, vm, sr, attempt in [
            ("j", "v1", "s1", "a1"),
            ("j", "v1", "s2", "a2"),
            ("k", "v1", "s1", "a3"),
        ]:
            disks = (ResumeDisk("0", f"{attempt}-d0", 5), ResumeDisk("1", f"{attempt}-d1", 7))
            db.record_resume(ResumeRow(job, vm, sr, attempt, "snap", "rep", "shape", disks))
        got = db.resume_of("j", "v1", "s2")
        assert got is not None and got.attempt == "a2"
        assert got.disks == (ResumeDisk("0", "a2-d0", 5), ResumeDisk("1", "a2-d1", 7))
        assert db.resume_of("j", "v2", "s1") is None
        assert [(r.attempt, len(r.disks)) for r in db.resumes("j")] == [("a1", 2), ("a2", 2)]
        assert sorted(r.attempt for r in db.resumes()) == ["a1", "a2", "a3"]


def test_a_newer_revision_is_refused(state_where: StateLocation) -> None:
    with StateDB(state_where) as db, db.transaction() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_later'")
    with pytest.raises(StateError) as err:
        StateDB(state_where)
    assert str(err.value) == (
        f"{state_where.describe()}: written by a newer xencr "
        f"(revision 9999_later, this one knows up to {migrations.HEAD})"
    )


def test_several_processes_open_a_fresh_postgresql_database_at_once(empty_pg: StateLocation) -> None:
    """The first open migrates; the others wait for it (advisory lock) and find it done."""
    code = textwrap.dedent(
        f"""
        import sys
        from xencr.config import StateLocation
        from xencr.state import StateDB
        db = StateDB(StateLocation(url={empty_pg.url!r}, password_env={empty_pg.password_env!r}))
        for i in range(5):
            r = db.start_run('j', sys.argv[1], None, 'manual')
            db.finish_run(r, 'success')
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, f"p{i}"]) for i in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    with StateDB(empty_pg) as db:
        runs = db.runs()
        assert db.revision == migrations.HEAD
    assert len(runs) == 15 and sorted({r.job_name for r in runs}) == ["p0", "p1", "p2"]
    assert len({r.id for r in runs}) == 15


def test_a_password_in_the_url_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "xencr.toml"
    for text in (
        'state = "postgresql://xencr:s3cr3t-pw@db.example.com/xencr"\n',
        '[state]\nurl = "postgresql://xencr@db.example.com/xencr?sslmode=require&password=s3cr3t-pw"\n',
    ):
        with pytest.raises(ConfigError) as err:
            parse_config(text, path)
        message = str(err.value)
        assert "the URL carries a password; remove it and set XENCR_STATE_PASSWORD" in message
        assert "password_file" in message and "s3cr3t-pw" not in message
    with pytest.raises(
        ConfigError, match=r"state\.password: is not read from the file: set XENCR_STATE_PASSWORD"
    ):
        parse_config('[state]\nurl = "postgresql://x@h/d"\npassword = "s3cr3t-pw"\n', path)
    with pytest.raises(ConfigError, match="unsupported database URL scheme 'mysql'"):
        parse_config('state = "mysql://x@h/d"\n', path)
    # The accepted forms: no secret anywhere in what the config keeps or shows.
    cfg = parse_config('state = "postgres://xencr@db.example.com:5433/xencr?sslmode=require"\n', path)
    assert cfg.state.url == "postgresql+psycopg://xencr@db.example.com:5433/xencr?sslmode=require"
    assert cfg.state.describe() == "PostgreSQL xencr@db.example.com:5433/xencr"
    cfg = parse_config('state = "run/state.sqlite"\n', path)
    assert (cfg.state.path, cfg.state.engine) == (tmp_path / "run/state.sqlite", "sqlite")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_wrong_password_and_unreachable_server_are_one_line_without_the_password(
    fresh_pg: StateLocation,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-Pa55word-xyz"
    assert fresh_pg.url is not None
    url = fresh_pg.url.replace("postgresql+psycopg://", "postgresql://")
    host_db = fresh_pg.describe().removeprefix("PostgreSQL ")
    monkeypatch.setenv("XENCR_STATE_PASSWORD", wrong)
    with pytest.raises(StateError) as err:
        StateDB(StateLocation(url=url))
    message = str(err.value)
    assert (
        message.startswith(f"PostgreSQL {host_db}: cannot connect: ")
        and "password authentication failed" in message
    )
    assert "\n" not in message and wrong not in message
    # Through the command line: one line, exit 1.
    cfg = tmp_path / "xencr.toml"
    cfg.write_text(f'state = "{url}"\n')
    code, out, err_text = cli("state", "info", "--config", str(cfg))
    assert (code, out) == (1, "")
    assert err_text.startswith(f"xencr: error: PostgreSQL {host_db}: cannot connect: ")
    assert len(err_text.strip().splitlines()) == 1 and wrong not in err_text
    # A server that does not answer: the same, naming where.
    port = _closed_port()
    closed = f"postgresql://xencr@127.0.0.1:{port}/nowhere"
    with pytest.raises(StateError, match=rf"^PostgreSQL xencr@127\.0\.0\.1:{port}/nowhere: cannot connect: "):
        StateDB(StateLocation(url=closed))
    assert wrong not in caplog.text


def test_password_from_a_file_and_its_mode(
    fresh_pg: StateLocation, pg_password: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = tmp_path / "state.password"
    secret.write_text(pg_password + "\n")
    os.chmod(secret, 0o600)
    assert fresh_pg.url is not None
    cfg = tmp_path / "xencr.toml"
    cfg.write_text(
        f'[state]\nurl = "{fresh_pg.url}"\npassword_env = "XENCR_UNSET_PW"\npassword_file = "{secret.name}"\n'
    )
    code, out, err = cli("state", "info", "--config", str(cfg))
    assert code == 0, err
    assert out.splitlines()[:3] == [
        f"postgresql: {fresh_pg.describe()}",
        f"password from: file {secret}",
        f"schema revision: {migrations.HEAD}",
    ]
    assert "runs" in out and pg_password not in out + err + caplog.text
    os.chmod(secret, 0o644)
    code, out, err = cli("state", "info", "--config", str(cfg))
    assert code == 1 and f"password_file {secret} of the state database has mode 0644" in err
    assert pg_password not in err
    with pytest.raises(CredentialError):
        StateDB(StateLocation(url=fresh_pg.url, password_file=secret))


def test_state_info_on_sqlite(tmp_path: Path) -> None:
    cfg = tmp_path / "xencr.toml"
    cfg.write_text('state = "s.sqlite"\n')
    code, out, _ = cli("state", "info", "--config", str(cfg))
    assert (code, out) == (0, f"sqlite: {tmp_path / 's.sqlite'} (not created yet: nothing recorded)\n")
    with StateDB(tmp_path / "s.sqlite") as db:
        db.finish_run(db.start_run("j", "web", None, "manual"), "success")
    code, out, _ = cli("state", "info", "--config", str(cfg))
    lines = out.splitlines()
    assert code == 0 and lines[:2] == [
        f"sqlite: {tmp_path / 's.sqlite'}",
        f"schema revision: {migrations.HEAD}",
    ]
    assert lines[3].split() == ["block_maps", "0"] and ["runs", "1"] in [line.split() for line in lines]
