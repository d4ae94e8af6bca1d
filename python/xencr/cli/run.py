"""`xencr run JOB`: one run of a job now, with a line per step and a summary per VM and target."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, load, reported
from xencr.cli.live import LiveTransfers
from xencr.replication.jobs import report_json, run_configured
from xencr.replication.runner import RunReport
from xencr.units import human_bytes, transfer_text

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", envvar="XENCR_CONFIG", help="Configuration file (default: user config dir)."),
]


def summary_lines(report: RunReport) -> list[str]:
    """What the run did per VM and target, sizes in binary units. A target refused because
    another run holds it has no line here: :func:`refusal_lines` says it, once."""
    lines = []
    for v in report.vms:
        if v.error:
            lines.append(f"{v.vm_name}: FAILED: {v.error}")
        for t in v.targets:
            if t.outcome == "skipped":
                continue
            reasons = ", ".join(sorted({transfer_text(d.kind, d.reason) for d in t.disks}))
            if t.outcome == "success":
                lines.append(
                    f"{v.vm_name} -> {t.target}: ok, restore point {t.restore_point}, "
                    f"{human_bytes(t.bytes_sent)}, {reasons}"
                )
            elif t.outcome == "interrupted":
                lines.append(f"{v.vm_name} -> {t.target}: interrupted: {t.error}")
            else:
                lines.append(f"{v.vm_name} -> {t.target}: FAILED: {t.error}")
            lines += [f"  cleaned up: {c}" for c in t.cleaned]
            lines += [f"  expired restore point {e}" for e in t.expired]
            lines += [f"  warning: {w}" for w in t.warnings]
            lines += [f"  detached: {d}" for d in t.detached]
        lines += [f"  {v.vm_name}: {k}" for k in v.source_kept]
    return lines


def refusal_lines(report: RunReport) -> list[str]:
    """One line per VM/target this run left alone because another run holds it, naming the
    holder (the runner's reason, "skipped: ...", would only repeat it)."""
    return [
        f"xencr: {v.vm_name} -> {t.target}: refused: being replicated by "
        f"{t.holder or 'another run (holder unknown)'}"
        for v in report.vms
        for t in v.targets
        if t.outcome == "skipped"
    ]


@contextlib.contextmanager
def stopping_cleanly() -> Iterator[threading.Event]:
    """An event set by SIGTERM (systemd stopping a timer's run) or a first Ctrl-C: the run then
    cuts its transfers, discards their replicas and returns. A second Ctrl-C aborts at once."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel  # signal handlers belong to the main thread; elsewhere nobody sends one
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and cancel.is_set():
            raise KeyboardInterrupt
        if not cancel.is_set():
            typer.echo("xencr: stopping: transfers in flight are cut and discarded", err=True)
        cancel.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield cancel
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@reported
def run_command(
    job: Annotated[str, typer.Argument(help="Job name or id.")],
    vm: Annotated[
        list[str] | None, typer.Option("--vm", help="Only this VM (name or UUID); repeatable.")
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Send full copies, whatever the bases.")] = False,
    schedule: Annotated[str | None, typer.Option("--schedule", help="Use this schedule's settings.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run report as JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Run a job once, now: snapshot, send only changed blocks, commit each restore point atomically.

    A VM already being replicated to a target (by the daemon, another job or another `xencr run`)
    is refused for that target with one line naming the holder; the exit code is then 1.
    SIGTERM or Ctrl-C stops the run cleanly: nothing half-sent is left on the target.

    Example:  xencr run web-servers --vm web-1
    """
    cfg = load(config)

    def progress(line: str) -> None:
        if not json_out:
            typer.echo(line, err=True)

    # A live line per disk in flight (rate, ETA) on a terminal; plain log lines otherwise.
    with stopping_cleanly() as cancel, LiveTransfers(enabled=False if json_out else None) as live:
        report = run_configured(
            cfg,
            job,
            only=vm or None,
            full=full,
            schedule_id=schedule,
            interactive=sys.stdin.isatty(),
            progress=progress,
            monitor=live,
            cancel=cancel,
        )
    if json_out:
        typer.echo(report_json(report))
    else:
        for line in summary_lines(report):
            typer.echo(line)
        typer.echo(f"run {report.outcome}: {len(report.vms)} VM(s)")
    refused = refusal_lines(report)
    for line in refused:
        typer.echo(line, err=True)
    # A VM/target refused because another run holds it did not get its restore point: not a
    # success for whoever asked for this run.
    if report.outcome != "success" or refused:
        raise typer.Exit(1)
