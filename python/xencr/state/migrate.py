"""Bringing a state database to the schema this xencr writes: Alembic revisions, one set for
SQLite and PostgreSQL, shipped in the package (``alembic/versions``) and run from here (no
``alembic.ini`` needed by users).

- A fresh database (either engine) goes through every revision; the baseline (``0001``) is the
  schema the numbered SQLite migrations had reached (schema 10).
- An SQLite file from before Alembic (a ``schema_version`` table, no ``alembic_version``) is first
  brought to schema 10 by the frozen `legacy.MIGRATIONS`, then stamped with the baseline.
- A database stamped with a revision this xencr does not know, or whose ``schema_version`` is
  past 10, was written by a newer xencr: refused, never misread.

All of it runs in the caller's write transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: under
an advisory lock), so processes opening a fresh database together take turns.

A new revision (developers): write ``alembic/versions/NNNN_what.py`` with ``down_revision`` the
current head, using ``op.batch_alter_table`` for changes SQLite cannot ``ALTER``; change
`schema.py` to match (tests/state checks that a migrated database equals it), and `HEAD`. A
revision an xencr from before Alembic would misread (it sees schema 10) may insert row 11 into
``schema_version`` to make those refuse the database; `upgrade`'s legacy check must then allow it.
Pre-Alembic files carry SQLite's unnamed foreign keys: test a revision on one of those too. Alembic's command
line works from ``python/xencr/state`` (its ``alembic.ini``):
``alembic -x url=sqlite:////tmp/dev.sqlite upgrade head`` then
``alembic -x url=sqlite:////tmp/dev.sqlite revision --autogenerate -m "what"``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Column, Connection, MetaData, String, Table, func, inspect, select, text

from xencr.state.legacy import MIGRATIONS, SCHEMA_VERSION
from xencr.state.rows import time_text
from xencr.state.schema import schema_version

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

SCRIPTS = Path(__file__).parent / "alembic"
BASELINE = "0001"
# The newest revision in SCRIPTS (tests/state checks it is Alembic's head): a database already
# there is opened without loading Alembic (a quarter of a second per process).
HEAD = "0003"
_alembic_version = Table("alembic_version", MetaData(), Column("version_num", String(32), primary_key=True))
# pg_advisory_xact_lock key for "migrating the xencr state" (any fixed number; "xencr" in ASCII).
_MIGRATE_LOCK = 0x78656E6372


class NewerDatabase(Exception):
    """The database was written by a newer xencr; the message says by how much."""


class NotStateDatabase(Exception):
    """The database holds tables xencr cannot place in its history; the message says which."""


@functools.cache
def scripts() -> ScriptDirectory:
    """The revisions shipped with this xencr (read once per process)."""
    from alembic.script import ScriptDirectory  # Alembic only when migrating: see HEAD

    return ScriptDirectory.from_config(alembic_config())


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """Alembic's configuration without an ini file; ``connection`` is what env.py migrates."""
    from alembic.config import Config as AlembicConfig  # Alembic only when migrating: see HEAD

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(SCRIPTS).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision this xencr knows."""
    heads = scripts().get_heads()
    assert len(heads) == 1, f"state migrations have several heads: {heads}"
    return heads[0]


def revision(conn: Connection) -> str | None:
    """The revision a database is stamped with (None: not stamped: fresh, or from before Alembic)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(select(_alembic_version.c.version_num)).scalar()


def upgrade(conn: Connection, now: Callable[[], datetime]) -> bool:
    """Bring the database on ``conn`` (a write transaction) to `head`; whether anything was
    applied. `NewerDatabase` when it is newer than this xencr."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(_MIGRATE_LOCK)))
    tables = set(inspect(conn).get_table_names())
    legacy = 0
    if "schema_version" in tables:
        legacy = conn.execute(select(func.coalesce(func.max(schema_version.c.version), 0))).scalar_one()
        if legacy > SCHEMA_VERSION:
            raise NewerDatabase(f"schema {legacy}, this one knows {SCHEMA_VERSION}")
    current = revision(conn) if "alembic_version" in tables else None
    if current == HEAD:
        return False
    from alembic import command  # Alembic only when migrating: see HEAD
    from alembic.util.exc import CommandError

    if current is not None:
        try:
            scripts().get_revision(current)
        except CommandError:
            raise NewerDatabase(f"revision {current}, this one knows up to {head()}") from None
    elif "schema_version" in tables:
        if conn.dialect.name != "sqlite":
            raise NotStateDatabase("a schema_version table without an Alembic revision")
        _legacy_to_baseline(conn, legacy, now)
        command.stamp(alembic_config(conn), BASELINE)
    command.upgrade(alembic_config(conn), "head")
    return True


def _legacy_to_baseline(conn: Connection, current: int, now: Callable[[], datetime]) -> None:
    """An SQLite file from before Alembic, at schema ``current``: the numbered migrations left."""
    for version in range(current + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[version - 1]:
            conn.exec_driver_sql(statement)
        conn.execute(
            text("INSERT INTO schema_version (version, applied_at) VALUES (:v, :t)"),
            {"v": version, "t": time_text(now())},
        )
