"""`xencr daemon`: run every enabled job on its schedules until stopped (SIGTERM), reloading the
configuration on SIGHUP."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, load, reported, usage_error
from xencr.service.daemon import Daemon, parse_listen


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
    daemon = Daemon(lambda: load(config), stream=sys.stdout, metrics_listen=metrics_listen)

    def stop(signum: int, frame: FrameType | None) -> None:
        daemon.request_stop()

    def reload(signum: int, frame: FrameType | None) -> None:
        daemon.request_reload()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)
    raise typer.Exit(daemon.run_forever())
