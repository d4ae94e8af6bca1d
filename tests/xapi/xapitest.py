"""Helpers of the XAPI client and replication tests: a two-pool simulator served in-process."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xencr.sim.harness import running_simulator
from xencr.sim.tls import fingerprint
from xencr.xapi.session import Endpoint, XapiSession

MIB = 1024 * 1024
PASSWORD = "pw:with@odd/chars%"


@dataclass
class Pools:
    state: Path
    urls: list[str]
    fingerprint: str | None = None
    sessions: list[XapiSession] = field(default_factory=list)

    def session(self, i: int, fingerprint: str | None = None) -> XapiSession:
        endpoint = Endpoint(self.urls[i], fingerprint=fingerprint or self.fingerprint)
        s = XapiSession(endpoint, "root", PASSWORD, retries=1, backoff=0.05)
        self.sessions.append(s)
        return s


def run_sim(state: Path, *, tls: bool = False) -> Iterator[Pools]:
    """Serve a fresh two-pool state until the generator is closed."""
    with running_simulator(
        state, pools=2, vms=2, disk_size=16 * MIB, sr_size=1024 * MIB, password=PASSWORD, tls=tls
    ) as sim:
        fp = None
        if tls:
            fp = fingerprint(state / "tls" / "cert.pem").replace(":", "").lower()
        p = Pools(state, sim.urls, fp)
        yield p
        for s in p.sessions:
            s.logout()
