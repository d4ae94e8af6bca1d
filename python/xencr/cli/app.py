"""Entry point of the `xencr` command: global options and the command groups."""

from __future__ import annotations

from typing import Annotated

import typer

from xencr import __version__
from xencr.cli.errors import reported, settings
from xencr.cli.sim import sim_app
from xencr.cli.vhd import vhd_app

app = typer.Typer(
    name="xencr",
    help="Continuous replication and disaster recovery for XenServer / XCP-ng VMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(vhd_app, name="vhd")
app.add_typer(sim_app, name="sim")


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


@app.command()
@reported
def demo(
    keep: Annotated[
        str | None, typer.Option("--keep", metavar="DIR", help="Work in DIR and keep the files.")
    ] = None,
) -> None:
    """Build a small VHD chain, inspect and check it, export a delta stream, apply it to the base's
    raw content and verify that the result has the chain's content hash.

    Example:  xencr demo --keep /tmp/xencr-demo
    """
    from xencr.demo import run

    if not run(keep):
        raise typer.Exit(1)


def main() -> None:
    app()
