"""Progress of a coarse engine call, shown only when stderr is a terminal.

Engine calls move whole files and release the GIL, so progress is measured from the outside: a
thread samples the size of the output file. When there is no file to watch (a pipe), only the
start and the final rate are shown. Nothing is printed when stderr is not a terminal.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType

from xencr.units import human_bytes, human_rate


class Progress:
    """``with Progress("export", total, watch=path) as p: ...; p.done(nbytes)``."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        watch: str | None = None,
        enabled: bool | None = None,
        interval: float = 0.5,
    ) -> None:
        self.label = label
        self.total = total
        self.watch = watch
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.interval = interval
        self.start = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0
        self.finished_bytes: int | None = None

    def _size(self) -> int:
        assert self.watch is not None
        try:
            return max(0, os.stat(self.watch).st_size - self._base)
        except OSError:
            return 0

    def _line(self, done: int) -> str:
        elapsed = time.monotonic() - self.start
        parts = [f"{self.label}: {human_bytes(done)}"]
        if self.total:
            pct = min(100.0, 100.0 * done / self.total)
            parts.append(f"of {human_bytes(self.total)} ({pct:.0f}%)")
        parts.append(human_rate(done, elapsed))
        if self.total and done and elapsed > 0:
            eta = max(0.0, (self.total - done) / (done / elapsed))
            parts.append(f"ETA {eta:.0f}s")
        return " ".join(parts)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            sys.stderr.write("\r\033[K" + self._line(self._size()))
            sys.stderr.flush()

    def __enter__(self) -> Progress:
        self.start = time.monotonic()
        if not self.enabled:
            return self
        # An existing target (apply onto a raw base) already has a size; count growth only when
        # the file is new, otherwise its size says nothing and we just time the call.
        if self.watch is not None and os.path.exists(self.watch):
            self.watch = None
        if self.watch is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        else:
            sys.stderr.write(f"{self.label}...")
            sys.stderr.flush()
        return self

    def done(self, nbytes: int) -> None:
        """Record the amount the operation moved, for the final rate."""
        self.finished_bytes = nbytes

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        if exc is not None:
            sys.stderr.write("\r\033[K")
        else:
            n = self.finished_bytes or 0
            sys.stderr.write(
                f"\r\033[K{self.label}: {human_bytes(n)} in {elapsed:.2f}s, {human_rate(n, elapsed)}\n"
            )
        sys.stderr.flush()


def timed(label: str, fn: Callable[[], int], *, total: int | None = None, watch: str | None = None) -> int:
    """Run ``fn`` (returning bytes moved) under a :class:`Progress`."""
    with Progress(label, total, watch=watch) as p:
        n = fn()
        p.done(n)
    return n
