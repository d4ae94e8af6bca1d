"""`xencr pool add` pins a self-signed pool's certificate on first contact; `pool test` logs in."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner
from xapitest import PASSWORD, Pools, run_sim

from xencr.cli.pools import pool_app
from xencr.config import load_config

app = typer.Typer()
app.add_typer(pool_app, name="pool")
app.command("noop")(lambda: None)
runner = CliRunner()


@pytest.fixture(scope="module")
def tls_pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    yield from run_sim(tmp_path_factory.mktemp("simtls"), tls=True)


def _pw(tmp: Path) -> Path:
    pw = tmp / "pw"
    pw.write_text(PASSWORD)
    os.chmod(pw, 0o600)
    return pw


def test_self_signed_needs_an_explicit_pin(tls_pools: Pools, tmp_path: Path) -> None:
    cfg = tmp_path / "xencr.toml"
    r = runner.invoke(app, ["pool", "add", "b", tls_pools.urls[0], "--config", str(cfg)])
    assert r.exit_code == 1
    assert "does not verify" in r.stderr and "--trust-fingerprint sha256:" in r.stderr
    assert not cfg.exists(), "nothing written"
    wrong = "sha256:" + "00" * 32
    r = runner.invoke(
        app, ["pool", "add", "b", tls_pools.urls[0], "--trust-fingerprint", wrong, "--config", str(cfg)]
    )
    assert r.exit_code == 1 and "not the fingerprint given" in r.stderr


def test_pinned_pool_is_added_and_tested(tls_pools: Pools, tmp_path: Path) -> None:
    cfg = tmp_path / "xencr.toml"
    fp = "sha256:" + (tls_pools.fingerprint or "")
    url = tls_pools.urls[0].replace("https://", "https://root:" + "s%40cret@")
    r = runner.invoke(
        app,
        [
            "pool",
            "add",
            "b",
            url,
            "--trust-fingerprint",
            fp,
            "--password-file",
            str(_pw(tmp_path)),
            "--config",
            str(cfg),
        ],
    )
    assert r.exit_code == 0, r.stderr
    assert "s@cret" not in cfg.read_text() and "s%40cret" not in cfg.read_text(), "no password written"
    pool = load_config(cfg).pools["b"]
    assert pool.fingerprint == tls_pools.fingerprint and pool.url == tls_pools.urls[0]
    r = runner.invoke(app, ["pool", "test", "b", "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["pool"] and info["srs"]


def test_plain_pool_and_bad_password(pools: Pools, tmp_path: Path) -> None:
    cfg = tmp_path / "xencr.toml"
    wrong = tmp_path / "wrong"
    wrong.write_text("not-it")
    os.chmod(wrong, 0o600)
    r = runner.invoke(
        app, ["pool", "add", "a", pools.urls[0], "--password-file", str(wrong), "--config", str(cfg)]
    )
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["pool", "test", "a", "--config", str(cfg)])
    assert r.exit_code == 1
    assert r.stderr == f"xencr: error: pool 'a' ({pools.urls[0]}): authentication failed for user 'root'\n"
    r = runner.invoke(app, ["pool", "add", "a", pools.urls[0], "--config", str(cfg)])
    assert r.exit_code == 1 and "already" in r.stderr
