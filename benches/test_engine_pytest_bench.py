"""pytest-benchmark variant of the engine benchmark, on a smaller disk (not part of the tests).

    .venv/bin/python -m pytest benches/test_engine_pytest_bench.py --benchmark-only

Each figure is the engine call alone on page-cached inputs; `engine_bench.py` has the full
comparison against dd and qemu-img, and the peak RSS.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xencr import _engine as eng
from xencr import pattern

SIZE = 512 << 20
BS = 2 << 20


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    d = tmp_path_factory.mktemp("bench")
    raw, base, child = str(d / "base.raw"), str(d / "base.vhd"), str(d / "child.vhd")
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        for i in pattern.random_allocation(1, SIZE // BS, 0.25):
            f.seek(i * BS)
            f.write(pattern.random_block(1, i, BS))
    eng.convert(raw, base, src_format="raw", dst_format="dynamic")
    eng.create(child, SIZE, parent=base)
    for i in pattern.random_allocation(2, SIZE // BS, 0.10):
        eng.write(child, i * BS, pattern.random_block(2, i, BS))
    full, delta = str(d / "full.vhd"), str(d / "delta.vhd")
    eng.export_stream(child, full)
    eng.export_stream(child, delta, base)
    yield {"dir": str(d), "raw": raw, "base": base, "child": child, "full": full, "delta": delta}
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def devnull() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_WRONLY)
    yield fd
    os.close(fd)


def test_transform(benchmark: Any, disks: dict[str, str], devnull: int) -> None:
    r = benchmark(eng.transform, disks["full"], devnull)
    benchmark.extra_info["allocated_bytes"] = r["blocks"] * r["block_size"]


def test_export_full(benchmark: Any, disks: dict[str, str], devnull: int) -> None:
    benchmark(eng.export_stream, disks["child"], devnull)


def test_export_delta(benchmark: Any, disks: dict[str, str], devnull: int) -> None:
    benchmark(eng.export_stream, disks["child"], devnull, disks["base"])


def test_diff(benchmark: Any, disks: dict[str, str]) -> None:
    benchmark(eng.diff, disks["base"], disks["child"], granularity=64 << 10)


def test_apply(benchmark: Any, disks: dict[str, str]) -> None:
    target = Path(disks["dir"]) / "target.raw"

    def setup() -> tuple[tuple[str, str], dict[str, str]]:
        with open(target, "wb") as f:
            f.truncate(SIZE)
        return (disks["delta"], str(target)), {"target_format": "raw"}

    benchmark.pedantic(eng.apply_stream, setup=setup, rounds=5)


def test_coalesce(benchmark: Any, disks: dict[str, str]) -> None:
    work = Path(disks["dir"]) / "merge"

    def setup() -> tuple[tuple[str], dict[str, str]]:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        for name in ("base.vhd", "child.vhd"):
            shutil.copyfile(disks[name.removesuffix(".vhd")], work / name)
        os.sync()
        return (str(work / "child.vhd"),), {}

    benchmark.pedantic(eng.coalesce, setup=setup, rounds=3)
