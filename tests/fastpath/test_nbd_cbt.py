"""The NBD + CBT path end to end on the simulator's real NBD servers (nbdkit): full then delta,
only the changed 64 KiB units read and written, purged snapshot data, every CBT breakage turned
into a correct transfer with its reason, TLS pinned to the pool's certificate, a kill mid-way."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner
from xapitest import Pools, disk_hashes, job_config

from xencr.cli.app import app
from xencr.config import load_config
from xencr.replication import metadata as md
from xencr.replication.jobs import run_configured
from xencr.replication.runner import DiskResult, JobSpec, RunReport, Target, run_job
from xencr.replication.source import disks_of
from xencr.replication.target import attach, create_disk, create_replica
from xencr.sim.tls import ensure_certificate
from xencr.xapi import nbd
from xencr.xapi.session import XapiSession
from xencr.xapi.transfer import copy_vdi

UNIT = 64 * 1024


@pytest.fixture(scope="module")
def a(pools: Pools) -> Iterator[XapiSession]:
    """Pool a serving NBD (TLS) on its management network."""
    s = pools.session(0)
    net = next(r for r, v in s.api.network.get_all_records().items() if v["bridge"] == "xenbr0")
    s.api.network.add_purpose(net, "nbd")
    yield s
    for purpose in ("nbd", "insecure_nbd"):
        s.api.network.remove_purpose(net, purpose)


def live_disk(a: XapiSession, vm: str) -> str:
    ref = a.api.VM.get_by_name_label(vm)[0]
    vbd = next(v for v in a.api.VM.get_VBDs(ref) if a.api.VBD.get_type(v) == "Disk")
    return str(a.api.VDI.get_uuid(a.api.VBD.get_VDI(vbd)))


def write_units(a: XapiSession, vm: str, units: list[int], seed: str) -> None:
    for u in units:
        a.api.sim.write(live_disk(a, vm), str(u * UNIT), str(UNIT), f"{seed}-{u}")


def run(cfg: Path) -> tuple[RunReport, DiskResult]:
    report = run_configured(load_config(cfg), "j")
    assert len(report.vms) == 1
    tr = report.vms[0].targets[0]
    assert report.outcome == "success", tr.error
    (disk,) = tr.disks
    return report, disk


def replica_hash(pools: Pools, report: RunReport) -> str:
    b = pools.session(1)
    rp = report.vms[0].targets[0].restore_point
    vm = b.api.VM.get_by_uuid(rp)
    vbd = next(v for v in b.api.VM.get_VBDs(vm) if b.api.VBD.get_type(v) == "Disk")
    return str(b.api.sim.hash(b.api.VDI.get_uuid(b.api.VBD.get_VDI(vbd))))


def replica_vdi(pools: Pools, report: RunReport) -> str:
    b = pools.session(1)
    vm = b.api.VM.get_by_uuid(report.vms[0].targets[0].restore_point)
    vbd = next(v for v in b.api.VM.get_VBDs(vm) if b.api.VBD.get_type(v) == "Disk")
    return str(b.api.VDI.get_uuid(b.api.VBD.get_VDI(vbd)))


def test_full_then_delta_read_exactly_the_changed_units(pools: Pools, a: XapiSession, tmp_path: Path) -> None:
    cfg = job_config(tmp_path, pools, "j", ["vm0"])
    report, d = run(cfg)
    assert (d.kind, d.path, d.path_reason) == ("full", "nbd", "NBD")
    assert any("enabled changed block tracking on disk 0" in n for n in report.vms[0].notes)
    assert replica_hash(pools, report) == a.api.sim.hash(live_disk(a, "vm0"))
    # Three 64 KiB units in three different 2 MiB blocks, one of them rewritten with the same
    # data it held (CBT reports a write, not a difference).
    same = a.api.VDI.get_by_uuid(live_disk(a, "vm0"))
    write_units(a, "vm0", [1, 40, 70], "delta")
    a.api.sim.write(a.api.VDI.get_uuid(same), str(100 * UNIT), str(UNIT), "delta-100")
    report, d = run(cfg)
    assert (d.kind, d.path, d.path_reason) == ("delta", "nbd", "NBD + CBT")
    assert d.bytes_read == 4 * UNIT
    stats = pools.session(1).api.sim.import_stats(replica_vdi(pools, report))
    assert int(stats["sectors_written"]) == 4 * UNIT // 512  # only the changed units were written
    assert replica_hash(pools, report) == a.api.sim.hash(live_disk(a, "vm0"))
    r = CliRunner().invoke(app, ["plan", "j", "--config", str(cfg)])
    assert r.exit_code == 0 and "delta via NBD + CBT" in r.output, r.output


def test_purged_snapshots_keep_their_cbt_logs_and_deltas_go_on(
    pools: Pools, a: XapiSession, tmp_path: Path
) -> None:
    cfg = job_config(tmp_path, pools, "j", ["vm1"], job_extra="purge_snapshot_data = true")
    report, d = run(cfg)
    assert d.path == "nbd" and report.vms[0].source_purged

    def source_disks() -> list[dict[str, Any]]:
        vm = a.api.VM.get_by_name_label("vm1")[0]
        snaps = [s for s in a.api.VM.get_snapshots(vm) if a.api.VM.get_other_config(s).get("xencr:job")]
        return [
            a.api.VDI.get_record(a.api.VDI.get_by_uuid(u))
            for s in snaps
            for u in a.api.VM.get_other_config(s)["xencr:purged"].split(";")[0].split("=")[1:]
        ]

    assert [v["type"] for v in source_disks()] == ["cbt_metadata"]
    r = CliRunner().invoke(app, ["plan", "j", "--config", str(cfg)])
    assert r.exit_code == 0 and "delta via NBD + CBT" in r.output, r.output
    for seed in ("one", "two"):
        write_units(a, "vm1", [3, 33, 65], seed)
        report, d = run(cfg)
        assert (d.kind, d.path_reason, d.bytes_read) == ("delta", "NBD + CBT", 3 * UNIT)
        assert replica_hash(pools, report) == a.api.sim.hash(live_disk(a, "vm1"))
        assert [v["type"] for v in source_disks()] == ["cbt_metadata"]  # the older one went


@pytest.mark.parametrize("purge", [False, True], ids=["data-kept", "data-purged"])
def test_a_broken_cbt_chain_is_never_a_wrong_delta(
    pools: Pools, a: XapiSession, tmp_path: Path, purge: bool
) -> None:
    """Each way a CBT chain breaks, with the base snapshot's data kept (the pool's VHD stream
    delta) or purged (a full over NBD): the replica equals the source, the reason is said."""
    vm = "vm3" if purge else "vm2"  # a VM of its own: the last case leaves its chain broken
    cfg = job_config(tmp_path, pools, "j", [vm], job_extra=f"purge_snapshot_data = {str(purge).lower()}")
    run(cfg)

    def disable_enable() -> None:  # a user turned CBT off and on: the log restarts
        ref = a.api.VDI.get_by_uuid(live_disk(a, vm))
        a.api.VDI.disable_cbt(ref)
        a.api.VDI.enable_cbt(ref)

    def inconsistent() -> None:  # sm found the log corrupt: CBT off (xencr turns it on again)
        a.api.sim.fault_cbt_inconsistent(live_disk(a, vm))

    def disabled() -> None:  # a user turned CBT off and left it off (xencr turns it on again)
        a.api.VDI.disable_cbt(a.api.VDI.get_by_uuid(live_disk(a, vm)))

    for i, breaks in enumerate((disable_enable, disabled, inconsistent)):
        write_units(a, vm, [5 + i, 50 + i], f"broken-{purge}-{i}")
        breaks()
        report, d = run(cfg)
        assert replica_hash(pools, report) == a.api.sim.hash(live_disk(a, vm)), breaks.__name__
        if purge:
            assert (d.kind, d.path) == ("full", "nbd"), (breaks.__name__, d)
        else:
            assert (d.kind, d.path) == ("delta", "stream"), (breaks.__name__, d)
        why = d.reason if purge else d.path_reason
        assert "CBT" in why, (breaks.__name__, why)
        # The next runs stay correct. A chain a user broke starts again from the snapshot taken
        # with CBT on again; after sm found a log corrupt (`_disable_cbt_on_error`, which leaves
        # the older snapshot's child pointer on the disk), deleting that snapshot re-links the
        # disk's log wrongly, so sm answers "unrelated" from then on: correct, by the stream.
        for attempt in range(2):
            write_units(a, vm, [9], f"after-{purge}-{i}-{attempt}")
            report, d = run(cfg)
            assert replica_hash(pools, report) == a.api.sim.hash(live_disk(a, vm))
        if breaks is not inconsistent:
            assert (d.kind, d.path_reason, d.bytes_read) == ("delta", "NBD + CBT", UNIT), (breaks.__name__, d)
        else:
            assert "CBT" in (d.reason if purge else d.path_reason)


def test_tls_is_pinned_and_insecure_nbd_is_plain(
    pools: Pools, a: XapiSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = job_config(tmp_path, pools, "j", ["vm1"])
    run(cfg)
    write_units(a, "vm1", [2], "tls")
    # A server showing another certificate than the one the pool names for it is refused.
    (tmp_path / "impostor").mkdir()
    cert, _ = ensure_certificate(tmp_path / "impostor")  # another key pair than the pool's
    wrong = cert.read_text()
    real = nbd.endpoints

    def forged(session: XapiSession, vdi: str) -> list[nbd.NbdEndpoint]:
        return [dataclasses.replace(e, cert=wrong) for e in real(session, vdi)]

    monkeypatch.setattr(nbd, "endpoints", forged)
    report = run_configured(load_config(cfg), "j")
    tr = report.vms[0].targets[0]
    assert tr.outcome == "failure" and tr.error is not None
    assert "NBD server 127.0.0.1:" in tr.error and "certificate" in tr.error and "\n" not in tr.error
    monkeypatch.undo()
    # insecure_nbd: plain NBD, used because the pool offers it.
    net = next(r for r, v in a.api.network.get_all_records().items() if "nbd" in v["purpose"])
    a.api.network.remove_purpose(net, "nbd")
    a.api.network.add_purpose(net, "insecure_nbd")
    try:
        (endpoint,) = nbd.endpoints(a, a.api.VDI.get_by_uuid(live_disk(a, "vm1")))
        assert endpoint.tls is None and endpoint.cert  # XAPI names the certificate either way
        report, d = run(cfg)
        assert (d.path_reason, d.bytes_read) == ("NBD + CBT", UNIT)
        assert replica_hash(pools, report) == a.api.sim.hash(live_disk(a, "vm1"))
    finally:
        a.api.network.remove_purpose(net, "insecure_nbd")
        a.api.network.add_purpose(net, "nbd")


def test_a_kill_mid_nbd_transfer_leaves_nothing_attached(
    pools: Pools, a: XapiSession, tmp_path: Path
) -> None:
    cfg = job_config(tmp_path, pools, "j", ["vm0"])
    report, _ = run(cfg)
    before = replica_hash(pools, report)
    kept = report.vms[0].targets[0].restore_point
    write_units(a, "vm0", list(range(0, 120, 3)), "kill")
    a.api.sim.fault_connection_rate(str(64 * 1024))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xencr.cli", "run", "j", "--config", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 60
        while not a.api.sim.nbd_attachments():
            assert time.monotonic() < deadline, "no NBD transfer started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        a.api.sim.fault_clear()
    deadline = time.monotonic() + 30
    while a.api.sim.nbd_attachments():  # the server ends the dom0 attachment once the client is gone
        assert time.monotonic() < deadline, a.api.sim.nbd_attachments()
        time.sleep(0.1)
    b = pools.session(1)
    vm = b.api.VM.get_by_uuid(kept)
    vbd = next(v for v in b.api.VM.get_VBDs(vm) if b.api.VBD.get_type(v) == "Disk")
    assert b.api.sim.hash(b.api.VDI.get_uuid(b.api.VBD.get_VDI(vbd))) == before  # intact
    report, d = run(cfg)
    assert report.vms[0].targets[0].cleaned, "the killed attempt's replica was cleaned up"
    assert d.path == "nbd" and replica_hash(pools, report) == a.api.sim.hash(live_disk(a, "vm0"))


def test_a_xen_orchestra_nbd_cbt_chain_is_continued(pools: Pools, a: XapiSession) -> None:
    """XO's "NBD + CBT" mode: CBT on the disk, XO's snapshot (its keys) and replica (full copies):
    our first run continues it as an NBD + CBT delta, XO's replica left as it was."""
    src, ts = a, pools.session(1)
    sr = str(ts.api.pool.get_default_SR(ts.api.pool.get_all()[0]))
    sr_uuid = str(ts.api.SR.get_uuid(sr))
    vm = str(src.api.VM.get_by_name_label("vm4")[0])
    vm_uuid = src.api.VM.get_uuid(vm)
    live = src.api.VDI.get_by_uuid(live_disk(src, "vm4"))
    src.api.VDI.enable_cbt(live)
    snap = src.call_async("VM.snapshot", vm, "[XO Backup nightly] vm4")
    xo_keys = {
        md.XO_JOB: "xo-job",
        md.XO_SCHEDULE: "xo-schedule",
        md.XO_VM: vm_uuid,
        md.XO_DATETIME: "20260101T00:00:00Z",
        md.XO_EXPORTED: "true",
    }
    src.api.VM.set_other_config(snap, dict(src.api.VM.get_other_config(snap)) | xo_keys)
    made = {md.ATTEMPT: "made-by-xo"}  # the helpers insist on an attempt id; XO's keys replace it
    replica = create_replica(ts, src.api.VM.get_record(snap) | {"name_label": "vm4 - nightly"}, made)
    ts.api.VM.set_other_config(
        replica, {md.XO_COPY_OF: src.api.VM.get_uuid(snap), md.XO_SR: sr_uuid} | xo_keys
    )
    for d in disks_of(src, snap):
        vdi = create_disk(ts, sr, d, None, made)
        ts.api.VDI.set_other_config(vdi, {md.XO_COPY_OF: d.uuid, md.XO_SR: sr_uuid})
        attach(ts, replica, vdi, d)
        copy_vdi(src, d.vdi, ts, vdi)
    xo_hashes = disk_hashes(ts, replica)
    write_units(src, "vm4", [7], "after-xo")
    t = Target("b", ts, sr, sr_uuid)
    vr = run_job(src, [vm], [t], JobSpec(id="44444444-2222-3333-4444-555555555555", name="after-xo")).vms[0]
    assert vr.outcome == "success", [x.error for x in vr.targets]
    (d,) = vr.targets[0].disks
    assert (d.kind, d.path_reason, d.bytes_read) == ("delta", "NBD + CBT", UNIT)
    assert d.reason == f"continues Xen Orchestra replica {ts.api.VM.get_uuid(replica)}"
    point = ts.api.VM.get_by_uuid(vr.targets[0].restore_point)
    assert disk_hashes(ts, point) == {"0": src.api.sim.hash(live_disk(src, "vm4"))}
    assert disk_hashes(ts, replica) == xo_hashes


def test_a_unit_the_target_garbles_is_never_committed(pools: Pools, a: XapiSession, tmp_path: Path) -> None:
    """The read-back of an NBD delta compares every 64 KiB unit read with what the target holds:
    a byte flipped in the import fails the attempt, which is retried and committed right."""
    cfg = job_config(tmp_path, pools, "j", ["vm4"])
    run(cfg)
    write_units(a, "vm4", list(range(32, 64)), "garbled")  # block 1, every unit of it
    # Inside block 1's data in the import stream: footer, header, BAT, then its bitmap and data.
    pools.session(1).api.sim.fault_flip_byte("import", str(512 + 1024 + 512 + 512 + 300_000))
    report, d = run(cfg)
    tr = report.vms[0].targets[0]
    assert (d.kind, d.path_reason) == ("delta", "NBD + CBT")
    [warning] = tr.warnings
    assert warning.endswith("disk 0: read back differs from what was read over NBD: blocks [1]"), warning
    assert replica_hash(pools, report) == a.api.sim.hash(live_disk(a, "vm4"))
