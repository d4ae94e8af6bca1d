"""Progress of the transfers of a run, read from the engine's byte counters by a thread while the
transfers run without the GIL.

On a terminal: one live line per disk in flight, redrawn twice a second. Elsewhere (a timer's
`xencr run`, the daemon, anything a journal keeps): a plain line per disk at least every
``LOG_EVERY`` seconds and at every ``LOG_STEP`` percent it crosses, with bytes, rate and ETA, so
that a long transfer shows it is alive. Where the run's log lines go is the caller's ``log``."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from xencr import _engine
from xencr.units import human_bytes, human_eta

# Without a terminal: a line per transfer at least this often (seconds), and at each step of
# this many percent. Tests shorten LOG_EVERY.
LOG_EVERY = 30.0
LOG_STEP = 10


@dataclass
class _Transfer:
    label: str
    total: int
    counter: _engine.Progress
    start: float
    logged_at: float = 0.0  # when its last plain line was written (monotonic)
    logged_step: int = 0  # the LOG_STEP bucket of that line


@dataclass(frozen=True)
class _Sample:
    """A transfer at one moment: what is done of what, how fast, how long is left."""

    done: int
    total: int  # 0: not known yet
    speed: float  # bytes per second since it began
    eta: float | None

    @property
    def percent(self) -> int | None:
        return 100 * self.done // self.total if self.total else None


def _to_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _sample(t: _Transfer, now: float) -> _Sample:
    total = t.total or t.counter.total  # a relay learns the length itself
    done = min(t.counter.bytes, total) if total else t.counter.bytes
    speed = done / max(now - t.start, 1e-6)
    eta = (total - done) / speed if total and speed > 0 else None
    return _Sample(done, total, speed, eta)


class LiveTransfers:
    """``monitor.begin(label, total)`` returns the counter to hand to the engine; ``end(label)``.

    ``enabled`` (default: stderr is a terminal) draws live lines on stderr. Otherwise plain
    progress lines go to ``log`` every ``log_every`` seconds (default ``LOG_EVERY``) and every
    ``LOG_STEP`` percent; ``log`` defaults to stderr when ``enabled`` was left to the terminal
    (``enabled=False`` without a ``log``: no progress at all, e.g. ``--json``)."""

    def __init__(
        self,
        *,
        enabled: bool | None = None,
        interval: float = 0.5,
        log: Callable[[str], None] | None = None,
        log_every: float | None = None,
    ) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.interval = interval
        if log is None and enabled is None:
            log = _to_stderr
        self.log = None if self.enabled else log
        self.log_every = LOG_EVERY if log_every is None else log_every
        self._lock = threading.Lock()
        self._active: dict[str, _Transfer] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = 0

    def begin(self, label: str, total: int) -> _engine.Progress:
        counter = _engine.Progress()
        now = time.monotonic()
        with self._lock:
            self._active[label] = _Transfer(label, total, counter, now, logged_at=now)
        return counter

    def end(self, label: str) -> None:
        with self._lock:
            self._active.pop(label, None)

    @staticmethod
    def line(t: _Transfer, now: float) -> str:
        """The live line: ``LABEL:  40% 6.4 MiB/16.0 MiB 3.2 MiB/s ETA 0:03``."""
        s = _sample(t, now)
        pct = s.percent if s.percent is not None else 100
        sizes = f"{human_bytes(s.done)}/{human_bytes(s.total)}"
        return f"{t.label}: {pct:3d}% {sizes} {human_bytes(s.speed)}/s ETA {human_eta(s.eta)}"

    @staticmethod
    def log_line(t: _Transfer, now: float) -> str:
        """The plain line: ``LABEL: 40% of 16.0 MiB (6.4 MiB), 3.2 MiB/s, ETA 0:03``."""
        s = _sample(t, now)
        rate = f"{human_bytes(s.speed)}/s"
        if s.percent is None:
            return f"{t.label}: {human_bytes(s.done)} sent, {rate}"
        return (
            f"{t.label}: {s.percent}% of {human_bytes(s.total)} ({human_bytes(s.done)}), "
            f"{rate}, ETA {human_eta(s.eta)}"
        )

    def _draw(self) -> None:
        with self._lock:
            lines = [self.line(t, time.monotonic()) for t in self._active.values()]
        out = "".join("\x1b[1A\x1b[2K" for _ in range(self._drawn))  # erase what we drew last
        out += "".join(line + "\n" for line in lines)
        sys.stderr.write(out)
        sys.stderr.flush()
        self._drawn = len(lines)

    def _log_due(self) -> None:
        """A plain line for each transfer whose time or next percent step has come."""
        assert self.log is not None
        now = time.monotonic()
        due = []
        with self._lock:
            for t in self._active.values():
                pct = _sample(t, now).percent
                step = pct // LOG_STEP if pct is not None else 0
                if now - t.logged_at >= self.log_every or step > t.logged_step:
                    t.logged_at, t.logged_step = now, step
                    due.append(self.log_line(t, now))
        for line in due:
            self.log(line)

    def _loop(self) -> None:
        if self.log is not None:
            # Often enough to catch each step and keep to the period, cheap either way.
            tick = min(0.2, self.log_every / 4)
            while not self._stop.wait(tick):
                self._log_due()
            return
        while not self._stop.wait(self.interval):
            self._draw()

    def __enter__(self) -> LiveTransfers:
        if self.enabled or self.log is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.enabled:
            with self._lock:
                self._active.clear()
            self._draw()
