"""Helpers of the seeding tests: a hand-made copy as a user makes one, a config, the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import typer
from typer.testing import CliRunner
from xapitest import PASSWORD, Pools

from xencr.cli.run import run_command
from xencr.cli.seed import seed_app
from xencr.xapi.session import XapiSession

app = typer.Typer()
app.command("run")(run_command)
app.add_typer(seed_app, name="seed")
runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args), env=env)
    return r.exit_code, r.stdout, r.stderr


def vm(s: XapiSession, name: str) -> str:
    return str(s.api.VM.get_by_name_label(name)[0])


def default_sr(s: XapiSession) -> str:
    return str(s.api.pool.get_default_SR(s.api.pool.get_all()[0]))


def disk_vdis(s: XapiSession, vm_ref: str) -> dict[str, str]:
    """userdevice -> VDI ref of a VM's disks."""
    out = {}
    for vbd in s.api.VM.get_VBDs(vm_ref):
        r = s.api.VBD.get_record(vbd)
        if r["type"] == "Disk" and r["VDI"] != "OpaqueRef:NULL":
            out[str(r["userdevice"])] = str(r["VDI"])
    return out


def hashes(s: XapiSession, vm_ref: str) -> dict[str, str]:
    return {dev: s.api.sim.hash(s.api.VDI.get_uuid(vdi)) for dev, vdi in disk_vdis(s, vm_ref).items()}


def _raw(s: XapiSession, method: str, handler: str, **params: str) -> httpx.Response:
    task = s.call("task.create", "by hand", "")
    try:
        q = {"session_id": s.ref, "task_id": task, "format": "raw"} | params
        if method == "GET":
            return httpx.get(f"{s.endpoint.url}/{handler}", params=q, timeout=60)
        raise AssertionError(method)
    finally:
        s.call("task.destroy", task)


def hand_copy(
    src: XapiSession, ts: XapiSession, vm_name: str, *, sizes: dict[str, int] | None = None
) -> tuple[str, str]:
    """What the documented manual seed does, through the SDK and plain HTTP only: snapshot the
    VM, read each disk raw, create a VM on the other pool with disks of the same sizes (or
    ``sizes``), write the content in. Returns (snapshot UUID, target VM UUID)."""
    source = vm(src, vm_name)
    snap = src.call_async("VM.snapshot", source, f"seed of {vm_name}")
    sr = default_sr(ts)
    target = ts.api.VM.create(_vm_record(src.api.VM.get_record(snap), vm_name))
    for dev, vdi in disk_vdis(src, snap).items():
        rec = src.api.VDI.get_record(vdi)
        size = (sizes or {}).get(dev, int(rec["virtual_size"]))
        new = ts.api.VDI.create(
            {
                "SR": sr,
                "virtual_size": str(size),
                "type": "user",
                "sharable": False,
                "read_only": False,
                "other_config": {},
                "name_label": rec["name_label"],
                "name_description": "",
            }
        )
        ts.api.VBD.create(
            {
                "VM": target,
                "VDI": new,
                "userdevice": dev,
                "bootable": dev == "0",
                "mode": "RW",
                "type": "Disk",
                "empty": False,
                "other_config": {},
                "qos_algorithm_type": "",
                "qos_algorithm_params": {},
            }
        )
        data = _raw(src, "GET", "export_raw_vdi", vdi=str(vdi)).content
        if size == len(data):
            task = ts.call("task.create", "by hand", "")
            q = {"session_id": ts.ref, "task_id": task, "format": "raw", "vdi": str(new)}
            r = httpx.put(f"{ts.endpoint.url}/import_raw_vdi", params=q, content=data, timeout=60)
            assert r.status_code == 200, r.text
            ts.call("task.destroy", task)
    return str(src.api.VM.get_uuid(snap)), str(ts.api.VM.get_uuid(target))


def _vm_record(snap: dict[str, Any], name: str) -> dict[str, Any]:
    # VM.create's required fields, as an SDK user fills them in from the snapshot's record.
    keep = (
        "name_description", "user_version", "memory_static_max", "memory_dynamic_max",
        "memory_dynamic_min", "memory_static_min", "VCPUs_params", "VCPUs_max", "VCPUs_at_startup",
        "actions_after_shutdown", "actions_after_reboot", "actions_after_crash", "PV_bootloader",
        "PV_kernel", "PV_ramdisk", "PV_args", "PV_bootloader_args", "PV_legacy_args", "HVM_boot_policy",
        "HVM_boot_params", "platform", "PCI_bus", "recommendations", "HVM_shadow_multiplier", "NVRAM",
        "domain_type", "xenstore_data", "has_vendor_device", "hardware_platform_version", "affinity",
    )  # fmt: skip
    return {k: snap[k] for k in keep if k in snap} | {
        "name_label": f"{name} (imported)",
        "is_a_template": False,
        "other_config": {},
    }


def config(tmp: Path, pools: Pools, *, vms: str = '["vm0"]', job: str = "seeded") -> Path:
    pw = tmp / "pw"
    pw.write_text(PASSWORD)
    os.chmod(pw, 0o600)
    s = pools.session(1)
    sr = s.api.SR.get_uuid(default_sr(s))
    cfg = tmp / "xencr.toml"
    cfg.write_text(
        f'state = "{tmp / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{pools.urls[0]}"\npassword_file = "{pw}"\n'
        f'[pools.b]\nurl = "{pools.urls[1]}"\npassword_file = "{pw}"\n'
        f'[jobs.{job}]\npool = "a"\nvms = {vms}\n'
        f'[[jobs.{job}.targets]]\npool = "b"\nsr = "{sr}"\n'
        f'[[jobs.{job}.schedules]]\nid = "hourly"\nevery = "1h"\nretention = 2\n'
    )
    return cfg


def password_file(tmp: Path) -> Path:
    pw = tmp / "seed-pw"
    pw.write_text(PASSWORD)
    os.chmod(pw, 0o600)
    return pw


def other_configs(src: XapiSession, ts: XapiSession) -> dict[str, dict[str, str]]:
    """Every VM's and VDI's other_config on both pools, by UUID: 'nothing was written'."""
    out = {}
    for s in (src, ts):
        for rec in s.api.VM.get_all_records().values():
            out[rec["uuid"]] = dict(rec["other_config"]) | {
                "@blocked": repr(sorted(rec["blocked_operations"]))
            }
        for rec in s.api.VDI.get_all_records().values():
            out[rec["uuid"]] = dict(rec["other_config"])
    return out
