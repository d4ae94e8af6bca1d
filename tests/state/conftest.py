"""Fixtures of the state database tests: no real config, data dir or password of the caller."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.delenv("XENCR_CONFIG", raising=False)
    for name in list(os.environ):
        if name.startswith("XENCR_") and name.endswith("_PASSWORD") and name != "XENCR_TEST_PG_PASSWORD":
            monkeypatch.delenv(name)
