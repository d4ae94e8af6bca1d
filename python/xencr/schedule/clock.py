"""Time for the daemon's loop: the system's, or a fake one tests move by hand."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

# Tests only (never documented for users): the daemon reads its time from this file.
CLOCK_FILE_ENV = "XENCR_TEST_CLOCK_FILE"

# Sleep in slices so a clock stepped by NTP or a resumed laptop is noticed within a minute.
_SLICE = 60.0


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, aware, in UTC."""
        ...

    def wait_until(self, t: datetime, stop: threading.Event) -> bool:
        """Block until ``t``: True when it is reached, False as soon as ``stop`` is set."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def wait_until(self, t: datetime, stop: threading.Event) -> bool:
        while True:
            if stop.is_set():
                return False
            remaining = (t - self.now()).total_seconds()
            if remaining <= 0:
                return True
            if stop.wait(min(remaining, _SLICE)):
                return False


class FakeClock:
    """A clock that moves only when told (``advance``, ``set``); ``wait_until`` blocks the calling
    thread until the time is reached, so a daemon loop in a thread follows the test's steps."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock needs an aware start time")
        self._now = start.astimezone(UTC)
        self._cond = threading.Condition()
        self._sleepers = 0
        self._waits = 0  # calls of wait_until so far

    def now(self) -> datetime:
        with self._cond:
            return self._now

    def advance(self, delta: timedelta) -> None:
        self.set(self.now() + delta)

    def set(self, t: datetime) -> None:
        with self._cond:
            self._now = t.astimezone(UTC)
            self._cond.notify_all()

    def wait_until(self, t: datetime, stop: threading.Event) -> bool:
        with self._cond:
            self._sleepers += 1
            self._waits += 1
            self._cond.notify_all()
            try:
                while self._now < t:
                    if stop.is_set():
                        return False
                    # ``stop`` is an Event, not our condition: look at it often.
                    self._cond.wait(0.01)
                return not stop.is_set()
            finally:
                self._sleepers -= 1
                self._cond.notify_all()

    @property
    def waits(self) -> int:
        """How many times ``wait_until`` was entered: pass it to ``wait_for_sleeper`` before moving
        the clock to learn when the waiting thread has handled the move and sleeps again."""
        with self._cond:
            return self._waits

    def wait_for_sleeper(self, timeout: float = 10.0, *, since: int = 0) -> bool:
        """Block (real time) until a thread waits in a ``wait_until`` entered after ``since``
        earlier calls; False after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._sleepers > 0 and self._waits > since, timeout)


class FileClock:
    """Time read from a file holding one ISO 8601 instant, which a test rewrites (atomically) to
    move the clocks of several daemon processes at once; ``wait_until`` looks at it every
    ``poll`` seconds."""

    def __init__(self, path: Path, *, poll: float = 0.05) -> None:
        self.path = path
        self.poll = poll

    def now(self) -> datetime:
        text = self.path.read_text(encoding="utf-8").strip()
        t = datetime.fromisoformat(text)
        if t.tzinfo is None:
            raise ValueError(f"{self.path}: the test clock needs an aware time, not {text!r}")
        return t.astimezone(UTC)

    def wait_until(self, t: datetime, stop: threading.Event) -> bool:
        while not stop.is_set():
            if self.now() >= t:
                return True
            stop.wait(self.poll)
        return False


def clock_from_env() -> Clock | None:
    """The test clock named by $XENCR_TEST_CLOCK_FILE, if set."""
    path = os.environ.get(CLOCK_FILE_ENV)
    return FileClock(Path(path)) if path else None
