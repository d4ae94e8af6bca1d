"""Block maps and where the state database keeps them: the serialisation, the content digest,
combining a delta with its base, the zero-block rule, the schema migration and dropping maps no
restore point uses."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from xencr.config import StateLocation
from xencr.replication.blockmap import BlockMap, MapError, combine, differing
from xencr.state import MAP_GRACE, MIGRATIONS, SCHEMA_VERSION, StateDB
from xencr.xapi.transfer import zero_digest

ALG, SIZE = "xxh3-128", 2 * 1024 * 1024
ZERO = zero_digest(ALG, SIZE)


def _h(n: int) -> str:
    return f"{n:032x}"


def test_zero_digest_is_the_engines() -> None:
    # xxh3-128 of 2 MiB of zeros, as the engine digests a block of a stream.
    assert ZERO == "7b3e6abe1456fd0094e26d8e04364852"


def test_map_round_trip_digest_and_size() -> None:
    m = BlockMap(ALG, SIZE, {0: _h(1), 7: _h(2), 1000: _h(3)})
    assert BlockMap.from_bytes(m.to_bytes()) == m
    # The digest names the content: same blocks in another order, same digest; another, not.
    assert BlockMap(ALG, SIZE, {1000: _h(3), 0: _h(1), 7: _h(2)}).digest == m.digest
    assert m.digest.startswith("xxh3-128-map:") and len(m.digest) == len("xxh3-128-map:") + 64
    assert BlockMap(ALG, SIZE, {0: _h(1), 7: _h(2), 1000: _h(4)}).digest != m.digest
    # 16 bytes a block plus almost nothing: a fully allocated 2 TiB disk stores ~16 MiB.
    many = BlockMap(ALG, SIZE, {i: hashlib.md5(str(i).encode()).hexdigest() for i in range(20000)})
    assert 20000 * 16 < len(many.to_bytes()) < 20000 * 16 + 2000
    with pytest.raises(MapError, match="unreadable block map"):
        BlockMap.from_bytes(m.to_bytes()[:-3])


def test_combine_and_the_zero_rule() -> None:
    # A full's map is what was sent, zero blocks left out (the same as unallocated ones).
    full = combine(None, [(0, _h(1)), (1, ZERO), (2, _h(2))], algorithm=ALG, block_size=SIZE)
    assert dict(full.blocks) == {0: _h(1), 2: _h(2)}
    assert full == BlockMap.of_blocks(ALG, SIZE, [(0, _h(1)), (2, _h(2)), (5, ZERO)])
    # A delta replaces its blocks; a block it sent as zeros leaves the map.
    delta = combine(full, [(2, ZERO), (3, _h(9))], algorithm=ALG, block_size=SIZE)
    assert dict(delta.blocks) == {0: _h(1), 3: _h(9)}
    assert differing(delta, {0: _h(1), 2: _h(2), 3: _h(8)}) == [2, 3]
    assert differing(delta, {0: _h(1), 2: _h(2), 3: _h(8)}, indices={0, 1}) == []
    with pytest.raises(MapError, match="base map"):
        combine(full, [], algorithm=ALG, block_size=SIZE * 2)


def test_maps_in_the_state_database(state_where: StateLocation) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    db = StateDB(state_where, clock=lambda: now[0])
    a = BlockMap(ALG, SIZE, {0: _h(1)})
    b = BlockMap(ALG, SIZE, {0: _h(2)})
    assert db.put_map(a) == a.digest and db.put_map(b) == b.digest
    assert db.get_map(a.digest) == a and db.get_map("xxh3-128-map:none") is None
    run = db.start_run("j", "job", None, "manual")
    for rp, m in (("rp-1", a), ("rp-2", b)):
        task = db.start_task(run, "vm", "vm", "sr")
        db.finish_task(
            task, "success", reasons={"0": "delta"}, restore_point=rp, maps={"0": m.digest}, detached=2
        )
    assert [(t.maps, t.detached) for t in db.tasks(run)] == [({"0": a.digest}, 2), ({"0": b.digest}, 2)]
    # rp-1 expires; its map goes once nothing uses it and it is older than the grace.
    assert db.release_maps(["rp-1"]) == 0  # just put: maybe an attempt's, still running
    now[0] += MAP_GRACE + timedelta(seconds=1)
    assert db.release_maps([]) == 1
    assert db.get_map(a.digest) is None and db.get_map(b.digest) == b
    assert db.map_bytes() == len(b.to_bytes())
    db.close()


def test_migration_from_schema_2_keeps_the_history(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    for version, statements in enumerate(MIGRATIONS[:2], start=1):
        for statement in statements:
            raw.execute(statement)
        raw.execute("INSERT INTO schema_version VALUES (?, '2026-01-01T00:00:00.000000Z')", (version,))
    raw.execute(
        "INSERT INTO runs (job_id, job_name, trigger, started_at, host, pid)"
        " VALUES ('j', 'job', 'manual', '2026-01-01T00:00:00.000000Z', 'h', 1)"
    )
    raw.execute(
        "INSERT INTO tasks (run_id, vm_uuid, vm_name, target_sr, started_at, outcome)"
        " VALUES (1, 'vm', 'vm', 'sr', '2026-01-01T00:00:00.000000Z', 'success')"
    )
    raw.execute("INSERT INTO task_disks VALUES (1, '0', 'first run')")
    raw.commit()
    raw.close()
    with StateDB(path) as db:
        assert db.schema_version == SCHEMA_VERSION
        [task] = db.tasks(1)
        assert (task.reasons, task.maps, task.detached) == ({"0": "first run"}, {}, 0)
