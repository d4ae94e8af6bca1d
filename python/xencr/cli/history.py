"""`xencr history [JOB] [--since]`: past runs and their tasks, from the state database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, JsonFlag, load, print_json, reported, usage_error
from xencr.config import ConfigError, StateLocation, format_duration
from xencr.monitor.history import parse_since, run_json, runs_with_tasks
from xencr.state import RunRow, StateDB, TaskRow
from xencr.units import human_bytes, transfer_text


def _time(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%SZ") if t is not None else "-"


def _took(d: timedelta | None) -> str:
    return format_duration(int(d.total_seconds())) if d is not None else "-"


def disk_kind(transfer: str | None, reason: str) -> str:
    """How one disk of a task went: the task's transfer unless it mixed both, then its reason
    says (``delta``, or continuing a Xen Orchestra chain, is a delta; any other reason a full)."""
    if transfer in ("full", "delta"):
        return transfer
    return "delta" if reason == "delta" or reason.startswith("continues ") else "full"


def run_lines(run: RunRow, tasks: list[TaskRow]) -> list[str]:
    head = f"run {run.id}  {_time(run.started_at)}  {run.job_name}  {run.outcome}  {_took(run.duration)}"
    if run.trigger == "schedule" and run.schedule_id:
        head += f"  (schedule {run.schedule_id})"
    else:
        head += f"  ({run.trigger}" + (f", schedule {run.schedule_id})" if run.schedule_id else ")")
    if run.worker:
        head += f"  on worker {run.worker}"
    lines = [head]
    if run.error:
        lines.append(f"  error: {run.error}")
    for t in tasks:
        what = f"  {t.vm_name} -> {t.target or t.target_sr}  {t.outcome}"
        if t.transfer:
            what += f"  {t.transfer}"
        if t.outcome not in ("running", "skipped", "interrupted") or t.bytes_sent:
            what += f"  {human_bytes(t.bytes_sent)}"
        what += f"  {_took(t.duration)}"
        if t.worker and t.worker != run.worker:
            what += f"  on worker {t.worker}"
        lines.append(what)
        lines += [
            f"    disk {disk}: {transfer_text(disk_kind(t.transfer, reason), reason)}"
            for disk, reason in t.reasons.items()
        ]
        if t.restore_point:
            lines.append(f"    restore point {t.restore_point}")
        lines += [f"    disk {disk} block map {digest}" for disk, digest in t.maps.items()]
        if t.cleaned:
            lines.append(f"    cleaned up {t.cleaned} leftover(s) of earlier runs")
        if t.detached:
            lines.append(f"    {t.detached} detached object(s) left alone (xencr replica list)")
        if t.health_check:
            lines.append(f"    health check {t.health_check}")
        if t.error:
            # The outcome column already says "skipped"; the reason follows without repeating it.
            error = t.error.removeprefix("skipped: ") if t.outcome == "skipped" else t.error
            lines.append(f"    error: {error}")
    return lines


@reported
def history_command(
    job: Annotated[str | None, typer.Argument(metavar="JOB", help="Only this job (name or id).")] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", metavar="WHEN", help="Only runs started since: 2h, 1d, or an ISO date (UTC)."
        ),
    ] = None,
    last: Annotated[
        int,
        typer.Option("--last", metavar="N", min=0, help="Only the newest N runs (default 100; 0: all)."),
    ] = 100,
    json: JsonFlag = False,
    config: ConfigOption = None,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state", metavar="PATH", help="State database file (SQLite; default: the config's `state`)."
        ),
    ] = None,
) -> None:
    """Show past runs, oldest first, each with its tasks (one per VM and target): outcome, full or
    delta and why per disk, bytes, duration, errors. The newest 100 unless ``--last`` says
    otherwise (a cluster records one run per VM and fire).

    Example:  xencr history web --since 1d --last 0
    """
    now = datetime.now(UTC)
    try:
        since_t = parse_since(since, now) if since is not None else None
    except ValueError as err:
        usage_error(str(err))
    job_ref = job
    if state is None:
        cfg = load(config)
        where = cfg.state
        if job is not None:
            # Through the config, a renamed job still finds its runs (by id).
            try:
                job_ref = cfg.job(job).id
            except ConfigError:
                job_ref = job  # a job since removed from the config: by name or id in the history
    else:
        where = StateLocation(path=state)
    if not where.exists():
        if json:
            print_json([])
        else:
            typer.echo(f"no runs recorded yet ({where.describe()})")
        return
    with StateDB(where) as db:
        db.mark_interrupted()  # a run whose process died shows as interrupted, not running
        found = runs_with_tasks(db, job_ref, since_t, last=last or None)
        more = bool(last) and len(found) == last and len(db.runs(job_ref, since_t, limit=last + 1)) > last
        if json:
            print_json([run_json(r, tasks) for r, tasks in found])
            return
        if not found:
            typer.echo(
                "no runs"
                + (f" of job {job}" if job else "")
                + (f" since {_time(since_t)}" if since_t else "")
            )
            return
        for i, (r, tasks) in enumerate(found):
            if i:
                typer.echo("")
            typer.echo("\n".join(run_lines(r, tasks)))
        if more:
            typer.echo(f"\n(the newest {last} runs; --last 0 shows all, --since narrows)")
