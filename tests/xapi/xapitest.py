"""Helpers of the XAPI client and replication tests: a two-pool simulator served in-process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xencr.sim.control import serve
from xencr.sim.layout import init_state
from xencr.xapi.session import Endpoint, XapiSession

MIB = 1024 * 1024
PASSWORD = "pw:with@odd/chars%"


@dataclass
class Pools:
    state: Path
    urls: list[str]
    stop: threading.Event
    fingerprint: str | None = None
    sessions: list[XapiSession] = field(default_factory=list)

    def session(self, i: int, fingerprint: str | None = None) -> XapiSession:
        endpoint = Endpoint(self.urls[i], fingerprint=fingerprint or self.fingerprint)
        s = XapiSession(endpoint, "root", PASSWORD, retries=1, backoff=0.05)
        self.sessions.append(s)
        return s


def run_sim(state: Path, *, tls: bool = False) -> Iterator[Pools]:
    """Serve a fresh two-pool state until the generator is closed."""
    init_state(state, 2, vms=2, disk_size=16 * MIB, sr_size=1024 * MIB, password=PASSWORD)
    stop = threading.Event()
    urls: list[str] = []
    fingerprint: list[str] = []
    ready = threading.Event()

    def announce(line: str) -> None:
        if line.startswith("tls "):
            fingerprint.append(line.split()[-1])
        if line.startswith("pool"):
            urls.append(line.split()[1])
            if len(urls) == 2:
                ready.set()

    def run() -> None:
        serve(
            state,
            pools=None,
            host="127.0.0.1",
            port=0,
            password_file=None,
            auth_delay=0.0,
            announce=announce,
            stop=stop,
            tls=tls,
        )

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(30), "simulator did not start"
    fp = fingerprint[0].replace(":", "").lower().removeprefix("sha256") if fingerprint else None
    p = Pools(state, urls, stop, fp)
    yield p
    for s in p.sessions:
        s.logout()
    stop.set()
    t.join(30)
