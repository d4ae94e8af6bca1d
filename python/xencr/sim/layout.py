"""``xencr sim init``: a ready-to-use state directory (per pool: one or more hosts, each with its
control domain and local SR, shared SRs, two networks, and a few halted VMs whose disks hold
recognisable data). With one host per pool the layout is the historical one, unchanged."""

from __future__ import annotations

import base64
import hashlib
import json
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
HOST_MEMORY = 64 * GIB
DOM0_MEMORY = 4 * GIB


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


def host_name(pool_index: int, host_index: int, hosts: int) -> str:
    """``sim-host-<pool>`` for a one-host pool (the historical name), ``sim-host-<pool>-<j>`` else."""
    return f"sim-host-{pool_index}" if hosts == 1 else f"sim-host-{pool_index}-{host_index}"


def _create_host(pool: PoolState, name: str, index: int) -> str:
    """A host with its metrics and its control domain; ``_index`` orders the pool's hosts."""
    db = pool.db
    host = db.create(
        "host",
        {
            "uuid": str(uuidlib.uuid4()),
            "name_label": name,
            "name_description": "simulated host",
            "hostname": name,
            "address": "127.0.0.1",  # a multi-host pool records each host's port when served
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
                "hostname": name,
            },
            "memory_overhead": 0,
            "cpu_info": {"cpu_count": "4"},
            "_index": index,
        },
    )
    host_metrics = db.create(
        "host_metrics",
        {"memory_total": HOST_MEMORY, "memory_free": 60 * GIB, "live": True, "last_updated": now()},
    )
    db.update("host", host, metrics=host_metrics)
    dom0 = db.create(
        "VM",
        {
            "name_label": f"Control domain on host: {name}",
            "is_control_domain": True,
            "power_state": "Running",
            "resident_on": host,
            "domid": 0,
            "memory_static_max": DOM0_MEMORY,
            "memory_dynamic_max": DOM0_MEMORY,
            "memory_dynamic_min": DOM0_MEMORY,
            "memory_static_min": DOM0_MEMORY,
            "memory_target": DOM0_MEMORY,
            "VCPUs_max": 4,
            "VCPUs_at_startup": 4,
            "domain_type": "pv",
            "other_config": {"storage_driver_domain": "OpaqueRef:NULL"},
        },
    )
    create_vm_metrics(db, dom0)
    return host


def _file_sr(pool: PoolState, label: str, serial: str, sr_size: int, *, shared: bool) -> str:
    return pool.db.create(
        "SR",
        {
            "name_label": label,
            "name_description": "file-based VHD SR (simulated)",
            "type": "nfs" if shared else "ext",
            "content_type": "user",
            "shared": shared,
            "physical_size": sr_size,
            "sm_config": {"devserial": serial},
            "allowed_operations": list(SR_OPERATIONS),
        },
    )


def _plug(pool: PoolState, sr: str, hosts: list[str], device_config: dict[str, str]) -> None:
    for host in hosts:
        pool.db.create(
            "PBD", {"host": host, "SR": sr, "device_config": dict(device_config), "currently_attached": True}
        )


def _pifs(pool: PoolState, host: str, networks: list[str], index: int) -> None:
    """A physical PIF per bridged network on each host: ``eth0`` (the management interface, its
    IP the address the simulator serves on) and ``eth1`` (no IP configured). ``VDI.get_nbd_info``
    lists the IPs of a host's PIFs on networks with an NBD purpose."""
    for k, network in enumerate(networks):
        management = k == 0
        pool.db.create(
            "PIF",
            {
                "device": f"eth{k}",
                "network": network,
                "host": host,
                "MAC": f"02:5e:{pool.index:02x}:{index:02x}:00:{k:02x}",
                "MTU": 1500,
                "VLAN": -1,
                "physical": True,
                "currently_attached": True,
                "management": management,
                "ip_configuration_mode": "Static" if management else "None",
                "IP": "127.0.0.1" if management else "",
                "netmask": "255.0.0.0" if management else "",
                "managed": True,
            },
        )


def populate(pool: PoolState, *, vms: int, disk_size: int, sr_size: int, hosts: int = 1) -> None:
    """Fill an empty pool database. One host: a local SR, a second local SR and the iSCSI SR, as
    always. Several hosts: a local SR per host plugged only there, and the second SR (NFS) and
    the iSCSI SR shared (plugged on every host); VM ``k``'s disk is on host ``k mod hosts``."""
    db = pool.db
    n = pool.index
    names = [host_name(n, j, hosts) for j in range(hosts)]
    host_refs = [_create_host(pool, name, j) for j, name in enumerate(names)]
    if hosts == 1:
        local = [_file_sr(pool, f"Local storage on {names[0]}", f"sim-{n}-0", sr_size, shared=False)]
        _plug(pool, local[0], host_refs, {"device": "/dev/sim0"})
        second = _file_sr(pool, "Second storage", f"sim-{n}-1", sr_size, shared=False)
        _plug(pool, second, host_refs, {"device": "/dev/sim1"})
    else:
        local = []
        for j, (name, host) in enumerate(zip(names, host_refs, strict=True)):
            sr = _file_sr(pool, f"Local storage on {name}", f"sim-{n}-{j}", sr_size, shared=False)
            _plug(pool, sr, [host], {"device": "/dev/sim0"})
            local.append(sr)
        second = _file_sr(pool, "Second storage", f"sim-{n}-shared", sr_size, shared=True)
        _plug(pool, second, host_refs, {"server": "127.0.0.1", "serverpath": f"/sim/{n}"})
    srs = [*local, second]
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
    _plug(
        pool,
        lun,
        host_refs,
        {"target": "127.0.0.1", "targetIQN": "iqn.2026-01.sim:array", "SCSIid": f"sim-lun-{n}"},
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
    for j, host in enumerate(host_refs):
        _pifs(pool, host, networks, j)
    db.create(
        "pool",
        {
            "name_label": f"sim-pool-{n}",
            "master": host_refs[0],
            "default_SR": local[0],
            "suspend_image_SR": local[0],
            "crash_dump_SR": local[0],
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
                local[k % hosts],
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
    hosts: int = 1,
) -> str:
    """Create ``root`` with ``pools`` pools of ``hosts`` hosts each; returns the root password (also
    in ``root/password``)."""
    if hosts < 1:
        raise ValueError(f"a pool needs at least one host, not {hosts}")
    root.mkdir(parents=True, exist_ok=True)
    if pool_count(root):
        raise FileExistsError(f"{root} already holds a simulator state")
    secret = write_password(root, password)
    for i in range(pools):
        pool = PoolState(root, i, secret)
        populate(pool, vms=vms, disk_size=disk_size, sr_size=sr_size, hosts=hosts)
    return secret


def host_counts(root: Path) -> list[int]:
    """How many hosts each pool of ``root`` has (read from the saved databases)."""
    counts = []
    for i in range(pool_count(root)):
        doc = json.loads((root / f"pool{i}" / "db.json").read_text())
        counts.append(len(doc["tables"].get("host", {})))
    return counts
