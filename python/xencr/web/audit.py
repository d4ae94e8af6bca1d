"""What a report says of one job over a period, from the state database alone (no pool is
asked, nothing of the live status is needed: it can be made, and made again, with the pools
down, and attached to a run's e-mail):

- per VM and target, the RPO compliance: the share of the time the newest restore point was
  within the RPO, and the worst breach (the oldest it got, and when);
- the runs and the bytes they moved, with the status page's charts;
- the restore points made: each disk, why it went full or delta, and the block map digest the
  read-back verified before the commit (what `xencr verify` checks the restore point against
  later), and the health check;
- the tasks that failed, were interrupted or skipped, with their one line."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from xencr.config import Config, JobConfig, format_duration
from xencr.monitor.rpo import job_rpo
from xencr.state import PointRow, RunRow, StateDB, TaskRow, open_state
from xencr.units import human_bytes, transfer_text
from xencr.web import charts
from xencr.web.html import document, e
from xencr.web.series import AgeStep, RunBar, run_bars, worst_ages

# Restore points listed with their digests per VM and target at most (the newest); the counts
# cover all of them.
POINTS_LISTED = 50


@dataclass
class Compliance:
    """One VM on one target over the period: how long it was watched (from the period's start,
    or from its first task when it joined later), how long of that its newest restore point was
    older than the RPO (or missing), and the oldest it got."""

    vm_name: str
    vm_uuid: str
    target: str
    rpo: int | None
    watched: float = 0.0  # seconds
    breached: float = 0.0  # seconds
    worst_age: float | None = None  # seconds; None: never had a restore point
    worst_at: datetime | None = None
    made: int = 0  # restore points made in the period

    @property
    def share(self) -> float | None:
        """Share of the watched time within the RPO (None: no RPO, or nothing watched)."""
        if self.rpo is None or self.watched <= 0:
            return None
        return 1.0 - self.breached / self.watched


def compliance(
    points: list[PointRow], tasks: list[TaskRow], rpo: int | None, since: datetime, now: datetime
) -> list[Compliance]:
    """Per (VM, target SR) seen in the period (see `Compliance`). A restore point protects
    from its task's end; its age counts from its snapshot."""
    first_task: dict[tuple[str, str], datetime] = {}
    names: dict[tuple[str, str], tuple[str, str]] = {}
    for t in tasks:
        first_task.setdefault((t.vm_uuid, t.target_sr), t.started_at)
        names[(t.vm_uuid, t.target_sr)] = (t.vm_name, t.target or t.target_sr)
    by_pair: dict[tuple[str, str], list[PointRow]] = {}
    for p in points:
        by_pair.setdefault((p.vm_uuid, p.target_sr), []).append(p)
        names.setdefault((p.vm_uuid, p.target_sr), (p.vm_name, p.target or p.target_sr))
    out = []
    for key in sorted(set(first_task) | set(by_pair), key=lambda k: (names[k][0], k)):
        made = sorted(by_pair.get(key, []), key=lambda p: p.finished_at or p.snapshot_time)
        before = [p for p in made if (p.finished_at or p.snapshot_time) < since]
        c = Compliance(names[key][0], key[0], names[key][1], rpo)
        c.made = len(made) - len(before)
        start = (
            since
            if before
            else min([first_task.get(key, now), *(p.finished_at or p.snapshot_time for p in made)])
        )
        snap: datetime | None = before[-1].snapshot_time if before else None
        edges = [p for p in made if (p.finished_at or p.snapshot_time) >= since]
        cursor = max(start, since)
        for edge in [*edges, None]:
            end = now if edge is None else min(max(edge.finished_at or edge.snapshot_time, cursor), now)
            _interval(c, snap, cursor, end)
            cursor = end
            if edge is not None and (snap is None or edge.snapshot_time > snap):
                snap = edge.snapshot_time
        out.append(c)
    return out


def _interval(c: Compliance, snap: datetime | None, a: datetime, b: datetime) -> None:
    """Account ``[a, b)`` protected by a restore point taken at ``snap`` (None: none yet)."""
    length = (b - a).total_seconds()
    if length <= 0:
        return
    c.watched += length
    if snap is None:
        if c.rpo is not None:
            c.breached += length
        return
    age = (b - snap).total_seconds()
    if c.worst_age is None or age > c.worst_age:
        c.worst_age, c.worst_at = age, b
    if c.rpo is not None:
        over_from = max(a, snap + timedelta(seconds=c.rpo))
        c.breached += max(0.0, (b - over_from).total_seconds())


@dataclass
class JobAudit:
    job: JobConfig
    rpo: int | None
    since: datetime
    now: datetime
    runs: list[RunRow] = field(default_factory=list)
    bars: list[RunBar] = field(default_factory=list)
    ages: list[AgeStep] = field(default_factory=list)
    tasks: list[TaskRow] = field(default_factory=list)
    compliance: list[Compliance] = field(default_factory=list)


def audit(db: StateDB, job: JobConfig, since: datetime, now: datetime) -> JobAudit:
    """Everything a report says of ``job`` over ``[since, now]``."""
    rpo = job_rpo(job)
    runs = db.runs(job.id, since)
    points = db.points(job.id, since)
    tasks = db.all_tasks(job.id, since)
    return JobAudit(
        job,
        rpo,
        since,
        now,
        runs=runs,
        bars=run_bars(runs, db.run_sums(job.id, since)),
        ages=worst_ages(points, since, now),
        tasks=tasks,
        compliance=compliance(points, tasks, rpo, since, now),
    )


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.2f}%"


def _head(*names: str) -> str:
    return "<thead><tr>" + "".join(f'<th scope="col">{n}</th>' for n in names) + "</tr></thead>"


def totals(a: JobAudit) -> str:
    by: dict[str, int] = {}
    for run in a.runs:
        by[run.outcome] = by.get(run.outcome, 0) + 1
    full = sum(b.full + b.mixed for b in a.bars)
    delta = sum(b.delta for b in a.bars)
    outcomes = ", ".join(f"{n} {o}" for o, n in sorted(by.items())) or "none"
    breached = sum(1 for c in a.compliance if c.rpo is not None and c.breached > 0)
    return (
        f"<p>RPO {format_duration(a.rpo) if a.rpo else 'none'}; {len(a.compliance)} VM/target(s), "
        + (
            f'<strong class="flag">{breached} BREACHED</strong> in the period'
            if breached
            else "none breached"
        )
        + f"; {len(a.runs)} runs ({e(outcomes)}); {human_bytes(full)} sent in full,"
        f" {human_bytes(delta)} as deltas.</p>"
    )


def compliance_table(a: JobAudit) -> str:
    rows = []
    for c in a.compliance:
        if c.worst_age is None or c.worst_at is None:
            worst = "never had a restore point"
        else:
            worst = f"{format_duration(int(c.worst_age))} old at {c.worst_at.strftime('%Y-%m-%d %H:%M')}Z"
        breach = c.rpo is not None and c.breached > 0
        rows.append(
            f'<tr class="{"breach" if breach else "success"}"><th scope="row">{e(c.vm_name)}<br>'
            f'<code class="uuid">{e(c.vm_uuid)}</code></th><td>{e(c.target)}</td>'
            f'<td class="share">{_pct(c.share)}</td><td>{format_duration(int(c.breached))}'
            + (' <strong class="flag">BREACH</strong>' if breach else "")
            + f"</td><td>{e(worst)}</td><td>{format_duration(int(c.watched))}</td><td>{c.made}</td></tr>"
        )
    body = "".join(rows) or '<tr><td colspan="7">no VM recorded in the period</td></tr>'
    return (
        f'<table class="compliance"><caption>RPO compliance of job {e(a.job.name)}'
        f" (RPO {format_duration(a.rpo) if a.rpo else 'none'})</caption>"
        + _head("VM", "Target", "Within RPO", "Time in breach", "Worst", "Watched", "Restore points made")
        + f"<tbody>{body}</tbody></table>"
    )


def charts_part(a: JobAudit) -> str:
    legend = ", ".join(f"{k} in {c}" for k, c in (("full", "amber"), ("delta", "blue"), ("mixed", "violet")))
    return (
        '<div class="charts"><figure>'
        + charts.runs_chart(a.job.name, a.bars, a.since, a.now)
        + f"<figcaption>Bytes moved per run ({legend}) and duration (dots, right axis), {len(a.bars)} runs"
        "</figcaption></figure><figure>"
        + charts.age_chart(a.job.name, a.ages, a.rpo, a.since, a.now)
        + "<figcaption>Age of the oldest newest restore point among the job's VMs; the dashed line is"
        " the RPO</figcaption></figure></div>"
    )


def runs_table(a: JobAudit) -> str:
    rows = "".join(
        f"<tr><td>{b.run_id}</td><td>{b.started.strftime('%Y-%m-%d %H:%M:%S')}Z</td><td>{e(b.trigger)}</td>"
        f"<td>{e(b.outcome)}</td><td>{e(human_bytes(b.full + b.mixed))}</td>"
        f"<td>{e(human_bytes(b.delta))}</td>"
        f"<td>{format_duration(int(b.seconds)) if b.seconds is not None else 'running'}</td>"
        f"<td>{e(b.error or '')}</td></tr>"
        for b in a.bars
    )
    return (
        f'<table class="runs"><caption>Runs of job {e(a.job.name)} in the period</caption>'
        + _head("Run", "Started", "Trigger", "Outcome", "Full", "Delta", "Took", "Error")
        + f"<tbody>{rows or '<tr><td colspan=8>none</td></tr>'}</tbody></table>"
    )


def verify_table(a: JobAudit) -> str:
    """The restore points made (the newest `POINTS_LISTED` of each VM and target listed)."""
    read_back = a.job.verify_import
    made = [t for t in a.tasks if t.outcome == "success" and t.restore_point]
    per_pair: dict[tuple[str, str], int] = {}
    listed = []
    for t in reversed(made):
        key = (t.vm_uuid, t.target_sr)
        per_pair[key] = per_pair.get(key, 0) + 1
        if per_pair[key] <= POINTS_LISTED:
            listed.append(t)
    rows = []
    for t in sorted(listed, key=lambda t: (t.vm_name, t.target_sr, t.id)):
        disks = "<br>".join(
            f"disk {e(d)}: {e(transfer_text('delta' if reason == 'delta' else 'full', reason))}"
            + (f", map <code>{e(t.maps[d])}</code>" if d in t.maps else ", no block map")
            for d, reason in t.reasons.items()
        )
        check = "read back, matched" if read_back else "not read back"
        snap = t.snapshot_time.strftime("%Y-%m-%d %H:%M:%S") + "Z" if t.snapshot_time else "-"
        rows.append(
            f'<tr><th scope="row">{e(t.vm_name)}</th><td>{e(t.target or t.target_sr)}</td>'
            f"<td><code>{e(t.restore_point)}</code><br>{snap}</td>"
            f"<td>{e(t.transfer or '-')}, {e(human_bytes(t.bytes_sent))}</td><td>{disks}</td>"
            f"<td>{check}</td><td>{e(t.health_check) if t.health_check else 'not checked'}</td></tr>"
        )
    note = (
        "Before each commit the disks were read back from the target and compared with the digests"
        " of what was sent (a difference is never committed); the block map digest is the content a"
        " later <code>xencr verify</code> checks the restore point against."
        if read_back
        else "This job does not read restore points back before the commit (verify_import = false)."
    )
    capped = sum(1 for n in per_pair.values() if n > POINTS_LISTED)
    if capped:
        note += f" Only the newest {POINTS_LISTED} of each VM and target are listed ({len(made)} in all)."
    return (
        f'<p>{note}</p><table class="verify"><caption>Restore points made by job {e(a.job.name)}'
        f" ({len(made)})</caption>"
        + _head(
            "VM", "Target", "Restore point", "Sent", "Disks (why; block map digest)", "Verify", "Health check"
        )
        + f"<tbody>{''.join(rows) or '<tr><td colspan=7>none in the period</td></tr>'}</tbody></table>"
    )


def problems_table(a: JobAudit) -> str:
    rows = [
        f'<tr class="{e(t.outcome)}"><td>{t.started_at.strftime("%Y-%m-%d %H:%M")}Z</td>'
        f'<th scope="row">{e(t.vm_name)}</th><td>{e(t.target or t.target_sr)}</td><td>{e(t.outcome)}</td>'
        f"<td>{e(t.error or '')}</td></tr>"
        for t in a.tasks
        if t.outcome in ("failure", "interrupted", "skipped")
    ]
    rows += [
        f'<tr class="{e(run.outcome)}"><td>{run.started_at.strftime("%Y-%m-%d %H:%M")}Z</td>'
        f'<th scope="row">(run {run.id})</th><td>-</td><td>{e(run.outcome)}</td><td>{e(run.error)}</td></tr>'
        for run in a.runs
        if run.error and run.outcome in ("failure", "interrupted")
    ]
    if not rows:
        return "<p>No task failed, was interrupted or was skipped in the period.</p>"
    return (
        f'<table class="problems"><caption>Failed, interrupted and skipped tasks of job {e(a.job.name)}'
        "</caption>"
        + _head("When", "VM", "Target", "Outcome", "Why")
        + f"<tbody>{''.join(rows)}</tbody></table>"
    )


def job_part(a: JobAudit, *, heading: str = "Job") -> str:
    """A job's whole section of a report."""
    name = e(a.job.name)
    return (
        f'<section class="job" id="job-{name}"><h2>{e(heading)} {name}</h2>'
        + totals(a)
        + compliance_table(a)
        + charts_part(a)
        + runs_table(a)
        + f"<h3>Restore points and verify results of job {name}</h3>"
        + verify_table(a)
        + f"<h3>Problems of job {name}</h3>"
        + problems_table(a)
        + "</section>"
    )


def job_report(config: Config, job: JobConfig, since: datetime, now: datetime) -> str:
    """The self-contained report of one job (an empty history is an empty report)."""
    if config.state.exists():
        with open_state(config) as db:
            a = audit(db, job, since, now)
    else:
        a = JobAudit(job, job_rpo(job), since, now)
    return document(f"xencr report: job {job.name}", job_part(a), since, now)


PERIOD = timedelta(days=7)  # what a run's e-mail attaches: the job's last week
