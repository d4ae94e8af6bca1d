"""``xencr sim init``: a ready-to-use state directory (per pool: a host with its control domain,
two file-based VHD SRs, two networks, and a few halted VMs whose disks hold recognisable data)."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import uuid as uuidlib
from pathlib import Path
from typing import Any

from xencr.sim.api.metrics import create_vm_metrics
from xencr.sim.dispatch import Ctx
from xencr.sim.guest import pattern
from xencr.sim.pool_state import PoolState
from xencr.sim.values import now

GIB = 1024**3
MIB = 1024**2
API_VERSION = (2, 21)  # what XCP-ng 8.3 reports (xapi.md 1.5)
PASSWORD_FILE = "password"


# What a plugged SR of a simulated pool allows (every SR kind the simulator makes).
SR_OPERATIONS = (
    "vdi_create",
    "vdi_destroy",
    "vdi_resize",
    "vdi_clone",
    "vdi_snapshot",
    "scan",
    "pbd_create",
    "pbd_destroy",
    "vdi_introduce",
    "update",
)


def write_password(root: Path, password: str | None) -> str:
    password = password or secrets.token_urlsafe(12)
    path = root / PASSWORD_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def read_password(root: Path, password_file: Path | None = None) -> str:
    path = password_file or root / PASSWORD_FILE
    return path.read_text().strip()


def pool_count(root: Path) -> int:
    return len([p for p in root.glob("pool*") if (p / "db.json").exists()])


def _vm_fields(name: str, index: int) -> dict[str, Any]:
    """A halted HVM guest; odd-numbered VMs boot with UEFI and carry NVRAM (EFI variables)."""
    uefi = index % 2 == 1
    fields: dict[str, Any] = {
        "name_label": name,
        "name_description": f"simulated VM {name}",
        "user_version": 1,
        "memory_static_max": GIB,
        "memory_dynamic_max": GIB,
        "memory_dynamic_min": GIB,
        "memory_static_min": 512 * MIB,
        "memory_target": GIB,
        "VCPUs_max": 2,
        "VCPUs_at_startup": 2,
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "HVM_boot_policy": "BIOS order",
        "HVM_boot_params": {"order": "cd", "firmware": "bios"},
        "platform": {
            "viridian": "true",
            "acpi": "1",
            "apic": "true",
            "pae": "true",
            "nx": "true",
            "device-model": "qemu-upstream-compat",
        },
        "other_config": {"mac_seed": str(uuidlib.uuid4()), "base_template_name": "Other install media"},
        "domain_type": "hvm",
        "power_state": "Halted",
        "domid": -1,
        "generation_id": "0:0",
        "hardware_platform_version": 0,
        "has_vendor_device": False,
    }
    if uefi:
        fields["HVM_boot_params"] = {"order": "cd", "firmware": "uefi"}
        fields["platform"] = {**fields["platform"], "secureboot": "false"}
        # EFI variable store as xapi keeps it: base64 of varstored's blob (contents simulated)
        blob = hashlib.sha256(f"nvram/{name}".encode()).digest() * 8
        fields["NVRAM"] = {"EFI-variables": base64.b64encode(blob).decode()}
    return fields


def populate(pool: PoolState, *, vms: int, disk_size: int, sr_size: int) -> None:
    """Fill an empty pool database."""
    db = pool.db
    n = pool.index
    host_uuid = str(uuidlib.uuid4())
    host = db.create(
        "host",
        {
            "uuid": host_uuid,
            "name_label": f"sim-host-{n}",
            "name_description": "simulated host",
            "hostname": f"sim-host-{n}",
            "address": "127.0.0.1",
            "enabled": True,
            "API_version_major": API_VERSION[0],
            "API_version_minor": API_VERSION[1],
            "API_version_vendor": "XenSource",
            "software_version": {
                "product_version": "8.3.0",
                "product_brand": "XCP-ng",
                "platform_version": "3.4.0",
                "xapi": "24.19",
                "xen": "4.17.4",
                "hostname": f"sim-host-{n}",
            },
            "memory_overhead": 0,
            "cpu_info": {"cpu_count": "4"},
        },
    )
    host_metrics = db.create(
        "host_metrics",
        {"memory_total": 64 * GIB, "memory_free": 60 * GIB, "live": True, "last_updated": now()},
    )
    db.update("host", host, metrics=host_metrics)
    dom0 = db.create(
        "VM",
        {
            "name_label": f"Control domain on host: sim-host-{n}",
            "is_control_domain": True,
            "power_state": "Running",
            "resident_on": host,
            "domid": 0,
            "memory_static_max": 4 * GIB,
            "memory_dynamic_max": 4 * GIB,
            "memory_dynamic_min": 4 * GIB,
            "memory_static_min": 4 * GIB,
            "memory_target": 4 * GIB,
            "VCPUs_max": 4,
            "VCPUs_at_startup": 4,
            "domain_type": "pv",
            "other_config": {"storage_driver_domain": "OpaqueRef:NULL"},
        },
    )
    create_vm_metrics(db, dom0)
    srs = []
    for k, label in enumerate(("Local storage", "Second storage")):
        sr = db.create(
            "SR",
            {
                "name_label": label if k else f"Local storage on sim-host-{n}",
                "name_description": "file-based VHD SR (simulated)",
                "type": "ext",
                "content_type": "user",
                "shared": False,
                "physical_size": sr_size,
                "sm_config": {"devserial": f"sim-{n}-{k}"},
                "allowed_operations": list(SR_OPERATIONS),
            },
        )
        db.create(
            "PBD",
            {"host": host, "SR": sr, "device_config": {"device": f"/dev/sim{k}"}, "currently_attached": True},
        )
        srs.append(sr)
    # A DR-capable SR (LVM over iSCSI) on a LUN of the simulated array, shared by every pool.
    lun = db.create(
        "SR",
        {
            "name_label": "iSCSI storage",
            "name_description": "LVM over iSCSI on the simulated array",
            "type": "lvmoiscsi",
            "content_type": "user",
            "shared": True,
            "physical_size": sr_size,
            "allowed_operations": list(SR_OPERATIONS),
        },
    )
    db.create(
        "PBD",
        {
            "host": host,
            "SR": lun,
            "currently_attached": True,
            "device_config": {
                "target": "127.0.0.1",
                "targetIQN": "iqn.2026-01.sim:array",
                "SCSIid": f"sim-lun-{n}",
            },
        },
    )
    srs.append(lun)
    networks = [
        db.create(
            "network",
            {
                "name_label": "Pool-wide network associated with eth0",
                "bridge": "xenbr0",
                "MTU": 1500,
                "managed": True,
            },
        ),
        db.create(
            "network", {"name_label": "Second network", "bridge": "xenbr1", "MTU": 1500, "managed": True}
        ),
    ]
    db.create(
        "pool",
        {
            "name_label": f"sim-pool-{n}",
            "master": host,
            "default_SR": srs[0],
            "suspend_image_SR": srs[0],
            "crash_dump_SR": srs[0],
        },
    )
    ctx = Ctx(pool, None, "sim.init")
    from xencr.sim.api.vbd import create_vbd
    from xencr.sim.api.vdi import new_vdi
    from xencr.sim.api.vif import create_vif

    for k in range(vms):
        name = f"vm{k}"
        vm = db.create("VM", _vm_fields(name, k))
        create_vm_metrics(db, vm)
        if disk_size:
            vdi = new_vdi(
                ctx,
                srs[0],
                {"name_label": f"{name} disk 0", "virtual_size": disk_size, "type": "user", "sm_config": {}},
                file_size=disk_size,
            )
            create_vbd(
                ctx,
                {
                    "VM": vm,
                    "VDI": vdi,
                    "userdevice": "0",
                    "bootable": True,
                    "mode": "RW",
                    "type": "Disk",
                    "empty": False,
                    "other_config": {"owner": "true"},
                    "qos_algorithm_type": "",
                    "qos_algorithm_params": {},
                    "device": "xvda",
                },
            )
            # recognisable data: the first MiB and one MiB in the middle, seeded by the VM's name
            for start in (0, (disk_size // 2) & ~(MIB - 1)):
                for pos, chunk in pattern(f"{n}/{name}", start, min(MIB, disk_size - start)):
                    pool.storage.write(vdi, pos, chunk)
        create_vif(
            ctx,
            {
                "VM": vm,
                "network": networks[0],
                "device": "0",
                "MAC": "",
                "MTU": 1500,
                "other_config": {},
                "qos_algorithm_type": "",
                "qos_algorithm_params": {},
            },
        )
    for sr in srs:
        pool.storage.refresh(sr)
    db.save()


def init_state(
    root: Path,
    pools: int,
    *,
    vms: int = 2,
    disk_size: int = 16 * MIB,
    sr_size: int = 4 * GIB,
    password: str | None = None,
) -> str:
    """Create ``root`` with ``pools`` pools; returns the root password (also in ``root/password``)."""
    root.mkdir(parents=True, exist_ok=True)
    if pool_count(root):
        raise FileExistsError(f"{root} already holds a simulator state")
    secret = write_password(root, password)
    for i in range(pools):
        pool = PoolState(root, i, secret)
        populate(pool, vms=vms, disk_size=disk_size, sr_size=sr_size)
    return secret
