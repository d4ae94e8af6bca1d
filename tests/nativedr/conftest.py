"""A fresh two-pool simulator per test: pool a (the primary) with a vApp of two VMs on its iSCSI
SR (LUN sim-lun-0) and metadata replication there; pool b the recovery pool."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "xapi"))
sys.path.insert(0, str(Path(__file__).parent))
from nativetest import Site, make_site
from xapitest import MIB, PASSWORD, Pools

from xencr.sim.harness import running_simulator


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with running_simulator(tmp_path / "sim", pools=2, vms=2, disk_size=4 * MIB, password=PASSWORD) as sim:
        pools = Pools(tmp_path / "sim", sim.urls)
        yield make_site(tmp_path, pools)
        for s in pools.sessions:
            s.logout()
