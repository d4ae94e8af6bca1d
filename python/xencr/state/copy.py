"""Copying a whole state database into another (`xencr state migrate --to postgresql://...`):
every table, ids kept, in one transaction on the target, then checked table by table.

Rules:
- The target must hold no records (only its schema): a copy never merges two histories.
- The source is read in one snapshot; the target is written in one transaction, parents before
  children (foreign keys hold throughout), and PostgreSQL's id sequences are moved past the
  copied ids so that the next run or task gets a new one.
- The check: per table, the row count and a digest of its rows in primary key order (each value
  in a canonical form: integers, text, bytes, floats as written), computed on each side from what
  that side's database returns. Equal on both sides, or the command fails.
- ``schema_version`` and ``alembic_version`` describe a database, not its records: each side
  keeps its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, func, insert, select, text

from xencr.state.db import StateDB
from xencr.state.engine import StateError
from xencr.state.schema import COORDINATION_TABLES, TABLES

# Records, not the claims of running workers (leases, slots, the queue: they mean nothing to a
# new database and would make an empty one look used).
CONTENT_TABLES: tuple[Table, ...] = tuple(
    t for t in TABLES if t.name != "schema_version" and t not in COORDINATION_TABLES
)
_BATCH = 500  # rows per INSERT; tables of block maps (up to 16 MiB each) go by fewer
_BLOB_BATCH = 8


@dataclass(frozen=True)
class TableSum:
    """One table's row count and content digest (sha256 hex of its rows in key order)."""

    table: str
    rows: int
    digest: str


@dataclass(frozen=True)
class CopyResult:
    """Both sides' sums, table by table in `CONTENT_TABLES` order: the source's in the snapshot
    copied, the target's after the commit; ``source_changed``: the source has other counts now
    (something wrote to it during the copy: those records are not in the target)."""

    source: tuple[TableSum, ...]
    target: tuple[TableSum, ...]
    source_changed: bool = False

    @property
    def equal(self) -> bool:
        return self.source == self.target


def _canonical(value: Any) -> bytes:
    """A value as the digest sees it: the same on both engines for what each returns."""
    if value is None:
        return b"N"
    if isinstance(value, bool | int):
        return b"I" + str(int(value)).encode()
    if isinstance(value, float):
        return b"F" + repr(value).encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return b"B" + bytes(value).hex().encode()
    return b"S" + str(value).encode("utf-8", "surrogatepass")


def _rows(conn: Connection, table: Table, batch: int) -> Iterator[list[dict[str, Any]]]:
    """A table's rows in primary key order, a batch at a time (streamed, not all in memory)."""
    key = list(table.primary_key.columns)
    result = conn.execute(select(table).order_by(*key).execution_options(yield_per=batch))
    for part in result.mappings().partitions(batch):
        yield [dict(r) for r in part]


def _batch(table: Table) -> int:
    return _BLOB_BATCH if table.name == "block_maps" else _BATCH


def table_sum(conn: Connection, table: Table) -> TableSum:
    """``table``'s count and digest as ``conn`` sees it."""
    digest, rows = hashlib.sha256(), 0
    names = [c.name for c in table.columns]
    for part in _rows(conn, table, _batch(table)):
        for row in part:
            digest.update(b"\x1e".join(_canonical(row[n]) for n in names) + b"\x1d")
            rows += 1
    return TableSum(table.name, rows, digest.hexdigest())


def sums(db: StateDB) -> tuple[TableSum, ...]:
    """Every content table's sums, in one snapshot."""
    with db.reading() as conn:
        return tuple(table_sum(conn, t) for t in CONTENT_TABLES)


def counts(db: StateDB) -> dict[str, int]:
    """Rows per content table, in one snapshot."""
    with db.reading() as conn:
        return {
            t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
            for t in CONTENT_TABLES
        }


def copy_all(source: StateDB, target: StateDB) -> CopyResult:
    """Copy every record of ``source`` into ``target`` (which must hold none), then sum both.
    `StateError` when the target holds records (nothing written)."""
    held = {name: n for name, n in counts(target).items() if n}
    if held:
        what = ", ".join(f"{n} {name}" for name, n in held.items())
        raise StateError(
            f"{target.location.describe()} already holds records ({what}): the copy goes into an "
            "empty database only (create a new one, or drop these tables)"
        )
    with source.reading() as src:
        with target.transaction() as dst:
            for table in CONTENT_TABLES:
                for part in _rows(src, table, _batch(table)):
                    dst.execute(insert(table), part)
            if dst.dialect.name == "postgresql":
                _advance_sequences(dst)
        copied = tuple(table_sum(src, t) for t in CONTENT_TABLES)
    now = counts(source)
    changed = any(now[s.table] != s.rows for s in copied)
    return CopyResult(copied, sums(target), changed)


def _advance_sequences(conn: Connection) -> None:
    """Each id sequence past the largest id copied (the next insert takes the one after it)."""
    for table in CONTENT_TABLES:
        column = table.autoincrement_column
        if column is None:
            continue
        conn.execute(
            text(
                f"SELECT setval(pg_get_serial_sequence('{table.name}', '{column.name}'),"
                f" COALESCE((SELECT MAX({column.name}) FROM {table.name}), 1),"
                f" (SELECT MAX({column.name}) FROM {table.name}) IS NOT NULL)"
            )
        )
