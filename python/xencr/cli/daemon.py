"""`xencr daemon`: run every enabled job on its schedules until stopped (SIGTERM), reloading the
configuration on SIGHUP."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, load, reported, usage_error
from xencr.cli.live import LiveTransfers
from xencr.config import Config
from xencr.replication.jobs import Placement, run_configured
from xencr.replication.runner import RunReport
from xencr.service.daemon import Daemon, parse_listen


def run_logging_transfers(
    config: Config,
    job_ref: str,
    *,
    only: list[str] | None = None,
    schedule_id: str | None = None,
    trigger: str = "manual",
    progress: Callable[[str], None] = lambda _: None,
    cancel: threading.Event | None = None,
    placement: Placement | None = None,
) -> RunReport:
    """``run_configured`` with a progress line per disk in flight, at least every 30 s and every
    10 %, among the run's progress events: a journal shows a long transfer is alive."""
    with LiveTransfers(enabled=False, log=progress) as live:
        return run_configured(
            config,
            job_ref,
            only=only,
            schedule_id=schedule_id,
            trigger=trigger,
            progress=progress,
            monitor=live,
            cancel=cancel,
            placement=placement,
        )


@reported
def daemon_command(
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen",
            metavar="HOST:PORT",
            help="Serve Prometheus metrics at http://HOST:PORT/metrics (default: [daemon] metrics_listen).",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Run every enabled job on its schedules, in the foreground, logging one line per event on
    stdout (journald friendly). SIGTERM or Ctrl-C: no new run starts, running transfers get
    [daemon] grace seconds, then are cancelled cleanly; a second one cancels at once. SIGHUP:
    reload the configuration (a bad file is logged and the old one kept).

    Example:  xencr daemon --metrics-listen 127.0.0.1:9464
    """
    if metrics_listen is not None:
        try:
            parse_listen(metrics_listen)
        except ValueError as err:
            usage_error(str(err))
    daemon = Daemon(
        lambda: load(config), stream=sys.stdout, run=run_logging_transfers, metrics_listen=metrics_listen
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        daemon.request_stop()

    def reload(signum: int, frame: FrameType | None) -> None:
        daemon.request_reload()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)
    raise typer.Exit(daemon.run_forever())
