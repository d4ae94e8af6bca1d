"""Past runs as data: the JSON of `xencr history --json`, shared by the status page's
`/api/history`, and the ``--since`` argument both take."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from xencr.config import parse_duration
from xencr.state import RunRow, StateDB, TaskRow


def parse_since(text: str, now: datetime) -> datetime:
    """``2h`` / ``1d`` (that long ago) or an ISO date or time (UTC unless it names a zone)."""
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since: {text!r} is neither a duration (2h, 1d) nor an ISO date") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def runs_with_tasks(
    db: StateDB, job: str | None = None, since: datetime | None = None, *, last: int | None = None
) -> list[tuple[RunRow, list[TaskRow]]]:
    """The runs of ``job`` (name or id; all jobs when None) started at or after ``since`` (only
    the newest ``last`` of them, when given), oldest first, each with its tasks."""
    runs = db.runs(job=job, since=since, limit=last)
    # One query for all their tasks rather than one per run (a long history has thousands), from
    # the oldest run shown on (a cluster records a run per VM: millions before it).
    tasks: dict[int, list[TaskRow]] = {r.id: [] for r in runs}
    for t in db.all_tasks(job=job, since=runs[0].started_at if runs else since):
        if t.run_id in tasks:
            tasks[t.run_id].append(t)
    return [(r, tasks[r.id]) for r in runs]


def run_json(run: RunRow, tasks: list[TaskRow]) -> dict[str, Any]:
    """One run as `xencr history --json` prints it (exact bytes and seconds, ISO times)."""

    def when(t: datetime | None) -> str | None:
        return t.isoformat() if t is not None else None

    def seconds(d: timedelta | None) -> float | None:
        return d.total_seconds() if d is not None else None

    return {
        "id": run.id,
        "job": run.job_name,
        "job_id": run.job_id,
        "schedule": run.schedule_id,
        "trigger": run.trigger,
        "outcome": run.outcome,
        "started": when(run.started_at),
        "finished": when(run.finished_at),
        "seconds": seconds(run.duration),
        "error": run.error,
        "worker": run.worker,  # the cluster worker that ran it (None: a host alone)
        "tasks": [
            {
                "id": t.id,
                "vm_uuid": t.vm_uuid,
                "vm_name": t.vm_name,
                "target_sr": t.target_sr,
                "target": t.target or None,
                "outcome": t.outcome,
                "transfer": t.transfer,
                "reasons": dict(t.reasons),
                "bytes_sent": t.bytes_sent,
                "started": when(t.started_at),
                "finished": when(t.finished_at),
                "seconds": seconds(t.duration),
                "error": t.error,
                "restore_point": t.restore_point,
                "snapshot_time": when(t.snapshot_time),
                "cleaned": t.cleaned,
                "detached": t.detached,
                "health_check": t.health_check,  # "passed: ..." / "failed: ...", None: not checked
                # disk -> its block map's digest: the content `xencr verify` checks the disk against
                "maps": dict(t.maps),
                "worker": t.worker,
            }
            for t in tasks
        ],
    }
