"""Helpers of the native DR tests: the primary's layout, the CLI, the array, record snapshots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typer.testing import CliRunner
from xapitest import Pools, job_config

from xencr.cli.app import app
from xencr.xapi.session import XapiSession

cli = CliRunner()
LUN = "sim-lun-0"  # pool a's iSCSI SR
MIRROR = "mirror-0"  # its mirror at the recovery site
# What a recovery carries over (the list), per VM.
VM_KEYS = (
    "uuid",
    "name_label",
    "memory_static_max",
    "memory_dynamic_max",
    "memory_dynamic_min",
    "VCPUs_max",
    "VCPUs_at_startup",
    "order",
    "start_delay",
    "shutdown_delay",
    "ha_restart_priority",
)
# Objects whose set a test must leave as it was.
CLASSES = ("VM", "VDI", "VBD", "VIF", "SR", "PBD", "network", "VM_appliance", "DR_task")


@dataclass
class Site:
    tmp: Path
    pools: Pools
    cfg: Path
    a: XapiSession
    b: XapiSession
    sr: str  # pool a's iSCSI SR (ref)
    sr_uuid: str
    vms: dict[str, str]  # name -> ref on pool a: "db" (order 0), "web" (order 1)
    app: str  # the vApp's ref on pool a

    def lun_config(self, lun: str = MIRROR) -> str:
        dc = self.a.api.PBD.get_device_config(self.a.api.SR.get_PBDs(self.sr)[0])
        return ",".join(f"{k}={v if k != 'SCSIid' else lun}" for k, v in sorted(dc.items()))

    def xencr(self, *args: str) -> tuple[int, str]:
        r = cli.invoke(app, [*args, "--config", str(self.cfg)])
        return r.exit_code, r.output

    def recover_in_background(self, *flags: str) -> subprocess.Popen[str]:
        """`xencr dr recover --pool b` from the mirror, in a process of its own (to be killed),
        its output unbuffered on ``stdout``."""
        argv = [
            sys.executable,
            "-m",
            "xencr.cli",
            "dr",
            "recover",
            "--pool",
            "b",
            "--sr-config",
            self.lun_config(),
        ]
        return subprocess.Popen(
            [*argv, *flags, "--config", str(self.cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )

    def mirror(self, src: str = LUN, dst: str = MIRROR) -> None:
        self.a.api.sim.array_mirror(src, dst)


def make_site(tmp: Path, pools: Pools) -> Site:
    cfg = job_config(tmp, pools, "j", ["vm0"])
    a, b = pools.session(0), pools.session(1)
    for t in (a, b):
        t.api.pool.set_other_config(t.api.pool.get_all()[0], {"sim_delay_scale": "0.01"})
    sr = next(str(r) for r, v in a.api.SR.get_all_records().items() if v["type"] == "lvmoiscsi")
    app_ref = str(a.api.VM_appliance.create({"name_label": "shop", "name_description": "a vApp"}))
    vms = {}
    for name, src, order, delay in (("db", "vm0", 0, 100), ("web", "vm1", 1, 0)):
        vm = str(a.call_async("VM.copy", a.api.VM.get_by_name_label(src)[0], name, sr))
        a.api.VM.set_order(vm, str(order))
        a.api.VM.set_start_delay(vm, str(delay))  # 100 s, scaled by 0.01: 1 s
        a.api.VM.set_shutdown_delay(vm, "3")
        a.api.VM.set_ha_restart_priority(vm, "best-effort")
        a.api.VM.set_appliance(vm, app_ref)
        vms[name] = vm
    a.api.SR.enable_database_replication(sr)
    return Site(tmp, pools, cfg, a, b, sr, str(a.api.SR.get_uuid(sr)), vms, app_ref)


def disks(t: XapiSession, vm: str) -> dict[str, str]:
    """userdevice -> VDI UUID of a VM's disks."""
    out = {}
    for vbd in t.api.VM.get_VBDs(vm):
        if t.api.VBD.get_type(vbd) == "Disk":
            out[str(t.api.VBD.get_userdevice(vbd))] = str(t.api.VDI.get_uuid(t.api.VBD.get_VDI(vbd)))
    return out


def record(t: XapiSession, vm: str) -> dict[str, Any]:
    """What a recovery must carry over of a VM: its fields, VIFs, VBDs, vApp and disks' content."""
    r = t.api.VM.get_record(vm)
    vifs = sorted(
        (v["device"], v["MAC"], t.api.network.get_name_label(v["network"]))
        for v in (t.api.VIF.get_record(x) for x in r["VIFs"])
    )
    vbds = sorted(
        (
            v["userdevice"],
            v["type"],
            v["mode"],
            v["bootable"],
            v["VDI"] != "OpaqueRef:NULL" and t.api.VDI.get_uuid(v["VDI"]),
        )
        for v in (t.api.VBD.get_record(x) for x in r["VBDs"])
    )
    app = r["appliance"]
    return {
        **{k: r[k] for k in VM_KEYS},
        "VIFs": vifs,
        "VBDs": vbds,
        "appliance": t.api.VM_appliance.get_uuid(app) if app != "OpaqueRef:NULL" else None,
        "hashes": {d: t.api.sim.hash(u) for d, u in disks(t, vm).items()},
    }


def objects(t: XapiSession) -> dict[str, set[str]]:
    """The UUIDs of every object of the classes a test must leave as they were."""
    return {cls: {str(r["uuid"]) for r in getattr(t.api, cls).get_all_records().values()} for cls in CLASSES}


def by_uuid(t: XapiSession, uuid: str) -> str:
    return str(t.api.VM.get_by_uuid(uuid))


def as_json(output: str) -> Any:
    return json.loads(output[output.index("{") :])
