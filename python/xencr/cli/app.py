"""Entry point of the `xencr` command: assembles the command groups."""

from __future__ import annotations

import typer

from xencr.cli.sim import sim_app
from xencr.cli.vhd import vhd_app

app = typer.Typer(
    name="xencr",
    help="Continuous replication and disaster recovery for XenServer / XCP-ng VMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(vhd_app, name="vhd")
app.add_typer(sim_app, name="sim")


def main() -> None:
    app()
