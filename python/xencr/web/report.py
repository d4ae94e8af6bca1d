"""`xencr report JOB|PLAN`: one self-contained HTML file an auditor can keep, from the recorded
history alone (`audit`). A job's report is its `audit.job_part`; a plan's report is its test
failovers in the period, each with its VMs and start groups as a timeline, then the part of each
job it recovers.

A PDF of the same is laid out by WeasyPrint, an HTML/CSS layout engine written in Python (no
browser, inline SVG supported), installed with the ``pdf`` extra."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from xencr.config import Config
from xencr.monitor import rehearsals
from xencr.state import open_state
from xencr.web import audit
from xencr.web.html import document, e
from xencr.web.plans import PlanView, plan_section


class ReportError(Exception):
    """The report cannot be made (one line)."""


def report_html(config: Config, name: str, since: datetime, now: datetime) -> str:
    """The report of job or plan ``name`` (a job's name or id, else a plan's name)."""
    job = next((j for j in config.jobs.values() if name in (j.name, j.id)), None)
    plan = config.plans.get(name)
    if job is None and plan is None:
        known = ", ".join([*config.jobs, *config.plans]) or "none"
        raise ReportError(f"no job or plan {name!r} (jobs and plans: {known})")
    if not config.state.exists():
        raise ReportError(f"no history recorded yet ({config.state.describe()})")
    with open_state(config) as db:
        db.mark_interrupted()  # a run whose process died shows as interrupted, not running
        if job is not None:
            return document(
                f"xencr report: job {job.name}", audit.job_part(audit.audit(db, job, since, now)), since, now
            )
        assert plan is not None
        tests = [r for r in db.runs(rehearsals.run_name(plan.name), since) if r.trigger == rehearsals.TRIGGER]
        records = {run.id: rehearsals.load(db, run.id) for run in tests}
        parts = [audit.audit(db, config.jobs[j], since, now) for j in plan.jobs if j in config.jobs]
    if tests:
        shown = "".join(
            plan_section(
                PlanView(plan, run, records[run.id]),
                now,
                heading="h3",
                label=f"Test failover (run {run.id})",
                key=f"-run-{run.id}",
            )
            for run in reversed(tests)
        )
    else:
        shown = (
            f'<p class="never"><strong>No test failover of plan {e(plan.name)} in the period.</strong></p>'
        )
    body = (
        f'<section class="plan"><h2>Plan {e(plan.name)}: {len(tests)} test failover(s) in the period</h2>'
        + shown
        + "</section>"
        + "".join(audit.job_part(a, heading="Job (recovered by this plan)") for a in parts)
    )
    return document(f"xencr report: plan {plan.name}", body, since, now)


def write_pdf(html: str, path: Path) -> None:
    """The report as PDF (see the module's note); `ReportError` when WeasyPrint is missing."""
    try:
        # Here, not at the top: an optional extra, and an import every other command would pay.
        import weasyprint
    except ImportError:
        raise ReportError("--pdf needs WeasyPrint: pip install 'xencr[pdf]'") from None
    weasyprint.HTML(string=html).write_pdf(str(path))
