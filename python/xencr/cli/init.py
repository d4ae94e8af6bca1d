"""`xencr init`: write the commented sample configuration."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, reported
from xencr.cli.errors import CliError
from xencr.config import default_config_path, sample_config

# No `help=` here: the callback's docstring (with its example) is the group's help.
init_app = typer.Typer(rich_markup_mode=None)


def write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a crash never leaves half a config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # no secrets inside; mkstemp's 0600 would surprise editors' users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    typer.echo("next: edit the pools and jobs, set each pool's password (XENCR_<POOL>_PASSWORD or a")
    typer.echo("0600 password_file), then check with `xencr job list`")


# `xencr init` as a group that runs without a subcommand, for registration with add_typer.
init_app.callback(invoke_without_command=True)(init_command)
