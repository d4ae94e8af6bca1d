"""The source side of a run: the VM's disks, its job snapshots, making one, and keeping only the
snapshots the next deltas need."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.xapi.errors import XapiError
from xencr.xapi.session import XapiSession

log = logging.getLogger("xencr.replication")


@dataclass(frozen=True)
class Disk:
    """One replicated disk of a VM or snapshot, keyed by its VBD's user device."""

    userdevice: str
    vdi: str
    uuid: str
    name: str
    size: int
    bootable: bool


def disks_of(s: XapiSession, vm: str, *, with_nobak: bool = False) -> list[Disk]:
    """Disk VBDs (no CDs, no empty drives, no `[NOBAK]` disks unless asked), in user-device order.
    A snapshot whose data was purged has its disks (CBT logs now) by its ``xencr:purged`` record."""
    out = []
    for device, uuid in md.purged_disks(s.api.VM.get_other_config(vm)).items():
        try:
            ref = str(s.api.VDI.get_by_uuid(uuid))
            v = s.api.VDI.get_record(ref)
        except XapiError:
            continue  # gone: the snapshot no longer has that disk
        if not v["VBDs"]:
            out.append(Disk(device, ref, uuid, v["name_label"], int(v["virtual_size"]), False))
    for vbd in s.api.VM.get_VBDs(vm):
        r = s.api.VBD.get_record(vbd)
        if r["type"] != "Disk" or r["empty"] or r["VDI"] == "OpaqueRef:NULL":
            continue
        v = s.api.VDI.get_record(r["VDI"])
        if md.NOBAK in v["name_label"] and not with_nobak:
            continue
        out.append(
            Disk(
                str(r["userdevice"]),
                str(r["VDI"]),
                v["uuid"],
                v["name_label"],
                int(v["virtual_size"]),
                bool(r["bootable"]),
            )
        )
    return sorted(out, key=lambda d: int(d.userdevice) if d.userdevice.isdigit() else 99)


def job_snapshots(s: XapiSession, vm: str, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """This job's snapshots of the VM, oldest first."""
    out = []
    for snap in s.api.VM.get_snapshots(vm):
        rec = s.api.VM.get_record(snap)
        if rec["other_config"].get(md.JOB) == job_id:
            out.append((str(snap), rec))
    return sorted(out, key=lambda x: x[1]["other_config"].get(md.SNAPSHOT_TIME, ""))


def foreign_snapshots(s: XapiSession, vm: str, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The VM's snapshots not made by this job: a Xen Orchestra replica or seed may be based on
    one of them."""
    out = []
    for snap in s.api.VM.get_snapshots(vm):
        rec = s.api.VM.get_record(snap)
        if rec["other_config"].get(md.JOB) != job_id and md.JOB not in rec["other_config"]:
            out.append((str(snap), rec))
    return out


def take_snapshot(
    s: XapiSession,
    vm: str,
    vm_rec: dict[str, Any],
    job_id: str,
    job_name: str,
    schedule_id: str,
    mode: str,
    nobak: list[str],
    attempt: str,
) -> tuple[str, datetime]:
    """Snapshot the VM (normal, checkpoint with memory, or offline: clean shutdown first and
    restart after) and tag it as this job's. Disks marked `[NOBAK]` are left out. The name
    carries the attempt's id, so that a snapshot a kill left untagged is still found."""
    now = datetime.now(UTC)
    name = ownership.snapshot_name(job_name, vm_rec["name_label"], attempt)
    restart = False
    if mode == "offline" and vm_rec["power_state"] == "Running":
        s.call_async("VM.clean_shutdown", vm)
        restart = True
    try:
        if mode == "checkpoint" and vm_rec["power_state"] == "Running":
            snap = s.call_async("VM.checkpoint", vm, name)
        else:
            snap = s.call_async("VM.snapshot", vm, name, nobak)
    finally:
        if restart:
            s.call_async("VM.start", vm, False, False)
    stamp = md.stamp(now)
    marks = {
        md.JOB: job_id,
        md.SCHEDULE: schedule_id,
        md.VM: vm_rec["uuid"],
        md.SNAPSHOT_TIME: md.precise(now),
        md.ROLE: "source-snapshot",
        md.ATTEMPT: attempt,
    }
    oc = dict(s.api.VM.get_other_config(snap))
    oc = {k: v for k, v in oc.items() if not k.startswith(md.PREFIX)} | marks
    s.api.VM.set_other_config(snap, oc)
    s.api.VM.set_name_description(snap, f"xencr job {job_name}: source snapshot of {stamp}")
    for d in disks_of(s, snap):
        voc = {k: v for k, v in s.api.VDI.get_other_config(d.vdi).items() if not k.startswith(md.PREFIX)}
        s.api.VDI.set_other_config(d.vdi, voc | marks)
    return snap, now


def prune_snapshots(s: XapiSession, vm: str, job_id: str, keep: set[str]) -> tuple[list[str], list[str]]:
    """Destroy this job's snapshots of the VM except ``keep`` (`ownership.destroy_snapshot`:
    never one whose disks another VM uses); returns the UUIDs destroyed, and a line for each
    snapshot left alone because it is in use.

    A seed's snapshot (written to files, perhaps still travelling) is kept until the chain has
    moved past it: until some kept base is newer than it."""
    gone, in_use = [], []
    snaps = job_snapshots(s, vm, job_id)
    newest_kept = max(
        (r["other_config"].get(md.SNAPSHOT_TIME, "") for ref, r in snaps if ref in keep), default=""
    )
    for snap, rec in snaps:
        if snap in keep:
            continue
        seeded = rec["other_config"].get(md.SEED)
        if seeded and rec["other_config"].get(md.SNAPSHOT_TIME, "") >= newest_kept:
            continue
        why = ownership.destroy_snapshot(s, snap, job_id, rec["other_config"].get(md.VM, ""))
        if why is None:
            gone.append(rec["uuid"])
        else:
            in_use.append(f"source snapshot {rec['uuid']} {rec['name_label']!r}: {why} (left alone)")
    return gone, in_use


def drop_leftovers(s: XapiSession, vm: str, job_id: str) -> tuple[list[str], list[str]]:
    """Destroy what killed runs of this job left on the source: snapshots left untagged
    (`ownership.source_leftovers`) and disks of snapshots whose destroy was cut short
    (`ownership.source_orphan_disks`); returns the lines for those destroyed and for those left
    alone (in use)."""
    gone: list[str] = []
    in_use: list[str] = []
    vm_uuid = str(s.api.VM.get_uuid(vm))
    for ref, rec in ownership.source_orphan_disks(s, vm_uuid, job_id):
        if ownership.destroy(s, "VDI", ref) is None:
            gone.append(f"source snapshot disk {rec['uuid']} whose destroy had been cut short")
    for snap, rec in ownership.source_leftovers(s, vm, job_id):
        why = ownership.destroy_snapshot(s, snap, job_id, vm_uuid)
        line = f"untagged source snapshot {rec['uuid']} of an interrupted attempt"
        (gone if why is None else in_use).append(line if why is None else f"{line}: {why} (left alone)")
    return gone, in_use
