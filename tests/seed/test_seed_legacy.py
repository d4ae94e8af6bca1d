"""Xen Orchestra's legacy CR (before 2021): the source VM names its last replicated snapshot in
`xo:base_delta:<target SR uuid>`, the replica carries only `xo:copy_of`. A run picks that up as
its base (the key is read, never required), and leaves XO's objects as they were."""

from __future__ import annotations

import json
from pathlib import Path

from seedtest import config, default_sr, disk_vdis, hand_copy, hashes, invoke, vm
from xapitest import MIB, Pools

from xencr.replication import metadata as md


def test_legacy_base_delta_is_a_base(pools: Pools, tmp_path: Path) -> None:
    src, ts = pools.session(0), pools.session(1)
    cfg = config(tmp_path, pools, job="legacy")
    sr_uuid = ts.api.SR.get_uuid(default_sr(ts))
    snap, target = hand_copy(src, ts, "vm0")
    source = vm(src, "vm0")
    snap_ref = src.api.VM.get_by_uuid(snap)
    src.api.VM.set_name_label(snap_ref, f"XO_DELTA_EXPORT: Local storage ({sr_uuid})")
    src.api.VM.add_to_other_config(source, md.XO_BASE_DELTA + sr_uuid, snap)
    # The legacy replica: xo:copy_of on the VM and its disks, start blocked, nothing else.
    tvm = ts.api.VM.get_by_uuid(target)
    ts.api.VM.add_to_other_config(tvm, md.XO_COPY_OF, snap)
    ts.api.VM.add_to_other_config(tvm, "xo:source_vm", src.api.VM.get_uuid(source))
    ts.api.VM.add_to_blocked_operations(tvm, "start", "legacy replica")
    for dev, vdi in disk_vdis(ts, tvm).items():
        source_vdi = disk_vdis(src, snap_ref)[dev]
        ts.api.VDI.add_to_other_config(vdi, md.XO_COPY_OF, src.api.VDI.get_uuid(source_vdi))
    legacy_hashes = hashes(ts, tvm)
    src.api.sim.write(src.api.VDI.get_uuid(disk_vdis(src, source)["0"]), str(9 * MIB), "1024", "legacy")
    code, out, err = invoke("run", "legacy", "--config", str(cfg), "--json")
    assert code == 0, err
    v = json.loads(out)["vms"][0]
    t = v["targets"][0]
    assert t["kind"] == "delta", t["disks"]
    assert {d["reason"] for d in t["disks"]} == {f"continues Xen Orchestra replica {target}"}
    assert [d["blocks"] for d in t["disks"]] == [1]
    assert hashes(ts, ts.api.VM.get_by_uuid(t["restore_point"])) == hashes(
        src, src.api.VM.get_by_uuid(v["snapshot"])
    )
    # XO's replica, its key and its snapshot are untouched.
    assert hashes(ts, tvm) == legacy_hashes
    assert src.api.VM.get_other_config(source)[md.XO_BASE_DELTA + sr_uuid] == snap
    assert src.api.VM.get_uuid(snap_ref) == snap


def test_legacy_key_pointing_nowhere_is_ignored(pools: Pools, tmp_path: Path) -> None:
    """A stale key (its snapshot deleted) is no base and no error: a full, as without it."""
    src, ts = pools.session(0), pools.session(1)
    cfg = config(tmp_path, pools, job="stale", vms='["vm1"]')
    sr_uuid = ts.api.SR.get_uuid(default_sr(ts))
    src.api.VM.add_to_other_config(
        vm(src, "vm1"), md.XO_BASE_DELTA + sr_uuid, "00000000-0000-0000-0000-000000000000"
    )
    code, out, err = invoke("run", "stale", "--config", str(cfg), "--json")
    assert code == 0, err
    t = json.loads(out)["vms"][0]["targets"][0]
    assert t["kind"] == "full" and {d["reason"] for d in t["disks"]} == {"first run"}
