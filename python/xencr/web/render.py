"""The status page as HTML, written on the server: semantic tables with captions and header
cells, every state in words (BREACH, skipped, failed) as well as in colour, charts as inline SVG.
The page works without JavaScript; with it, `status.js` keeps it current. Everything shown is
escaped: VM names and error lines come from the pools."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from xencr import __version__
from xencr.config import format_duration
from xencr.monitor.status import status_json
from xencr.replication.preview import StatusRow
from xencr.state import TaskRow
from xencr.units import human_bytes, transfer_text
from xencr.web import charts
from xencr.web.data import JobView, Page, VmView
from xencr.web.html import e, when
from xencr.web.plans import plan_section

RUNS_LISTED = 25  # the newest runs of a job listed as a table under its chart


def age_text(age: int | None, rpo: int | None) -> str:
    if age is None:
        return "no restore point" + (f" (RPO {format_duration(rpo)})" if rpo else "")
    text = f"{format_duration(age)} old"
    if rpo:
        text += f" of RPO {format_duration(rpo)} ({100 * age // rpo}%)"
    return text


def outcome_text(r: StatusRow, last: TaskRow | None) -> str:
    """The last outcome and why, in full: the transfer and each full disk's reason, the skip's
    reason, the failure's line."""
    if r.last_outcome is None:
        return "no run yet"
    if r.last_outcome == "skipped":
        return r.last_error or "skipped"
    if r.last_outcome in ("failure", "interrupted"):
        return f"{r.last_outcome}: {r.last_error}" if r.last_error else r.last_outcome
    text = r.last_outcome
    if last is not None and last.outcome == r.last_outcome and last.transfer:
        fulls = [f"disk {d}: {reason}" for d, reason in last.reasons.items() if reason not in ("delta", "")]
        if last.transfer == "delta" or not fulls:
            text += f", {last.transfer}"
        else:
            text += f", {transfer_text('full' if last.transfer == 'full' else 'mixed', '; '.join(fulls))}"
        text += f", {human_bytes(last.bytes_sent)} sent"
    return text


def _row(v: VmView, now: datetime) -> str:
    r = v.row
    data = status_json(v.job, r)
    cls = "breach" if r.breach else (r.last_outcome or "none")
    flag = '<strong class="flag">BREACH</strong>' if r.breach else ""
    points = "".join(
        f"<li>{when(p.snapshot_time, now)} <code>{e(p.restore_point)}</code> "
        f"{e(p.transfer or '')} {e(human_bytes(p.bytes_sent))} sent</li>"
        for p in v.points
    )
    pts = (
        # An id, so that a refresh of the page keeps it open (status.js).
        f'<details id="pts-{e(v.job)}-{e(r.vm_uuid)}-{e(r.target_sr)}">'
        f"<summary>{len(v.points)} restore point{'s' if len(v.points) != 1 else ''}</summary>"
        f'<ul class="points">{points}</ul></details>'
        if v.points
        else "none recorded"
    )
    health = ""
    if data["health_check"] is not None:
        hc = data["health_check"]
        verdict = "passed" if hc["passed"] else "FAILED"
        health = f'<br><span class="health">health check {verdict}: {e(hc["detail"])}</span>'
    detached = (
        f'<span class="detached">{r.detached} detached (left alone; see'
        " <code>xencr replica list</code>)</span>"
        if r.detached
        else "0"
    )
    source = ' <span class="source">from history</span>' if r.source == "history" else ""
    return (
        f'<tr class="{e(cls)}" data-key="{e(v.job)}/{e(r.vm_uuid)}/{e(r.target_sr)}">'
        f'<th scope="row">{e(r.vm_name)}<br><code class="uuid">{e(r.vm_uuid)}</code></th>'
        f"<td>{e(r.target)}{source}</td>"
        f'<td class="age">{charts.rpo_bar(r.age_seconds, r.rpo_seconds)} '
        f'<span class="agetext">{e(age_text(r.age_seconds, r.rpo_seconds))}</span> {flag}</td>'
        f'<td class="outcome">{e(outcome_text(r, v.last))}{health}</td>'
        f'<td class="next">{when(r.next_run, now)}</td>'
        f'<td class="detached-count">{detached}</td>'
        f"<td>{pts}</td></tr>"
    )


def rows_table(view: JobView, now: datetime) -> str:
    head = "".join(
        f'<th scope="col">{h}</th>'
        for h in (
            "VM",
            "Target",
            "Newest restore point vs RPO",
            "Last outcome",
            "Next run",
            "Detached",
            "Restore points",
        )
    )
    body = "".join(_row(v, now) for v in view.vms) or (
        '<tr><td colspan="7">no VM: nothing selected, or nothing recorded yet</td></tr>'
    )
    return (
        f'<table class="rows"><caption>VMs of job {e(view.name)}, one row per target</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def runs_table(view: JobView, limit: int = RUNS_LISTED) -> str:
    runs = view.runs[-limit:][::-1]
    rows = "".join(
        f"<tr><td>{r.run_id}</td><td>{r.started.strftime('%Y-%m-%d %H:%M:%S')}Z</td><td>{e(r.trigger)}</td>"
        f"<td>{e(r.outcome)}</td><td>{e(human_bytes(r.full + r.mixed))}</td>"
        f"<td>{e(human_bytes(r.delta))}</td>"
        f"<td>{format_duration(int(r.seconds)) if r.seconds is not None else 'running'}</td>"
        f"<td>{e(r.error or '')}</td></tr>"
        for r in runs
    )
    head = "".join(
        f'<th scope="col">{h}</th>'
        for h in ("Run", "Started", "Trigger", "Outcome", "Full", "Delta", "Took", "Error")
    )
    return (
        f'<details id="runs-{e(view.name)}"><summary>The {len(runs)} newest runs as a table</summary>'
        f'<table class="runs"><caption>Runs of job {e(view.name)}, newest first</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></details>"
    )


def job_section(view: JobView, since: datetime, now: datetime, *, heading: str = "h2") -> str:
    j = view.job
    facts = [f"RPO {format_duration(view.rpo)}" if view.rpo else "no RPO"]
    if not j.enabled:
        facts.append("disabled (not scheduled)")
    breaches = sum(1 for v in view.vms if v.row.breach)
    if breaches:
        facts.append(f"<strong>{breaches} BREACH{'ES' if breaches > 1 else ''}</strong>")
    legend = "".join(
        f'<span class="key"><svg width="10" height="10" aria-hidden="true"><rect width="10" height="10"'
        f' fill="{c}"/></svg> {k}</span>'
        for k, c in charts.COLOURS.items()
    )
    return (
        f'<section class="job" id="job-{e(j.name)}" aria-labelledby="h-job-{e(j.name)}">'
        f'<{heading} id="h-job-{e(j.name)}">Job {e(j.name)}</{heading}><p>{", ".join(facts)}</p>'
        + rows_table(view, now)
        + '<div class="charts"><figure>'
        + charts.runs_chart(j.name, view.runs, since, now)
        + f"<figcaption>Bytes moved per run ({legend}) and duration (dots, right axis), "
        f"{len(view.runs)} runs since {since.strftime('%Y-%m-%d %H:%M')}Z</figcaption></figure><figure>"
        + charts.age_chart(j.name, view.ages, view.rpo, since, now)
        + "<figcaption>Age of the oldest newest restore point among the job's VMs; "
        "the dashed line is the RPO</figcaption></figure></div>" + runs_table(view) + "</section>"
    )


def _unreachable(page: Page) -> Iterable[str]:
    for job, err in page.status.unreachable:
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        yield (
            f'<p class="warning" role="status">Job {e(job)}: its pools did not answer ({e(line)}); '
            "shown from the recorded history.</p>"
        )


def main_html(page: Page) -> str:
    """The part of the page that a refresh replaces."""
    now = page.generated
    rows = len(page.status.rows)
    summary = (
        f'<p class="summary">{rows} VM/target{"s" if rows != 1 else ""} in {len(page.jobs)} job'
        f"{'s' if len(page.jobs) != 1 else ''}; "
        + (
            f'<strong class="flag">{page.breaches} BREACH{"ES" if page.breaches != 1 else ""}</strong>'
            if page.breaches
            else "no breach"
        )
        + f'. Generated <time datetime="{e(now.isoformat())}" id="generated">'
        f"{now.strftime('%Y-%m-%d %H:%M:%S')}Z</time>.</p>"
    )
    nav = "".join(f'<li><a href="#job-{e(j.name)}">{e(j.name)}</a></li>' for j in page.jobs) + (
        '<li><a href="#plans">DR plans</a></li>' if page.plans else ""
    )
    plans = ""
    if page.plans:
        plans = (
            '<section id="plans" aria-labelledby="h-plans"><h2 id="h-plans">DR plans</h2>'
            + "".join(plan_section(p, now) for p in page.plans)
            + "</section>"
        )
    return (
        summary
        + "".join(_unreachable(page))
        + f'<nav aria-label="jobs"><ul>{nav}</ul></nav>'
        + "".join(job_section(j, page.since, now) for j in page.jobs)
        + plans
    )


def page_html(page: Page, refresh: int) -> str:
    """The whole status page; its script polls `/api/status` every ``refresh`` seconds."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>xencr status</title>"
        '<link rel="stylesheet" href="static/status.css">'
        f'<script src="static/status.js" defer></script></head><body data-refresh="{refresh}">'
        '<header><h1>xencr status</h1><p id="live" class="live" aria-live="polite">'
        f"Without JavaScript this page shows the moment it was loaded; reload it to update.</p></header>"
        f'<main id="main">{main_html(page)}</main>'
        f'<footer><p>xencr {e(__version__)}. Data: <a href="api/status">api/status</a> (as '
        '<code>xencr status --json</code>), <a href="api/history?since=1d">api/history?since=1d</a>, '
        '<a href="api/plans">api/plans</a>.</p></footer></body></html>'
    )
