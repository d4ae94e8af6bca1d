"""Issue 11 / SPEC 8: the per-job health check boots a clone of each new restore point with no
network, waits for the gate, and destroys the clone whatever happened; its outcome is the check's
(recorded, shown, reported), never the run's."""

from __future__ import annotations

from pathlib import Path

from healthtest import JOB, Watcher, guest, objects, restore_point_objects, write, write_config
from typer.testing import CliRunner
from xapitest import Pools, default_sr

from xencr.config import load_config
from xencr.monitor import notify
from xencr.replication.jobs import report_payload, run_configured

cli = CliRunner()


def _scale(pools: Pools) -> None:
    t = pools.session(1)
    pool = t.api.pool.get_all()[0]
    t.api.pool.remove_from_other_config(pool, "sim_delay_scale")
    t.api.pool.add_to_other_config(pool, "sim_delay_scale", "0.1")


def test_a_booting_clone_passes_without_network_and_leaves_nothing(pools: Pools, tmp_path: Path) -> None:
    _scale(pools)
    guest(pools, "vm0", sim_boot_delay="5")  # 0.5 s at the pool's scale
    cfg = write_config(tmp_path, pools, '{ gate = "guest_tools", timeout = "30s" }')
    t = pools.session(1)
    before = objects(t)
    write(pools, "vm0", "a1")
    with Watcher(pools.session(1)) as w:
        report = run_configured(load_config(cfg), JOB)
    tr = report.vms[0].targets[0]
    assert (report.outcome, tr.outcome) == ("success", "success")
    assert tr.health_check is not None
    assert (tr.health_check.passed, tr.health_check.detail) == (True, "guest tools reported")
    assert 0.4 < tr.health_check.seconds < 10, "the gate waited for the guest's boot delay"
    # The clone ran, beside the restore point, and never with a VIF; the restore point has one.
    assert tr.restore_point is not None
    rp_vms, rp_vdis, rp_vifs = restore_point_objects(t, tr.restore_point)
    assert len(rp_vifs) == 1
    [seen] = w.seen.values()
    assert seen.name.startswith("[xencr health-check] vm0 #")
    assert (seen.running, seen.vifs_when_running) == (True, 0)
    assert seen.srs == {default_sr(pools)}
    # Nothing of the check is left: the pool holds what it held, plus the restore point.
    after = objects(t)
    assert after == (before[0] | rp_vms, before[1] | rp_vdis, before[2] | rp_vifs)
    assert seen.uuid not in after[0]
    # The checked restore point is still intact: the next run is a delta on it, nothing detached.
    write(pools, "vm0", "a2")
    again = run_configured(load_config(cfg), JOB).vms[0].targets[0]
    assert (again.outcome, again.kind, again.detached, again.cleaned) == ("success", "delta", [], [])
    assert again.health_check is not None and again.health_check.passed


def test_a_clone_that_does_not_boot_fails_the_check_not_the_run(pools: Pools, tmp_path: Path) -> None:
    _scale(pools)
    guest(pools, "vm1", sim_boots="false")
    cfg = write_config(tmp_path, pools, '{ gate = "guest_tools", timeout = "1s" }', vm="vm1")
    t = pools.session(1)
    before = objects(t)
    write(pools, "vm1", "b1")
    with Watcher(pools.session(1)) as w:
        report = run_configured(load_config(cfg), JOB)
    tr = report.vms[0].targets[0]
    assert (report.outcome, tr.outcome, tr.error) == ("success", "success", None)
    assert tr.health_check is not None and not tr.health_check.passed
    assert tr.health_check.detail == "guest_tools within 1s: not met after 1s"
    [seen] = w.seen.values()
    assert seen.running and seen.vifs_when_running == 0
    assert tr.restore_point is not None
    rp = restore_point_objects(t, tr.restore_point)
    after = objects(t)
    assert after == tuple(b | r for b, r in zip(before, rp, strict=True))
    # The job's report: a failed check is something to report under report_when = "failure".
    payload = report_payload(report)
    assert payload["vms"][0]["targets"][0]["health_check"] == {
        "passed": False,
        "detail": "guest_tools within 1s: not met after 1s",
        "seconds": round(tr.health_check.seconds, 3),
    }
    assert notify.report_reason("failure", payload, []) == "a health check failed"
    assert notify.report_reason("never", payload, []) is None


def test_a_xenstore_gate_answered_failure_and_a_health_check_sr(pools: Pools, tmp_path: Path) -> None:
    _scale(pools)
    guest(pools, "vm0", sim_health_check="failure")
    t = pools.session(1)
    second = next(r for r in t.api.SR.get_all_records().values() if r["name_label"] == "Second storage")
    health = (
        '{ gate = "xenstore", key = "vm-data/xencr-health-check", timeout = "30s", sr = "Second storage" }'
    )
    cfg = write_config(tmp_path, pools, health)
    before = objects(t)
    write(pools, "vm0", "c1")
    with Watcher(pools.session(1)) as w:
        report = run_configured(load_config(cfg), JOB)
    tr = report.vms[0].targets[0]
    assert (report.outcome, tr.outcome) == ("success", "success")
    assert tr.health_check is not None
    assert tr.health_check.detail == ("vm-data/xencr-health-check = failure: simulated health-check failure")
    [seen] = w.seen.values()
    assert seen.srs == {second["uuid"]}, "the clone's disks were copied onto the health-check SR"
    assert tr.restore_point is not None
    rp = restore_point_objects(t, tr.restore_point)
    # The previous tests' restore points of vm0 are this job's too (same job id): retention 2
    # may have expired one of them; nothing else changed.
    after = objects(t)
    assert after[0] - before[0] == rp[0] and after[1] - before[1] == rp[1] and after[2] - before[2] == rp[2]
    assert not any(n.startswith("[xencr health-check]") for n in _names(pools))


def _names(pools: Pools) -> list[str]:
    t = pools.session(1)
    return [r["name_label"] for r in t.api.VM.get_all_records().values()]
