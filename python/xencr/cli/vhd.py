"""`xencr vhd ...`: the engine's tools for users."""

import typer

vhd_app = typer.Typer(help="Inspect, check, convert, stream and merge VHD files.", no_args_is_help=True)
