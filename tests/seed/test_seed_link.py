"""`xencr seed link` with `xo-cr-seed`'s arguments: a hand-made copy becomes the base of the
job's next run (a delta), with our keys or Xen Orchestra's; every mismatch is refused before
anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest
from seedtest import (
    config,
    default_sr,
    disk_vdis,
    hand_copy,
    hashes,
    invoke,
    other_configs,
    password_file,
    vm,
)
from xapitest import MIB, PASSWORD, Pools

from xencr.config import job_id_for
from xencr.replication import metadata as md
from xencr.replication.target import restore_points


def _creds_url(url: str, password: str = PASSWORD, *, encode: bool = True) -> str:
    scheme, rest = url.split("://")
    return f"{scheme}://root:{quote(password, safe='') if encode else password}@{rest}"


def test_link_then_run_is_a_delta(pools: Pools, tmp_path: Path) -> None:
    src, ts = pools.session(0), pools.session(1)
    cfg = config(tmp_path, pools)
    snap, target = hand_copy(src, ts, "vm0")
    pw = password_file(tmp_path)
    code, out, err = invoke(
        "seed", "link", pools.urls[0], snap, pools.urls[1], target, "seeded", "hourly",
        "--source-password-file", str(pw), "--target-password-file", str(pw), "--config", str(cfg),
    )  # fmt: skip
    assert code == 0, err
    assert f"VM {target}" in out and "next run" in out
    job_id = job_id_for("seeded")
    sr_uuid = ts.api.SR.get_uuid(default_sr(ts))
    vm_uuid = src.api.VM.get_uuid(vm(src, "vm0"))
    [rp] = restore_points(ts, job_id, vm_uuid, sr_uuid)
    assert rp.uuid == target and rp.copy_of == snap and rp.protected
    assert ts.api.VM.get_blocked_operations(ts.api.VM.get_by_uuid(target))["start"] == md.START_BLOCKED
    assert all(commit is not None for _, commit, _ in rp.disks.values())
    # The guest writes a block; the next run sends only it, on top of the hand-made copy.
    disk = disk_vdis(src, vm(src, "vm0"))["0"]
    src.api.sim.write(src.api.VDI.get_uuid(disk), str(3 * MIB), "4096", "after-seed")
    code, out, err = invoke("run", "seeded", "--config", str(cfg), "--json")
    assert code == 0, err
    t = json.loads(out)["vms"][0]["targets"][0]
    assert t["kind"] == "delta" and [d["blocks"] for d in t["disks"]] == [1], t
    new = ts.api.VM.get_by_uuid(t["restore_point"])
    snap_now = src.api.VM.get_by_uuid(json.loads(out)["vms"][0]["snapshot"])
    assert hashes(ts, new) == hashes(src, snap_now)
    # The seed's snapshot was the base; now that the chain moved on it is pruned like any other.
    assert snap in json.loads(out)["vms"][0]["source_snapshots_removed"]


def test_link_xo_writes_exactly_xo_keys(pools: Pools, tmp_path: Path) -> None:
    """xo-compat.md 6.3, key for key on every object."""
    src, ts = pools.session(0), pools.session(1)
    snap, target = hand_copy(src, ts, "vm1")
    pw = password_file(tmp_path)
    code, _, err = invoke(
        "seed", "link", pools.urls[0], snap, pools.urls[1], target, "xo-job-id", "xo-schedule-id", "--xo",
        "--source-password-file", str(pw), "--target-password-file", str(pw),
        "--config", str(tmp_path / "none.toml"),
    )  # fmt: skip
    assert code == 1 and "none.toml" in err  # an explicit config must exist
    code, _, err = invoke(
        "seed", "link", pools.urls[0], snap, pools.urls[1], target, "xo-job-id", "xo-schedule-id", "--xo",
        "--source-password-file", str(pw), "--target-password-file", str(pw),
    )  # fmt: skip
    assert code == 0, err
    snap_ref = src.api.VM.get_by_uuid(snap)
    srec = src.api.VM.get_record(snap_ref)
    vm_uuid = src.api.VM.get_uuid(srec["snapshot_of"])
    sr_uuid = ts.api.SR.get_uuid(default_sr(ts))
    when = srec["other_config"][md.XO_DATETIME]
    assert len(when) == len("20260821T15:31:45Z") and when.endswith("Z") and when[8] == "T"
    common = {
        md.XO_DATETIME: when,
        md.XO_JOB: "xo-job-id",
        md.XO_SCHEDULE: "xo-schedule-id",
        md.XO_VM: vm_uuid,
    }
    xo = {k: v for k, v in srec["other_config"].items() if k.startswith("xo:")}
    assert xo == common | {md.XO_EXPORTED: "true", md.XO_CHAIN_LENGTH: "0"}
    source_disks = disk_vdis(src, snap_ref)
    for vdi in source_disks.values():
        oc = src.api.VDI.get_other_config(vdi)
        vdi_uuid = src.api.VDI.get_uuid(vdi)
        assert {k: v for k, v in oc.items() if k.startswith("xo:")} == common | {
            md.XO_EXPORTED: "true",
            md.XO_CHAIN_LENGTH: "0",
            md.XO_CONTENT_KEY: vdi_uuid,
        }
    tvm = ts.api.VM.get_by_uuid(target)
    trec = ts.api.VM.get_record(tvm)
    assert {k: v for k, v in trec["other_config"].items() if k.startswith("xo:")} == common | {
        md.XO_SR: sr_uuid,
        md.XO_COPY_OF: snap,
    }
    assert trec["blocked_operations"] == {"start": md.START_BLOCKED, "start_on": md.START_BLOCKED}
    assert trec["name_label"] == f"{src.api.VM.get_name_label(srec['snapshot_of'])} ({when})"
    assert not any(k.startswith(md.PREFIX) for k in trec["other_config"])
    by_dev = {dev: src.api.VDI.get_uuid(v) for dev, v in source_disks.items()}
    for dev, vdi in disk_vdis(ts, tvm).items():
        oc = ts.api.VDI.get_other_config(vdi)
        assert {k: v for k, v in oc.items() if k.startswith("xo:")} == {md.XO_COPY_OF: by_dev[dev]}
    # The target snapshot current XO continues from: its disks carry the content keys.
    [tsnap] = ts.api.VM.get_snapshots(tvm)
    for dev, vdi in disk_vdis(ts, tsnap).items():
        oc = ts.api.VDI.get_other_config(vdi)
        assert {k: v for k, v in oc.items() if k.startswith("xo:")} == common | {
            md.XO_SR: sr_uuid,
            md.XO_COPY_OF: by_dev[dev],
            md.XO_CONTENT_KEY: by_dev[dev],
            md.XO_QCOW2_FIX: "true",
        }
    # Run again: nothing new (idempotent), one target snapshot still.
    code, _, err = invoke(
        "seed", "link", pools.urls[0], snap, pools.urls[1], target, "xo-job-id", "xo-schedule-id", "--xo",
        "--source-password-file", str(pw), "--target-password-file", str(pw),
    )  # fmt: skip
    assert code == 0, err
    assert len(ts.api.VM.get_snapshots(tvm)) == 1


def test_dry_run_writes_nothing(pools: Pools, tmp_path: Path) -> None:
    src, ts = pools.session(0), pools.session(1)
    cfg = config(tmp_path, pools, job="dry")
    snap, target = hand_copy(src, ts, "vm0")
    before = other_configs(src, ts)
    pw = password_file(tmp_path)
    code, out, err = invoke(
        "seed", "link", pools.urls[0], snap, pools.urls[1], target, "dry", "hourly", "--dry-run",
        "--source-password-file", str(pw), "--target-password-file", str(pw), "--config", str(cfg),
    )  # fmt: skip
    assert code == 0, err
    assert f"{md.COPY_OF}={snap}" in out and "would write: target VM" in out
    assert other_configs(src, ts) == before


@pytest.mark.parametrize(
    "case",
    ["size", "count", "device", "running", "not-a-snapshot", "no-such-snapshot", "no-such-vm", "password"],
)
def test_refusals_write_nothing(pools: Pools, tmp_path: Path, case: str) -> None:
    src, ts = pools.session(0), pools.session(1)
    cfg = config(tmp_path, pools, job="refused")
    sizes = {"0": 32 * MIB} if case == "size" else None
    snap, target = hand_copy(src, ts, "vm0", sizes=sizes)
    tvm = ts.api.VM.get_by_uuid(target)
    if case == "count":
        extra = ts.api.VDI.create(
            {
                "SR": default_sr(ts), "virtual_size": str(MIB), "type": "user", "sharable": False,
                "read_only": False, "other_config": {}, "name_label": "extra", "name_description": "",
            }
        )  # fmt: skip
        ts.api.VBD.create(
            {
                "VM": tvm, "VDI": extra, "userdevice": "5", "bootable": False, "mode": "RW", "type": "Disk",
                "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {},
            }
        )  # fmt: skip
    if case == "device":
        vbd = next(b for b in ts.api.VM.get_VBDs(tvm) if ts.api.VBD.get_type(b) == "Disk")
        vdi = ts.api.VBD.get_VDI(vbd)
        ts.api.VBD.destroy(vbd)
        ts.api.VBD.create(
            {
                "VM": tvm, "VDI": vdi, "userdevice": "3", "bootable": True, "mode": "RW", "type": "Disk",
                "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {},
            }
        )  # fmt: skip
    if case == "running":
        ts.api.VM.start(tvm, False, False)
    args = [pools.urls[0], snap, pools.urls[1], target]
    if case == "not-a-snapshot":
        args[1] = src.api.VM.get_uuid(vm(src, "vm0"))
    if case == "no-such-snapshot":
        args[1] = "00000000-0000-0000-0000-00000000dead"
    if case == "no-such-vm":
        args[3] = "00000000-0000-0000-0000-00000000beef"
    pw = password_file(tmp_path)
    if case == "password":
        pw.write_text("wrong")
    before = other_configs(src, ts)
    code, out, err = invoke(
        "seed", "link", *args, "refused", "hourly",
        "--source-password-file", str(pw), "--target-password-file", str(pw), "--config", str(cfg),
    )  # fmt: skip
    expected = {
        "size": "virtual sizes must be equal",
        "count": "do not pair up by user device",
        "device": "do not pair up by user device",
        "running": "is Running: it must be halted",
        "not-a-snapshot": "is a VM, not a snapshot",
        "no-such-snapshot": "UUID 00000000-0000-0000-0000-00000000dead on the source pool",
        "no-such-vm": "UUID 00000000-0000-0000-0000-00000000beef on the target pool",
        "password": "authentication failed for user 'root'",
    }[case]
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert other_configs(src, ts) == before
    if case == "running":
        ts.api.VM.hard_shutdown(tvm)


@pytest.mark.parametrize("encode", [True, False])
def test_password_in_url_works_and_never_shows(pools: Pools, tmp_path: Path, encode: bool) -> None:
    """xo-cr-seed's way: credentials in the URLs, percent-encoded or not; the password (with
    `@ : % /`) is warned about and never printed."""
    src, ts = pools.session(0), pools.session(1)
    snap, target = hand_copy(src, ts, "vm1")
    code, out, err = invoke(
        "seed", "link", _creds_url(pools.urls[0], encode=encode), snap,
        _creds_url(pools.urls[1], encode=encode), target, "url-job", "url-schedule", "--dry-run",
        "--config", str(config(tmp_path, pools, job="url")),
    )  # fmt: skip
    assert code == 0, err
    assert "visible to other users" in err
    for text in (out, err):
        assert PASSWORD not in text and quote(PASSWORD, safe="") not in text
    # A wrong password in the URL: refused in one line that does not show it either.
    bad = "s3cr@t:/%x"
    code, out, err = invoke(
        "seed", "link", _creds_url(pools.urls[0], bad, encode=encode), snap, pools.urls[1], target, "j", "s",
        "--config", str(config(tmp_path, pools, job="url")),
    )  # fmt: skip
    assert code == 1 and f"pool 'source' ({pools.urls[0]}): authentication failed for user 'root'" in err
    assert bad not in out + err and quote(bad, safe="") not in out + err


def test_usage_errors_exit_2(pools: Pools) -> None:
    code, _, _ = invoke("seed", "link", pools.urls[0], "only-two")
    assert code == 2


def test_interrupted_link_is_finished_by_running_it_again(pools: Pools, tmp_path: Path) -> None:
    """The link fails at its commit point (the target VM's keys): no restore point, nothing a
    run would misuse; the same command again finishes it, and the next run is a delta."""
    src, ts = pools.session(0), pools.session(1)
    cfg = config(tmp_path, pools, job="again", vms='["vm1"]')
    snap, target = hand_copy(src, ts, "vm1")
    pw = password_file(tmp_path)
    args = [
        "seed", "link", pools.urls[0], snap, pools.urls[1], target, "again", "hourly",
        "--source-password-file", str(pw), "--target-password-file", str(pw), "--config", str(cfg),
    ]  # fmt: skip
    ts.api.sim.fault_fail_next_call("VM.set_other_config", ["INTERNAL_ERROR", "injected"])
    code, _, err = invoke(*args)
    assert code == 1 and "INTERNAL_ERROR" in err
    sr_uuid = ts.api.SR.get_uuid(default_sr(ts))
    vm_uuid = src.api.VM.get_uuid(vm(src, "vm1"))
    assert restore_points(ts, job_id_for("again"), vm_uuid, sr_uuid) == []
    assert md.JOB not in src.api.VM.get_other_config(src.api.VM.get_by_uuid(snap)), "source untouched"
    code, _, err = invoke(*args)
    assert code == 0, err
    [rp] = restore_points(ts, job_id_for("again"), vm_uuid, sr_uuid)
    assert rp.uuid == target
    # One commit snapshot per disk, though the first attempt had made them too.
    tvm = ts.api.VM.get_by_uuid(target)
    for vdi in disk_vdis(ts, tvm).values():
        assert len(ts.api.VDI.get_snapshots(vdi)) == 1
    src.api.sim.write(src.api.VDI.get_uuid(disk_vdis(src, vm(src, "vm1"))["0"]), str(MIB), "512", "again")
    code, out, err = invoke("run", "again", "--config", str(cfg), "--json")
    assert code == 0, err
    assert json.loads(out)["vms"][0]["targets"][0]["kind"] == "delta"
