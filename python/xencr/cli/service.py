"""`xencr service install`: the systemd units for the daemon, and the timer-based alternative."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, load, reported
from xencr.config import Config, ConfigError, default_config_path
from xencr.service.units import DAEMON_UNIT, RUN_SERVICE, RUN_TIMER, Layout, all_units, escape

service_app = typer.Typer(help="systemd units for xencr.", no_args_is_help=True)


def _exe() -> list[str]:
    """This installation's `xencr` as absolute command words, so the units run the same one
    (a virtualenv's too) whatever systemd's PATH."""
    argv0 = Path(sys.argv[0])
    beside = Path(sys.executable).parent / "xencr"
    for candidate in (argv0 if argv0.name == "xencr" else None, beside, shutil.which("xencr")):
        if candidate is not None and Path(candidate).is_file():
            return [str(Path(candidate).absolute())]
    return [sys.executable, "-m", "xencr.cli"]


def _user_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "systemd" / "user"


@service_app.command("install")
@reported
def install_command(
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the units instead of writing them.")
    ] = False,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            metavar="DIR",
            help="Where to write (default: ~/.config/systemd/user, or /etc/systemd/system with --system).",
        ),
    ] = None,
    system: Annotated[
        bool, typer.Option("--system", help="Units for the system manager instead of the user's.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Write (or print) xencr.service, running `xencr daemon`, and, as the alternative,
    xencr-run@.service + xencr-run@.timer running `xencr run JOB` on a timer, with a drop-in per
    enabled job giving its schedule. Enable one or the other, not both.

    Example:  xencr service install --print
    """
    config_path = (config or default_config_path()).expanduser().resolve()
    cfg: Config | None = None
    try:
        cfg = load(config_path)
    except ConfigError as err:
        # Units without per-job drop-ins are still useful; say why they are missing.
        typer.echo(f"xencr: warning: {err} (no per-job timer drop-ins)", err=True)
    layout = Layout(system=system)
    units = all_units(_exe(), config_path, cfg, layout)
    if print_only:
        for name, text in units.items():
            typer.echo(f"# ---- {name}")
            typer.echo(text)
        return
    target = (directory or (Path("/etc/systemd/system") if system else _user_dir())).expanduser()
    for name, text in units.items():
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {path}")
    sc = layout.systemctl
    jobs = [escape(j.name) for j in cfg.jobs.values() if j.enabled and j.schedules] if cfg else []
    typer.echo(f"\nThen either the daemon:\n  {sc} daemon-reload\n  {sc} enable --now {DAEMON_UNIT}")
    if jobs:
        timers = " ".join(f"'{RUN_TIMER.replace('@', '@' + j)}'" for j in jobs)
        typer.echo(f"or a timer per job ({RUN_SERVICE} runs `xencr run JOB`):\n  {sc} enable --now {timers}")
    else:
        typer.echo(f"or a timer per job: {sc} enable --now 'xencr-run@JOB.timer'")
    if not system:
        typer.echo("User units stop at logout unless lingering is on: loginctl enable-linger")
