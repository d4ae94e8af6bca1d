"""`xencr run` and `xencr replica` as a user runs them: a config file, the simulator, output
lines, exit codes, history, and one readable line for each kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner
from xapitest import PASSWORD, Pools

from xencr.cli.plan import plan_command, status_command
from xencr.cli.replica import replica_app, verify_command
from xencr.cli.run import run_command
from xencr.replication import metadata as md
from xencr.state import StateDB

app = typer.Typer()
app.command("run")(run_command)
app.command("plan")(plan_command)
app.command("status")(status_command)
app.add_typer(replica_app, name="replica")
app.command("verify")(verify_command)
runner = CliRunner()


def _config(
    tmp: Path,
    pools: Pools,
    *,
    password: str = PASSWORD,
    sr: str | None = None,
    url: str | None = None,
    vms: str = '["vm1"]',
) -> Path:
    pw = tmp / "pw"
    pw.write_text(password)
    os.chmod(pw, 0o600)
    if sr is None:
        s = pools.session(1)
        sr = s.api.SR.get_uuid(s.api.pool.get_default_SR(s.api.pool.get_all()[0]))
    cfg = tmp / "xencr.toml"
    cfg.write_text(
        f'state = "{tmp / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{url or pools.urls[0]}"\npassword_file = "{pw}"\n'
        f'[pools.b]\nurl = "{pools.urls[1]}"\npassword_file = "{pw}"\n'
        f'[jobs.cli]\npool = "a"\nvms = {vms}\n'
        f'[[jobs.cli.targets]]\npool = "b"\nsr = "{sr}"\n'
        f'[[jobs.cli.schedules]]\nevery = "15m"\nretention = 2\n'
    )
    return cfg


def _invoke(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_run_twice_full_then_delta(pools: Pools, tmp_path: Path) -> None:
    cfg = _config(tmp_path, pools)
    code, out, _ = _invoke("run", "cli", "--config", str(cfg))
    assert code == 0, out
    assert "full (first run)" in out and "run success" in out
    code, out, _ = _invoke("run", "cli", "--config", str(cfg), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["vms"][0]["targets"][0]["kind"] == "delta"
    with StateDB(tmp_path / "state.sqlite") as db:
        runs = db.runs()
        assert [r.outcome for r in runs] == ["success", "success"]
        tasks = db.tasks(runs[-1].id)
        assert tasks[0].transfer == "delta" and tasks[0].restore_point


def test_replica_list_and_clone(pools: Pools, tmp_path: Path) -> None:
    cfg = _config(tmp_path, pools)
    _invoke("run", "cli", "--config", str(cfg))
    code, out, _ = _invoke("replica", "list", "cli", "--config", str(cfg), "--json")
    assert code == 0
    rows = json.loads(out)
    assert rows and all(r["complete"] and r["protected"] for r in rows)
    code, out, _ = _invoke("replica", "clone", rows[-1]["uuid"], "--name", "usable", "--config", str(cfg))
    assert code == 0, out
    s = pools.session(1)
    assert out.startswith(f"cloned {rows[-1]['uuid']} into VM 'usable' "), out
    clone = s.api.VM.get_by_uuid(out.split()[-1])
    assert s.api.VM.get_blocked_operations(clone) == {}
    assert md.ROLE not in s.api.VM.get_other_config(clone)
    s.api.VM.start(clone, False, False)
    s.api.VM.hard_shutdown(clone)
    s.api.VM.destroy(clone)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("password", "pool 'a' (URL): authentication failed for user 'root'"),
        ("unreachable", "pool 'a' (http://127.0.0.1:9): connection refused"),
        ("sr", "no SR 'nope' on pool 'b'"),
        ("vm", "selects no VM nope"),
    ],
)
def test_bad_input_is_one_line(pools: Pools, tmp_path: Path, case: str, expected: str) -> None:
    kwargs: dict[str, str] = {}
    args = ["run", "cli"]
    if case == "password":
        kwargs["password"] = "wrong-password"
    elif case == "unreachable":
        kwargs["url"] = "http://127.0.0.1:9"
    elif case == "sr":
        kwargs["sr"] = "nope"
    else:
        args += ["--vm", "nope"]
    cfg = _config(tmp_path, pools, **kwargs)
    s = pools.session(1)
    before = set(s.api.VM.get_all()), set(s.api.VDI.get_all())
    code, _, err = _invoke(*args, "--config", str(cfg))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected.replace("URL", pools.urls[0]) in lines[0], err
    assert "wrong-password" not in err and PASSWORD not in err
    assert (set(s.api.VM.get_all()), set(s.api.VDI.get_all())) == before, "nothing left behind"


def test_invalid_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "xencr.toml"
    cfg.write_text('[pools.a]\nurl = "http://x"\nbogus = 1\n')
    code, _, err = _invoke("run", "cli", "--config", str(cfg))
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "bogus" in err


def test_plan_and_status(pools: Pools, tmp_path: Path) -> None:
    cfg = _config(tmp_path, pools, vms='["vm0"]')
    code, out, _ = _invoke("plan", "cli", "--config", str(cfg), "--json")
    assert code == 0, out
    first = json.loads(out)
    assert first[0]["disks"][0]["kind"] in ("full", "delta")
    _invoke("run", "cli", "--config", str(cfg))
    s = pools.session(0)
    vm = s.api.VM.get_by_name_label("vm0")[0]
    vdi = next(s.api.VBD.get_VDI(b) for b in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(b) == "Disk")
    s.api.sim.write(s.api.VDI.get_uuid(vdi), str(9 * 1024 * 1024), "1000", "plan")
    snaps_before = set(s.api.VM.get_snapshots(vm))
    code, out, _ = _invoke("plan", "cli", "--config", str(cfg), "--json")
    assert code == 0
    disk = json.loads(out)[0]["disks"][0]
    assert (disk["kind"], disk["reason"], disk["estimated_bytes"]) == ("delta", "delta", 2 * 1024 * 1024)
    assert set(s.api.VM.get_snapshots(vm)) == snaps_before, "plan changes nothing"
    code, out, _ = _invoke("status", "cli", "--config", str(cfg), "--json")
    assert code == 0
    row = json.loads(out)[0]
    assert row["last_outcome"] == "success" and row["newest"] and row["age_seconds"] < 600
    assert row["rpo_seconds"] == 900 and row["rpo_breach"] is False


def test_xencr_demo_end_to_end(tmp_path: Path) -> None:
    """The README's main command: the replication demo, as the installed `xencr` runs it."""
    from xencr.cli.app import app as xencr_app

    r = runner.invoke(xencr_app, ["demo", "--keep", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert sum("== source snapshot" in line for line in lines) == 2
    assert any("start replica: refused with OPERATION_BLOCKED" in line for line in lines)
    # Two hosts per pool: the transfers to the member's SR were redirected, and the clone boots
    # on the host that sees its SR.
    assert any(": Running on sim-host-1-1, the host that sees its SR" in line for line in lines)
    assert sum("site-b/Local storage on sim-host-1-1: ok, restore point" in line for line in lines) == 4
    assert lines[-1].startswith("demo succeeded")


def test_verify_rereads_what_was_sent(pools: Pools, tmp_path: Path) -> None:
    cfg = _config(tmp_path, pools, vms='["vm1"]')
    s = pools.session(0)
    src_vm = s.api.VM.get_by_name_label("vm1")[0]
    src_vdi = next(s.api.VBD.get_VDI(b) for b in s.api.VM.get_VBDs(src_vm) if s.api.VBD.get_type(b) == "Disk")
    s.api.sim.write(s.api.VDI.get_uuid(src_vdi), str(5 * 1024 * 1024), "4096", "verify")
    assert _invoke("run", "cli", "--config", str(cfg))[0] == 0
    rows = json.loads(_invoke("replica", "list", "cli", "--config", str(cfg), "--json")[1])
    # This run's restore point of vm1: earlier tests' (vm0's too) have their maps in other state files.
    newest = [r for r in rows if r["source_vm"] == s.api.VM.get_uuid(src_vm)][-1]["uuid"]
    code, out, _ = _invoke("verify", newest, "--config", str(cfg), "--json")
    assert code == 0, out
    checks = json.loads(out)
    assert checks and all(c["ok"] and c["blocks"] > 0 for c in checks)
    # A write into the replica's disk: verify says so and fails.
    t = pools.session(1)
    vm = t.api.VM.get_by_uuid(newest)
    vdi = next(t.api.VBD.get_VDI(b) for b in t.api.VM.get_VBDs(vm) if t.api.VBD.get_type(b) == "Disk")
    t.api.sim.write(t.api.VDI.get_uuid(vdi), "0", "4096", "corrupt")
    code, out, _ = _invoke("verify", newest, "--config", str(cfg))
    assert code == 1
    assert "MISMATCH" in out and "written since the commit" in out
