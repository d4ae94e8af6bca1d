"""Helpers of the DR tests: a configuration with two jobs replicating the same VM to two
target pools, plans appended as TOML text, and the preview run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner
from xapitest import Pools, default_sr, password_file

from xencr.cli.app import app

cli = CliRunner()
ETH0 = "Pool-wide network associated with eth0"


def write_config(tmp: Path, pools: Pools, plans: str) -> Path:
    """Pools a (source), b and c (targets); job jb: vm0 and vm1 to b; job jc: vm0 to c; job jn:
    a VM that does not exist, to b (never has a restore point); then ``plans``."""
    tmp.mkdir(parents=True, exist_ok=True)
    pw = password_file(tmp)
    text = f'state = "{tmp.parent / "state.sqlite"}"\n'
    for name, url in zip("abc", pools.urls, strict=True):
        text += f'[pools.{name}]\nurl = "{url}"\npassword_file = "{pw}"\n'
    for job, vms, pool, i, rpo in (
        ("jb", ["vm0", "vm1"], "b", 1, "1h"),
        ("jc", ["vm0"], "c", 2, "2h"),
        ("jn", ["no-such-vm"], "b", 1, "1h"),
    ):
        text += (
            f'[jobs.{job}]\npool = "a"\nvms = {json.dumps(vms)}\nrpo = "{rpo}"\n'
            f'[[jobs.{job}.targets]]\npool = "{pool}"\nsr = "{default_sr(pools, i)}"\n'
            f'[[jobs.{job}.schedules]]\nevery = "15m"\nretention = 3\n'
        )
    cfg = tmp / "xencr.toml"
    cfg.write_text(text + plans)
    return cfg


def preview(cfg: Path, plan: str, *flags: str) -> tuple[int, list[str]]:
    """`xencr plan --failover PLAN` as typed: exit code and output lines."""
    r = cli.invoke(app, ["plan", "--failover", plan, *flags, "--config", str(cfg)])
    return r.exit_code, r.output.splitlines()


def preview_json(cfg: Path, plan: str) -> tuple[int, dict[str, Any]]:
    r = cli.invoke(app, ["plan", "--failover", plan, "--json", "--config", str(cfg)])
    return r.exit_code, json.loads(r.stdout)


def problems(lines: list[str]) -> list[str]:
    return [x.removeprefix("PROBLEM: ") for x in lines if x.startswith("PROBLEM: ")]
