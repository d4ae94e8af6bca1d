"""`xencr pool ...`: the configured pools (never their passwords)."""

from __future__ import annotations

import os
from typing import Any

import typer

from xencr.cli.common import ConfigOption, JsonFlag, columns, load, print_json, reported
from xencr.config import PoolConfig
from xencr.credentials import password_source

pool_app = typer.Typer(
    help="Configured pools: list them (add and test come with the XAPI client).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def display_fingerprint(fp: str) -> str:
    """``sha256:AB:CD:...``, as `openssl x509 -fingerprint -sha256` prints it."""
    return "sha256:" + ":".join(fp[i : i + 2].upper() for i in range(0, len(fp), 2))


def tls_mode(pool: PoolConfig) -> str:
    if pool.fingerprint is not None:
        return "pinned"
    return "verify" if pool.verify_tls else "no-verify"


def pool_json(pool: PoolConfig) -> dict[str, Any]:
    """Everything about a pool except a secret: where its password would come from."""
    return {
        "name": pool.name,
        "url": pool.url,
        "username": pool.username,
        "password_source": password_source(pool),
        "password_env": pool.password_env,
        "password_env_set": bool(os.environ.get(pool.password_env)),
        "password_file": pool.password_file,
        "password_in_url": pool.url_password is not None,
        "fingerprint": display_fingerprint(pool.fingerprint) if pool.fingerprint else None,
        "verify_tls": pool.verify_tls,
        "tls": tls_mode(pool),
    }


@pool_app.command("list")
@reported
def list_command(config: ConfigOption = None, json_out: JsonFlag = False) -> None:
    """List the configured pools: URL, user, where the password comes from, TLS mode.

    The password source is the first of: env (the variable is set), file (password_file),
    url (a password embedded in the URL: move it), none (only a prompt on a terminal will do).

    Example:  xencr pool list --json
    """
    cfg = load(config)
    pools = sorted(cfg.pools.values(), key=lambda p: p.name)
    if json_out:
        print_json([pool_json(p) for p in pools])
        return
    if not pools:
        typer.echo(f"no pools in {cfg.path}")
        return
    rows = [(p.name, p.url, p.username, password_source(p), tls_mode(p)) for p in pools]
    typer.echo(columns(("NAME", "URL", "USER", "PASSWORD", "TLS"), rows))
