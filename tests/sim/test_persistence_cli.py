"""State that survives a restart, GC of base copies, and the ``xencr sim`` commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import XenAPI
from simtest import MIB, Sim, first_vm, vm_disk
from typer.testing import CliRunner

from xencr.cli.app import app
from xencr.sim.guest import pattern_bytes
from xencr.sim.layout import init_state

runner = CliRunner()


def test_restart_keeps_refs_not_sessions(sim: Sim) -> None:
    s = sim.session()
    x = s.xenapi
    vm = first_vm(x)
    disk = vm_disk(x, vm)
    snap = x.VM.snapshot(vm, "before restart")
    x.VM.add_to_other_config(vm, "persisted", "yes")
    digest = x.sim.hash(x.VDI.get_uuid(disk))
    old_session = s._session
    sim.shutdown()
    sim.start()
    reply = sim.raw().VM.get_all(old_session)
    assert reply["ErrorDescription"] == ["SESSION_INVALID", old_session]
    y = sim.session().xenapi
    assert y.VM.get_other_config(vm)["persisted"] == "yes"  # the same ref is still valid
    assert y.VM.get_snapshot_of(snap) == vm
    assert y.sim.hash(y.VDI.get_uuid(disk)) == digest


def test_gc_coalesces_single_child_base_copies(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x, "vm1")
    disk = vm_disk(x, vm)
    uuid = x.VDI.get_uuid(disk)
    snap = x.VDI.snapshot(disk)
    x.sim.write(uuid, str(MIB), str(MIB), "after-snapshot")
    base_uuid = x.VDI.get_sm_config(disk)["vhd-parent"]
    digest = x.sim.hash(uuid)
    x.VDI.destroy(snap)  # the base copy now has a single child
    x.sim.gc(x.SR.get_uuid(x.VDI.get_SR(disk)))
    assert x.VDI.get_sm_config(disk).get("vhd-parent") != base_uuid
    assert base_uuid not in [x.VDI.get_uuid(v) for v in x.SR.get_VDIs(x.VDI.get_SR(disk))]
    assert x.sim.hash(uuid) == digest


def test_cli_write_and_hash_with_running_server(sim: Sim) -> None:
    x = sim.session().xenapi
    uuid = x.VDI.get_uuid(vm_disk(x, first_vm(x)))
    result = runner.invoke(
        app,
        [
            "sim",
            "write",
            "--state",
            str(sim.state),
            uuid,
            "--offset",
            "4096",
            "--length",
            "8192",
            "--pattern",
            "cli",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sim", "hash", "--state", str(sim.state), uuid])
    assert result.exit_code == 0 and result.output.strip() == x.sim.hash(uuid)
    result = runner.invoke(app, ["sim", "hash", "--state", str(sim.state), "no-such-uuid"])
    assert result.exit_code == 1 and "UUID_INVALID" in result.output


def test_cli_fault_commands(sim: Sim) -> None:
    x = sim.session().xenapi
    result = runner.invoke(
        app,
        [
            "sim",
            "fault",
            "fail-call",
            "--state",
            str(sim.state),
            "VM.clone",
            "OPERATION_NOT_ALLOWED",
            "from the CLI",
        ],
    )
    assert result.exit_code == 0, result.output
    try:
        x.VM.clone(first_vm(x), "x")
        raise AssertionError("the injected failure did not fire")
    except XenAPI.Failure as err:
        assert err.details == ["OPERATION_NOT_ALLOWED", "from the CLI"]
    result = runner.invoke(app, ["sim", "fault", "slow", "--state", str(sim.state), "1000000", "--pool", "1"])
    assert result.exit_code == 0
    assert sim.session(1).xenapi.sim.faults()["rate"] == "1000000"
    result = runner.invoke(app, ["sim", "fault", "show", "--state", str(sim.state), "--pool", "1"])
    assert '"rate": "1000000"' in result.output or '"rate": 1000000' in result.output
    runner.invoke(app, ["sim", "fault", "clear", "--state", str(sim.state), "--pool", "1"])
    assert sim.session(1).xenapi.sim.faults()["rate"] == "0"


def test_cli_write_and_hash_offline(sim: Sim) -> None:
    x = sim.session().xenapi
    disk = vm_disk(x, first_vm(x, "vm1"))
    uuid = x.VDI.get_uuid(disk)
    sim.shutdown()
    try:
        result = runner.invoke(
            app,
            [
                "sim",
                "write",
                "--state",
                str(sim.state),
                uuid,
                "--offset",
                "0",
                "--length",
                str(MIB),
                "--pattern",
                "offline",
            ],
        )
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["sim", "hash", "--state", str(sim.state), uuid])
        offline_hash = result.output.strip()
        assert result.exit_code == 0 and len(offline_hash) == 64
        result = runner.invoke(app, ["sim", "fault", "show", "--state", str(sim.state)])
        assert result.exit_code == 1 and "no simulator is serving" in result.output
    finally:
        sim.start()
    y = sim.session().xenapi
    assert y.sim.hash(uuid) == offline_hash
    s = sim.session()
    from simtest import export_path, http_request

    _, _, raw = http_request(sim, "GET", export_path(s, disk, "raw"))
    assert raw[:MIB] == pattern_bytes("offline", 0, MIB)


def test_cli_init_and_serve_subprocess(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = runner.invoke(
        app, ["sim", "init", "--state", str(state), "--pools", "1", "--vms", "1", "--disk-mib", "4"]
    )
    assert result.exit_code == 0, result.output
    assert (state / "password").stat().st_mode & 0o777 == 0o600
    again = runner.invoke(app, ["sim", "init", "--state", str(state)])
    assert again.exit_code == 1
    xencr = str(Path(sys.executable).with_name("xencr"))
    command = [xencr, "sim", "serve", "--state", str(state), "--port", "0", "--auth-delay", "0"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[0] == "pool0" and line[1].startswith("http://127.0.0.1:")
        assert (state / "server.json").stat().st_mode & 0o777 == 0o600
        s = XenAPI.Session(line[1])
        s.xenapi.login_with_password("root", (state / "password").read_text().strip(), "1.0", "t")
        assert len([v for v in s.xenapi.VM.get_all_records().values() if not v["is_control_domain"]]) == 1
        busy = runner.invoke(app, ["sim", "serve", "--state", str(state), "--port", "0"])
        assert busy.exit_code == 1 and "already served" in busy.output
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not (state / "server.json").exists()


def test_init_state_values(tmp_path: Path) -> None:
    password = init_state(tmp_path / "s", 1, vms=0, disk_size=0, sr_size=MIB, password=None)
    assert len(password) >= 12 and (tmp_path / "s" / "password").read_text().strip() == password


def test_cli_ls(sim: Sim) -> None:
    import json

    x = sim.session().xenapi
    disk_uuid = x.VDI.get_uuid(vm_disk(x, first_vm(x)))
    result = runner.invoke(app, ["sim", "ls", "--state", str(sim.state)])
    assert result.exit_code == 0 and disk_uuid in result.output and "pool1" in result.output
    online = json.loads(runner.invoke(app, ["sim", "ls", "--state", str(sim.state), "--json"]).output)
    sim.shutdown()
    try:
        offline = json.loads(runner.invoke(app, ["sim", "ls", "--state", str(sim.state), "--json"]).output)
    finally:
        sim.start()
    assert online == offline and len(online) == 2
    vm0 = next(v for v in online[0]["vms"] if v["name"] == "vm0")
    assert vm0["disks"][0]["uuid"] == disk_uuid and vm0["disks"][0]["size"] == 8 * MIB


def test_harness_for_other_suites(tmp_path: Path) -> None:
    from xencr.sim.harness import running_simulator

    with running_simulator(tmp_path / "h", pools=1, vms=1, disk_size=2 * MIB, password="pw") as h:
        s = XenAPI.Session(h.urls[0])
        s.xenapi.login_with_password("root", h.password, "1.0", "harness")
        vm = s.xenapi.VM.get_by_name_label("vm0")[0]
        h.restart()
        s2 = XenAPI.Session(h.urls[0])
        s2.xenapi.login_with_password("root", "pw", "1.0", "harness")
        assert s2.xenapi.VM.get_name_label(vm) == "vm0"


def test_restart_after_a_crash_between_merge_and_record(sim: Sim) -> None:
    from xencr import _engine
    from xencr.sim.api.vdi import destroy_vdi, new_vdi, snapshot_vdi
    from xencr.sim.control import state_lock
    from xencr.sim.dispatch import Ctx
    from xencr.sim.pool_state import PoolState

    sim.shutdown()
    with state_lock(sim.state, wait=True):
        pool = PoolState(sim.state, 0, sim.password, auth_delay=0)
        pool.gc.enabled = False  # the "crash" comes before the collector records its merge
        ctx = Ctx(pool, None, "test")
        with pool.db.lock:
            sr = pool.pool_ref and pool.db.get("pool", pool.pool_ref)["default_SR"]
            vdi = new_vdi(
                ctx,
                sr,
                {"name_label": "crashy", "virtual_size": 4 * MIB, "type": "user", "sm_config": {}},
                file_size=4 * MIB,
            )
            pool.storage.write(vdi, 0, b"x" * 4096)
            snap = snapshot_vdi(ctx, vdi)
            digest = pool.storage.sha256(vdi)
            destroy_vdi(ctx, snap)
            base = pool.storage.parent_ref(vdi)
            assert base is not None
            _engine.coalesce(str(pool.storage.path(vdi)), str(pool.storage.path(base)))
            pool.storage.path(base).unlink(missing_ok=True)
            uuid = pool.db.get("VDI", vdi)["uuid"]
            pool.save()
    sim.start()
    x = sim.session().xenapi
    ref = x.VDI.get_by_uuid(uuid)
    assert "vhd-parent" not in x.VDI.get_sm_config(ref)
    assert x.sim.hash(uuid) == digest


def test_restart_after_a_crash_before_the_database_save(sim: Sim) -> None:
    from xencr.sim.api.vdi import destroy_vdi, snapshot_vdi
    from xencr.sim.control import state_lock
    from xencr.sim.dispatch import Ctx
    from xencr.sim.pool_state import PoolState

    x = sim.session().xenapi
    disk = vm_disk(x, first_vm(x))
    uuid = x.VDI.get_uuid(disk)
    victim = x.VDI.clone(disk)
    victim_uuid = x.VDI.get_uuid(victim)
    digest, victim_digest = x.sim.hash(uuid), x.sim.hash(victim_uuid)
    sr_vdis = len(x.SR.get_VDIs(x.VDI.get_SR(disk)))
    sim.shutdown()
    with state_lock(sim.state, wait=True):
        pool = PoolState(sim.state, 0, sim.password, auth_delay=0)
        pool.gc.enabled = False
        ctx = Ctx(pool, None, "test")
        with pool.db.lock:
            snapshot_vdi(ctx, pool.db.by_uuid("VDI", uuid))  # files changed...
            destroy_vdi(ctx, pool.db.by_uuid("VDI", victim_uuid))
        # ...and the process dies before the database is saved
    sim.start()
    y = sim.session().xenapi
    assert y.sim.hash(uuid) == digest and y.sim.hash(victim_uuid) == victim_digest
    assert len(y.SR.get_VDIs(y.VDI.get_SR(disk))) == sr_vdis
    assert y.VDI.snapshot(disk)  # the chain works after the undo
