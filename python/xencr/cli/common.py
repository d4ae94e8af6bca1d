"""What the configuration-reading commands share: the ``--config`` option, loading with warnings on
stderr, and turning config/credential/state errors into one ``xencr: error:`` line."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer

from xencr.cli import errors
from xencr.cli.errors import USER_ERRORS
from xencr.config import Config, load_config

P = ParamSpec("P")
R = TypeVar("R")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="XENCR_CONFIG",
        metavar="PATH",
        help="Configuration file (default: $XENCR_CONFIG, else ~/.config/xencr/xencr.toml).",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def warn(message: str) -> None:
    typer.echo(f"xencr: warning: {message}", err=True)


def load(path: Path | None) -> Config:
    """The configuration, with its warnings (a password in a URL) as ``xencr: warning:`` lines."""
    return load_config(path, warn=warn)


def usage_error(message: str) -> NoReturn:
    """A bad argument value found after parsing: one line, exit code 2 like Typer's own."""
    typer.echo(f"xencr: error: {message}", err=True)
    raise typer.Exit(2)


def reported(fn: Callable[P, R]) -> Callable[P, R]:
    """``errors.reported``, with config, credential and state errors shown as they are."""

    @functools.wraps(fn)
    def inner(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            raise errors.CliError(str(err)) from err

    return errors.reported(inner)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def confirm(what: str, yes: bool) -> None:
    """A command that changes VMs: asked on a terminal, refused without one unless ``--yes``."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise errors.CliError(f"{what} changes VMs: give --yes to run it without a terminal")
    if not typer.confirm(f"{what}: go ahead?", default=False):
        raise errors.CliError("cancelled; nothing changed")
