"""A fresh two-pool simulator per test module, served in-process (as in tests/safety)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "xapi"))
from xapitest import Pools, run_sim


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    yield from run_sim(tmp_path_factory.mktemp("sim"))
