"""Issue 11: a health check killed midway leaves its clone (named by the call that made it,
marked or not yet, maybe running) and perhaps a disk whose clone is gone; the next run removes
exactly those, never a user's clone of a restore point. The outcome shows in status, history and
the metrics."""

from __future__ import annotations

import json
from pathlib import Path

from healthtest import JOB, guest, objects, write, write_config
from typer.testing import CliRunner
from xapitest import Pools

from xencr.cli.app import app
from xencr.config import load_config
from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.replication.jobs import run_configured
from xencr.xapi.session import XapiSession

cli = CliRunner()


def _disks(t: XapiSession, vm: str) -> list[str]:
    return [str(t.api.VBD.get_VDI(b)) for b in t.api.VM.get_VBDs(vm) if t.api.VBD.get_type(b) == "Disk"]


def _mark(t: XapiSession, vdi: str, attempt: str) -> None:
    """What a check writes on its clone's disks right after the clone."""
    oc = dict(t.api.VDI.get_other_config(vdi))
    t.api.VDI.set_other_config(
        vdi,
        oc
        | {md.ROLE: ownership.HEALTH_CHECK_DISK_ROLE, md.ATTEMPT: attempt, md.SELF: t.api.VDI.get_uuid(vdi)},
    )


def test_leftovers_of_a_killed_check_go_with_the_next_run(pools: Pools, tmp_path: Path) -> None:
    guest(pools, "vm0")
    cfg = write_config(tmp_path, pools, '{ gate = "power_state", timeout = "30s" }')
    job_id = load_config(cfg).job(JOB).id
    write(pools, "vm0", "d1")
    first = run_configured(load_config(cfg), JOB).vms[0].targets[0]
    assert first.health_check is not None and first.health_check.passed
    t = pools.session(1)
    assert first.restore_point is not None
    rp = t.api.VM.get_by_uuid(first.restore_point)
    before = objects(t)

    # Killed right after VM.clone: named, still carrying the restore point's keys.
    a1 = ownership.new_attempt(job_id)
    unmarked = t.api.VM.clone(rp, ownership.health_check_name("vm0", a1))
    # Killed while waiting for the gate: marked, VIFs gone, running.
    a2 = ownership.new_attempt(job_id)
    running = t.api.VM.clone(rp, ownership.health_check_name("vm0", a2))
    oc = dict(t.api.VM.get_other_config(running))
    oc |= {md.ROLE: ownership.HEALTH_CHECK_ROLE, md.ATTEMPT: a2, md.SELF: t.api.VM.get_uuid(running)}
    t.api.VM.set_other_config(running, oc)
    for vdi in _disks(t, running):
        _mark(t, vdi, a2)
    for vif in t.api.VM.get_VIFs(running):
        t.api.VIF.destroy(vif)
    for op in md.PROTECTED_OPS:
        t.api.VM.remove_from_blocked_operations(running, op)
    t.api.VM.start(running, False, False)
    assert t.api.VM.get_power_state(running) == "Running"
    # Killed between the clone's destroy and its disk's: a marked disk attached to nothing.
    a3 = ownership.new_attempt(job_id)
    orphan = t.api.VDI.clone(_disks(t, rp)[0], {})
    _mark(t, orphan, a3)
    # A user's own clone of the restore point: not a check's, left alone.
    users = t.api.VM.clone(rp, "my copy of vm0")
    leftovers = {t.api.VM.get_uuid(v) for v in (unmarked, running)}
    leftover_disks = {t.api.VDI.get_uuid(v) for v in [*_disks(t, unmarked), *_disks(t, running), orphan]}
    user_vm = t.api.VM.get_uuid(users)
    user_disks = {t.api.VDI.get_uuid(v) for v in _disks(t, users)}

    write(pools, "vm0", "d2")
    report = run_configured(load_config(cfg), JOB)
    tr = report.vms[0].targets[0]
    assert tr.outcome == "success" and tr.health_check is not None and tr.health_check.passed
    vms, vdis, _ = objects(t)
    assert not leftovers & vms and not leftover_disks & vdis
    assert user_vm in vms, "a user's clone is never destroyed"
    assert user_disks <= vdis
    assert {tuple(d.split(" ")[:2]) for d in tr.detached} == {("VM", user_vm)} | {
        ("VDI", u) for u in user_disks
    }
    cleaned = "\n".join(tr.cleaned)
    for uuid in leftovers | leftover_disks:
        assert uuid in cleaned
    assert len([c for c in tr.cleaned if "health-check" in c or "health check" in c]) == 5
    # Everything that was there before is still there, plus the new restore point's objects.
    assert before[0] <= vms and before[1] <= vdis

    # Shown: status (text and JSON), history, metrics.
    args = ["--config", str(cfg)]
    status = cli.invoke(app, ["status", JOB, "--json", *args])
    assert status.exit_code == 0, status.output
    [row] = json.loads(status.stdout)
    assert row["health_check"]["passed"] is True
    assert row["health_check"]["detail"].startswith("running after ")
    text = cli.invoke(app, ["status", JOB, *args]).stdout
    assert ", health check passed: running after " in text
    history = cli.invoke(app, ["history", JOB, *args])
    assert history.exit_code == 0, history.output
    assert history.stdout.count("    health check passed: running after ") == 2
    target = f"b/{t.api.SR.get_name_label(t.api.SR.get_by_uuid(tr.sr_uuid))}"
    metrics = cli.invoke(app, ["metrics", *args]).stdout
    assert f'xencr_health_check_passed{{job="{JOB}",vm="vm0",target="{target}"}} 1' in metrics.splitlines()
    assert f'xencr_health_check_failures_total{{job="{JOB}"}} 0' in metrics.splitlines()
