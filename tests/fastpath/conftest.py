"""Two simulated pools: a (source) and b (target), fresh per module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "xapi"))
from xapitest import MIB, PASSWORD, Pools

from xencr.sim.harness import running_simulator


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    state = tmp_path_factory.mktemp("sim")
    with running_simulator(state, pools=2, vms=5, disk_size=8 * MIB, password=PASSWORD) as sim:
        p = Pools(state, sim.urls)
        yield p
        for s in p.sessions:
            s.logout()
