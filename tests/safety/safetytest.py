"""Helpers of the data-safety tests: a one-VM job with retention 2, what a user does through the
SDK (never through xencr), and what each object holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer.testing import CliRunner
from xapitest import MIB, Pools, job_config

from xencr.cli.app import app
from xencr.config import load_config
from xencr.replication.jobs import run_configured
from xencr.replication.runner import RunReport
from xencr.replication.source import Disk
from xencr.replication.target import VM_FIELDS, attach, restore_points
from xencr.xapi.session import XapiSession

JOB = "safe"
cli = CliRunner()


def write_config(tmp: Path, pools: Pools, *, retention: int = 2, vm: str = "vm0") -> Path:
    return job_config(tmp, pools, JOB, [vm], retention=retention)


def run(cfg: Path, pools: Pools, seed: str, vm: str = "vm0") -> RunReport:
    """A guest write of one block, then a run that must succeed."""
    s = pools.session(0)
    ref = s.api.VM.get_by_name_label(vm)[0]
    vbd = next(v for v in s.api.VM.get_VBDs(ref) if s.api.VBD.get_type(v) == "Disk")
    s.api.sim.write(s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd)), str(5 * MIB), "4096", seed)
    report = run_configured(load_config(cfg), JOB)
    assert report.outcome == "success", [(t.error, t.detached) for v in report.vms for t in v.targets]
    return report


def points(pools: Pools, cfg: Path, vm: str = "vm0") -> list[str]:
    s, t = pools.session(0), pools.session(1)
    c = load_config(cfg)
    job = c.job(JOB)
    sr_uuid = job.targets[0].sr  # write_config names the SR by UUID
    vm_uuid = s.api.VM.get_uuid(s.api.VM.get_by_name_label(vm)[0])
    return [p.uuid for p in restore_points(t, job.id, vm_uuid, sr_uuid)]


def disks(s: XapiSession, vm: str) -> list[str]:
    return [str(s.api.VBD.get_VDI(b)) for b in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(b) == "Disk"]


def new_vm_with_disk(t: XapiSession, like: str, vdi: str, name: str) -> str:
    """What a user does with a cloned replica disk: a new VM of their own with it attached."""
    rec = t.api.VM.get_record(like)
    fields: dict[str, Any] = {k: rec[k] for k in VM_FIELDS if k in rec}
    fields |= {"name_label": name, "is_a_template": False, "affinity": "OpaqueRef:NULL", "other_config": {}}
    vm = str(t.api.VM.create(fields))
    size = int(t.api.VDI.get_virtual_size(vdi))
    attach(t, vm, vdi, Disk("0", vdi, t.api.VDI.get_uuid(vdi), name, size, True))
    return vm


def xencr(*args: str) -> Any:
    return cli.invoke(app, list(args))
