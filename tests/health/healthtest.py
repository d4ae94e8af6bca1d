"""Helpers of the health-check tests: a one-VM job with a health check, the target pool's
objects, and a watcher that sees each health-check clone while it exists."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from xapitest import MIB, Pools, job_config

from xencr.xapi.session import XapiSession

JOB = "hc"
PREFIX = "[xencr health-check] "


def write_config(tmp: Path, pools: Pools, health: str, *, vm: str = "vm0", extra: str = "") -> Path:
    return job_config(tmp, pools, JOB, [vm], retention=2, job_extra=f"health_check = {health}\n{extra}")


def guest(pools: Pools, vm: str, **knobs: str) -> None:
    """Sim guest knobs on the source VM (a replica, and so its clone, carries its other_config)."""
    s = pools.session(0)
    ref = s.api.VM.get_by_name_label(vm)[0]
    for k in ("sim_boots", "sim_boot_delay", "sim_health_check"):
        s.api.VM.remove_from_other_config(ref, k)
    for k, v in knobs.items():
        s.api.VM.add_to_other_config(ref, k, v)


def write(pools: Pools, vm: str, seed: str) -> None:
    s = pools.session(0)
    ref = s.api.VM.get_by_name_label(vm)[0]
    vbd = next(v for v in s.api.VM.get_VBDs(ref) if s.api.VBD.get_type(v) == "Disk")
    s.api.sim.write(s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd)), str(3 * MIB), "4096", seed)


def objects(t: XapiSession) -> tuple[set[str], set[str], set[str]]:
    """UUIDs of the pool's VMs (no control domain), managed VDIs and VIFs."""
    vms = {r["uuid"] for r in t.api.VM.get_all_records().values() if not r["is_control_domain"]}
    vdis = {r["uuid"] for r in t.api.VDI.get_all_records().values() if r["managed"]}
    vifs = {r["uuid"] for r in t.api.VIF.get_all_records().values()}
    return vms, vdis, vifs


def restore_point_objects(t: XapiSession, uuid: str) -> tuple[set[str], set[str], set[str]]:
    """The restore point VM, its disks with their snapshots, and its VIFs."""
    vm = t.api.VM.get_by_uuid(uuid)
    vdis: set[str] = set()
    for b in t.api.VM.get_VBDs(vm):
        if t.api.VBD.get_type(b) == "Disk":
            vdi = t.api.VBD.get_VDI(b)
            vdis |= {t.api.VDI.get_uuid(vdi)} | {t.api.VDI.get_uuid(x) for x in t.api.VDI.get_snapshots(vdi)}
    vifs = {t.api.VIF.get_uuid(v) for v in t.api.VM.get_VIFs(vm)}
    return {uuid}, vdis, vifs


@dataclass
class Seen:
    """A health-check clone as the watcher saw it while it ran."""

    uuid: str
    name: str
    vifs_when_running: int = -1
    srs: set[str] = field(default_factory=set)
    running: bool = False


class Watcher:
    """Polls the target pool (its own session) for health-check clones until stopped."""

    def __init__(self, t: XapiSession) -> None:
        self.t = t
        self.seen: dict[str, Seen] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _loop(self) -> None:
        while not self.stop.is_set():
            # The clone may go between two calls: look again.
            with contextlib.suppress(Exception):
                self._look()
            self.stop.wait(0.02)

    def _look(self) -> None:
        t = self.t
        for ref, r in t.api.VM.get_all_records().items():
            if not r["name_label"].startswith(PREFIX):
                continue
            s = self.seen.setdefault(r["uuid"], Seen(r["uuid"], r["name_label"]))
            for b in r["VBDs"]:
                if t.api.VBD.get_type(b) == "Disk":
                    s.srs.add(t.api.SR.get_uuid(t.api.VDI.get_SR(t.api.VBD.get_VDI(b))))
            if r["power_state"] == "Running":
                s.running = True
                vifs = len(t.api.VM.get_VIFs(ref))
                s.vifs_when_running = max(s.vifs_when_running, vifs)
