"""`xencr verify` checks the whole restore point against its block map, as a user runs it: after a
full and a delta, damage in a block the delta did not carry (in the chain the restore points
share) is found and named; a 100 % sample is the full check; the source snapshot can be
compared too; the run report, the history and verify show the same map digest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from integritytest import (
    BLOCK,
    job_id,
    map_of,
    replica_disk,
    replicas,
    run,
    write_blocks,
    write_config,
    xencr,
)
from xapitest import Pools

from xencr.replication.blockmap import KEY as MAP_KEY
from xencr.replication.verify import Sample
from xencr.units import human_bytes
from xencr.xapi.session import XapiSession

JOB = "whole"


def _verify(point: str, cfg: Path, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    code, out = xencr("verify", point, "--config", str(cfg), "--json", *extra)
    disks: list[dict[str, Any]] = json.loads(out)
    return code, disks


def _result(disks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a check found, without how it read (sample settings, bytes read)."""
    return [{k: v for k, v in d.items() if k not in ("sample", "bytes_read")} for d in disks]


def _root(t: XapiSession, vdi_uuid: str) -> str:
    """The oldest file of a VDI's chain: the full every later restore point of the job builds on."""
    rec = t.api.VDI.get_record(t.api.VDI.get_by_uuid(vdi_uuid))
    while rec["sm_config"].get("vhd-parent"):
        rec = t.api.VDI.get_record(t.api.VDI.get_by_uuid(rec["sm_config"]["vhd-parent"]))
    return str(rec["uuid"])


def test_verify_reads_the_whole_restore_point(pools: Pools, tmp_path: Path) -> None:
    t = pools.session(1)
    cfg = write_config(tmp_path, pools, JOB, "vm0")
    write_blocks(pools, "vm0", [1, 5], "whole-1")
    first = run(cfg, JOB)
    write_blocks(pools, "vm0", [2], "whole-2")
    second = run(cfg, JOB)
    disk = second["vms"][0]["targets"][0]["disks"][0]
    assert disk["kind"] == "delta" and disk["blocks"] == 1
    newest = replicas(t, job_id(cfg, JOB))[-1]["uuid"]

    # Untouched: every block equals the map; the map is the one the run and the history name.
    code, full = _verify(newest, cfg)
    assert code == 0 and full[0]["ok"] and full[0]["differing"] == [] and full[0]["blocks"] == 8
    assert full[0]["map"] == disk["map"] == map_of(t, newest)
    assert full[0]["map"] != first["vms"][0]["targets"][0]["disks"][0]["map"]  # content changed
    code, out = xencr("history", JOB, "--config", str(cfg), "--json")
    history = json.loads(out)
    assert [r["tasks"][0]["maps"] for r in history] == [
        {"0": first["vms"][0]["targets"][0]["disks"][0]["map"]},
        {"0": disk["map"]},
    ]
    code, out = xencr("history", JOB, "--config", str(cfg))
    assert f"    disk 0 block map {disk['map']}" in out.splitlines()
    code, sampled = _verify(newest, cfg, "--sample", "100%", "--seed", "3")
    assert code == 0 and _result(sampled) == _result(full)
    assert sampled[0]["sample"] == {"percent": 100.0, "seed": 3}
    code, out = xencr("verify", newest, "--config", str(cfg), "--against-source")
    assert code == 0, out
    assert "the source snapshot holds the same" in out

    # Damage in block 5, which only the first run carried: in the file both restore points
    # share, below the newest one's commit snapshot (so "written since the commit" is silent).
    damaged = _root(t, replica_disk(t, newest)["uuid"])
    t.api.sim.write(damaged, str(5 * BLOCK + 4096), "512", "bit-rot")
    code, full = _verify(newest, cfg)
    assert code == 1 and full[0]["differing"] == ["5"]
    code, out = xencr("verify", newest, "--config", str(cfg))
    assert code == 1
    assert out.splitlines()[:3] == [
        f"{newest} disk 0: MISMATCH: 8 block(s), {human_bytes(full[0]['bytes_read'])} read,"
        " 1 of 8 block(s) differ from its block map",
        "disk 0: block 5 differs",
        f"disk 0: map {full[0]['map']}",
    ]
    assert "written since the commit" not in out
    code, sampled = _verify(newest, cfg, "--sample", "100%")
    assert code == 1 and _result(sampled) == _result(full)
    # A half sample finds the damage exactly when it holds block 5, and says how to repeat it.
    for seed in (1, 2, 3, 4):
        chosen = Sample(50, seed).choose(8)
        code, half = _verify(newest, cfg, "--sample", "50%", "--seed", str(seed))
        assert half[0]["blocks"] == 4
        assert (code, half[0]["differing"]) == ((1, ["5"]) if 5 in chosen else (0, []))
        if max(chosen) < 5:
            assert half[0]["bytes_read"] < full[0]["bytes_read"]  # the export was cut early
    code, out = xencr("verify", newest, "--config", str(cfg), "--sample", "50%", "--seed", "9")
    assert out.splitlines()[0] == "sample: 50% of each disk's blocks, seed 9 (repeat with --seed 9)"
    code, out = xencr("verify", newest, "--config", str(cfg), "--against-source")
    assert code == 1 and "disk 0: block 5 differs from the source" in out.splitlines()


def test_verify_without_a_map(pools: Pools, tmp_path: Path) -> None:
    t = pools.session(1)
    cfg = write_config(tmp_path, pools, "nomap", "vm1")
    write_blocks(pools, "vm1", [3], "nomap")
    run(cfg, "nomap")
    [point] = replicas(t, job_id(cfg, "nomap"))
    key = map_of(t, point["uuid"])
    # The state database is another one: the map the disk names is not there.
    other = tmp_path / "other"
    other.mkdir()
    moved = cfg.read_text().replace(str(tmp_path / "state.sqlite"), str(other / "state.sqlite"))
    (other / "xencr.toml").write_text(moved)
    code, out = xencr("verify", point["uuid"], "--config", str(other / "xencr.toml"))
    assert code == 1 and f"its block map {key} is not in the state database" in out
    # A restore point from before maps: checked the old way, and it says how little that is.
    vdi = replica_disk(t, point["uuid"])["ref"]
    oc = t.api.VDI.get_other_config(vdi)
    t.api.VDI.set_other_config(vdi, {k: v for k, v in oc.items() if k != MAP_KEY})
    code, out = xencr("verify", point["uuid"], "--config", str(cfg))
    assert code == 0, out
    assert "no block map (made before xencr kept them): checked only the blocks of its own transfer" in out
