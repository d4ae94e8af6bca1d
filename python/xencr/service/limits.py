"""Per-pool limits on disk transfers, shared by every job of one process: at most ``max_exports``
disks exported from a pool at once and ``max_imports`` imported into it, so that overlapping runs
of a daemon do not pile streams onto one pool's storage and network.

One condition guards all counters and a transfer takes its export and its import slots together
(never one while waiting for the other), so no two transfers can wait on each other. The limit is
read at each acquisition: after a configuration reload the new value applies to the next disk.

The runner asks for slots through a `SlotProvider`: `IN_PROCESS` (these counters: one process), or
with a PostgreSQL state the database's numbered slots (`xencr.coordination.slots`: every worker).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

_cond = threading.Condition()
_in_use: dict[tuple[str, str], int] = {}  # ("export" | "import", pool name) -> transfers running


class SlotCancelled(Exception):
    """Waiting for a transfer slot was given up (the run was cancelled or its deadline passed)."""


class SlotsUnavailable(SlotCancelled):
    """Where the slots are counted did not answer (a cluster's state database out of reach):
    ``str()`` is one line naming it."""


@dataclass(frozen=True)
class Slot:
    """One side of a transfer: which pool, which direction, and how many may run at once there."""

    kind: str  # "export" or "import"
    pool: str
    limit: int


def in_use(kind: str, pool: str) -> int:
    """How many transfers of ``kind`` involve ``pool`` now (for tests and status)."""
    with _cond:
        return _in_use.get((kind, pool), 0)


@contextmanager
def transfer_slots(
    slots: list[Slot], *, cancel: threading.Event | None = None, deadline: float | None = None
) -> Iterator[None]:
    """Wait until every slot has room, hold them all for the block, then free them. Raises
    :class:`SlotCancelled` if ``cancel`` is set or ``deadline`` (``time.monotonic()``) passes first."""
    keys = [((s.kind, s.pool), max(1, s.limit)) for s in slots]
    with _cond:
        while not all(_in_use.get(k, 0) < limit for k, limit in keys):
            if cancel is not None and cancel.is_set():
                raise SlotCancelled("cancelled while waiting for a transfer slot")
            if deadline is not None and time.monotonic() >= deadline:
                raise SlotCancelled("deadline passed while waiting for a transfer slot")
            # Woken by a release; the short period also notices cancel and the deadline.
            _cond.wait(0.1)
        for k, _ in keys:
            _in_use[k] = _in_use.get(k, 0) + 1
    try:
        yield
    finally:
        with _cond:
            for k, _ in keys:
                _in_use[k] -= 1
                if not _in_use[k]:
                    del _in_use[k]
            _cond.notify_all()


class SlotProvider(Protocol):
    """Where transfer slots are counted: `transfer_slots`' contract (all slots of a transfer
    together, waiting with ``cancel`` and ``deadline``, `SlotCancelled` when given up)."""

    def transfer_slots(
        self, slots: list[Slot], *, cancel: threading.Event | None = None, deadline: float | None = None
    ) -> AbstractContextManager[None]: ...


class _InProcess:
    """The counters of this process (`transfer_slots`)."""

    def transfer_slots(
        self, slots: list[Slot], *, cancel: threading.Event | None = None, deadline: float | None = None
    ) -> AbstractContextManager[None]:
        return transfer_slots(slots, cancel=cancel, deadline=deadline)


IN_PROCESS: SlotProvider = _InProcess()
