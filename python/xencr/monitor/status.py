"""Where each VM stands, gathered once for every face that shows it: `xencr status --json`, the
status page and its `/api/status`. The pools are asked when they answer; a job whose pools do not
answer is shown from the recorded history (``source = "history"``), and the caller is told why."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from xencr.config import Config, JobConfig
from xencr.coordination import queue
from xencr.coordination.queue import QueueRow
from xencr.dr.native import metadata
from xencr.dr.native.metadata import MetadataSr
from xencr.replication.jobs import Connected, connected, resolve_sr
from xencr.replication.preview import StatusRow, status, status_from_history
from xencr.state import open_state
from xencr.xapi.errors import PoolUnreachable, XapiError

# The pool cannot be asked: status falls back on what the history recorded.
UNREACHABLE: tuple[type[Exception], ...] = (PoolUnreachable, XapiError, OSError)


@dataclass
class StatusReport:
    """The rows of ``jobs`` (job name, row), in the jobs' order, and whether some job had to be
    read from the history because its pools did not answer."""

    now: datetime
    rows: list[tuple[str, StatusRow]] = field(default_factory=list)
    fell_back: bool = False
    unreachable: list[tuple[str, Exception]] = field(default_factory=list)  # job name, why
    # XenServer native DR: the SRs each pool asked replicates its metadata to (`dr.native`).
    metadata: dict[str, list[MetadataSr]] = field(default_factory=dict)
    # A cluster's (PostgreSQL state) pending tasks that no live worker may take.
    unserved: list[QueueRow] = field(default_factory=list)

    def json(self) -> list[dict[str, Any]]:
        """What `xencr status --json` prints."""
        return [status_json(name, r) for name, r in self.rows]


def target_names(c: Connected) -> dict[str, str]:
    """SR UUID -> ``pool/SR name`` for the job's targets, as the pools name them now (a job may
    name an SR by UUID; people read names)."""
    out = {}
    for t in c.job.targets:
        s = c.sessions[t.pool]
        ref, uuid = resolve_sr(s, t.sr, t.pool)
        out[uuid] = f"{t.pool}/{s.api.SR.get_name_label(ref)}"
    return out


def gather(
    config: Config,
    jobs: Sequence[JobConfig],
    *,
    interactive: bool = False,
    now: datetime | None = None,
    on_unreachable: Callable[[JobConfig, Exception], None] = lambda job, err: None,
    fall_back_on: tuple[type[Exception], ...] = UNREACHABLE,
) -> StatusReport:
    """Status rows of ``jobs`` (see the module's rule); a job whose pools fail with one of
    ``fall_back_on`` is read from the history. Only reads, except that runs left 'running' by
    dead processes are closed as interrupted first (as every command does); a missing state
    database is no history, not one to create."""
    out = StatusReport(now or datetime.now(UTC))
    db = open_state(config) if config.state.exists() else None
    try:
        if db is not None:
            db.mark_interrupted()
        for j in jobs:
            try:
                with connected(config, j, interactive=interactive) as c:
                    names = target_names(c)
                    found = [
                        replace(r, target=names.get(r.target_sr, r.target)) for r in status(c, db, out.now)
                    ]
                    for pool, session in c.sessions.items():
                        if pool not in out.metadata:
                            out.metadata[pool] = [m for m in metadata.status(session, pool) if m.replicating]
            except fall_back_on as err:
                on_unreachable(j, err)
                out.fell_back = True
                out.unreachable.append((j.name, err))
                found = status_from_history(j, db, out.now) if db is not None else []
            out.rows += [(j.name, r) for r in found]
        if db is not None and config.state.engine == "postgresql":
            out.unserved = queue.unserved(db)
            _mark_unserved(out, {j.name: j.id for j in jobs})
    finally:
        if db is not None:
            db.close()
    return out


def _mark_unserved(out: StatusReport, ids: dict[str, str]) -> None:
    """Each row's oldest unserved task (of its VM, or of its whole job not yet resolved)."""
    for i, (name, r) in enumerate(out.rows):
        fires = [
            t.fire_at
            for t in out.unserved
            if t.job_id == ids.get(name) and t.vm_uuid in (r.vm_uuid, queue.WHOLE_JOB)
        ]
        if fires:
            out.rows[i] = (name, replace(r, unserved_since=min(fires)))


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def status_json(job: str, r: StatusRow) -> dict[str, Any]:
    """One row as `xencr status --json` prints it (exact seconds, ISO times)."""
    return {
        "job": job,
        "vm_name": r.vm_name,
        "vm_uuid": r.vm_uuid,
        "target": r.target,
        "target_sr": r.target_sr,
        "newest": r.newest,
        "snapshot_time": _iso(r.snapshot_time),
        "age_seconds": r.age_seconds,
        "rpo_seconds": r.rpo_seconds,
        "rpo_breach": r.breach,
        "last_outcome": r.last_outcome,
        "last_error": r.last_error,
        "last_finished": _iso(r.last_finished),
        "next_run": _iso(r.next_run),
        "source": r.source,
        "detached": r.detached,
        "health_check": health_json(r.health_check),
        "worker": r.worker,  # the cluster worker of the newest task (None: a host alone)
        "unserved_since": _iso(r.unserved_since),  # waiting for a worker that may touch its pools
    }


def health_json(line: str | None) -> dict[str, Any] | None:
    """The recorded line ("passed: ..." / "failed: ...") as JSON."""
    if line is None:
        return None
    verdict, _, detail = line.partition(": ")
    return {"passed": verdict == "passed", "detail": detail}
