"""Helpers of the runner tests: a config with two jobs over the simulator's two VMs, and what
the pools hold (to compare before and after a run)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xapitest import Pools, default_sr, password_file

from xencr.replication import metadata as md

JOB = "be"  # both VMs
OTHER = "other"  # vm0 only, to the same SR


def write_config(
    tmp: Path, pools: Pools, *, job_extra: str = "", pool_a_extra: str = "", pool_b_extra: str = ""
) -> Path:
    pw = password_file(tmp)
    sr = default_sr(pools)
    cfg = tmp / "xencr.toml"
    cfg.write_text(
        f'state = "{tmp / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{pools.urls[0]}"\npassword_file = "{pw}"\n{pool_a_extra}\n'
        f'[pools.b]\nurl = "{pools.urls[1]}"\npassword_file = "{pw}"\n{pool_b_extra}\n'
        f'[jobs.{JOB}]\npool = "a"\nvms = ["vm0", "vm1"]\nconcurrency = 2\n{job_extra}\n'
        f'[[jobs.{JOB}.targets]]\npool = "b"\nsr = "{sr}"\n'
        f'[[jobs.{JOB}.schedules]]\nevery = "15m"\nretention = 3\n'
        f'[jobs.{OTHER}]\npool = "a"\nvms = ["vm0"]\n'
        f'[[jobs.{OTHER}.targets]]\npool = "b"\nsr = "{sr}"\n'
        f'[[jobs.{OTHER}.schedules]]\nevery = "1h"\n'
    )
    return cfg


@dataclass(frozen=True)
class Snapshot:
    """What a run may leave behind: every VM and VDI on the target, the incomplete ones among
    them, the jobs' snapshots on the source, and xencr's XAPI tasks on both pools."""

    target_vms: frozenset[str]
    target_vdis: frozenset[str]
    incomplete: frozenset[str]
    source_snapshots: frozenset[str]
    tasks: tuple[int, int]


def snapshot(pools: Pools) -> Snapshot:
    s, t = pools.session(0), pools.session(1)
    vms = t.api.VM.get_all_records()
    vdis = {ref: r for ref, r in t.api.VDI.get_all_records().items() if r["managed"]}
    incomplete = {
        r["uuid"]
        for r in [*vms.values(), *vdis.values()]
        if r["other_config"].get(md.JOB) and r["other_config"].get(md.COMPLETE) != "true"
    }
    snaps = {
        r["uuid"]
        for r in s.api.VM.get_all_records().values()
        if r["is_a_snapshot"] and r["other_config"].get(md.JOB)
    }

    def xencr_tasks(x: object) -> int:
        api = x.api  # type: ignore[attr-defined]
        return sum(1 for r in api.task.get_all_records().values() if r["name_label"].startswith("xencr"))

    return Snapshot(
        frozenset(r["uuid"] for r in vms.values()),
        frozenset(r["uuid"] for r in vdis.values()),
        frozenset(incomplete),
        frozenset(snaps),
        (xencr_tasks(s), xencr_tasks(t)),
    )


def exporting(pools: Pools) -> bool:
    """Whether the source pool is exporting a disk now (its control domain has one attached)."""
    s = pools.session(0)
    dom0 = next(r for r, rec in s.api.VM.get_all_records().items() if rec["is_control_domain"])
    return bool(s.api.VM.get_VBDs(dom0))


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def spawn_held(
    cfg: Path, job: str, only: list[str], point: str, tmp: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """A second process running ``job`` that parks at ``point`` (runner.hold), holding its locks."""
    marker = tmp / f"held-{point}"
    env = dict(os.environ) | {"XENCR_TEST_HOLD": point, "XENCR_TEST_HOLD_FILE": str(marker)}
    code = (
        "from xencr.config import load_config; from xencr.replication.jobs import run_configured; "
        f"run_configured(load_config({str(cfg)!r}), {job!r}, only={only!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    return proc, marker
