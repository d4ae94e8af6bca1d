"""Engine API details the replication code relies on: streams arriving on a socket after a
peeked prefix, re-parenting, deltas between sibling chains, and a coalesce killed at any time."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vhdtest import BASE_EXTENTS, SPEC_CHAIN, MiB, file_sha256, pattern_raw, sha256

from xencr import _engine as eng
from xencr import pattern

BASE = "caml-dynamic-base.vhd"
CHILD = "caml-diff-child.vhd"


@pytest.fixture
def chain(vectors: Path, tmp_path: Path) -> tuple[str, str]:
    for name in (BASE, CHILD):
        shutil.copy(vectors / name, tmp_path / name)
        (tmp_path / name).chmod(0o644)
    return str(tmp_path / CHILD), str(tmp_path / BASE)


def test_apply_after_a_peeked_prefix_stops_at_length(chain: tuple[str, str], tmp_path: Path) -> None:
    """An HTTP handler has read the first bytes already and the connection carries more after
    the body: the engine takes the prefix, then reads exactly up to `length`."""
    child, base = chain
    delta = tmp_path / "delta.vhd"
    eng.export_stream(child, str(delta), base)
    body = delta.read_bytes()
    wire = tmp_path / "wire"
    wire.write_bytes(body + b"NEXT REQUEST")
    replica = tmp_path / "replica.raw"
    replica.write_bytes(pattern_raw(64 * MiB, 0xBA5E, BASE_EXTENTS))
    fd = os.open(wire, os.O_RDONLY)
    try:
        prefix = os.read(fd, 700)  # part of the header
        report = eng.apply_stream(fd, str(replica), target_format="raw", length=len(body), prefix=prefix)
        assert os.read(fd, 100) == b"NEXT REQUEST"
    finally:
        os.close(fd)
    assert report["bytes_in"] == len(body)
    assert file_sha256(replica) == SPEC_CHAIN


def test_transform_with_prefix_and_length(chain: tuple[str, str], tmp_path: Path) -> None:
    child, base = chain
    delta = tmp_path / "delta.vhd"
    eng.export_stream(child, str(delta), base)
    body = delta.read_bytes()
    wire = tmp_path / "wire"
    wire.write_bytes(body + b"tail")
    out = tmp_path / "out.vhd"
    fd = os.open(wire, os.O_RDONLY)
    try:
        prefix = os.read(fd, 512)
        report = eng.transform(fd, str(out), length=len(body), prefix=prefix, rate_limit=10 << 30)
    finally:
        os.close(fd)
    assert out.read_bytes() == body
    assert report["bytes_in"] == report["bytes_out"] == len(body)


def test_short_body_with_announced_length_is_rejected(chain: tuple[str, str], tmp_path: Path) -> None:
    child, base = chain
    delta = tmp_path / "delta.vhd"
    eng.export_stream(child, str(delta), base)
    body = delta.read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(body[: len(body) // 2])
    with pytest.raises(eng.VhdError):
        eng.transform(str(cut), os.devnull, length=len(body))


def test_set_parent_and_set_uuid(chain: tuple[str, str], tmp_path: Path) -> None:
    """Re-point a child at a copy of its parent that got a new UUID (what a clone does)."""
    child, base = chain
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    new_base = str(moved / "base-copy.vhd")
    shutil.copy(base, new_base)
    new_uuid = "12345678-1234-4234-8234-123456789abc"
    eng.set_uuid(new_base, new_uuid)
    assert eng.info(new_base)["footer"]["uuid"] == new_uuid
    assert eng.check(new_base) == []
    with pytest.raises(eng.VhdError) as err:
        eng.sha256(child, [new_base])
    assert err.value.kind == "parent_mismatch"
    eng.set_parent(child, new_base)
    assert eng.info(child)["header"]["parent_uuid"] == new_uuid
    os.unlink(base)
    assert [os.path.normpath(p) for p in eng.chain(child)] == [child, new_base]
    assert eng.sha256(child) == SPEC_CHAIN


def test_delta_between_sibling_chains(tmp_path: Path) -> None:
    """base -> a and base -> b: the delta of b against a (symmetric difference of the two
    chains) applied onto a's content yields b's."""
    size = 16 * MiB
    base, a, b = (str(tmp_path / n) for n in ("base.vhd", "a.vhd", "b.vhd"))
    eng.create(base, size, block_size=1 * MiB)
    model = bytearray(size)
    for off, tag in [(0, 1), (5 * MiB + 700, 2)]:
        data = pattern.sectors(tag, off // 512, 9)
        eng.write(base, off, data)
        model[off : off + len(data)] = data
    models = {}
    for path, writes in [
        (a, [(1 * MiB + 3, 5000), (9 * MiB, 100)]),
        (b, [(3 * MiB, 1 << 20), (9 * MiB + 50, 10)]),
    ]:
        eng.create(path, size, parent=base)
        m = bytearray(model)
        for off, n in writes:
            data = random.Random(off).randbytes(n)
            eng.write(path, off, data)
            m[off : off + n] = data
        models[path] = m
    delta = str(tmp_path / "delta.vhd")
    eng.export_stream(b, delta, a)
    target = tmp_path / "a.raw"
    target.write_bytes(models[a])
    eng.apply_stream(delta, str(target), target_format="raw")
    assert sha256(target.read_bytes()) == sha256(models[b])


KILL_SCRIPT = """
import sys
from xencr import _engine as eng
eng.coalesce(sys.argv[1])
"""


def test_coalesce_killed_at_any_time_leaves_a_readable_chain(tmp_path: Path) -> None:
    """SIGKILL a merge at random moments: the child's path always reads the chain's content
    (through the old chain, or merged), and calling coalesce again finishes the job."""
    size = 64 * MiB
    src = tmp_path / "src"
    src.mkdir()
    base, child = str(src / "base.vhd"), str(src / "child.vhd")
    eng.create(base, size)
    model = bytearray(size)
    rng = random.Random(5)
    for _ in range(12):
        off = rng.randrange(0, size - 3 * MiB)
        data = rng.randbytes(rng.randrange(1, 3 * MiB))
        eng.write(base, off, data)
        model[off : off + len(data)] = data
    eng.create(child, size, parent=base)
    for _ in range(40):
        off = rng.randrange(0, size - MiB)
        data = rng.randbytes(rng.randrange(1, MiB))
        eng.write(child, off, data)
        model[off : off + len(data)] = data
    expected = sha256(model)
    assert eng.sha256(child) == expected

    # How long an uninterrupted merge takes here, to spread the kills over it.
    probe = tmp_path / "probe"
    shutil.copytree(src, probe)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(probe / "child.vhd")], check=True)
    full = time.perf_counter() - t0

    outcomes: list[tuple[bool, list[str]]] = []
    for i in range(10):
        run = tmp_path / f"run{i}"
        shutil.copytree(src, run)
        leaf = str(run / "child.vhd")
        p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, leaf])
        time.sleep(full * i / 7)  # up to past the end: before, during and after the merge
        p.send_signal(signal.SIGKILL)
        p.wait()
        outcomes.append((os.path.exists(run / "base.vhd"), sorted(os.listdir(run))))
        # Whatever the moment, the leaf path reads the right content...
        assert eng.sha256(leaf) == expected, f"kill {i}"
        # ...and a second call completes (or finds nothing left to do).
        try:
            eng.coalesce(leaf)
        except eng.VhdError as err:
            assert err.kind == "not_differencing", err  # the first run had finished
        assert eng.info(leaf)["disk_type"] == "dynamic"
        assert eng.check(leaf) == []
        assert eng.sha256(leaf) == expected
        assert sorted(os.listdir(run)) == ["child.vhd"], f"left behind after kill {i}"
    print(outcomes)  # which step each kill interrupted, for -s runs


def _grown_chain(tmp_path: Path) -> tuple[str, str, bytearray]:
    """An 8 MiB base whose snapshot child was grown to 16 MiB (VDI.resize), with data on both
    sides of the old end."""
    base, child = str(tmp_path / "base.vhd"), str(tmp_path / "child.vhd")
    model = bytearray(16 * MiB)
    eng.create(base, 8 * MiB)
    eng.write(base, 8 * MiB - 512, b"\1" * 512)
    model[8 * MiB - 512 : 8 * MiB] = b"\1" * 512
    eng.create(child, 16 * MiB, parent=base)
    eng.write(child, 12 * MiB + 3, b"\2" * 1000)
    model[12 * MiB + 3 : 12 * MiB + 1003] = b"\2" * 1000
    return base, child, model


def test_grown_leaf_reads_streams_and_applies(tmp_path: Path) -> None:
    base, child, model = _grown_chain(tmp_path)
    assert eng.virtual_size(child) == 16 * MiB
    assert eng.read(child, 8 * MiB - 512, 1024) == b"\1" * 512 + bytes(512)
    assert eng.sha256(child) == sha256(model)
    delta = str(tmp_path / "delta.vhd")
    report = eng.export_stream(child, delta, base)
    assert report["virtual_size"] == 16 * MiB
    replica = tmp_path / "replica.raw"
    replica.write_bytes(bytes(model[: 8 * MiB]) + bytes(8 * MiB))  # grown by the importer
    eng.apply_stream(delta, str(replica), target_format="raw")
    assert sha256(replica.read_bytes()) == sha256(model)


# XenServer's GC coalesces a resized leaf by first growing the parent (SM cleanup.py
# _increaseSizeVirt); so does ours (the parent's table is relocated and grown).
def test_grown_leaf_coalesces(tmp_path: Path) -> None:
    _, child, model = _grown_chain(tmp_path)
    eng.coalesce(child)
    assert eng.virtual_size(child) == 16 * MiB
    assert eng.sha256(child) == sha256(model)
