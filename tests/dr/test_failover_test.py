"""`xencr failover PLAN --test` and `--cleanup`: a booted rehearsal on clones leaves the target
pool exactly as before (VMs, VDIs, networks and their records) and the next CR run a delta; a
test killed mid-way is cleaned by `--cleanup`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from drtest import cli, write_config
from xapitest import Pools

from xencr.cli.app import app
from xencr.config import load_config
from xencr.monitor import rehearsals
from xencr.replication.jobs import run_configured
from xencr.state import StateDB
from xencr.xapi.session import XapiSession

PLAN = '[[plan]]\nname = "rehearsal"\njobs = ["jb"]\ngate = { kind = "guest_tools", timeout = "20s" }\n'
VOLATILE = ("allowed_operations", "current_operations")  # XAPI recomputes these around any call


def _pool(t: XapiSession) -> dict[str, Any]:
    def clean(recs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {r["uuid"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in recs.values()}

    return {
        "VM": clean(t.api.VM.get_all_records()),
        "VDI": clean(t.api.VDI.get_all_records()),
        "network": clean(t.api.network.get_all_records()),
        "VIF": clean(t.api.VIF.get_all_records()),
    }


def _run(cfg: Path) -> list[str]:
    report = run_configured(load_config(cfg), "jb")
    assert report.outcome == "success", [t.error for v in report.vms for t in v.targets]
    return [d.kind for v in report.vms for x in v.targets for d in x.disks]


def test_a_booted_test_failover_leaves_the_pool_as_it_was(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools, PLAN)
    _run(cfg)
    b = pools.session(1)
    pool = b.api.pool.get_all()[0]
    b.api.pool.set_other_config(pool, dict(b.api.pool.get_other_config(pool)) | {"sim_delay_scale": "0.05"})
    before = _pool(b)
    mark = len(b.api.sim.start_log())
    r = cli.invoke(app, ["failover", "rehearsal", "--test", "--boot", "--json", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ok"] and out["booted"] and not out["kept"]
    assert sorted(v["name"] for v in out["vms"]) == ["vm0", "vm1"]
    for v in out["vms"]:
        assert v["ok"] and v["gate"] == "guest tools reported" and v["boot_seconds"] > 0, v
    assert sorted(str(e["vm"]) for e in b.api.sim.start_log()[mark:]) == sorted(
        v["clone"] for v in out["vms"]
    )
    assert len(out["cleaned"]) == 2 + 2 + 1, out["cleaned"]  # 2 clones, their 2 disks, the network
    after = _pool(b)
    assert after == before
    with StateDB(load_config(cfg).state.path) as db:
        run = db.run(out["run"])
        # Its per-VM record, for the status page and `xencr report` (start group and time, gate).
        record = rehearsals.load(db, run.id)
    assert (run.trigger, run.outcome, run.job_name) == ("dr-test", "success", "plan rehearsal")
    assert record is not None and record.ok and record.booted
    assert sorted((v.name, v.group, v.clone) for v in record.vms) == sorted(
        (v["name"], 1, v["clone"]) for v in out["vms"]
    )
    assert all(
        v.started_at is not None and run.started_at <= v.started_at <= run.finished_at for v in record.vms
    )  # type: ignore[operator]
    assert _run(cfg) == ["delta", "delta"]


def test_a_killed_test_is_cleaned_by_cleanup(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools, PLAN.replace('"20s"', '"60s"'))
    _run(cfg)
    b = pools.session(1)
    rp = [r for r in b.api.VM.get_all_records().values() if r["other_config"].get("xencr:role") == "replica"]
    # A guest that never boots: the test sits in its gate until killed.
    for r in rp:
        ref = b.api.VM.get_by_uuid(r["uuid"])
        b.api.VM.set_other_config(ref, dict(r["other_config"]) | {"sim_boots": "false"})
    before = _pool(b)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xencr.cli",
            "failover",
            "rehearsal",
            "--test",
            "--boot",
            "--config",
            str(cfg),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(
                "[xencr test " in r["name_label"] and r["power_state"] == "Running"
                for r in b.api.VM.get_all_records().values()
            ):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the test failover did not boot a clone")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _pool(b) != before
    r = cli.invoke(app, ["failover", "--cleanup", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[-1] == "5 test object(s) destroyed", lines
    assert _pool(b) == before
