"""Connecting to the state database: one SQLAlchemy engine per `StateDB`, set up so that several
processes share an SQLite file, and several hosts a PostgreSQL database.

SQLite: WAL journal (readers never wait for a writer), a 30 s busy timeout, foreign keys on, and
write transactions opened with ``BEGIN IMMEDIATE`` (the write lock up front: two processes wait
for each other instead of failing on a lock upgrade); reads open a plain ``BEGIN``. Python's
sqlite3 driver is kept out of transaction control (``isolation_level = None``) so that these
statements are the only ones that open transactions.

PostgreSQL (psycopg 3): the password is handed to the driver apart from the URL, so that neither
the URL, the engine's ``repr`` nor an error carries it; a pooled connection is checked before use
(a restarted server costs one failed ping, not a failed write); TCP keepalives and a user timeout
bound how long a silent server goes unnoticed.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import URL, Connection, Engine, create_engine, event, exc, make_url

from xencr.config import StateLocation
from xencr.credentials import Secret


class StateError(Exception):
    """The state database cannot be used (newer schema, not a database, unwritable, unreachable)."""


# In a connection's ``info``: its next transaction writes (SQLite: ``BEGIN IMMEDIATE``).
WRITE = "xencr_write"
BUSY_TIMEOUT = 30.0  # seconds an SQLite writer waits for another


def create(location: StateLocation, password: Secret | None) -> Engine:
    """An engine for ``location`` (no connection made yet)."""
    if location.path is not None:
        url = URL.create("sqlite+pysqlite", database=str(location.path))
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    assert location.url is not None
    url = make_url(location.url)
    # A server gone silent (a partition, a host lost) is noticed in about half a minute rather
    # than the kernel's 15: keepalives for idle connections, and a bound on unacknowledged data
    # (a worker must see it lost the database before its lease lapses). The URL may say otherwise.
    args: dict[str, Any] = {
        k: v
        for k, v in (
            ("connect_timeout", 10),
            ("keepalives", 1),
            ("keepalives_idle", 10),
            ("keepalives_interval", 5),
            ("keepalives_count", 3),
            ("tcp_user_timeout", 30_000),
        )
        if k not in url.query
    } | {"application_name": "xencr"}
    if password is not None:
        args["password"] = password.reveal()
    try:
        return create_engine(url, connect_args=args, pool_pre_ping=True, pool_size=2)
    except ImportError:
        raise StateError(
            f"{location.describe()}: PostgreSQL needs psycopg 3: pip install 'xencr[postgresql]'"
        ) from None


def _sqlite_connect(dbapi: sqlite3.Connection, _record: object) -> None:
    dbapi.isolation_level = None  # transactions are opened by `_sqlite_begin` only
    for pragma in (
        f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}",
        "PRAGMA foreign_keys = ON",
        "PRAGMA synchronous = NORMAL",
    ):
        dbapi.execute(pragma)


def _sqlite_begin(conn: Connection) -> None:
    statement = "BEGIN IMMEDIATE" if conn.info.get(WRITE) else "BEGIN"
    dbapi = conn.connection.driver_connection
    assert isinstance(dbapi, sqlite3.Connection)
    try:
        dbapi.execute(statement)  # the driver's own call: SQLAlchemy's would cost as much again
    except sqlite3.Error as err:
        raise exc.OperationalError(statement, None, err) from None


def use_wal(engine: Engine) -> None:
    """Switch an SQLite file to WAL (kept by the file; outside any transaction, which SQLite
    requires)."""
    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        try:
            dbapi.execute("PRAGMA journal_mode = WAL")
        except sqlite3.Error as err:
            raise exc.OperationalError("PRAGMA journal_mode = WAL", None, err) from None


def reason(err: BaseException, password: Secret | None) -> str:
    """What went wrong, as one line without the password (a driver error's own text, when any)."""
    orig = err.orig if isinstance(err, exc.DBAPIError) and err.orig is not None else err
    text = " ".join(str(orig).split()) or type(orig).__name__
    if password is not None and password.reveal():
        text = text.replace(password.reveal(), "***")
    return text


def is_transient(err: BaseException) -> bool:
    """SQLite's "locked"/"busy" answered at once (switching a new file to WAL does not wait on
    the busy timeout): worth a retry."""
    text = str(err.orig if isinstance(err, exc.DBAPIError) else err)
    return isinstance(err, exc.OperationalError) and ("locked" in text or "busy" in text)
