"""`xencr sim ...`: the embedded XAPI simulator."""

import typer

sim_app = typer.Typer(help="The XAPI simulator: a faithful pool on loopback.", no_args_is_help=True)
