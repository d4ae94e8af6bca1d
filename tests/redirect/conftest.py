"""Two simulated pools of three hosts each, served in-process once per module (plain HTTP), and
the same over TLS."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "xapi"))
from xapitest import MIB, PASSWORD, Pools

from xencr.sim.harness import RunningSimulator, running_simulator
from xencr.sim.tls import fingerprint


def _serve(state: Path, tls: bool) -> Iterator[tuple[Pools, RunningSimulator]]:
    # vm2's disk is on host 2's local SR (VM k on host k mod 3).
    with running_simulator(
        state, pools=2, vms=3, disk_size=16 * MIB, sr_size=512 * MIB, password=PASSWORD, tls=tls, hosts=3
    ) as sim:
        fp = fingerprint(sim.certificate(0, 0)).replace(":", "").lower() if tls else None
        pools = Pools(state, sim.urls, fp)
        yield pools, sim
        for s in pools.sessions:
            s.logout()


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pools, RunningSimulator]]:
    yield from _serve(tmp_path_factory.mktemp("multi"), tls=False)


@pytest.fixture(scope="module")
def multi_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pools, RunningSimulator]]:
    yield from _serve(tmp_path_factory.mktemp("multitls"), tls=True)
