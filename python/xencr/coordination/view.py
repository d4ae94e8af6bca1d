"""The cluster as `xencr worker list`, `xencr status` and the metrics show it: every worker with
its liveness and the tasks it runs, and the tasks no live worker may take."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from xencr.coordination import queue
from xencr.coordination.queue import QueueRow
from xencr.coordination.worker import WorkerRow, worker_rows
from xencr.state import StateDB


@dataclass(frozen=True)
class WorkerView:
    row: WorkerRow
    alive: bool
    heartbeat_age: float  # seconds, by the database server's clock
    tasks_running: int

    def json(self) -> dict[str, Any]:
        r = self.row
        return {
            "name": r.name,
            "host": r.host,
            "pid": r.pid,
            "pools": list(r.pools),
            "slots": r.slots,
            "lease_seconds": r.lease_seconds,
            "started": r.started_at.isoformat(),
            "heartbeat": r.heartbeat_at.isoformat(),
            "heartbeat_age_seconds": round(self.heartbeat_age, 3),
            "alive": self.alive,
            "stopped": r.stopped_at.isoformat() if r.stopped_at is not None else None,
            "tasks_running": self.tasks_running,
        }


@dataclass(frozen=True)
class ClusterView:
    now: datetime  # the database server's
    workers: list[WorkerView]
    unserved: list[QueueRow]


def cluster_view(db: StateDB) -> ClusterView:
    now, rows = worker_rows(db)
    running = queue.running(db)
    views = [WorkerView(r, r.alive(now), r.heartbeat_age(now), running.get(r.name, 0)) for r in rows]
    return ClusterView(now, views, queue.unserved(db))


def unserved_line(t: QueueRow, job: str) -> str:
    """One line for a task no live worker may take (``job``: its job's name)."""
    vm = t.vm_name if not t.whole_job else "(its VMs, not listed yet)"
    return (
        f"unserved: job {job} VM {vm} (fire {t.fire_at:%Y-%m-%d %H:%M:%SZ}): "
        f"no live worker may touch pools {', '.join(t.pools)}"
    )
