"""`xencr job ...`: the configured jobs, as the configuration file defines them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from tomlkit import TOMLDocument

from xencr.cli.common import ConfigOption, JsonFlag, columns, load, print_json, reported
from xencr.cli.render import table
from xencr.cli.tomledit import edit, set_value, table_at
from xencr.config import JobConfig, ScheduleConfig, TargetConfig, format_duration, format_rate

job_app = typer.Typer(
    help="Configured jobs: what is protected, where to, and when; enable or disable one.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def timing(s: ScheduleConfig) -> str:
    if s.cron is not None:
        return f"cron {s.cron} {s.timezone}"
    assert s.every is not None
    return f"every {format_duration(s.every)}"


def target_text(t: TargetConfig) -> str:
    return f"{t.pool}/{t.sr}"


def selection_text(job: JobConfig) -> str:
    text = ", ".join(job.vms)
    return f"{text} except {', '.join(job.exclude)}" if job.exclude else text


def schedule_text(s: ScheduleConfig) -> str:
    parts = [f"id={s.id}", timing(s), f"retention={s.retention}"]
    if s.full_interval:
        parts.append(f"full_interval={s.full_interval}")
    if s.rpo is not None:
        parts.append(f"rpo={format_duration(s.rpo)}")
    if s.rate is not None:
        parts.append(f"rate={format_rate(s.rate)}")
    parts += [f"window={w!r}" for w in s.rate_windows]
    return " ".join(parts)


def schedule_json(s: ScheduleConfig) -> dict[str, Any]:
    return {
        "id": s.id,
        "cron": s.cron,
        "every": s.every,
        "timezone": s.timezone,
        "retention": s.retention,
        "full_interval": s.full_interval,
        "rpo": s.rpo,
        "rpo_effective": s.rpo_seconds,
        "rate": s.rate,
        "rate_windows": list(s.rate_windows),
    }


def job_json(job: JobConfig) -> dict[str, Any]:
    """The job as configured; durations in seconds, rates in bytes per second."""
    return {
        "name": job.name,
        "id": job.id,
        "pool": job.pool,
        "vms": list(job.vms),
        "exclude": list(job.exclude),
        "targets": [{"pool": t.pool, "sr": t.sr, "network_map": dict(t.network_map)} for t in job.targets],
        "schedules": [schedule_json(s) for s in job.schedules],
        "concurrency": job.concurrency,
        "snapshot_mode": job.snapshot_mode,
        "full_interval": job.full_interval,
        "vm_timeout": job.vm_timeout,
        "enabled": job.enabled,
    }


@job_app.command("list")
@reported
def list_command(config: ConfigOption = None, json_out: JsonFlag = False) -> None:
    """List the configured jobs: source pool, VM selection, targets, schedules.

    Example:  xencr job list --json
    """
    cfg = load(config)
    jobs = sorted(cfg.jobs.values(), key=lambda j: j.name)
    if json_out:
        print_json([job_json(j) for j in jobs])
        return
    if not jobs:
        typer.echo(f"no jobs in {cfg.path}")
        return
    rows = [
        (
            j.name,
            j.pool,
            selection_text(j),
            ", ".join(target_text(t) for t in j.targets),
            "; ".join(timing(s) for s in j.schedules) or "manual only",
            "yes" if j.enabled else "no",
        )
        for j in jobs
    ]
    typer.echo(columns(("NAME", "POOL", "VMS", "TARGETS", "SCHEDULES", "ENABLED"), rows))


@job_app.command("show")
@reported
def show_command(
    job: Annotated[str, typer.Argument(metavar="JOB", help="Job name or id.")],
    config: ConfigOption = None,
    json_out: JsonFlag = False,
) -> None:
    """Show one job in full: every setting, target, network map and schedule.

    Example:  xencr job show web --json
    """
    j = load(config).job(job)
    if json_out:
        print_json(job_json(j))
        return
    rows = [
        ("name", j.name),
        ("id", j.id),
        ("pool", j.pool),
        ("vms", ", ".join(j.vms)),
        ("exclude", ", ".join(j.exclude) or "-"),
        ("concurrency", str(j.concurrency)),
        ("snapshot_mode", j.snapshot_mode),
        ("full_interval", str(j.full_interval) if j.full_interval else "0 (only when needed)"),
        ("vm_timeout", format_duration(j.vm_timeout) if j.vm_timeout else "none"),
        ("enabled", "yes" if j.enabled else "no"),
    ]
    for i, t in enumerate(j.targets):
        rows.append((f"targets[{i}]", target_text(t)))
        rows += [(f"targets[{i}].network_map", f"{src} -> {dst}") for src, dst in t.network_map.items()]
    for i, s in enumerate(j.schedules):
        rows.append((f"schedules[{i}]", schedule_text(s)))
    if not j.schedules:
        rows.append(("schedules", "none (runs only by hand)"))
    typer.echo(table(rows))


def _set_enabled(job_ref: str, enabled: bool, config: Path | None) -> None:
    cfg = load(config)
    job = cfg.job(job_ref)
    state = "enabled" if enabled else "disabled"
    if job.enabled == enabled:
        typer.echo(f"job {job.name!r} is already {state} in {cfg.path}")
        return

    def change(doc: TOMLDocument) -> None:
        set_value(table_at(doc, "jobs", job.name), "enabled", enabled)

    edit(cfg.path, change)
    typer.echo(f"{state} job {job.name!r} in {cfg.path}; a running daemon applies it when reloaded (SIGHUP)")


@job_app.command("enable")
@reported
def enable_command(
    job: Annotated[str, typer.Argument(metavar="JOB", help="Job name or id.")],
    config: ConfigOption = None,
) -> None:
    """Let the daemon schedule a job again: sets ``enabled = true`` in its table, keeping the
    file's comments and layout (edited with tomlkit).

    Example:  xencr job enable web
    """
    _set_enabled(job, True, config)


@job_app.command("disable")
@reported
def disable_command(
    job: Annotated[str, typer.Argument(metavar="JOB", help="Job name or id.")],
    config: ConfigOption = None,
) -> None:
    """Stop the daemon scheduling a job (`xencr run JOB` still runs it by hand): sets
    ``enabled = false`` in its table, keeping the file's comments and layout (edited with tomlkit).
    Its restore points stay; status and metrics stop flagging its RPO.

    Example:  xencr job disable web
    """
    _set_enabled(job, False, config)
