"""A fresh three-pool simulator per test module: pool 0 the primary site (source), pools 1
and 2 two DR targets holding restore points of different ages."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "xapi"))
from xapitest import MIB, PASSWORD, Pools

from xencr.replication.ownership import FAILED_OVER
from xencr.sim.harness import running_simulator


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    state = tmp_path_factory.mktemp("sim")
    with running_simulator(
        state, pools=3, vms=2, disk_size=4 * MIB, sr_size=512 * MIB, password=PASSWORD
    ) as sim:
        p = Pools(state, sim.urls)
        yield p
        for s in p.sessions:
            s.logout()


@pytest.fixture(autouse=True)
def _failovers_ended(pools: Pools) -> Iterator[None]:
    """After each test, what an administrator does once a failover is over (failed back): the
    failed-over VMs go, so that the jobs replicate those VMs again in the next test."""
    yield
    for i in (1, 2):
        t = pools.session(i)
        for ref, rec in t.api.VM.get_all_records().items():
            if rec["is_a_snapshot"] or FAILED_OVER not in rec["other_config"]:
                continue
            if rec["power_state"] != "Halted":
                t.api.VM.hard_shutdown(ref)
            vdis = [t.api.VBD.get_VDI(b) for b in rec["VBDs"] if t.api.VBD.get_type(b) == "Disk"]
            snaps = [x for v in vdis for x in t.api.VDI.get_snapshots(v)]
            t.api.VM.destroy(ref)
            for vdi in [*snaps, *vdis]:
                t.api.VDI.destroy(vdi)
