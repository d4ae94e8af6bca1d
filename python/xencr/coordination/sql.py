"""What every coordination table's statements share: the database server's time, an upsert that
speaks both dialects, a retry for statements a restarting server interrupts, and the rule that
says whether a claim (lease, slot) still stands."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Connection, Table, Text, and_, exists, func, literal, or_, select
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite as lite

from xencr.state import StateError
from xencr.state.rows import time_text
from xencr.state.schema import workers

T = TypeVar("T")


def server_now(conn: Connection) -> datetime:
    """The database server's time (PostgreSQL: the transaction's start), aware UTC: one clock for
    every host's claims. SQLite (one host): this host's."""
    if conn.dialect.name == "postgresql":
        now: datetime = conn.execute(select(func.now())).scalar_one()
        return now.astimezone(UTC)
    return datetime.now(UTC)


def now_text(conn: Connection, plus: float = 0.0) -> ColumnElement[str]:
    """The database server's time (PostgreSQL: its transaction's start) ``plus`` seconds, as
    stored text, computed by the server within the statement (no round trip of its own).
    SQLite (one host): this host's time, as a value."""
    if conn.dialect.name == "postgresql":
        return _pg_now(plus)
    return literal(time_text(datetime.now(UTC) + timedelta(seconds=plus)), Text)


@functools.lru_cache(maxsize=64)
def _pg_now(plus: float) -> ColumnElement[str]:
    # Built once per offset (a handful: the leases): building it costs more than the statement.
    t: ColumnElement[Any] = func.now()
    if plus:
        t = t + func.make_interval(0, 0, 0, 0, 0, 0, plus)
    return func.to_char(func.timezone("UTC", t), _PG_TIME_FORMAT, type_=Text)


# `rows.TIME_FORMAT` in PostgreSQL's words: the same fixed-width text, so times compare as text.
_PG_TIME_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'


def insert(conn: Connection, table: Table) -> Any:
    """An INSERT with ``on_conflict_do_update/nothing`` in the connection's dialect."""
    return (pg if conn.dialect.name == "postgresql" else lite).insert(table)


def lapsed(
    expires_at: ColumnElement[str], worker: ColumnElement[str], now: ColumnElement[str]
) -> ColumnElement[bool]:
    """A claim that no longer stands at ``now`` (`now_text`): past its expiry, or its worker
    stopped cleanly."""
    stopped = exists().where(workers.c.name == worker, workers.c.stopped_at.is_not(None))
    return or_(expires_at < now, stopped)


def standing(
    expires_at: ColumnElement[str], worker: ColumnElement[str], now: ColumnElement[str]
) -> ColumnElement[bool]:
    """The opposite of `lapsed`."""
    stopped = exists().where(workers.c.name == worker, workers.c.stopped_at.is_not(None))
    return and_(expires_at >= now, ~stopped)


def retried(attempt: Callable[[], T], *, seconds: float, stop: Callable[[], bool] = lambda: False) -> T:
    """``attempt()``, again with backoff while the state database fails (`StateError`: a server
    restarting or out of reach) for up to ``seconds``, or until ``stop()``; then its error.
    For statements that may be run twice (claims carry a token: a retried claim finds its own)."""
    deadline = time.monotonic() + seconds
    delay = 0.1
    while True:
        try:
            return attempt()
        except StateError:
            if stop() or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
