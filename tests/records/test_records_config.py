"""Editing the configuration by command: `xencr init` then `xencr pool add` replaces the sample's
placeholder pools, `xencr pool remove` refuses a pool in use, `xencr job enable|disable` flips one
key; each keeps every comment, the key order and the rest of the file byte for byte."""

from __future__ import annotations

import difflib
import json
import os
import stat
from pathlib import Path

from recordstest import xencr

from xencr.config import load_config, sample_config


def _changed(before: str, after: str) -> list[str]:
    """The lines that differ, as ``-old`` / ``+new``."""
    return [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("---", "+++"))
    ]


def test_init_then_pool_add_replaces_the_sample_pools_in_place(tmp_path: Path) -> None:
    cfg = tmp_path / "xencr.toml"
    assert xencr("init", "--config", str(cfg))[0] == 0
    sample = cfg.read_text()
    assert sample == sample_config()

    code, out, err = xencr("pool", "add", "site-a", "http://10.0.0.2", "--config", str(cfg))
    assert (code, err) == (0, "") and out == f"replaced the sample pool 'site-a' in {cfg}\n"
    assert _changed(sample, cfg.read_text()) == [
        '-url = "https://pool-a.example.com"         # https://host[:port] of the pool master',
        '+url = "http://10.0.0.2"                    # https://host[:port] of the pool master',
    ]
    config = load_config(cfg)
    assert config.pools["site-a"].url == "http://10.0.0.2"
    assert config.jobs["web"].pool == "site-a", "the sample's jobs keep their pool"

    # A pool that is no longer a placeholder is only changed on purpose.
    before = cfg.read_text()
    code, _, err = xencr("pool", "add", "site-a", "http://10.0.0.3", "--config", str(cfg))
    assert code == 1 and err == (
        f"xencr: error: pool 'site-a' is already in {cfg} "
        "(--replace changes it; `xencr pool remove site-a` removes it)\n"
    )
    assert cfg.read_text() == before
    code, out, _ = xencr(
        "pool", "add", "site-a", "http://10.0.0.3", "--replace", "--username", "xencr", "--config", str(cfg)
    )
    assert code == 0 and out == f"replaced pool 'site-a' in {cfg}\n"
    assert _changed(before, cfg.read_text()) == [
        '-url = "http://10.0.0.2"                    # https://host[:port] of the pool master',
        '-username = "root"                          # default "root"',
        '+url = "http://10.0.0.3"                    # https://host[:port] of the pool master',
        '+username = "xencr"                         # default "root"',
    ]


def test_pool_add_then_remove_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    cfg = tmp_path / "xencr.toml"
    cfg.write_text(sample_config())
    os.chmod(cfg, 0o640)
    link = tmp_path / "link.toml"  # a dotfile manager's link: edited through, kept a link
    link.symlink_to(cfg)
    code, out, _ = xencr("pool", "add", "dr site", "http://10.0.0.9", "--config", str(link))
    assert code == 0 and out == f"added pool 'dr site' in {link}\n"
    assert (
        cfg.read_text()
        == sample_config() + '\n[pools."dr site"]\nurl = "http://10.0.0.9"\nusername = "root"\n'
    )
    assert link.is_symlink() and stat.S_IMODE(cfg.stat().st_mode) == 0o640
    code, out, _ = xencr("pool", "list", "--config", str(link), "--json")
    assert [p["name"] for p in json.loads(out)] == ["dr site", "site-a", "site-b"]

    code, out, _ = xencr("pool", "remove", "dr site", "--config", str(link))
    assert code == 0 and out == f"removed pool 'dr site' from {link}\n"
    assert cfg.read_text() == sample_config()

    code, _, err = xencr("pool", "remove", "site-b", "--config", str(cfg))
    assert code == 1
    assert err == "xencr: error: pool 'site-b' is used by job db (target), job web (target): not removed\n"
    code, _, err = xencr("pool", "remove", "nope", "--config", str(cfg))
    assert code == 1 and err == f"xencr: error: {cfg}: no pool 'nope' (pools: site-a, site-b)\n"
    assert cfg.read_text() == sample_config()


def test_job_enable_disable_keeps_comments_and_order(tmp_path: Path) -> None:
    cfg = tmp_path / "xencr.toml"
    cfg.write_text(sample_config())
    code, out, _ = xencr("job", "disable", "web", "--config", str(cfg))
    assert code == 0 and out.startswith(f"disabled job 'web' in {cfg}")
    assert _changed(sample_config(), cfg.read_text()) == [
        "-enabled = true                  # false: the daemon does not schedule it (`xencr run` still can)",
        "+enabled = false                 # false: the daemon does not schedule it (`xencr run` still can)",
    ]
    code, out, _ = xencr("job", "disable", "web", "--config", str(cfg))
    assert code == 0 and out == f"job 'web' is already disabled in {cfg}\n"
    db_id = load_config(cfg).jobs["db"].id
    assert xencr("job", "enable", db_id, "--config", str(cfg))[0] == 0  # by id too
    assert xencr("job", "enable", "web", "--config", str(cfg))[0] == 0
    assert _changed(sample_config(), cfg.read_text()) == ["-enabled = false", "+enabled = true"]
    code, out, _ = xencr("job", "list", "--config", str(cfg), "--json")
    assert [(j["name"], j["enabled"]) for j in json.loads(out)] == [("db", True), ("web", True)]

    # A job without the key gets it at the end of its own table; the rest is untouched.
    text = '[pools.a]\nurl = "http://a"  # source\n\n[jobs.j]\npool = "a"  # from a\nvms = ["x"]\n'
    text += '\n[[jobs.j.targets]]\npool = "a"\nsr = "s"\n'
    cfg.write_text(text)
    assert xencr("job", "disable", "j", "--config", str(cfg))[0] == 0
    assert cfg.read_text() == text.replace('vms = ["x"]\n', 'vms = ["x"]\nenabled = false\n')
    code, _, err = xencr("job", "enable", "nope", "--config", str(cfg))
    assert code == 1 and err == f"xencr: error: {cfg}: no job 'nope' (jobs: j)\n"
