"""`xencr plan JOB` and `xencr status [JOB]`: what a run would do, and how old each VM's newest
restore point is against its RPO. Neither changes anything on the pools."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, load, print_json, reported, warn
from xencr.cli.errors import CliError, describe
from xencr.coordination.view import unserved_line
from xencr.dr import choose
from xencr.dr.connect import dr_sessions
from xencr.dr.preview import Mode, failover_preview, render, to_json
from xencr.monitor.status import gather
from xencr.replication.jobs import connected
from xencr.replication.preview import StatusRow, plan
from xencr.state import open_state
from xencr.units import human_bytes, transfer_text

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", envvar="XENCR_CONFIG", help="Configuration file (default: user config dir)."),
]


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "never"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


@reported
def plan_command(
    job: Annotated[str | None, typer.Argument(help="Job name or id.")] = None,
    vm: Annotated[
        list[str] | None, typer.Option("--vm", help="Only this VM (name or UUID); repeatable.")
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Plan as `xencr run --full` would.")] = False,
    failover: Annotated[
        str | None,
        typer.Option("--failover", metavar="PLAN", help="Preview the failover of this [[plan]] instead."),
    ] = None,
    test: Annotated[bool, typer.Option("--test", help="With --failover: preview a test failover.")] = False,
    planned: Annotated[
        bool, typer.Option("--planned", help="With --failover: preview a planned failover.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOption = None,
) -> None:
    """Print, without changing anything, full or delta per disk and why, estimated size, the
    target SR's free space after the run, and anything that would fail (sizes in binary units;
    --json gives exact bytes). With --failover PLAN: per VM the restore point a failover would
    use (newest across all targets), its group, where each VIF lands, the memory needed, and
    every problem; the source pools are not contacted. Exit 1 when something would fail.

    Example:  xencr plan web-servers
    Example:  xencr plan --failover site-b --test
    """
    if failover is not None or test or planned:
        if failover is None:
            raise CliError("--test and --planned preview a failover: give --failover PLAN")
        if job is not None or vm or full:
            raise CliError("--failover PLAN previews a plan: give no JOB, --vm or --full with it")
        if test and planned:
            raise CliError("--test and --planned exclude each other")
        _failover_preview(
            config, failover, "test" if test else "planned" if planned else "failover", json_out
        )
        return
    if job is None:
        raise CliError("give a JOB to plan, or --failover PLAN")
    cfg = load(config)
    with contextlib.ExitStack() as stack:
        c = stack.enter_context(connected(cfg, cfg.job(job), interactive=sys.stdin.isatty()))
        db = stack.enter_context(open_state(cfg)) if cfg.state.exists() else None
        rows = plan(c, vm or None, full=full, resumes=db)
    if json_out:
        typer.echo(json.dumps([asdict(r) | {"estimated_bytes": r.estimated_bytes} for r in rows], indent=2))
    else:
        for r in rows:
            typer.echo(
                f"{r.vm_name} -> {r.target}: ~{human_bytes(r.estimated_bytes)}, "
                f"SR free after: {human_bytes(r.sr_free_after)}"
            )
            for d in r.disks:
                typer.echo(
                    f"  disk {d.userdevice} ({d.name}): {transfer_text(d.kind, d.reason)}"
                    + (f" via {d.path_reason}" if d.path_reason else "")
                    + f", ~{human_bytes(d.estimated_bytes)}"
                )
            if r.source_data_freed:
                typer.echo(
                    f"  source: purge_snapshot_data destroys ~{human_bytes(r.source_data_freed)} of "
                    "snapshot data after the run (CBT logs kept)"
                )
            if r.resume:
                typer.echo(f"  {r.resume}")
            for p in r.problems:
                typer.echo(f"  PROBLEM: {p}")
    if any(r.problems for r in rows):
        raise typer.Exit(1)


def _failover_preview(config: Path | None, name: str, mode: Mode, json_out: bool) -> None:
    """`plan --failover`: only the target pools of the configured jobs are asked."""
    cfg = load(config)
    plan_cfg = cfg.plan(name)
    pools = [p.pool for p in choose.places(cfg)]
    with dr_sessions(cfg, pools, interactive=sys.stdin.isatty()) as dr:
        p = failover_preview(cfg, plan_cfg, dr.sessions, dr.unreachable, mode=mode)
    if json_out:
        print_json(to_json(p))
    else:
        for line in render(p):
            typer.echo(line)
    if p.problems:
        raise typer.Exit(1)


def _when(t: datetime | None, now: datetime) -> str:
    if t is None:
        return "-"
    delta = int((t - now).total_seconds())
    rel = f"in {_age(delta)}" if delta >= 0 else f"{_age(-delta)} ago"
    return f"{t.strftime('%Y-%m-%d %H:%M')}Z ({rel})"


def _last(r: StatusRow) -> str:
    if r.last_outcome is None:
        return "no run yet"
    if r.last_outcome == "skipped":
        # The reason reads "skipped: previous run still running".
        return r.last_error or "skipped"
    text = r.last_outcome
    if r.last_outcome in ("failure", "interrupted") and r.last_error:
        error = r.last_error if len(r.last_error) <= 80 else r.last_error[:77] + "..."
        text += f" ({error})"
    return text


def status_line(job: str, r: StatusRow, now: datetime) -> str:
    """One VM on one target; the breach flag in bold red (stripped when not on a terminal)."""
    rpo = f"RPO {_age(r.rpo_seconds)}" if r.rpo_seconds else "no RPO"
    newest = "no restore point" if r.age_seconds is None else f"newest {_age(r.age_seconds)} old"
    line = (
        f"{job}  {r.vm_name} -> {r.target}: {newest} ({rpo}), last {_last(r)}, next {_when(r.next_run, now)}"
    )
    if r.detached:
        line += f", {r.detached} detached object(s) left alone (xencr replica list)"
    if r.health_check is not None:
        line += f", health check {r.health_check}"
    if r.worker:
        line += f", by worker {r.worker}"
    if r.unserved_since is not None:
        line += f", waiting since {r.unserved_since:%Y-%m-%d %H:%M:%SZ} for a worker that may touch its pools"
    if r.source == "history":
        line += " [from history]"
    if r.breach:
        line += "  " + typer.style("BREACH", fg="red", bold=True)
    return line


@reported
def status_command(
    job: Annotated[str | None, typer.Argument(help="Only this job (name or id).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    config: ConfigOption = None,
) -> None:
    """One line per VM per target: the newest restore point's age against the RPO (breaches
    flagged BREACH), the last outcome (skipped and interrupted included), the next run. When a
    pool cannot be reached, its jobs are shown from the recorded history instead.

    Example:  xencr status --json
    """
    cfg = load(config)
    jobs = [cfg.job(job)] if job else [j for j in cfg.jobs.values() if j.enabled]
    report = gather(
        cfg,
        jobs,
        interactive=sys.stdin.isatty(),
        on_unreachable=lambda j, err: warn(f"job {j.name}: {describe(err)}; showing the recorded history"),
    )
    now, rows, fell_back = report.now, report.rows, report.fell_back
    if json_out:
        print_json(report.json())
        return
    if not rows and fell_back:
        typer.echo("nothing recorded yet for the jobs whose pools could not be reached")
    elif not rows:
        typer.echo("no VM selected" + (f" by job {job}" if job else " by any enabled job"))
    for name, r in rows:
        typer.echo(status_line(name, r, now))
    for pool in sorted(report.metadata):
        for m in report.metadata[pool]:
            typer.echo(m.line())
    names = {j.id: j.name for j in cfg.jobs.values()}
    for t in report.unserved:
        typer.echo(unserved_line(t, names.get(t.job_id, t.job_id)))
