"""A fresh two-pool simulator per test module, served in-process on free ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from simtest import DISK, MIB, Sim

from xencr.sim.layout import init_state


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    state = tmp_path_factory.mktemp("sim")
    init_state(state, 2, vms=2, disk_size=DISK, sr_size=1024 * MIB, password="s3cret-pw")
    s = Sim(state)
    s.start()
    yield s
    s.shutdown()
