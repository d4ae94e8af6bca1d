"""Entry point of the `xencr` command: global options and the command groups."""

from __future__ import annotations

from typing import Annotated

import typer

from xencr import __version__
from xencr.cli.daemon import daemon_command
from xencr.cli.dr import dr_app
from xencr.cli.errors import reported, settings
from xencr.cli.failover import failback_command, failover_command
from xencr.cli.history import history_command
from xencr.cli.init import init_command
from xencr.cli.jobs import job_app
from xencr.cli.metrics import metrics_command
from xencr.cli.plan import plan_command, status_command
from xencr.cli.pools import pool_app
from xencr.cli.replica import replica_app, verify_command
from xencr.cli.run import run_command
from xencr.cli.seed import seed_app
from xencr.cli.service import service_app
from xencr.cli.sim import sim_app
from xencr.cli.state import state_app
from xencr.cli.vhd import vhd_app
from xencr.cli.web import report_command, serve_status_command
from xencr.cli.worker import worker_app

app = typer.Typer(
    name="xencr",
    help="Continuous replication and disaster recovery for XenServer / XCP-ng VMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command("init")(init_command)
app.add_typer(pool_app, name="pool")
app.add_typer(job_app, name="job")
app.command("plan")(plan_command)
app.command("failover")(failover_command)
app.command("failback")(failback_command)
app.add_typer(dr_app, name="dr")
app.command("run")(run_command)
app.command("daemon")(daemon_command)
app.add_typer(service_app, name="service")
app.command("status")(status_command)
app.command("history")(history_command)
app.command("metrics")(metrics_command)
app.command("serve-status")(serve_status_command)
app.command("report")(report_command)
app.add_typer(replica_app, name="replica")
app.add_typer(seed_app, name="seed")
app.command("verify")(verify_command)
app.add_typer(vhd_app, name="vhd")
app.add_typer(sim_app, name="sim")
app.add_typer(state_app, name="state")
app.add_typer(worker_app, name="worker")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xencr {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    settings.debug = debug


KeepOption = Annotated[
    str | None, typer.Option("--keep", metavar="DIR", help="Work in DIR and keep the files.")
]


@app.command()
@reported
def demo(keep: KeepOption = None) -> None:
    """Replicate two VMs between two simulated pools: a full run, guest writes, a delta run; then
    prove the newest restore points equal the source snapshots, that a replica refuses to start,
    and that a clone of one boots.

    Example:  xencr demo
    """
    from xencr.crdemo import run

    if not run(keep, say=typer.echo):
        raise typer.Exit(1)


@vhd_app.command("demo")
@reported
def vhd_demo(keep: KeepOption = None) -> None:
    """Build a small VHD chain, inspect and check it, export a delta stream, apply it to the base's
    raw content, merge the chain, and verify every result's content hash.

    Example:  xencr vhd demo --keep /tmp/xencr-vhd-demo
    """
    from xencr.demo import run

    if not run(keep):
        raise typer.Exit(1)


def main() -> None:
    app()
