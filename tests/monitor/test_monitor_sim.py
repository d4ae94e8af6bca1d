"""Monitoring after real runs against the simulator: the report reaches a webhook, and metrics,
status and history carry what the runs did."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
from monitortest import families, receiving, value
from typer.testing import CliRunner

from xencr.cli.history import history_command
from xencr.cli.plan import status_command
from xencr.config import load_config
from xencr.monitor.metrics import render
from xencr.replication.jobs import run_configured
from xencr.sim.harness import RunningSimulator, running_simulator
from xencr.state import StateDB
from xencr.xapi.session import Endpoint, XapiSession

MIB = 1024 * 1024
PASSWORD = "monitor-pw"

app = typer.Typer()
app.command("status")(status_command)
app.command("history")(history_command)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSimulator]:
    with running_simulator(
        tmp_path_factory.mktemp("sim"),
        pools=2,
        vms=2,
        disk_size=16 * MIB,
        sr_size=1024 * MIB,
        password=PASSWORD,
    ) as s:
        yield s


def session(url: str) -> XapiSession:
    return XapiSession(Endpoint(url), "root", PASSWORD, retries=1, backoff=0.05)


def write_config(tmp: Path, sim: RunningSimulator, webhook: str) -> Path:
    pw = tmp / "pw"
    pw.write_text(PASSWORD)
    os.chmod(pw, 0o600)
    t = session(sim.urls[1])
    sr = t.api.SR.get_uuid(t.api.pool.get_default_SR(t.api.pool.get_all()[0]))
    t.logout()
    path = tmp / "xencr.toml"
    path.write_text(
        f'state = "{tmp / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{sim.urls[0]}"\npassword_file = "{pw}"\n'
        f'[pools.b]\nurl = "{sim.urls[1]}"\npassword_file = "{pw}"\n'
        f'[jobs.mon]\npool = "a"\nvms = ["vm*"]\nreport_when = "always"\nwebhook = "{webhook}"\n'
        f'[[jobs.mon.targets]]\npool = "b"\nsr = "{sr}"\n'
        '[[jobs.mon.schedules]]\nid = "quarter"\nevery = "15m"\nretention = 2\n'
    )
    return path


def test_after_real_runs(sim: RunningSimulator, tmp_path: Path) -> None:
    with receiving() as rec:
        cfg_path = write_config(tmp_path, sim, f"{rec.url}/hook")
        cfg = load_config(cfg_path)
        first = run_configured(cfg, "mon", schedule_id="quarter", trigger="schedule")
        assert first.outcome == "success"
        # A guest write between the runs: the second run sends one changed 2 MiB block per write.
        s = session(sim.urls[0])
        vm = s.api.VM.get_by_name_label("vm0")[0]
        vdi = next(s.api.VBD.get_VDI(b) for b in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(b) == "Disk")
        s.api.sim.write(s.api.VDI.get_uuid(vdi), str(3 * MIB), "1000", "monitor")
        s.logout()
        second = run_configured(cfg, "mon", schedule_id="quarter", trigger="schedule")
        assert second.outcome == "success"

    # The webhook got each run's report (report_when = "always").
    posted = [json.loads(body) for path, _, body in rec.posts]
    assert [path for path, _, _ in rec.posts] == ["/hook", "/hook"]
    assert [(p["job"], p["outcome"], p["report_reason"], p["rpo_breaches"]) for p in posted] == [
        ("mon", "success", "every run is reported", [])
    ] * 2
    assert sorted(v["name"] for v in posted[1]["vms"]) == ["vm0", "vm1"]
    kinds = {v["name"]: v["targets"][0]["kind"] for v in posted[1]["vms"]}
    assert kinds == {"vm0": "delta", "vm1": "delta"}

    now = datetime.now(UTC)
    with StateDB(cfg.state.path) as db:
        runs = db.runs()
        tasks = [t for r in runs for t in db.tasks(r.id)]
        text = render(db, cfg, now)
    assert [r.outcome for r in runs] == ["success", "success"] and len(tasks) == 4
    assert all(t.snapshot_time is not None and t.restore_point for t in tasks)
    full_bytes = sum(t.bytes_sent for t in tasks if t.transfer == "full")
    delta_bytes = sum(t.bytes_sent for t in tasks if t.transfer == "delta")
    assert full_bytes > 0 and delta_bytes >= 2 * MIB

    f = families(text)
    assert value(f, "xencr_tasks_total", job="mon", outcome="success") == 4
    assert value(f, "xencr_tasks_total", job="mon", outcome="failure") == 0
    assert value(f, "xencr_bytes_sent_total", job="mon", kind="full") == full_bytes
    assert value(f, "xencr_bytes_sent_total", job="mon", kind="delta") == delta_bytes
    first_disks = sum(len(t.reasons) for t in tasks[:2])
    assert value(f, "xencr_full_transfers_total", job="mon", reason="first run") == first_disks
    assert value(f, "xencr_run_duration_seconds", job="mon") == runs[1].duration.total_seconds()  # type: ignore[union-attr]
    assert value(f, "xencr_last_run_timestamp_seconds", job="mon") == runs[1].started_at.timestamp()
    for t in tasks[2:]:
        labels = {"job": "mon", "vm": t.vm_name, "vm_uuid": t.vm_uuid, "target_sr": t.target_sr}
        assert t.snapshot_time is not None and t.finished_at is not None
        assert value(f, "xencr_restore_point_age_seconds", **labels) == int(
            (now - t.snapshot_time).total_seconds()
        )
        assert value(f, "xencr_rpo_seconds", **labels) == 900
        assert value(f, "xencr_rpo_breached", **labels) == 0
        assert value(f, "xencr_last_success_timestamp_seconds", **labels) == t.finished_at.timestamp()

    # status asks the target pool: the newest restore point there is the one history recorded.
    r = CliRunner().invoke(app, ["status", "mon", "--config", str(cfg_path), "--json"])
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    newest = {t.vm_uuid: t.restore_point for t in tasks[2:]}
    assert sorted(row["vm_name"] for row in rows) == ["vm0", "vm1"]
    for row in rows:
        assert row["source"] == "pool" and row["newest"] == newest[row["vm_uuid"]]
        assert (row["last_outcome"], row["rpo_seconds"], row["rpo_breach"]) == ("success", 900, False)
        assert 0 <= row["age_seconds"] < 900
        nxt = datetime.fromisoformat(row["next_run"])
        assert nxt > now and nxt.minute % 15 == 0 and nxt.second == 0
    r = CliRunner().invoke(app, ["history", "mon", "--config", str(cfg_path), "--json"])
    assert r.exit_code == 0
    hist = json.loads(r.stdout)
    assert [t["transfer"] for t in hist[1]["tasks"]] == ["delta", "delta"]
    assert all(t["snapshot_time"] for run in hist for t in run["tasks"])
