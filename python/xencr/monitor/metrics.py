"""The Prometheus text exposition of the state database: served on the daemon's ``/metrics`` and
written as a node-exporter textfile by ``xencr metrics --textfile``.

Counters are sums over the whole history, recomputed on every render: they survive restarts of
the daemon and agree between the daemon and a textfile written by hand."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from xencr.config import Config
from xencr.coordination.view import cluster_view
from xencr.dr.native.metadata import MetadataSr
from xencr.monitor.rpo import protection
from xencr.state import RUN_OUTCOMES, JobTotals, RunRow, StateDB

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Task outcomes always exported (at 0 until they happen) so that rate() and alerts see a series.
_OUTCOMES = ("success", "failure", "skipped", "interrupted")

Labels = dict[str, str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Exposition:
    """Metric families in the order first declared, each with HELP, TYPE and its samples."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def declare(self, name: str, kind: str, help_text: str) -> None:
        self._families[name] = (kind, help_text, [])

    def add(self, name: str, labels: Labels, value: float) -> None:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        series = f"{name}{{{text}}}" if text else name
        self._families[name][2].append(f"{series} {_number(value)}")

    def text(self) -> str:
        lines = []
        for name, (kind, help_text, samples) in self._families.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def _declare_all(e: Exposition) -> None:
    e.declare(
        "xencr_restore_point_age_seconds",
        "gauge",
        "Age of the newest restore point of a VM on a target SR (absent: none yet).",
    )
    e.declare("xencr_rpo_seconds", "gauge", "Recovery point objective of the VM on the target SR.")
    e.declare(
        "xencr_rpo_breached",
        "gauge",
        "1 when the newest restore point is older than the RPO or missing, else 0 (enabled jobs).",
    )
    e.declare(
        "xencr_last_success_timestamp_seconds",
        "gauge",
        "When the last successful replication of the VM to the target SR finished (Unix time).",
    )
    e.declare(
        "xencr_bytes_sent_total",
        "counter",
        "Bytes sent to targets by kind of transfer (a task mixing full and delta disks counts as full).",
    )
    e.declare("xencr_run_duration_seconds", "gauge", "Duration of the job's last finished run.")
    e.declare(
        "xencr_runs_total",
        "counter",
        "Finished runs by outcome; a run that failed before any transfer (pool unreachable, "
        "login refused, SR missing) is a failure here and has no task.",
    )
    e.declare("xencr_tasks_total", "counter", "Finished tasks (one VM to one target) by outcome.")
    e.declare(
        "xencr_full_transfers_total",
        "counter",
        "Disks sent in full by successful tasks, by the reason a delta was not possible.",
    )
    e.declare("xencr_orphans_cleaned_total", "counter", "Leftovers of interrupted runs cleaned up.")
    e.declare(
        "xencr_detached_objects",
        "gauge",
        "Objects carrying the job's keys that xencr leaves alone (a replica started, renamed or "
        "cloned by someone...): not restore points, never destroyed; the administrator decides.",
    )
    e.declare(
        "xencr_last_run_timestamp_seconds",
        "gauge",
        "When the job's newest run started (Unix time).",
    )
    e.declare(
        "xencr_health_check_passed",
        "gauge",
        "1 when the newest health check of the VM's restore points on the target passed, else 0.",
    )
    e.declare("xencr_health_check_failures_total", "counter", "Health checks of the job that failed.")


def _declare_cluster(e: Exposition) -> None:
    e.declare(
        "xencr_worker_up",
        "gauge",
        "1 when the worker's heartbeat is within its lease and it has not stopped (PostgreSQL state).",
    )
    e.declare("xencr_worker_heartbeat_age_seconds", "gauge", "Seconds since the worker's last heartbeat.")
    e.declare("xencr_worker_tasks_running", "gauge", "Tasks (one VM of one job) the worker has claimed.")
    e.declare("xencr_worker_tasks_total", "counter", "Tasks the worker finished, by outcome.")
    e.declare("xencr_worker_bytes_sent_total", "counter", "Bytes the worker's tasks sent to targets.")
    e.declare(
        "xencr_tasks_unserved",
        "gauge",
        "Pending tasks whose pools no live worker may touch: they wait for a worker that is not there.",
    )


def _cluster(e: Exposition, db: StateDB) -> None:
    """The workers sharing the PostgreSQL state, and the tasks none of them may take."""
    _declare_cluster(e)
    view = cluster_view(db)
    for w in view.workers:
        labels = {"worker": w.row.name}
        e.add("xencr_worker_up", labels, int(w.alive))
        e.add("xencr_worker_heartbeat_age_seconds", labels, round(w.heartbeat_age, 3))
        e.add("xencr_worker_tasks_running", labels, w.tasks_running)
    # Counters for every worker that ever ran a task, alive or not (a counter must not vanish).
    for t in db.worker_totals():
        for outcome, n in sorted(t.tasks.items()):
            e.add("xencr_worker_tasks_total", {"worker": t.worker, "outcome": outcome}, n)
        e.add("xencr_worker_bytes_sent_total", {"worker": t.worker}, t.bytes_sent)
    e.add("xencr_tasks_unserved", {}, len(view.unserved))


def _job_names(config: Config, totals: Iterable[JobTotals]) -> dict[str, str]:
    """job id -> label: the configured name (a renamed job keeps its series' history under the
    new name), else the name its newest run recorded."""
    names = {t.job_id: t.job_name for t in totals}
    names.update({j.id: j.name for j in config.jobs.values()})
    return names


def render(db: StateDB | None, config: Config, now: datetime) -> str:
    """The exposition of everything ``db`` records (``None``: no database yet) for ``config``'s
    jobs at ``now``."""
    e = Exposition()
    _declare_all(e)
    totals = db.job_totals() if db is not None else []
    names = _job_names(config, totals)

    if db is not None:
        for job in config.jobs.values():
            if not job.enabled:
                continue  # not scheduled on purpose: its ageing restore points are no alert
            for p in protection(db, job):
                labels = {"job": job.name, "vm": p.vm, "vm_uuid": p.vm_uuid, "target_sr": p.target_sr}
                age = p.age(now)
                if age is not None:
                    e.add("xencr_restore_point_age_seconds", labels, age)
                if p.rpo is not None:
                    e.add("xencr_rpo_seconds", labels, p.rpo)
                e.add("xencr_rpo_breached", labels, int(p.breached(now)))
                if p.last_success is not None:
                    e.add("xencr_last_success_timestamp_seconds", labels, p.last_success.timestamp())
                e.add("xencr_detached_objects", labels, p.detached)
        for job in config.jobs.values():
            checked, failures = db.health_checks(job.id)
            for task in checked:
                labels = {"job": job.name, "vm": task.vm_name, "target": task.target or task.target_sr}
                passed = (task.health_check or "").startswith("passed")
                e.add("xencr_health_check_passed", labels, int(passed))
            if job.health_check is not None or checked:
                e.add("xencr_health_check_failures_total", {"job": job.name}, failures)

    by_id = {t.job_id: t for t in totals}
    runs = _run_counts(db.runs() if db is not None else [])
    for job_id in sorted(names, key=lambda i: (names[i], i)):
        jl = {"job": names[job_id]}
        t = by_id.get(job_id)
        sent = t.bytes_sent if t else {}
        delta = sent.get("delta", 0)
        e.add("xencr_bytes_sent_total", jl | {"kind": "full"}, sum(sent.values()) - delta)
        e.add("xencr_bytes_sent_total", jl | {"kind": "delta"}, delta)
        if t is not None and t.last_finished is not None and t.last_finished.duration is not None:
            e.add("xencr_run_duration_seconds", jl, t.last_finished.duration.total_seconds())
        for outcome in sorted(RUN_OUTCOMES):
            e.add("xencr_runs_total", jl | {"outcome": outcome}, runs.get((job_id, outcome), 0))
        counts = t.tasks if t else {}
        for outcome in sorted(set(_OUTCOMES) | set(counts)):
            e.add("xencr_tasks_total", jl | {"outcome": outcome}, counts.get(outcome, 0))
        for reason, n in sorted((t.full_disks if t else {}).items()):
            e.add("xencr_full_transfers_total", jl | {"reason": reason}, n)
        e.add("xencr_orphans_cleaned_total", jl, t.cleaned if t else 0)
        if t is not None:
            e.add("xencr_last_run_timestamp_seconds", jl, t.last_started.timestamp())
    if db is not None and config.state.engine == "postgresql":
        _cluster(e, db)
    return e.text()


def _run_counts(runs: Iterable[RunRow]) -> dict[tuple[str, str], int]:
    """(job id, outcome) -> finished runs; runs still going are not counted yet."""
    out: dict[tuple[str, str], int] = {}
    for r in runs:
        if r.outcome in RUN_OUTCOMES:
            out[r.job_id, r.outcome] = out.get((r.job_id, r.outcome), 0) + 1
    return out


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a temporary file in the same directory, synced,
    then renamed over it, so the node exporter never reads half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a node exporter running as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_metadata(rows: Iterable[MetadataSr], unreachable: Iterable[str]) -> str:
    """Pool metadata replication (`xencr dr metadata status --textfile`): per pool the SRs its
    metadata goes to, and per SR whether its metadata VDI is being written; pools that did not
    answer as ``xencr_dr_metadata_pool_up 0``."""
    e = Exposition()
    e.declare("xencr_dr_metadata_pool_up", "gauge", "1 when the pool answered the metadata check.")
    e.declare("xencr_dr_metadata_srs", "gauge", "SRs the pool replicates its metadata to.")
    e.declare("xencr_dr_metadata_written", "gauge", "1 when the SR's metadata VDI is being written.")
    by_pool: dict[str, list[MetadataSr]] = {}
    for r in rows:
        by_pool.setdefault(r.pool, []).append(r)
    for pool in sorted(by_pool):
        e.add("xencr_dr_metadata_pool_up", {"pool": pool}, 1)
        e.add("xencr_dr_metadata_srs", {"pool": pool}, sum(r.replicating for r in by_pool[pool]))
        for r in by_pool[pool]:
            if r.replicating:
                e.add(
                    "xencr_dr_metadata_written",
                    {"pool": pool, "sr": r.sr_name, "sr_uuid": r.sr_uuid},
                    int(r.written),
                )
    for pool in sorted(set(unreachable) - set(by_pool)):
        e.add("xencr_dr_metadata_pool_up", {"pool": pool}, 0)
    return e.text()
