"""Read-back before the commit: a byte the target garbles while importing is never committed as
a restore point (the attempt is discarded and retried), unless the job switches the check off."""

from __future__ import annotations

import json
import re
from pathlib import Path

from integritytest import (
    FIRST_DATA,
    job_id,
    replica_disk,
    replicas,
    roles,
    run,
    same_content,
    write_blocks,
    write_config,
    xencr,
)
from xapitest import Pools

from xencr.replication import metadata as md
from xencr.xapi.transfer import export_digests


def _first_block(pools: Pools, replica_uuid: str) -> int:
    """The first block a full stream of the restore point's source snapshot carries."""
    s = pools.session(0)
    snap_disk = replica_disk(pools.session(1), replica_uuid)["other_config"][md.COPY_OF]
    return export_digests(s, s.api.VDI.get_by_uuid(snap_disk)).digests[0][0]


def test_import_flip_on_a_full_is_retried(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools, "rbfull", "vm0")
    write_blocks(pools, "vm0", [1, 5], "rbfull")
    pools.session(1).api.sim.fault_flip_byte("import", str(FIRST_DATA + 1000))
    report = run(cfg, "rbfull")
    target = report["vms"][0]["targets"][0]
    assert target["outcome"] == "success" and target["kind"] == "full"
    [point] = replicas(pools.session(1), job_id(cfg, "rbfull"))
    first = _first_block(pools, point["uuid"])
    [warning] = target["warnings"]
    assert re.fullmatch(
        rf"retried after: target b/[^:]+ disk 0: read back differs from what was sent: block {first}",
        warning,
    ), warning
    # What was committed is what the source snapshot holds; the failed attempt left nothing.
    assert same_content(pools, point["uuid"])
    assert roles(pools.session(1), job_id(cfg, "rbfull")) == {
        "VM replica": 1,
        "VDI replica-disk": 1,
        "VDI commit-snapshot": 1,
    }


def test_import_flip_on_a_delta_is_retried(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools, "rbdelta", "vm1")
    write_blocks(pools, "vm1", [1, 5], "rbdelta-1")
    run(cfg, "rbdelta")
    write_blocks(pools, "vm1", [2], "rbdelta-2")
    # A delta of one block: its data follows the head and the block's bitmap.
    pools.session(1).api.sim.fault_flip_byte("import", str(FIRST_DATA + 5000))
    report = run(cfg, "rbdelta")
    target = report["vms"][0]["targets"][0]
    assert target["outcome"] == "success" and target["kind"] == "delta"
    assert target["disks"][0]["blocks"] == 1
    [warning] = target["warnings"]
    assert warning.endswith("disk 0: read back differs from what was sent: block 2"), warning
    points = replicas(pools.session(1), job_id(cfg, "rbdelta"))
    assert len(points) == 2 and same_content(pools, points[-1]["uuid"])
    assert roles(pools.session(1), job_id(cfg, "rbdelta")) == {
        "VM replica": 2,
        "VDI replica-disk": 2,
        "VDI commit-snapshot": 2,
    }


def test_without_verify_import_the_flip_is_committed_and_verify_finds_it(
    pools: Pools, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, pools, "norb", "vm0", job_extra="verify_import = false")
    pools.session(1).api.sim.fault_flip_byte("import", str(FIRST_DATA + 1000))
    report = run(cfg, "norb")
    target = report["vms"][0]["targets"][0]
    assert target["outcome"] == "success" and target["warnings"] == []
    [point] = replicas(pools.session(1), job_id(cfg, "norb"))
    assert not same_content(pools, point["uuid"])  # the damage was committed
    first = _first_block(pools, point["uuid"])
    code, out = xencr("verify", point["uuid"], "--config", str(cfg))
    assert code == 1
    assert f"disk 0: block {first} differs" in out.splitlines()
    code, out = xencr("verify", point["uuid"], "--config", str(cfg), "--json")
    [disk] = json.loads(out)
    assert code == 1 and disk["differing"] == [str(first)] and not disk["ok"]
