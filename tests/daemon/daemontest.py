"""Helpers of the daemon tests that use the simulator."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from xencr.replication import metadata as md
from xencr.xapi.session import Endpoint, XapiSession

MIB = 1024 * 1024
PASSWORD = "daemon-pw"


def session(url: str) -> XapiSession:
    return XapiSession(Endpoint(url), "root", PASSWORD, retries=1, backoff=0.05)


def write_config(
    tmp: Path, urls: list[str], *, job: str, vms: list[str], every: str, daemon: str = "grace = 0"
) -> Path:
    pw = tmp / "pw"
    pw.write_text(PASSWORD)
    os.chmod(pw, 0o600)
    t = session(urls[1])
    try:
        sr = t.api.SR.get_uuid(t.api.pool.get_default_SR(t.api.pool.get_all()[0]))
    finally:
        t.logout()
    vm_list = ", ".join(f'"{v}"' for v in vms)
    cfg = tmp / "xencr.toml"
    cfg.write_text(
        f'state = "{tmp / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{urls[0]}"\npassword_file = "{pw}"\n'
        f'[pools.b]\nurl = "{urls[1]}"\npassword_file = "{pw}"\n'
        f'[jobs.{job}]\npool = "a"\nvms = [{vm_list}]\n'
        f'[[jobs.{job}.targets]]\npool = "b"\nsr = "{sr}"\n'
        f'[[jobs.{job}.schedules]]\nid = "tick"\nevery = "{every}"\n'
        f"[daemon]\n{daemon}\n"
    )
    return cfg


def wait_for(cond: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def write_blocks(s: XapiSession, vm_name: str, blocks: int, seed: str) -> None:
    """Change ``blocks`` 2 MiB blocks of the VM's first disk (a delta of that many blocks)."""
    vm = s.api.VM.get_by_name_label(vm_name)[0]
    vbd = next(v for v in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(v) == "Disk")
    vdi = s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd))
    for i in range(blocks):
        s.api.sim.write(vdi, str(i * 2 * MIB + 512), "512", f"{seed}-{i}")


def incomplete(t: XapiSession) -> list[str]:
    """Replica VMs and disks on the target marked incomplete (in flight, or left behind)."""
    records = [*t.api.VM.get_all_records().values(), *t.api.VDI.get_all_records().values()]
    return [r["uuid"] for r in records if r["other_config"].get(md.COMPLETE) == "false"]


def job_snapshots(s: XapiSession, vm_name: str, job_id: str) -> list[str]:
    vm = s.api.VM.get_by_name_label(vm_name)[0]
    return [x for x in s.api.VM.get_snapshots(vm) if s.api.VM.get_other_config(x).get(md.JOB) == job_id]


def disk_hashes(x: XapiSession, vm_uuid: str) -> dict[str, str]:
    vm = x.api.VM.get_by_uuid(vm_uuid)
    return {
        x.api.VBD.get_userdevice(b): x.api.sim.hash(x.api.VDI.get_uuid(x.api.VBD.get_VDI(b)))
        for b in x.api.VM.get_VBDs(vm)
        if x.api.VBD.get_type(b) == "Disk"
    }
