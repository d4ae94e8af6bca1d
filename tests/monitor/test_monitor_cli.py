"""`xencr metrics`, `xencr status` (from history when the pools are down) and `xencr history`:
output content, JSON, exit codes."""

from __future__ import annotations

import json
import re
import socket
from datetime import UTC, datetime, timedelta
from functools import partialmethod
from pathlib import Path

import pytest
import typer
from monitortest import families, value
from typer.testing import CliRunner

from xencr.cli.history import history_command
from xencr.cli.metrics import metrics_command
from xencr.cli.plan import status_command
from xencr.config import load_config
from xencr.state import StateDB
from xencr.xapi.session import XapiSession

app = typer.Typer()
app.command("metrics")(metrics_command)
app.command("status")(status_command)
app.command("history")(history_command)
runner = CliRunner()


@pytest.fixture(autouse=True)
def unreachable_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool nobody answers is retried with backoff for seconds: once is enough to know here."""
    monkeypatch.setattr(XapiSession, "__init__", partialmethod(XapiSession.__init__, retries=0))


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path) -> Path:
    """Pools nobody answers on (status must fall back on the history); web every 10m, db disabled."""
    pw = tmp / "pw"
    pw.write_text("pw")
    pw.chmod(0o600)
    path = tmp / "xencr.toml"
    path.write_text(
        f'state = "{tmp / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "https://127.0.0.1:{_closed_port()}"\npassword_file = "{pw}"\n'
        f'[pools.b]\nurl = "https://127.0.0.1:{_closed_port()}"\npassword_file = "{pw}"\n'
        '[jobs.web]\npool = "a"\nvms = ["web-*"]\n'
        '[[jobs.web.targets]]\npool = "b"\nsr = "SR1"\n'
        '[[jobs.web.schedules]]\nid = "ten"\nevery = "10m"\n'
        '[jobs.db]\npool = "a"\nvms = ["db-*"]\nenabled = false\n'
        '[[jobs.db.targets]]\npool = "b"\nsr = "sr-b"\n'
        '[[jobs.db.schedules]]\nid = "hourly"\ncron = "@hourly"\n'
    )
    return path


def fill(cfg_path: Path, now: datetime, *, daemon: bool = True) -> dict[str, int]:
    """web-1 replicated 4 minutes ago; web-2 last replicated 2 hours ago and skipped since;
    web-3 interrupted by a shutdown, never replicated."""
    cfg = load_config(cfg_path)
    web = cfg.jobs["web"]
    t = [now - timedelta(hours=2)]
    db = StateDB(cfg.state.path, clock=lambda: t[0])
    r1 = db.start_run(web.id, "web", "ten", "schedule")
    for vm in ("1", "2"):
        task = db.start_task(r1, f"vm-{vm}", f"web-{vm}", "sr-b")
        db.finish_task(
            task,
            "success",
            transfer="full",
            reasons={"0": "first run"},
            bytes_sent=4096,
            restore_point=f"rp-{vm}-old",
            snapshot_time=t[0],
            cleaned=2 if vm == "1" else 0,
        )
    db.finish_run(r1, "success")
    t[0] = now - timedelta(minutes=4)
    r2 = db.start_run(web.id, "web", "ten", "schedule")
    task = db.start_task(r2, "vm-1", "web-1", "sr-b")
    db.finish_task(
        task,
        "success",
        transfer="delta",
        reasons={"0": "delta"},
        bytes_sent=512,
        restore_point="rp-1-new",
        snapshot_time=t[0],
    )
    db.skip_task(r2, "vm-2", "web-2", "sr-b", "skipped: previous run still running")
    task = db.start_task(r2, "vm-3", "web-3", "sr-b")
    db.finish_task(task, "interrupted", error="cancelled: shutting down")
    db.finish_run(r2, "interrupted", "cancelled")
    if daemon:
        db.set_fire(web.id, "ten", last=now - timedelta(minutes=4), next=now + timedelta(minutes=6))
    db.close()
    return {"r1": r1, "r2": r2}


def test_metrics_prints_and_writes_a_textfile(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path)
    state = tmp_path / "state.sqlite"
    code, out, _ = run("metrics", "--config", str(cfg_path))
    assert code == 0 and not state.exists()  # no history: zeros, and no database created
    assert value(families(out), "xencr_tasks_total", job="web", outcome="success") == 0
    fill(cfg_path, datetime.now(UTC))
    code, out, _ = run("metrics", "--config", str(cfg_path))
    assert code == 0
    f = families(out)
    assert value(f, "xencr_tasks_total", job="web", outcome="success") == 3
    assert value(f, "xencr_tasks_total", job="web", outcome="skipped") == 1
    assert value(f, "xencr_tasks_total", job="web", outcome="interrupted") == 1
    assert value(f, "xencr_bytes_sent_total", job="web", kind="full") == 8192
    assert value(f, "xencr_orphans_cleaned_total", job="web") == 2
    assert value(f, "xencr_rpo_breached", job="web", vm="web-2") == 1
    assert value(f, "xencr_rpo_breached", job="web", vm="web-1") == 0
    assert value(f, "xencr_rpo_seconds", job="web", vm="web-1") == 600
    textfile = tmp_path / "collector" / "xencr.prom"
    textfile.parent.mkdir()
    code, out, _ = run("metrics", "--config", str(cfg_path), "--textfile", str(textfile))
    assert code == 0 and out == ""
    assert value(families(textfile.read_text()), "xencr_tasks_total", job="web", outcome="success") == 3
    assert [p.name for p in textfile.parent.iterdir()] == ["xencr.prom"]
    code, _, err = run(
        "metrics", "--config", str(cfg_path), "--textfile", str(tmp_path / "nowhere" / "x.prom")
    )
    assert code == 1
    assert (
        err == f"xencr: error: {tmp_path / 'nowhere' / 'x.prom'}: cannot write: No such file or directory\n"
    )


def test_status_from_history_when_pools_are_down(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path)
    now = datetime.now(UTC)
    fill(cfg_path, now)
    code, out, err = run("status", "--config", str(cfg_path), "--json")
    assert code == 0, err
    assert err.startswith("xencr: warning: job web: ") and err.rstrip().endswith(
        "showing the recorded history"
    )
    assert len(err.strip().splitlines()) == 1  # the disabled job 'db' is not shown
    rows = {r["vm_name"]: r for r in json.loads(out)}
    assert sorted(rows) == ["web-1", "web-2", "web-3"]
    w1, w2, w3 = rows["web-1"], rows["web-2"], rows["web-3"]
    assert {r["source"] for r in rows.values()} == {"history"}
    assert (w1["newest"], w1["last_outcome"], w1["rpo_seconds"], w1["rpo_breach"]) == (
        "rp-1-new",
        "success",
        600,
        False,
    )
    assert 240 <= w1["age_seconds"] < 600 and w1["target_sr"] == "sr-b"
    # The skip is shown as such (not a failure), and the old restore point it left breaches.
    assert (w2["last_outcome"], w2["last_error"]) == ("skipped", "skipped: previous run still running")
    assert (w2["newest"], w2["rpo_breach"]) == ("rp-2-old", True) and w2["age_seconds"] >= 7200
    assert (w3["last_outcome"], w3["newest"], w3["age_seconds"], w3["rpo_breach"]) == (
        "interrupted",
        None,
        None,
        True,
    )
    # The next run as the daemon recorded it.
    assert {r["next_run"] for r in rows.values()} == {(now + timedelta(minutes=6)).isoformat()}

    code, out, _ = run("status", "--config", str(cfg_path))
    assert code == 0
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert lines["web-1"].startswith("web  web-1 -> sr-b: newest 4m old (RPO 10m), last success, next ")
    assert re.search(r"\(in [56]m\)", lines["web-1"]) and "BREACH" not in lines["web-1"]
    assert "last skipped: previous run still running" in lines["web-2"]
    assert lines["web-2"].endswith("[from history]  BREACH")
    assert "no restore point (RPO 10m), last interrupted (cancelled: shutting down)" in lines["web-3"]
    assert "\x1b[" not in out  # colour only on a terminal
    coloured = runner.invoke(app, ["status", "--config", str(cfg_path)], color=True).stdout
    assert coloured.count("\x1b[31m\x1b[1mBREACH\x1b[0m") == 2 and coloured.count("\x1b[") == 6


def test_status_next_run_without_a_daemon(tmp_path: Path) -> None:
    """Without fire times recorded by a daemon, the schedule's own next fire; a disabled job has
    none; a recorded fire time in the past is shown as it is (the daemon did not fire it)."""
    cfg_path = write_config(tmp_path)
    now = datetime.now(UTC)
    fill(cfg_path, now, daemon=False)
    cfg = load_config(cfg_path)
    with StateDB(cfg.state.path) as db:
        r = db.start_run(cfg.jobs["db"].id, "db", None, "manual")
        db.finish_task(db.start_task(r, "vm-9", "db-9", "sr-b"), "success", snapshot_time=now)
        db.finish_run(r, "success")
    code, out, _ = run("status", "--config", str(cfg_path), "--json")
    assert code == 0
    [nxt] = {r["next_run"] for r in json.loads(out)}
    t = datetime.fromisoformat(nxt)
    assert now < t <= now + timedelta(minutes=10) and t.minute % 10 == 0 and t.second == 0
    code, out, _ = run("status", "db", "--config", str(cfg_path), "--json")
    assert code == 0
    [row] = json.loads(out)
    assert (row["vm_name"], row["next_run"], row["rpo_seconds"]) == ("db-9", None, 3600)
    # Its target is named by the SR's UUID in the config: shown as the job names it.
    assert (row["target"], row["target_sr"]) == ("b/sr-b", "sr-b")

    with StateDB(cfg.state.path) as db:
        db.set_fire(cfg.jobs["web"].id, "ten", last=None, next=now - timedelta(hours=1))
    code, out, _ = run("status", "web", "--config", str(cfg_path))
    assert code == 0
    assert all(re.search(r", next \S+ \S+Z \((59m|1h) ago\)", line) for line in out.splitlines())


def test_status_without_history(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path)
    code, out, _ = run("status", "--config", str(cfg_path), "--json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = run("status", "--config", str(cfg_path))
    assert code == 0 and out == "nothing recorded yet for the jobs whose pools could not be reached\n"
    assert not (tmp_path / "state.sqlite").exists()


def test_history_shows_skips_interruptions_and_cleanups(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path)
    now = datetime.now(UTC)
    ids = fill(cfg_path, now)
    code, out, _ = run("history", "web", "--config", str(cfg_path), "--json")
    assert code == 0
    r1, r2 = json.loads(out)
    assert (r1["id"], r2["id"]) == (ids["r1"], ids["r2"])
    assert r1["tasks"][0]["cleaned"] == 2 and r1["tasks"][1]["cleaned"] == 0
    assert r1["tasks"][0]["snapshot_time"] == (now - timedelta(hours=2)).isoformat()
    assert [(t["vm_name"], t["outcome"], t["error"]) for t in r2["tasks"]] == [
        ("web-1", "success", None),
        ("web-2", "skipped", "skipped: previous run still running"),
        ("web-3", "interrupted", "cancelled: shutting down"),
    ]
    assert r2["outcome"] == "interrupted"
    code, out, _ = run("history", "--config", str(cfg_path))
    assert code == 0
    lines = out.splitlines()
    assert "    cleaned up 2 leftover(s) of earlier runs" in lines
    i = lines.index("  web-2 -> sr-b  skipped  0s")
    assert lines[i + 1] == "    error: previous run still running"
    assert any(line.startswith("  web-3 -> sr-b  interrupted") for line in lines)
    assert "    error: cancelled: shutting down" in lines
    code, out, _ = run("history", "--config", str(cfg_path), "--since", "1h", "--json")
    assert code == 0 and [r["id"] for r in json.loads(out)] == [ids["r2"]]


def test_history_shows_the_newest_runs_unless_asked_for_all(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path)
    fill(cfg_path, datetime.now(UTC))
    with StateDB(load_config(cfg_path).state) as db:
        extra = []
        for i in range(3):
            run_id = db.start_run("job-x", "x", None, "manual")
            db.finish_task(db.start_task(run_id, f"vm-{i}", f"x-{i}", "sr"), "success", bytes_sent=i)
            db.finish_run(run_id, "success")
            extra.append(run_id)
        every = [r.id for r in db.runs()]
    code, out, _ = run("history", "--config", str(cfg_path), "--last", "2", "--json")
    shown = json.loads(out)
    assert code == 0 and [r["id"] for r in shown] == extra[-2:], "the newest, oldest first"
    assert [[t["vm_name"] for t in r["tasks"]] for r in shown] == [["x-1"], ["x-2"]]
    code, out, _ = run("history", "--config", str(cfg_path), "--last", "2")
    assert code == 0 and out.count("\nrun ") + out.startswith("run ") == 2
    assert out.endswith("(the newest 2 runs; --last 0 shows all, --since narrows)\n"), out
    code, out, _ = run("history", "--config", str(cfg_path), "--last", "0", "--json")
    assert code == 0 and [r["id"] for r in json.loads(out)] == every
    code, out, _ = run("history", "--config", str(cfg_path))
    assert code == 0 and "--last 0 shows all" not in out, "100 by default: all of these"
