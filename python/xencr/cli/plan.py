"""`xencr plan JOB` and `xencr status [JOB]`: what a run would do, and how old each VM's newest
restore point is against its RPO. Neither changes anything."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, load, reported
from xencr.replication.jobs import connected
from xencr.replication.preview import plan, status
from xencr.state import StateDB

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
    job: Annotated[str, typer.Argument(help="Job name or id.")],
    vm: Annotated[
        list[str] | None, typer.Option("--vm", help="Only this VM (name or UUID); repeatable.")
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Plan as `xencr run --full` would.")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOption = None,
) -> None:
    """Print, without changing anything, full or delta per disk and why, estimated bytes, the
    target SR's free space after the run, and anything that would fail.

    Example:  xencr plan web-servers
    """
    cfg = load(config)
    with connected(cfg, cfg.job(job), interactive=sys.stdin.isatty()) as c:
        rows = plan(c, vm or None, full=full)
    if json_out:
        typer.echo(json.dumps([asdict(r) | {"estimated_bytes": r.estimated_bytes} for r in rows], indent=2))
    else:
        for r in rows:
            typer.echo(
                f"{r.vm_name} -> {r.target}: ~{r.estimated_bytes} bytes, SR free after: {r.sr_free_after}"
            )
            for d in r.disks:
                typer.echo(
                    f"  disk {d.userdevice} ({d.name}): {d.kind} ({d.reason}), ~{d.estimated_bytes} bytes"
                )
            for p in r.problems:
                typer.echo(f"  PROBLEM: {p}")
    if any(r.problems for r in rows):
        raise typer.Exit(1)


@reported
def status_command(
    job: Annotated[str | None, typer.Argument(help="Only this job (name or id).")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOption = None,
) -> None:
    """One line per VM per target: the newest restore point's age against the RPO, last outcome.

    Example:  xencr status --json
    """
    cfg = load(config)
    jobs = [cfg.job(job)] if job else [j for j in cfg.jobs.values() if j.enabled]
    rows = []
    with StateDB(cfg.state_path) as db:
        for j in jobs:
            with connected(cfg, j, interactive=sys.stdin.isatty()) as c:
                rows += [(j.name, r) for r in status(c, db)]
    if json_out:
        typer.echo(
            json.dumps([{"job": name} | asdict(r) | {"rpo_breach": r.breach} for name, r in rows], indent=2)
        )
        return
    for name, r in rows:
        rpo = f"RPO {_age(r.rpo_seconds)}" if r.rpo_seconds else "no RPO"
        flag = "  RPO BREACH" if r.breach else ""
        last = r.last_outcome or "no run yet"
        typer.echo(
            f"{name}  {r.vm_name} -> {r.target}: newest {_age(r.age_seconds)} old ({rpo}), last {last}{flag}"
        )
