"""The path rule when the source pool offers no NBD: `auto` falls back to the stream and says
why in the run's record and in `xencr plan`; `nbd` fails the VM with that line; a stream job
cannot purge snapshot data."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner
from xapitest import Pools, job_config

from xencr.cli.app import app
from xencr.config import ConfigError, load_config
from xencr.replication.jobs import run_configured
from xencr.state import StateDB


def test_auto_falls_back_to_the_stream_saying_why(pools: Pools, tmp_path: Path) -> None:
    cfg = job_config(tmp_path, pools, "j", ["vm0"])
    r = CliRunner().invoke(app, ["plan", "j", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "disk 0 (" in r.output and "via stream: no NBD network on pool a" in r.output
    report = run_configured(load_config(cfg), "j")
    assert report.outcome == "success"
    (disk,) = report.vms[0].targets[0].disks
    assert (disk.path, disk.path_reason) == ("stream", "stream: no NBD network on pool a")
    with StateDB(load_config(cfg).state.path) as db:
        (task,) = db.tasks(db.runs("j")[-1].id)
    assert task.paths == {"0": "stream: no NBD network on pool a"}


def test_nbd_required_fails_the_vm_with_the_reason(pools: Pools, tmp_path: Path) -> None:
    cfg = job_config(tmp_path, pools, "j", ["vm1"], job_extra='transfer = "nbd"')
    r = CliRunner().invoke(app, ["plan", "j", "--config", str(cfg)])
    assert (
        r.exit_code == 1 and 'PROBLEM: disk 0: fails: transfer = "nbd": no NBD network on pool a' in r.output
    )
    report = run_configured(load_config(cfg), "j")
    tr = report.vms[0].targets[0]
    assert tr.outcome == "failure" and tr.error is not None
    assert tr.error.endswith('transfer = "nbd": no NBD network on pool a')


def test_purging_needs_the_nbd_path(pools: Pools, tmp_path: Path) -> None:
    cfg = job_config(
        tmp_path, pools, "j", ["vm0"], job_extra='transfer = "stream"\npurge_snapshot_data = true'
    )
    with pytest.raises(ConfigError, match=r"purge_snapshot_data.*needs the NBD path"):
        load_config(cfg)
    bad = job_config(tmp_path / "x", pools, "j", ["vm0"], job_extra='transfer = "fast"')
    with pytest.raises(ConfigError, match=r"transfer.*must be one of auto, nbd, stream, not 'fast'"):
        load_config(bad)
