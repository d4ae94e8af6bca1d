"""Fixtures of the engine tests: the shared VHD vectors, decompressed once per session."""

from __future__ import annotations

import lzma
import os
import shutil
import stat
from pathlib import Path

import pytest

VECTORS_SRC = Path(os.environ.get("XENCR_VECTORS", Path(__file__).parent / "vectors"))


@pytest.fixture(scope="session")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding every vector decompressed, with its original name (children find
    their parents through relative locators), read-only so no test can alter them."""
    d = tmp_path_factory.mktemp("vhd-vectors")
    for xz in sorted(VECTORS_SRC.glob("*.vhd.xz")):
        out = d / xz.name.removesuffix(".xz")
        out.write_bytes(lzma.decompress(xz.read_bytes()))
        out.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    for extra in ("hashes.txt", *(p.name for p in VECTORS_SRC.glob("*.inspect.txt"))):
        shutil.copy(VECTORS_SRC / extra, d / extra)
    return d


@pytest.fixture
def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        pytest.fail("qemu-img is required (apt-get install qemu-utils); scripts/test.sh installs it")
    return path
