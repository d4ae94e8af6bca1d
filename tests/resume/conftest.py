"""A two-pool simulator with large SRs (vm0 gets a 512 MiB disk in the tests' fixture)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "xapi"))

from xapitest import MIB, PASSWORD, Pools

from xencr.sim.harness import running_simulator


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    # Room for several fulls of a 512 MiB disk on either side (the simulator's files are sparse).
    with running_simulator(
        tmp_path_factory.mktemp("sim"),
        pools=2,
        vms=1,
        disk_size=16 * MIB,
        sr_size=8192 * MIB,
        password=PASSWORD,
    ) as sim:
        p = Pools(sim.state, sim.urls)
        yield p
        for s in p.sessions:
            s.logout()
