"""`xencr demo`: the engine's replication primitive, end to end, on a small VHD chain.

A dynamic base and a differencing child (a "snapshot" with guest writes, one of them ending in
the middle of a bitmap byte) are built with the engine; then, as continuous replication does,
the delta stream between them is exported and applied onto a raw copy of the base. The copy must
then hash to the chain's content, and to an independent in-memory model.

The replication issue will replace this with a demo between two simulated pools.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable

import typer

from xencr import pattern
from xencr.cli.render import render_info

SIZE = 64 << 20
BASE_TAG = 0xBA5E
CHILD_TAG = 0xC41D
# (start sector, count): the layout of the shared test vectors, so the hashes can be compared.
BASE_EXTENTS = [(0, 4096), (4096, 100), (20480, 4096), (126976, 4096)]
CHILD_EXTENTS = [(4100, 8), (12288, 4096), (20490, 20), (24576, 8), (131064, 8)]


def _fill(path: str, tag: int, extents: list[tuple[int, int]], model: bytearray) -> None:
    from xencr import _engine as eng

    for start, count in extents:
        data = pattern.sectors(tag, start, count)
        eng.write(path, start * pattern.SECTOR, data)
        model[start * pattern.SECTOR : (start + count) * pattern.SECTOR] = data


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def run(workdir: str | None = None, echo: Callable[[str], None] = typer.echo) -> bool:
    """Run the demo in ``workdir`` (kept) or a temporary directory; True when verified."""
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        return _run(workdir, echo)
    with tempfile.TemporaryDirectory(prefix="xencr-demo-") as tmp:
        return _run(tmp, echo)


def _run(d: str, echo: Callable[[str], None]) -> bool:
    from xencr import _engine as eng

    base, child = os.path.join(d, "base.vhd"), os.path.join(d, "child.vhd")
    delta, replica = os.path.join(d, "delta.vhd"), os.path.join(d, "replica.raw")
    for p in (base, child, delta, replica):
        if os.path.exists(p):
            os.unlink(p)
    model = bytearray(SIZE)
    t0 = time.monotonic()

    echo(f"# in {d}: a 64 MiB dynamic base with 3 written extents, then a snapshot child")
    eng.create(base, SIZE)
    _fill(base, BASE_TAG, BASE_EXTENTS, model)
    base_model_sha = hashlib.sha256(model).hexdigest()
    eng.create(child, SIZE, parent=base)
    _fill(child, CHILD_TAG, CHILD_EXTENTS, model)
    model_sha = hashlib.sha256(model).hexdigest()

    echo("\n$ xencr vhd info child.vhd")
    echo(render_info(eng.info(child)))

    echo("\n$ xencr vhd check base.vhd child.vhd")
    problems = {p: eng.check(p) for p in (base, child)}
    for p, found in problems.items():
        for line in found or ["ok"]:
            echo(f"{os.path.basename(p)}: {line}")
    if any(problems.values()):
        echo("demo: FAILED: the chain does not check clean")
        return False

    echo("\n$ xencr vhd cat base.vhd -o replica.raw        # the replica as of the last run")
    eng.cat(base, replica)
    echo("\n$ xencr vhd stream child.vhd --base base.vhd -o delta.vhd")
    sent = eng.export_stream(child, delta, base)
    echo(
        f"delta stream: {sent['bytes_out']} bytes, {sent['blocks']} blocks of "
        f"{sent['block_size'] >> 20} MiB, parent {sent['parent_uuid']}"
    )
    echo("\n$ xencr vhd apply delta.vhd replica.raw --format raw")
    got = eng.apply_stream(delta, replica, target_format="raw", require_full_bitmaps=True)
    echo(f"applied {got['blocks']} blocks, {got['sectors_written']} sectors written")

    chain_sha = eng.sha256(child)
    replica_sha = _file_sha256(replica)
    base_sha = eng.sha256(base)

    # Then the source side's housekeeping: merge the snapshot chain back into one disk.
    echo("\n$ xencr vhd merge child.vhd")
    merged = eng.coalesce(child)
    echo(
        f"merged {merged['sectors_merged']} sectors into the base; "
        f"child.vhd is now {eng.info(child)['disk_type']}"
    )
    merged_sha = eng.sha256(child)

    echo("")
    echo(f"base    sha256 {base_sha}  (model {'agrees' if base_sha == base_model_sha else 'DIFFERS'})")
    echo(f"chain   sha256 {chain_sha}  (model {'agrees' if chain_sha == model_sha else 'DIFFERS'})")
    echo(f"replica sha256 {replica_sha}")
    echo(f"merged  sha256 {merged_sha}")
    ok = replica_sha == chain_sha == merged_sha == model_sha and base_sha == base_model_sha
    took = time.monotonic() - t0
    if ok:
        echo(
            "verified: the replica (base + delta stream) and the merged disk "
            f"have the chain's content ({took:.1f}s)"
        )
    else:
        echo("demo: FAILED: the replica's or the merged disk's content differs from the chain's")
    return ok
