"""PostgreSQL for the tests that need one (the state database on PostgreSQL).

The server: $XENCR_TEST_PG (postgresql://user@host:port/db, the password in
$XENCR_TEST_PG_PASSWORD; scripts/test.sh starts a throwaway cluster and sets both), else a
cluster this session starts itself when PostgreSQL is installed (pytest run by hand), else the
tests that need it FAIL: they are skipped only when XENCR_NO_PG=1 says so explicitly.

Each test module (`pg_url`) or test (`fresh_pg`) gets a database of its own, created empty by the
server's user (it has CREATEDB) and dropped afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import pgcluster
from pgtest import NO_PG_ENV, PG_ENV, PG_PASSWORD_ENV, PgServer, pg_location
from xencr.config import StateLocation
from xencr.state import StateDB

# Read once, as the session starts: the server fixture may first be asked for inside a test whose
# fixtures isolate the environment (its password variables removed).
_GIVEN = os.environ.get(PG_ENV), os.environ.get(PG_PASSWORD_ENV, "")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    given, password = _GIVEN
    if given:
        yield PgServer(given, password)
        return
    if os.environ.get(NO_PG_ENV) == "1":
        pytest.skip(f"{NO_PG_ENV}=1: the tests that need PostgreSQL are not run")
    if pgcluster.bindir() is None:
        pytest.fail(
            f"{PG_ENV} is unset and PostgreSQL is not installed (apt-get install postgresql, or run "
            f"scripts/test.sh); set {NO_PG_ENV}=1 to skip these tests knowingly"
        )
    # Directly under /tmp: the server's user (postgres, when run as root) must reach it.
    root = Path(tempfile.mkdtemp(prefix="xencr-pg-"))
    try:
        cluster = pgcluster.start(root)
    except Exception as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start a PostgreSQL cluster: {err}")
    os.environ[PG_ENV], os.environ[PG_PASSWORD_ENV] = cluster.url, cluster.password
    try:
        yield PgServer(cluster.url, cluster.password)
    finally:
        pgcluster.stop(root)
        shutil.rmtree(root, ignore_errors=True)
        os.environ.pop(PG_ENV, None)
        os.environ.pop(PG_PASSWORD_ENV, None)


def _database(server: PgServer, template: str | None = None) -> Iterator[str]:
    name = f"xencr_t_{uuid.uuid4().hex[:12]}"
    with server.admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield server.database_url(name)
    finally:
        with server.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """An empty database for this test module: its URL (no password: ``pg_location``)."""
    yield from _database(pg_server)


@pytest.fixture
def pg_password(pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test server's password, also in $XENCR_TEST_PG_PASSWORD for this test (whatever
    an isolating fixture removed from the environment), where `pg_location` has it read."""
    monkeypatch.setenv(PG_PASSWORD_ENV, pg_server.password)
    return pg_server.password


@pytest.fixture(scope="session")
def pg_migrated(pg_server: PgServer) -> Iterator[str]:
    """A database migrated to the newest schema and closed: the template of `fresh_pg` (a copy
    is made in a fraction of the time migrating takes)."""
    for url in _database(pg_server):
        with pytest.MonkeyPatch.context() as env:
            env.setenv(PG_PASSWORD_ENV, pg_server.password)
            StateDB(pg_location(url)).close()
        yield urlsplit(url).path.lstrip("/")


@pytest.fixture
def empty_pg(pg_server: PgServer, pg_password: str) -> Iterator[StateLocation]:
    """An empty database (no schema) for this test, as a state location."""
    for url in _database(pg_server):
        yield pg_location(url)


@pytest.fixture
def fresh_pg(pg_server: PgServer, pg_migrated: str, pg_password: str) -> Iterator[StateLocation]:
    """A database for this test, with the newest schema and no records, as a state location."""
    for url in _database(pg_server, template=pg_migrated):
        yield pg_location(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def state_where(request: pytest.FixtureRequest, tmp_path: Path) -> StateLocation:
    """A fresh state location on each engine in turn."""
    if request.param == "sqlite":
        return StateLocation(path=tmp_path / "deep" / "dir" / "state.sqlite")
    location: StateLocation = request.getfixturevalue("fresh_pg")
    return location
