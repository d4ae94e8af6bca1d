"""A fresh two-pool simulator per test module, served in-process (as in tests/xapi), and no
real config, data dir or password of the caller."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "xapi"))
from xapitest import Pools, run_sim


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    yield from run_sim(tmp_path_factory.mktemp("sim"))


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.delenv("XENCR_CONFIG", raising=False)
    for name in list(os.environ):
        if name.startswith("XENCR_") and name.endswith("_PASSWORD"):
            monkeypatch.delenv(name)
