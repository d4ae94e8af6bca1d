"""What the status page and the reports show, gathered from the configuration, the status rows
(`monitor.status`, the same as `xencr status --json`) and the state database: per job its VMs'
rows with their recent restore points, its runs (bytes and duration) and how old its oldest
newest restore point was over time; per plan its last test failover. Only reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from xencr.config import Config, JobConfig
from xencr.monitor.rpo import job_rpo
from xencr.monitor.status import StatusReport
from xencr.replication.preview import StatusRow
from xencr.state import PointRow, StateDB, TaskRow, open_state
from xencr.web.plans import PlanView, plan_view
from xencr.web.series import AgeStep, RunBar, run_bars, worst_ages

# Restore points listed per VM and target at most (the newest ones).
POINTS_SHOWN = 12
# The page's charts cover this much history.
PERIOD = timedelta(days=7)


@dataclass
class VmView:
    job: str
    row: StatusRow
    last: TaskRow | None  # the newest recorded task of this VM and target, with its disks
    points: list[PointRow] = field(default_factory=list)  # newest first


@dataclass
class JobView:
    job: JobConfig
    rpo: int | None
    vms: list[VmView] = field(default_factory=list)
    runs: list[RunBar] = field(default_factory=list)
    ages: list[AgeStep] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.job.name


@dataclass
class Page:
    generated: datetime
    since: datetime
    status: StatusReport
    jobs: list[JobView] = field(default_factory=list)
    plans: list[PlanView] = field(default_factory=list)

    @property
    def breaches(self) -> int:
        return sum(1 for _, r in self.status.rows if r.breach)


def job_view(
    db: StateDB | None, job: JobConfig, rows: list[StatusRow], since: datetime, now: datetime
) -> JobView:
    """A job's rows with their history (runs started since ``since``)."""
    view = JobView(job, job_rpo(job))
    if db is None:
        view.vms = [VmView(job.name, r, None) for r in rows]
        return view
    points = db.points(job.id, since)
    view.runs = run_bars(db.runs(job.id, since), db.run_sums(job.id, since))
    view.ages = worst_ages(points, since, now)
    last = {(t.vm_uuid, t.target_sr): t for t in db.newest_tasks(job.id)}
    by_pair: dict[tuple[str, str], list[PointRow]] = {}
    for p in reversed(points):
        kept = by_pair.setdefault((p.vm_uuid, p.target_sr), [])
        if len(kept) < POINTS_SHOWN:
            kept.append(p)
    for r in rows:
        key = (r.vm_uuid, r.target_sr)
        view.vms.append(VmView(job.name, r, last.get(key), by_pair.get(key, [])))
    return view


def page(config: Config, jobs: list[JobConfig], status: StatusReport, *, since: timedelta = PERIOD) -> Page:
    """Everything the page shows of ``jobs``, whose rows ``status`` holds (gathered at
    ``status.now``), with the history of the period ``since`` before it, and every plan."""
    now = status.now
    out = Page(now, now - since, status)
    by_job: dict[str, list[StatusRow]] = {j.name: [] for j in jobs}
    for name, r in status.rows:
        by_job.setdefault(name, []).append(r)
    db = open_state(config) if config.state.exists() else None
    try:
        out.jobs = [job_view(db, j, by_job[j.name], out.since, now) for j in jobs]
        out.plans = [plan_view(db, config, p) for p in config.plans.values()]
    finally:
        if db is not None:
            db.close()
    return out
