"""`xencr state info`, `xencr state migrate --to postgresql://...` and `xencr state prune`: where
the state database is, moving an SQLite state to PostgreSQL without losing a record, and
forgetting old history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, JsonFlag, columns, load, print_json, reported
from xencr.cli.errors import CliError
from xencr.config import STATE_PASSWORD_ENV, StateLocation, format_duration, parse_duration, postgresql_url
from xencr.state import StateDB, open_state
from xencr.state.copy import copy_all, counts

state_app = typer.Typer(help="The state database (run history and records).", no_args_is_help=True)


@state_app.command("info")
@reported
def info_command(json: JsonFlag = False, config: ConfigOption = None) -> None:
    """Show the state database: engine, location (never a password), schema revision and the
    rows of each table.

    Example:  xencr state info
    """
    cfg = load(config)
    where = cfg.state
    info: dict[str, object] = {"engine": where.engine, "location": where.describe()}
    if where.url is not None:
        info["password_from"] = where.password_source()
    if not where.exists():
        info |= {"exists": False}
        if json:
            print_json(info)
        else:
            typer.echo(f"{where.engine}: {where.describe()} (not created yet: nothing recorded)")
        return
    with open_state(cfg) as db:
        info |= {"exists": True, "revision": db.revision, "tables": counts(db)}
    if json:
        print_json(info)
        return
    typer.echo(f"{where.engine}: {where.describe()}")
    if where.url is not None:
        typer.echo(f"password from: {info['password_from']}")
    typer.echo(f"schema revision: {info['revision']}")
    tables = info["tables"]
    assert isinstance(tables, dict)
    typer.echo(columns(["table", "rows"], [[name, str(n)] for name, n in tables.items()]))


@state_app.command("migrate")
@reported
def migrate_command(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="URL",
            help="The PostgreSQL database to copy into: postgresql://user@host[:port]/dbname (no password).",
        ),
    ],
    password_env: Annotated[
        str,
        typer.Option("--password-env", metavar="VAR", help="Environment variable holding its password."),
    ] = STATE_PASSWORD_ENV,
    password_file: Annotated[
        Path | None,
        typer.Option("--password-file", metavar="FILE", help="File (mode 0600) holding its password."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Copy every record of the configured state (runs, tasks, disks' reasons, block maps,
    schedule fires, failovers, failbacks, test failovers, native recoveries, incomplete
    attempts) into an empty PostgreSQL database, in one transaction, ids kept; then check each
    table's row count and content digest on both sides and print them. Stop the daemon first:
    what it records during the copy is not copied. The configuration is not changed: the last
    line says what to put in it.

    Example:  XENCR_STATE_PASSWORD=... xencr state migrate --to postgresql://xencr@db.example.com/xencr
    """
    cfg = load(config)
    try:
        url = postgresql_url(to)
    except ValueError as err:
        raise CliError(f"--to: {err}") from None
    target_at = StateLocation(url=url, password_env=password_env, password_file=password_file)
    if cfg.state.url == url:
        raise CliError(f"the configured state is already {target_at.describe()}")
    if not cfg.state.exists():
        raise CliError(f"nothing to copy: {cfg.state.describe()} does not exist")
    with open_state(cfg) as source, StateDB(target_at) as target:
        result = copy_all(source, target)
    rows = [
        [s.table, str(s.rows), str(t.rows), s.digest[:16], "equal" if s == t else "DIFFERENT"]
        for s, t in zip(result.source, result.target, strict=True)
    ]
    typer.echo(f"copied {cfg.state.describe()} -> {target_at.describe()}")
    typer.echo(columns(["table", "rows", "copied", "sha256 (first 16)", "check"], rows))
    if not result.equal:
        raise CliError(f"{target_at.describe()}: the copy differs from the source (tables marked DIFFERENT)")
    typer.echo("every table equal on both sides")
    if result.source_changed:
        typer.echo(
            f"xencr: warning: {cfg.state.describe()} changed during the copy (a daemon or a run "
            "writing?): those records are not in the copy",
            err=True,
        )
    shown = url.replace("postgresql+psycopg://", "postgresql://", 1)
    if password_file is None and password_env == STATE_PASSWORD_ENV:
        setting = f'state = "{shown}"  (the password in ${STATE_PASSWORD_ENV} or ~/.pgpass)'
    else:
        secret_from = (
            f'password_file = "{password_file.absolute()}"'
            if password_file is not None
            else f'password_env = "{password_env}"'
        )
        setting = f'a [state] table: url = "{shown}", {secret_from}'
    typer.echo(f"next: in {cfg.path}, replace the state setting by {setting}; then restart the daemon")


@state_app.command("prune")
@reported
def prune_command(
    keep: Annotated[
        str | None,
        typer.Option(
            "--keep",
            metavar="DURATION",
            help="Forget runs started longer ago than this (90d, 12w; default: [daemon] keep_history).",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Forget old runs now, as the daemon does every hour: runs started longer ago than
    ``--keep`` (default ``[daemon] keep_history``, 90 days) go with their tasks, while the metrics'
    counters keep what they counted. Kept whatever their age: each job's newest run, and the run
    of each VM and target's newest task and newest successful task (the RPO is read there).
    Restore points and replicas are never touched: this is history only.

    Example:  xencr state prune --keep 30d
    """
    cfg = load(config)
    if keep is not None:
        try:
            seconds = parse_duration(keep)
        except ValueError as err:
            raise CliError(f"--keep: {err}") from None
    elif cfg.daemon.keep_history is not None:
        seconds = cfg.daemon.keep_history
    else:
        raise CliError(f'{cfg.path}: [daemon] keep_history is "forever": give --keep DURATION')
    if not cfg.state.exists():
        typer.echo(f"{cfg.state.describe()}: not created yet, nothing to forget")
        return
    before = datetime.now(UTC) - timedelta(seconds=seconds)
    with open_state(cfg) as db:
        forgotten = db.prune_history(timedelta(seconds=seconds))
    when = before.strftime("%Y-%m-%d %H:%M:%SZ")
    typer.echo(f"forgot {forgotten} run(s) started before {when} (older than {format_duration(seconds)})")
