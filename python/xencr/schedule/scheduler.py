"""Which (job, schedule) pairs are due: one next fire time per pair, best effort.

A pair whose fire time has passed is due once, however many of its ticks were missed (a long
run, a suspended host): missed ticks are not queued, the next fire is the first after now.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from xencr.config import ScheduleConfig
from xencr.schedule.timing import next_fire

Entry = tuple[str, ScheduleConfig]  # (job id, schedule)


class Scheduler:
    def __init__(self, entries: Iterable[Entry], now: datetime) -> None:
        self._entries: dict[tuple[str, str], ScheduleConfig] = {}
        self._next: dict[tuple[str, str], datetime] = {}
        self.update(entries, now)

    def update(self, entries: Iterable[Entry], now: datetime) -> None:
        """Take a new set of entries (a reloaded config); a pair whose schedule did not change
        keeps its next fire, others start from ``now``."""
        old_entries, old_next = self._entries, self._next
        self._entries, self._next = {}, {}
        for job_id, s in entries:
            key = (job_id, s.id)
            self._entries[key] = s
            same = old_entries.get(key) == s and key in old_next
            self._next[key] = old_next[key] if same else next_fire(s, now)

    def due(self, now: datetime) -> list[Entry]:
        """The pairs due at ``now`` (each once), in fire-time order; their next fires move past now."""
        ready = sorted((t, key) for key, t in self._next.items() if t <= now)
        out = []
        for _, key in ready:
            s = self._entries[key]
            self._next[key] = next_fire(s, now)
            out.append((key[0], s))
        return out

    def next_wake(self) -> datetime | None:
        return min(self._next.values(), default=None)

    def next_fires(self) -> dict[tuple[str, str], datetime]:
        """Next fire per (job id, schedule id)."""
        return dict(self._next)
