"""The target side: restore points (one protected VM each), building a new one, the commit
point, clean-up of interrupted runs, and retention.

A restore point is a replica VM marked complete, whose disks each have a *commit snapshot*
taken at the commit: the immutable copy the next delta is cloned from. Comparing a replica's
live disk with its commit snapshot tells whether anyone wrote to it since. What may be destroyed
(and what is detached instead) is decided in `ownership`, and nowhere else."""

from __future__ import annotations

import logging
from typing import Any

from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.replication.ownership import RestorePoint
from xencr.replication.source import Disk
from xencr.xapi.session import XapiSession

__all__ = ["RestorePoint", "restore_points"]  # RestorePoint: defined with the rule, in ownership
log = logging.getLogger("xencr.replication")
NULL = "OpaqueRef:NULL"


def restore_points(t: XapiSession, job_id: str, vm_uuid: str, sr_uuid: str) -> list[RestorePoint]:
    """This job's intact restore points of the VM on the SR, oldest first (`ownership.survey`:
    detached replicas are not restore points)."""
    return ownership.survey(t, job_id, vm_uuid, sr_uuid).points


def xo_restore_points(
    t: XapiSession, vm_uuid: str, sr_uuid: str, *, legacy_copy_of: str | None = None
) -> list[RestorePoint]:
    """Replicas Xen Orchestra made of this VM on this SR (classic or seeded: `xo:copy_of` on the
    VM and its disks, `start` blocked), newest last. A chain of theirs can be continued.

    Legacy replicas (before 2021) carry no `xo:backup:*` keys: with ``legacy_copy_of`` (the
    snapshot the source VM's `xo:base_delta:<SR uuid>` names) the VM that is a copy of it counts
    too, if its disks are on this SR."""
    points = []
    for ref, rec in t.api.VM.get_all_records().items():
        oc = rec["other_config"]
        if rec["is_a_snapshot"] or md.ROLE in oc or md.XO_COPY_OF not in oc:
            continue
        legacy = legacy_copy_of is not None and oc[md.XO_COPY_OF] == legacy_copy_of and md.XO_SR not in oc
        if legacy and not _disks_on(t, rec, sr_uuid):
            continue
        if not legacy and (oc.get(md.XO_SR) != sr_uuid or oc.get(md.XO_VM, vm_uuid) != vm_uuid):
            continue
        if "start" not in rec["blocked_operations"]:
            continue  # a user's clone of a replica carries the keys but no block (xo-compat.md 2)
        when = oc.get(md.XO_DATETIME, oc.get("xo:export_time", ""))
        rp = RestorePoint(str(ref), rec["uuid"], rec["name_label"], when, oc[md.XO_COPY_OF], rec, xo=True)
        for vbd in rec["VBDs"]:
            b = t.api.VBD.get_record(vbd)
            if b["type"] == "Disk" and b["VDI"] != NULL:
                copy_of = t.api.VDI.get_other_config(b["VDI"]).get(md.XO_COPY_OF, "")
                rp.disks[str(b["userdevice"])] = (str(b["VDI"]), None, copy_of)
        points.append(rp)
    return sorted(points, key=lambda p: p.snapshot_time)


def _disks_on(t: XapiSession, rec: dict[str, Any], sr_uuid: str) -> bool:
    """Whether a VM has disks, all on this SR."""
    srs = set()
    for vbd in rec["VBDs"]:
        b = t.api.VBD.get_record(vbd)
        if b["type"] == "Disk" and b["VDI"] != NULL:
            srs.add(t.api.SR.get_uuid(t.api.VDI.get_SR(b["VDI"])))
    return srs == {sr_uuid}


# The fields of a VM record that VM.create takes and that make the same VM boot elsewhere.
VM_FIELDS = (
    "name_description",
    "user_version",
    "memory_static_max",
    "memory_dynamic_max",
    "memory_dynamic_min",
    "memory_static_min",
    "VCPUs_params",
    "VCPUs_max",
    "VCPUs_at_startup",
    "actions_after_shutdown",
    "actions_after_reboot",
    "actions_after_crash",
    "PV_bootloader",
    "PV_kernel",
    "PV_ramdisk",
    "PV_args",
    "PV_bootloader_args",
    "PV_legacy_args",
    "HVM_boot_policy",
    "HVM_boot_params",
    "platform",
    "PCI_bus",
    "recommendations",
    "HVM_shadow_multiplier",
    "NVRAM",
    "domain_type",
    "order",
    "start_delay",
    "shutdown_delay",
    "xenstore_data",
    "has_vendor_device",
    "hardware_platform_version",
)


def _vm_record(src_rec: dict[str, Any], name: str, keys: dict[str, str]) -> dict[str, Any]:
    """A VM.create record from the source snapshot's: what boots the same VM elsewhere."""
    rec = {k: src_rec[k] for k in VM_FIELDS if k in src_rec}
    rec.update(
        name_label=name,
        is_a_template=False,
        affinity=NULL,
        other_config=md.strip_ours(dict(src_rec["other_config"])) | keys,
        tags=sorted(set(src_rec.get("tags", [])) | set(md.TAGS)),
        ha_restart_priority="",
        ha_always_run=False,
    )
    # The startup order, delays and HA priority travel as metadata (failover reads them back);
    # the replica itself has HA cleared.
    for k in ("order", "start_delay", "ha_restart_priority"):
        rec["other_config"][f"xencr:{k}"] = str(src_rec.get(k, ""))
    return rec


def create_replica(t: XapiSession, src_rec: dict[str, Any], keys: dict[str, str]) -> str:
    """The replica VM shell, incomplete-marked and protected before any data lands. ``keys``
    carry the attempt's id (`md.ATTEMPT`): the VM has it from the call that creates it."""
    assert md.ATTEMPT in keys, "every object an attempt creates carries its id"
    name = f"[xencr importing] {src_rec['name_label']}"
    vm = str(t.api.VM.create(_vm_record(src_rec, name, keys | {md.COMPLETE: "false", md.ROLE: "replica"})))
    _set_self(t, "VM", vm)
    # blocked_operations given to VM.create did not always take effect (xo-compat.md 2): set them.
    for op in md.PROTECTED_OPS:
        t.api.VM.remove_from_blocked_operations(vm, op)
        t.api.VM.add_to_blocked_operations(vm, op, md.START_BLOCKED)
    return vm


def create_disk(
    t: XapiSession, sr: str, src_disk: Disk, base_snapshot: str | None, keys: dict[str, str]
) -> str:
    """A new VDI for one disk: a clone of the base restore point's commit snapshot (delta), or a
    fresh one of the same size (full). Marked incomplete, with the attempt's id, from the call
    that creates it: a clone inherits the base's keys, so the base carries the attempt in
    `md.CLONING` while it is cloned (`ownership` finds a clone cut off before its keys)."""
    assert md.ATTEMPT in keys, "every object an attempt creates carries its id"
    oc = keys | {md.COMPLETE: "false", md.ROLE: "replica-disk", md.COPY_OF: src_disk.uuid}
    if base_snapshot is None:
        rec = {
            "SR": sr,
            "virtual_size": str(src_disk.size),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": oc,
            "name_label": src_disk.name,
            "name_description": "xencr replica disk",
        }
        vdi = str(t.api.VDI.create(rec))
        _set_self(t, "VDI", vdi)
        return vdi
    base_oc = dict(t.api.VDI.get_other_config(base_snapshot))
    t.api.VDI.set_other_config(base_snapshot, base_oc | {md.CLONING: keys[md.ATTEMPT]})
    vdi = str(t.api.VDI.clone(base_snapshot, {}))
    t.api.VDI.set_other_config(vdi, oc | {md.SELF: str(t.api.VDI.get_uuid(vdi))})
    t.api.VDI.set_other_config(base_snapshot, {k: v for k, v in base_oc.items() if k != md.CLONING})
    t.api.VDI.set_name_label(vdi, src_disk.name)
    return vdi


def make_plain(t: XapiSession, vm: str) -> None:
    """A clone of a replica made an ordinary VM: neither it nor its disks pass for a replica or a
    Xen Orchestra backup (their keys removed, `md.strip_ours`), and it is not a template. What
    `xencr replica clone`, a failover's clones and a failback's linked clone all need."""
    t.api.VM.set_other_config(vm, md.strip_ours(dict(t.api.VM.get_other_config(vm))))
    for vbd in t.api.VM.get_VBDs(vm):
        vdi = t.api.VBD.get_VDI(vbd)
        if t.api.VBD.get_type(vbd) == "Disk" and vdi != NULL:
            t.api.VDI.set_other_config(vdi, md.strip_ours(dict(t.api.VDI.get_other_config(vdi))))
    t.api.VM.set_is_a_template(vm, False)


def _set_self(t: XapiSession, cls: str, ref: str) -> None:
    """Name an object its own: a copy of it made by anyone keeps this value, not its own UUID."""
    oc = dict(t.call(f"{cls}.get_other_config", ref))
    t.call(f"{cls}.set_other_config", ref, oc | {md.SELF: str(t.call(f"{cls}.get_uuid", ref))})


def attach(t: XapiSession, vm: str, vdi: str, d: Disk) -> None:
    t.api.VBD.create(
        {
            "VM": vm,
            "VDI": vdi,
            "userdevice": d.userdevice,
            "bootable": d.bootable,
            "mode": "RW",
            "type": "Disk",
            "empty": False,
            "other_config": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
        }
    )


def copy_vifs(s: XapiSession, src_vm: str, t: XapiSession, vm: str, network_map: dict[str, str]) -> list[str]:
    """The source VM's VIFs on target networks (see `create_vifs`). Returns warnings."""
    return create_vifs(t, vm, vifs_of(s, src_vm), network_map)


def vifs_of(s: XapiSession, vm: str) -> list[dict[str, str]]:
    """A VM's VIFs as device, network name, MAC and MTU: what rebuilds them on another pool."""
    out = []
    for vif in s.api.VM.get_VIFs(vm):
        r = s.api.VIF.get_record(vif)
        network = str(s.api.network.get_name_label(r["network"]))
        out.append(
            {"device": str(r["device"]), "network": network, "MAC": str(r["MAC"]), "MTU": str(r["MTU"])}
        )
    return out


def create_vifs(
    t: XapiSession, vm: str, vifs: list[dict[str, str]], network_map: dict[str, str]
) -> list[str]:
    """VIFs on target networks: the job's map (by source network name), then a network of the
    same name, then the target pool's first network. Returns warnings."""
    nets = {r["name_label"]: ref for ref, r in t.api.network.get_all_records().items()}
    warnings = []
    for v in vifs:
        wanted = network_map.get(v["network"], v["network"])
        net = nets.get(wanted)
        if net is None:
            if not nets:
                warnings.append(f"no network on the target for VIF {v['device']}")
                continue
            net = sorted(nets.items())[0][1]
            fallback = t.api.network.get_name_label(net)
            warnings.append(f"network {wanted!r} not on the target: VIF {v['device']} on {fallback!r}")
        t.api.VIF.create(
            {
                "device": v["device"],
                "network": net,
                "VM": vm,
                "MAC": v["MAC"],
                "MTU": v["MTU"],
                "other_config": {},
                "qos_algorithm_type": "",
                "qos_algorithm_params": {},
            }
        )
    return warnings


def commit(
    t: XapiSession, vm: str, disks: list[str], keys: dict[str, str], name: str, description: str
) -> None:
    """Make the replica a restore point. Commit snapshots first; the single `other_config`
    write at the end is the commit point: before it the previous restore point is the newest."""
    # A disk's copy_of names its source snapshot *VDI*; the VM-level value must not replace it.
    disk_keys = {k: v for k, v in keys.items() if k != md.COPY_OF}
    for vdi in disks:
        oc = dict(t.api.VDI.get_other_config(vdi)) | disk_keys | {md.COMPLETE: "true"}
        t.api.VDI.set_other_config(vdi, oc)
        snap = str(t.api.VDI.snapshot(vdi, {}))
        t.api.VDI.set_other_config(
            snap, oc | {md.ROLE: "commit-snapshot", md.SELF: str(t.api.VDI.get_uuid(snap))}
        )
    t.api.VM.set_name_label(vm, name)
    t.api.VM.set_name_description(vm, description)
    seal(t, vm, keys | {md.COMPLETE: "true"})


def seal(t: XapiSession, vm: str, keys: dict[str, str]) -> None:
    """Write ``keys`` and the replica's seal (`ownership.seal_of`) in one `other_config` write:
    a run's commit point, and a seed link's."""
    rec = t.api.VM.get_record(vm)
    disks = {}
    for vbd in rec["VBDs"]:
        b = t.api.VBD.get_record(vbd)
        if b["type"] == "Disk" and b["VDI"] != NULL:
            disks[str(b["userdevice"])] = str(t.api.VDI.get_uuid(b["VDI"]))
    # A commit is a fresh verdict: an earlier one (a half-written seed link seen by a run) goes.
    oc = {k: v for k, v in rec["other_config"].items() if k not in (md.DETACHED, md.EXPIRING)}
    oc |= keys | {md.SELF: rec["uuid"], md.SEAL: ownership.seal_of(rec, disks)}
    t.api.VM.set_other_config(vm, oc)
