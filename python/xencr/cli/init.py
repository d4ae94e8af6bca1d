"""`xencr init`: write the commented sample configuration."""

from __future__ import annotations

from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, reported
from xencr.cli.errors import CliError
from xencr.cli.tomledit import write_atomically
from xencr.config import default_config_path, sample_config

# No `help=` here: the callback's docstring (with its example) is the group's help.
init_app = typer.Typer(rich_markup_mode=None)


@reported
def init_command(
    config: ConfigOption = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented sample configuration (pools, jobs, targets, schedules) to edit.

    Example:  xencr init --config ./xencr.toml
    """
    path = config if config is not None else default_config_path()
    if path.exists() and not force:
        raise CliError(f"{path} already exists (use --force to overwrite it)")
    try:
        write_atomically(path, sample_config())
    except OSError as err:
        raise CliError(f"{path}: {err.strerror or err}") from None
    typer.echo(f"wrote {path}")
    typer.echo("next: `xencr pool add site-a https://HOST` (and site-b) replaces the sample's pools,")
    typer.echo("set each pool's password (XENCR_<POOL>_PASSWORD or a 0600 password_file), edit the")
    typer.echo("jobs, then check with `xencr pool test site-a` and `xencr plan web`")


# `xencr init` as a group that runs without a subcommand, for registration with add_typer.
init_app.callback(invoke_without_command=True)(init_command)
