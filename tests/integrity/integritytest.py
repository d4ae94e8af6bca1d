"""Helpers of the integrity tests: a one-job config over the simulator, the `xencr` CLI as a user
runs it, and what the pools hold for a job (its replicas, its disks, their content hashes)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from typer.testing import CliRunner
from xapitest import MIB, Pools, job_config

from xencr.cli.app import app
from xencr.config import load_config
from xencr.replication import metadata as md
from xencr.replication.blockmap import KEY as MAP_KEY
from xencr.xapi.session import XapiSession

BLOCK = 2 * MIB
# A full stream of the simulator's 16 MiB disks: footer, header, zero sector and 8-entry BAT
# (2560 bytes), then the first block carried: its 512-byte bitmap, then its data.
FIRST_DATA = 2560 + 512
runner = CliRunner()


def write_config(tmp: Path, pools: Pools, job: str, vm: str, *, job_extra: str = "") -> Path:
    return job_config(tmp, pools, job, [vm], job_extra=job_extra)


def xencr(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout + r.stderr


def run(cfg: Path, job: str) -> dict[str, Any]:
    code, out = xencr("run", job, "--config", str(cfg), "--json")
    assert code == 0, out
    report: dict[str, Any] = json.loads(out)
    return report


def job_id(cfg: Path, job: str) -> str:
    return load_config(cfg).job(job).id


def source_disk(pools: Pools, vm: str) -> str:
    """UUID of the VM's (only) disk on the source."""
    s = pools.session(0)
    ref = s.api.VM.get_by_name_label(vm)[0]
    vbd = next(v for v in s.api.VM.get_VBDs(ref) if s.api.VBD.get_type(v) == "Disk")
    return str(s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd)))


def write_blocks(pools: Pools, vm: str, blocks: list[int], seed: str) -> None:
    """A guest write into each of these blocks of the VM's disk."""
    s = pools.session(0)
    for b in blocks:
        s.api.sim.write(source_disk(pools, vm), str(b * BLOCK + 4096), "8192", f"{seed}-{b}")


def replicas(t: XapiSession, jid: str) -> list[dict[str, Any]]:
    """The job's replica VMs on the target, oldest first."""
    out = [
        r
        for r in t.api.VM.get_all_records().values()
        if not r["is_a_snapshot"] and r["other_config"].get(md.JOB) == jid
    ]
    return sorted(out, key=lambda r: r["other_config"].get(md.SNAPSHOT_TIME, ""))


def replica_disk(t: XapiSession, replica_uuid: str) -> dict[str, Any]:
    """The record of a replica's (only) disk, with its ref under "ref"."""
    vm = t.api.VM.get_by_uuid(replica_uuid)
    vbd = next(v for v in t.api.VM.get_VBDs(vm) if t.api.VBD.get_type(v) == "Disk")
    ref = t.api.VBD.get_VDI(vbd)
    return dict(t.api.VDI.get_record(ref)) | {"ref": str(ref)}


def roles(t: XapiSession, jid: str) -> Counter[str]:
    """What of the job's is on the target: VMs and VDIs by role."""
    vms = [r for r in t.api.VM.get_all_records().values() if r["other_config"].get(md.JOB) == jid]
    vdis = [r for r in t.api.VDI.get_all_records().values() if r["other_config"].get(md.JOB) == jid]
    return Counter(
        [f"VM {r['other_config'].get(md.ROLE)}" for r in vms if not r["is_a_snapshot"]]
        + [f"VDI {r['other_config'].get(md.ROLE)}" for r in vdis]
    )


def same_content(pools: Pools, replica_uuid: str) -> bool:
    """Whether the restore point's disk holds exactly its source snapshot's disk."""
    disk = replica_disk(pools.session(1), replica_uuid)
    source = pools.session(0).api.sim.hash(disk["other_config"][md.COPY_OF])
    return bool(pools.session(1).api.sim.hash(disk["uuid"]) == source)


def map_of(t: XapiSession, replica_uuid: str) -> str:
    return str(replica_disk(t, replica_uuid)["other_config"][MAP_KEY])
