"""`xencr metrics [--textfile PATH]`: the Prometheus exposition of the state database, printed or
written for node-exporter's textfile collector (e.g. from a systemd timer or cron)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, load, reported
from xencr.cli.errors import CliError
from xencr.monitor.metrics import render, write_textfile
from xencr.state import open_state


@reported
def metrics_command(
    textfile: Annotated[
        Path | None,
        typer.Option(
            "--textfile",
            metavar="PATH",
            help="Write atomically to PATH (name it *.prom in the node exporter's textfile directory).",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Print the metrics: restore-point age and RPO per VM and target, last success, bytes sent by
    kind, run durations, runs and tasks by outcome (a run that failed before any transfer counts
    as a failed run), full-transfer reasons, orphans cleaned.

    Example:  xencr metrics --textfile /var/lib/node_exporter/textfile/xencr.prom
    """
    cfg = load(config)
    now = datetime.now(UTC)
    if cfg.state.exists():
        with open_state(cfg) as db:
            text = render(db, cfg, now)
    else:
        text = render(None, cfg, now)  # nothing recorded yet: zeros, and no database created
    if textfile is None:
        typer.echo(text, nl=False)
        return
    try:
        write_textfile(textfile, text)
    except OSError as err:
        # Named after the file asked for, not the temporary one beside it.
        raise CliError(f"{textfile}: cannot write: {err.strerror or err}") from None
