"""Live progress of the transfers of a run: one line per disk in flight, with rate and ETA, read
from the engine's byte counters by a thread while the transfers run without the GIL. Only on a
terminal; elsewhere the run's log lines say when each disk starts and ends, and at what rate."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from xencr import _engine
from xencr.cli.progress import human_bytes


@dataclass
class _Transfer:
    label: str
    total: int
    counter: _engine.Progress
    start: float


class LiveTransfers:
    """``monitor.begin(label, total)`` returns the counter to hand to the engine; ``end(label)``."""

    def __init__(self, *, enabled: bool | None = None, interval: float = 0.5) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.interval = interval
        self._lock = threading.Lock()
        self._active: dict[str, _Transfer] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = 0

    def begin(self, label: str, total: int) -> _engine.Progress:
        counter = _engine.Progress()
        with self._lock:
            self._active[label] = _Transfer(label, total, counter, time.monotonic())
        return counter

    def end(self, label: str) -> None:
        with self._lock:
            self._active.pop(label, None)

    @staticmethod
    def line(t: _Transfer, now: float) -> str:
        total = t.total or t.counter.total  # a relay learns the length itself
        t = _Transfer(t.label, total, t.counter, t.start)
        done = min(t.counter.bytes, t.total)
        elapsed = max(now - t.start, 1e-6)
        speed = done / elapsed
        eta = (t.total - done) / speed if speed > 0 else None
        pct = 100 * done // t.total if t.total else 100
        eta_text = f"ETA {int(eta) // 60}:{int(eta) % 60:02d}" if eta is not None else "ETA -"
        sizes = f"{human_bytes(done)}/{human_bytes(t.total)}"
        return f"{t.label}: {pct:3d}% {sizes} {human_bytes(speed)}/s {eta_text}"

    def _draw(self) -> None:
        with self._lock:
            lines = [self.line(t, time.monotonic()) for t in self._active.values()]
        out = "".join("\x1b[1A\x1b[2K" for _ in range(self._drawn))  # erase what we drew last
        out += "".join(line + "\n" for line in lines)
        sys.stderr.write(out)
        sys.stderr.flush()
        self._drawn = len(lines)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def __enter__(self) -> LiveTransfers:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            with self._lock:
                self._active.clear()
            self._draw()
