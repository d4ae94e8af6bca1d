"""Cluster tests: one simulator for the module (VMs on pools a and c, b the target), the
helpers importable, and an environment without the user's configuration."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clustertest import MIB, PASSWORD

from xencr.sim.harness import RunningSimulator, running_simulator


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSimulator]:
    with running_simulator(
        tmp_path_factory.mktemp("sim"),
        pools=3,
        vms=6,
        disk_size=32 * MIB,
        sr_size=8192 * MIB,
        password=PASSWORD,
    ) as s:
        yield s


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.delenv("XENCR_CONFIG", raising=False)
    for name in list(os.environ):
        if name.startswith("XENCR_") and name.endswith("_PASSWORD") and name != "XENCR_TEST_PG_PASSWORD":
            monkeypatch.delenv(name)
