"""Run a simulator in-process, for other test suites and the demo:

    with running_simulator(tmp_path, pools=2) as sim:
        session = XenAPI.Session(sim.urls[0])
        session.xenapi.login_with_password("root", sim.password, "1.0", "tests")

The state directory is initialised when empty (small disks by default, failed logins answer at
once); ``restart()`` stops and serves the same state again (sessions are lost, refs are not).

Pools of several hosts (``hosts=2``): ``urls[i]`` is host 0 of pool ``i`` (the first master),
``host_urls[i][j]`` host ``j``; the hosts keep their ports across ``restart()``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from xencr.sim.control import serve
from xencr.sim.layout import MIB, host_counts, init_state, pool_count, read_password
from xencr.sim.tls import host_certificate


class RunningSimulator:
    def __init__(self, state: Path, *, tls: bool = False) -> None:
        self.state = state
        self.tls = tls
        self.urls: list[str] = []  # per pool, host 0
        self.host_urls: list[list[str]] = []  # per pool, every host in host order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def password(self) -> str:
        return read_password(self.state)

    def certificate(self, pool: int, host: int = 0) -> Path:
        """The certificate host ``host`` of pool ``pool`` presents under ``tls=True``."""
        counts = host_counts(self.state)
        cert, _ = host_certificate(self.state, pool, host, own=counts[pool] > 1)
        return cert

    def start(self, timeout: float = 30.0) -> None:
        counts = host_counts(self.state)
        expected = len(counts) + sum(n for n in counts if n > 1)
        self._stop = threading.Event()
        ready = threading.Event()
        lines: list[list[str]] = []
        errors: list[BaseException] = []

        def announce(line: str) -> None:
            if line.startswith("pool"):
                lines.append(line.split())
                if len(lines) == expected:
                    ready.set()

        def run() -> None:
            try:
                serve(
                    self.state,
                    pools=None,
                    host="127.0.0.1",
                    port=0,
                    password_file=None,
                    auth_delay=0.0,
                    announce=announce,
                    stop=self._stop,
                    tls=self.tls,
                )
            except BaseException as err:
                errors.append(err)
                ready.set()

        self._thread = threading.Thread(target=run, name="xencr-sim", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or errors:
            raise RuntimeError(f"simulator did not start: {errors[0] if errors else 'timeout'}")
        self.urls = [words[1] for words in lines if len(words) == 2]
        self.host_urls = [[url] if n == 1 else [] for url, n in zip(self.urls, counts, strict=True)]
        for words in lines:
            if len(words) == 3:  # "pool<i> host<j> <url>", in host order
                self.host_urls[int(words[0][4:])].append(words[2])

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextmanager
def running_simulator(
    state: Path,
    *,
    pools: int = 2,
    vms: int = 2,
    disk_size: int = 8 * MIB,
    sr_size: int = 1024 * MIB,
    password: str | None = None,
    tls: bool = False,
    hosts: int = 1,
) -> Iterator[RunningSimulator]:
    """Initialise ``state`` if it is empty (``hosts`` hosts per pool), serve it on free ports,
    stop on exit."""
    state.mkdir(parents=True, exist_ok=True)
    if pool_count(state) == 0:
        init_state(
            state, pools, vms=vms, disk_size=disk_size, sr_size=sr_size, password=password, hosts=hosts
        )
    sim = RunningSimulator(state, tls=tls)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()
