"""One readable line per error, exit code 1, and a traceback only with ``--debug``."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from xencr._engine import VhdError
from xencr.config import ConfigError
from xencr.credentials import CredentialError
from xencr.seed.manifest import SeedError
from xencr.state import StateError
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.handlers import TransferError

P = ParamSpec("P")
R = TypeVar("R")


class Settings:
    """Global options, set by the app callback before any command runs."""

    debug: bool = False


settings = Settings()


class CliError(Exception):
    """A failure the command detected itself; its message is the whole story."""


# The user's own mistakes or environment, what the pools answered (a pool unreachable
# included), and what the engine found wrong in a file: their message is the whole story, never
# "internal error".
USER_ERRORS: tuple[type[Exception], ...] = (
    CliError,
    VhdError,
    ConfigError,
    CredentialError,
    StateError,
    XapiError,
    PoolUnreachable,
    TransferError,
    SeedError,
)


def describe(err: BaseException) -> str:
    """The one line a user sees for ``err``."""
    if isinstance(err, FileNotFoundError) and err.filename is not None:
        return f"no such file: {err.filename}"
    if isinstance(err, OSError):
        # The engine's OSErrors carry "context: reason" as strerror; Python's carry filename.
        what = err.strerror or str(err)
        if err.filename is not None:
            return f"{err.filename}: {what}"
        return what
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    if isinstance(err, USER_ERRORS):
        return line
    return f"internal error ({type(err).__name__}): {line}"


def fail(err: BaseException) -> typer.Exit:
    """Print ``err`` as one line on stderr and return the exit to raise."""
    typer.echo(f"xencr: error: {describe(err)}", err=True)
    return typer.Exit(1)


def reported(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command: turn any exception into one stderr line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except KeyboardInterrupt:
            typer.echo("xencr: interrupted", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # `xencr vhd cat x | head`: the reader left; that is not our failure.
            sys.stderr.close()
            raise typer.Exit(0) from None
        except Exception as err:
            if settings.debug:
                raise
            raise fail(err) from None

    return wrapper
