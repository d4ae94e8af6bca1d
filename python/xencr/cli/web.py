"""`xencr serve-status` (the read-only status page, without the daemon) and `xencr report
JOB|PLAN` (a self-contained HTML file, or PDF, for auditors)."""

from __future__ import annotations

import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, load, reported, usage_error
from xencr.cli.errors import CliError
from xencr.config import Config
from xencr.monitor.history import parse_since
from xencr.service.daemon import parse_listen
from xencr.web.report import ReportError, report_html, write_pdf
from xencr.web.server import AccessError, Server, Site, Source, access_for, handler_class, url_of


@reported
def serve_status_command(
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            metavar="HOST:PORT",
            help="Where to listen (default: [status] listen, 127.0.0.1:8080).",
        ),
    ] = None,
    job: Annotated[str | None, typer.Option("--job", help="Only this job (name or id).")] = None,
    config: ConfigOption = None,
) -> None:
    """Serve the read-only status page (and its JSON: /api/status, /api/history?since=,
    /api/plans) until stopped, from the same state as `xencr status`. On an address other than
    loopback it needs [status] tls_cert, tls_key, username and a password
    ($XENCR_STATUS_PASSWORD or password_file), else it refuses to start.

    Example:  xencr serve-status --listen 127.0.0.1:8080
    """
    cfg = load(config)
    if job is not None:
        cfg.job(job)  # an unknown job is one line now, not a 500 later
    try:
        host, port = parse_listen(listen or cfg.status.listen)
    except ValueError as err:
        usage_error(str(err))
    try:
        access = access_for(cfg.status, host)
    except AccessError as err:
        raise CliError(str(err)) from None
    state: dict[str, Config] = {"config": cfg}

    def on_error(line: str) -> None:
        typer.echo(f"xencr: error: {line}", err=True)

    site = Site(Source(lambda: state["config"], job=job, on_error=on_error), access)
    handler = handler_class(site, on_error=on_error)
    try:
        server = Server(host, port, handler, access.tls)
    except OSError as err:
        raise CliError(f"status page listen address {host}:{port}: {err.strerror or err}") from None
    typer.echo(f"serving the status page at {url_of(access.scheme, server.address)} ({access.describe()})")
    stop = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_reload(signum: int, frame: FrameType | None) -> None:
        try:
            state["config"] = load(config)
        except Exception as err:  # a bad file is reported and the old one kept
            typer.echo(f"xencr: warning: reload failed, keeping the old configuration: {err}", err=True)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)
    try:
        stop.wait()
    finally:
        server.close()


@reported
def report_command(
    name: Annotated[str, typer.Argument(metavar="JOB|PLAN", help="A job (name or id) or a [[plan]] name.")],
    since: Annotated[
        str, typer.Option("--since", metavar="WHEN", help="The period: 30d, 12h, or an ISO date (UTC).")
    ] = "30d",
    html: Annotated[
        Path | None, typer.Option("--html", metavar="FILE", help="Write the report as HTML.")
    ] = None,
    pdf: Annotated[
        Path | None, typer.Option("--pdf", metavar="FILE", help="Write it as PDF (needs the pdf extra).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write a report an auditor can keep: per VM the share of time within the RPO and the worst
    breach, the runs and bytes, each restore point's disks with their verified block map
    digests and health checks; for a plan its test failovers with their start timelines. From
    the recorded history only (the pools are not asked). The HTML file is self-contained.

    Example:  xencr report web --since 30d --html web-report.html
    """
    if html is None and pdf is None:
        usage_error("give --html FILE and/or --pdf FILE")
    now = datetime.now(UTC)
    try:
        start = parse_since(since, now)
    except ValueError as err:
        usage_error(str(err))
    cfg = load(config)
    try:
        text = report_html(cfg, name, start, now)
        if pdf is not None:
            write_pdf(text, pdf)
    except ReportError as err:
        raise CliError(str(err)) from None
    except OSError as err:
        raise CliError(f"{pdf}: cannot write: {err.strerror or err}") from None
    if html is not None:
        try:
            html.write_text(text, encoding="utf-8")
        except OSError as err:
            raise CliError(f"{html}: cannot write: {err.strerror or err}") from None
    for path in (p for p in (html, pdf) if p is not None):
        typer.echo(f"wrote {path}")
