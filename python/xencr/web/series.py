"""A job's history as the charts draw it: its runs (bytes by kind and duration) and the age of
its oldest newest restore point over time. From the state database's rows only."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from xencr.state import PointRow, RunRow, RunSums


@dataclass(frozen=True)
class RunBar:
    """One run of a job, as its chart draws it."""

    run_id: int
    started: datetime
    seconds: float | None  # None: still running
    outcome: str
    trigger: str
    full: int  # bytes sent by tasks that sent every disk in full
    delta: int
    mixed: int  # tasks with some disks full and some delta
    tasks: dict[str, int]  # outcome -> tasks
    error: str | None = None

    @property
    def total(self) -> int:
        return self.full + self.delta + self.mixed


class AgeStep(NamedTuple):
    """The job's worst restore point age (the oldest of its VMs' newest) at a moment, in
    seconds; VM/targets without a restore point yet do not count."""

    at: datetime
    age: int


def run_bars(runs: list[RunRow], sums: dict[int, RunSums]) -> list[RunBar]:
    out = []
    for r in runs:
        s = sums.get(r.id, RunSums(r.id, {}, {}))
        d = r.duration
        out.append(
            RunBar(
                run_id=r.id,
                started=r.started_at,
                seconds=d.total_seconds() if d is not None else None,
                outcome=r.outcome,
                trigger=r.trigger,
                full=s.bytes_sent.get("full", 0),
                delta=s.bytes_sent.get("delta", 0),
                mixed=s.bytes_sent.get("mixed", 0),
                tasks=dict(s.tasks),
                error=r.error,
            )
        )
    return out


def worst_ages(points: list[PointRow], since: datetime, now: datetime) -> list[AgeStep]:
    """The job's worst age over ``[since, now]``: at each moment, now minus the oldest snapshot
    time among the newest restore point of each VM/target that had one (a restore point counts
    from its task's end). It grows linearly while the oldest stays the same, so the steps where
    the oldest changes (before and after) and the two ends draw it exactly."""
    start, end = since.timestamp(), now.timestamp()
    # Epoch seconds, not datetimes: a week of a thousand VMs is a hundred thousand events.
    events = sorted(
        ((p.finished_at or p.snapshot_time).timestamp(), p.snapshot_time.timestamp(), p.vm_uuid, p.target_sr)
        for p in points
    )
    current: dict[tuple[str, str], float] = {}
    heap: list[tuple[float, tuple[str, str]]] = []
    steps: list[tuple[float, float]] = []

    def oldest() -> float | None:
        # Drop the entries a newer restore point replaced; the oldest left is the worst.
        while heap and current[heap[0][1]] != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    begun = False
    for at, snap, vm, sr in events:
        if at > end:
            break
        if at >= start and not begun:
            begun = True
            first = oldest()
            if first is not None:
                steps.append((start, start - first))
        key = (vm, sr)
        if snap <= current.get(key, float("-inf")):
            continue
        before = oldest()
        current[key] = snap
        heapq.heappush(heap, (snap, key))
        after = oldest()
        if at >= start and before != after:
            if before is not None:
                steps.append((at, at - before))
            assert after is not None  # one was just pushed
            steps.append((at, at - after))
    if not begun:
        first = oldest()
        if first is not None:
            steps.append((start, start - first))
    last = oldest()
    if last is not None:
        steps.append((end, end - last))
    return [AgeStep(datetime.fromtimestamp(at, UTC), max(0, int(age))) for at, age in steps]
