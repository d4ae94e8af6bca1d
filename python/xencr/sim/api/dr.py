"""XenServer native disaster recovery (xapi.md 5; ``ocaml/xapi/xapi_sr.ml``, ``xapi_dr_task.ml``,
``xapi_vm.ml`` / ``xapi_vm_helpers.ml`` recover, ``xapi_vdi.ml`` open_database).

The storage array is ``<state>/array/<SCSIid>/``: a DR-capable SR (``lvmoiscsi``/``lvmohba``) lives
there, so any pool whose PBD names that LUN sees the same disks, as a mirrored LUN would appear at
the recovery site. Like LVHD's management volume, the LUN carries the SR's own metadata
(``sr.json``: its VDIs), rewritten whenever the owning pool saves; a metadata VDI carries the whole
pool database (``<vdi uuid>.db.json``), kept current as xapi's redo log does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

from xencr.sim.api.ctor import ctor_fields
from xencr.sim.api.metrics import create_vm_metrics
from xencr.sim.api.vdi import destroy_vdi, new_vdi
from xencr.sim.db import Database, write_json
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError
from xencr.sim.storage import DR_SR_TYPES
from xencr.sim.values import NULL_REF

if TYPE_CHECKING:
    from xencr.sim.pool_state import PoolState

# Redo_log.minimum_vdi_size (xapi.md 5.2)
METADATA_VDI_SIZE = 3_988_783_104
MAX_METADATA_SRS = 8
BLANK_LUN_SIZE = 16 * 1024**3  # what a freshly attached, empty simulated LUN reports
SR_METADATA = "sr.json"
# VDI fields carried in the SR's own metadata (enough to re-introduce the VDIs elsewhere).
_VDI_FIELDS = (
    "uuid",
    "name_label",
    "name_description",
    "type",
    "virtual_size",
    "sharable",
    "read_only",
    "is_a_snapshot",
    "snapshot_time",
    "managed",
    "sm_config",
    "other_config",
    "tags",
    "metadata_latest",
    "on_boot",
    "cbt_enabled",
    "location",
)


def _lun_dir(pool: PoolState, lun: str) -> Path:
    return pool.dir.parent / "array" / lun


def _attached(db: Database, sr: str) -> bool:
    return any(db.get("PBD", p)["currently_attached"] for p in db.reverse("SR", "PBDs", sr))


# --------------------------------------------------------------------------------------- replication


def replicate(pool: PoolState) -> None:
    """Write the SR metadata of every attached DR-capable SR and this pool's database into its
    metadata VDIs (called after each database save)."""
    db = pool.db
    with db.lock:
        pool_uuid = db.get("pool", pool.pool_ref)["uuid"] if db.exists("pool", pool.pool_ref) else ""
        for sr, rec in db.items("SR"):
            lun = pool.storage.lun(sr)
            if lun is None or not _attached(db, sr):
                continue
            directory = _lun_dir(pool, lun)
            directory.mkdir(parents=True, exist_ok=True)
            vdis = []
            for _, vrec in db.items("VDI"):
                if vrec["SR"] != sr:
                    continue
                entry = {k: vrec[k] for k in _VDI_FIELDS}
                of = vrec["snapshot_of"]
                entry["snapshot_of_uuid"] = db.get("VDI", of)["uuid"] if db.exists("VDI", of) else ""
                entry["metadata_of_pool"] = vrec["metadata_of_pool"]
                vdis.append(entry)
                if vrec["type"] == "metadata" and vrec["metadata_of_pool"] == pool.pool_ref:
                    write_json(
                        directory / f"{vrec['uuid']}.db.json",
                        {"pool_uuid": pool_uuid, "pool_ref": pool.pool_ref, **db.snapshot_doc()},
                    )
            write_json(
                directory / SR_METADATA,
                {
                    "sr": {
                        k: rec[k] for k in ("uuid", "name_label", "name_description", "type", "physical_size")
                    },
                    "vdis": vdis,
                },
            )


def _read_lun(pool: PoolState, lun: str) -> dict[str, Any] | None:
    path = _lun_dir(pool, lun) / SR_METADATA
    if not path.exists():
        return None
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def scan_lun(ctx: Ctx, sr: str) -> None:
    """SR.scan of a DR-capable SR: introduce the VDIs its metadata lists that this pool lacks."""
    db = ctx.pool.db
    lun = ctx.pool.storage.lun(sr)
    doc = _read_lun(ctx.pool, lun) if lun else None
    if doc is None:  # a blank LUN: the SM reports its size
        if int(db.get("SR", sr)["physical_size"]) < 0:
            db.update("SR", sr, physical_size=BLANK_LUN_SIZE)
        return
    known = {rec["uuid"] for _, rec in db.items("VDI")}
    for entry in doc["vdis"]:
        if entry["uuid"] in known:
            continue
        fields = {k: entry[k] for k in _VDI_FIELDS}
        if fields["type"] == "metadata":
            fields["metadata_latest"] = True  # one database per foreign pool in the simulator
            fields["metadata_of_pool"] = entry["metadata_of_pool"]
        db.create("VDI", {**fields, "SR": sr, "missing": False})
    for ref, rec in db.items("VDI"):  # re-link snapshots by UUID
        for entry in doc["vdis"]:
            if entry["uuid"] == rec["uuid"] and entry["snapshot_of_uuid"] and rec["snapshot_of"] == NULL_REF:
                target = [r for r, v in db.items("VDI") if v["uuid"] == entry["snapshot_of_uuid"]]
                if target:
                    db.update("VDI", ref, snapshot_of=target[0])
    if doc["sr"].get("physical_size"):
        db.update("SR", sr, physical_size=doc["sr"]["physical_size"])
    ctx.pool.storage.refresh(sr)


# --------------------------------------------------------------------------------------- SR calls


def _assert_supports(ctx: Ctx, sr: str) -> dict[str, Any]:
    row = require(ctx, "SR", sr)
    if not _attached(ctx.db, sr):
        raise XapiError("SR_HAS_NO_PBDS", sr)
    if row["type"] not in DR_SR_TYPES:
        raise XapiError("SR_OPERATION_NOT_SUPPORTED", sr)
    return row


@handler("SR.assert_supports_database_replication")
def assert_supports_database_replication(ctx: Ctx, sr: str) -> None:
    _assert_supports(ctx, sr)


def _metadata_vdis(ctx: Ctx, sr: str | None = None) -> list[str]:
    return [
        r
        for r, v in ctx.db.items("VDI")
        if v["type"] == "metadata"
        and v["metadata_of_pool"] == ctx.pool.pool_ref
        and (sr is None or v["SR"] == sr)
    ]


@handler("SR.enable_database_replication")
def enable_database_replication(ctx: Ctx, sr: str) -> None:
    _assert_supports(ctx, sr)
    if not _metadata_vdis(ctx, sr):
        srs = {ctx.db.get("VDI", v)["SR"] for v in _metadata_vdis(ctx)}
        if len(srs) >= MAX_METADATA_SRS:
            raise XapiError("NO_MORE_REDO_LOGS_ALLOWED")
        new_vdi(
            ctx,
            sr,
            {
                "name_label": "Metadata for DR",
                "name_description": "Used for disaster recovery",
                "virtual_size": METADATA_VDI_SIZE,
                "type": "metadata",
                "sm_config": {"type": "raw"},
                "metadata_of_pool": ctx.pool.pool_ref,
            },
            file_size=METADATA_VDI_SIZE,
        )
    for vdi in _metadata_vdis(ctx, sr):
        ctx.db.update("VDI", vdi, metadata_latest=True)
    ctx.pool.db.dirty = True


@handler("SR.disable_database_replication")
def disable_database_replication(ctx: Ctx, sr: str) -> None:
    require(ctx, "SR", sr)
    lun = ctx.pool.storage.lun(sr)
    for vdi in _metadata_vdis(ctx, sr):
        uuid = ctx.db.get("VDI", vdi)["uuid"]
        for vbd in ctx.db.reverse("VDI", "VBDs", vdi):
            ctx.db.delete("VBD", vbd)
        destroy_vdi(ctx, vdi)
        if lun:  # the replicated database goes with its VDI
            (_lun_dir(ctx.pool, lun) / f"{uuid}.db.json").unlink(missing_ok=True)


@handler("SR.probe")
def probe(ctx: Ctx, host: str, device_config: dict[str, str], type_: str, sm_config: dict[str, str]) -> str:
    """The SRs found on the LUN named by ``device_config["SCSIid"]``, as the SM's XML list."""
    require(ctx, "host", host)
    doc = _read_lun(ctx.pool, device_config.get("SCSIid", "")) if type_ in DR_SR_TYPES else None
    items = ""
    if doc is not None:
        sr = doc["sr"]
        items = (
            f"<SR><UUID>{escape(sr['uuid'])}</UUID><name_label>{escape(sr['name_label'])}</name_label>"
            f"<name_description>{escape(sr['name_description'])}</name_description></SR>"
        )
    return f'<?xml version="1.0" ?><SRlist>{items}</SRlist>'


@handler("SR.introduce")
def introduce(
    ctx: Ctx,
    uuid: str,
    name_label: str,
    name_description: str,
    type_: str,
    content_type: str,
    shared: bool,
    sm_config: dict[str, str],
) -> str:
    if uuid and any(rec["uuid"] == uuid for _, rec in ctx.db.items("SR")):
        raise XapiError("SR_UUID_EXISTS", uuid)
    return ctx.db.create(
        "SR",
        {
            "uuid": uuid,
            "name_label": name_label,
            "name_description": name_description,
            "type": type_.lower(),
            "content_type": content_type,
            "shared": shared,
            "sm_config": sm_config,
            "physical_utilisation": -1,
            "physical_size": -1,
            "virtual_allocation": 0,
        },
    )


@handler("PBD.create")
def pbd_create(ctx: Ctx, record: dict[str, Any]) -> str:
    fields = ctor_fields("PBD", record)
    require(ctx, "host", fields["host"])
    require(ctx, "SR", fields["SR"])
    fields["currently_attached"] = False
    return ctx.db.create("PBD", fields)


@handler("PBD.destroy")
def pbd_destroy(ctx: Ctx, pbd: str) -> None:
    if require(ctx, "PBD", pbd)["currently_attached"]:
        raise XapiError("OPERATION_NOT_ALLOWED", "PBD is currently attached")  # xapi_pbd.ml
    ctx.db.delete("PBD", pbd)


# ------------------------------------------------------------------------------------------ DR_task


@handler("DR_task.create")
def dr_task_create(ctx: Ctx, type_: str, device_config: dict[str, str], whitelist: list[str]) -> str:
    if type_ not in DR_SR_TYPES:
        raise XapiError("OPERATION_NOT_ALLOWED", f"Disaster recovery not supported on SRs of type {type_}")
    xml = probe(ctx, ctx.pool.host_ref, device_config, type_, {"metadata": "true"})
    doc = _read_lun(ctx.pool, device_config.get("SCSIid", "")) if "<SR>" in xml else None
    task = ctx.db.create("DR_task", {})
    if doc is not None and doc["sr"]["uuid"] in whitelist:
        sr_uuid = doc["sr"]["uuid"]
        if not any(rec["uuid"] == sr_uuid for _, rec in ctx.db.items("SR")):
            sr = introduce(
                ctx, sr_uuid, doc["sr"]["name_label"], doc["sr"]["name_description"], type_, "", True, {}
            )
            # a PBD on every host, the master first (xapi_dr_task.ml call_fn_on_master_then_slaves)
            master = ctx.pool.master_ref
            for host in [master] + [h for h in ctx.pool.hosts() if h != master]:
                pbd = pbd_create(
                    ctx, {"host": host, "SR": sr, "device_config": device_config, "other_config": {}}
                )
                plug_pbd(ctx, pbd)
            ctx.db.update("SR", sr, introduced_by=task)
    return task


@handler("DR_task.destroy")
def dr_task_destroy(ctx: Ctx, task: str) -> None:
    require(ctx, "DR_task", task)
    for sr, rec in ctx.db.items("SR"):
        if rec["introduced_by"] != task:
            continue
        for pbd in ctx.db.reverse("SR", "PBDs", sr):
            ctx.db.update("PBD", pbd, currently_attached=False)
        forget_sr(ctx, sr)
    ctx.db.delete("DR_task", task)


def plug_pbd(ctx: Ctx, pbd: str) -> None:
    ctx.db.update("PBD", pbd, currently_attached=True)
    sr = ctx.db.get("PBD", pbd)["SR"]
    if ctx.pool.storage.lun(sr):
        scan_lun(ctx, sr)


def forget_sr(ctx: Ctx, sr: str) -> None:
    """``SR.forget`` (message_forwarding.ml): refused while a PBD is attached, then the SR, its
    PBDs and VDI records go (the data stays on the storage)."""
    require(ctx, "SR", sr)
    if _attached(ctx.db, sr):
        raise XapiError("SR_HAS_PBD", sr)
    for pbd in ctx.db.reverse("SR", "PBDs", sr):
        ctx.db.delete("PBD", pbd)
    for vdi in ctx.db.reverse("SR", "VDIs", sr):
        for vbd in ctx.db.reverse("VDI", "VBDs", vdi):
            ctx.db.delete("VBD", vbd)
        ctx.db.delete("VDI", vdi)
    ctx.db.delete("SR", sr)


# ----------------------------------------------------------------------------- foreign databases


@handler("VDI.open_database")
def open_database(ctx: Ctx, vdi: str) -> str:
    row = require(ctx, "VDI", vdi)
    if row["type"] != "metadata":
        raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, row["type"])
    lun = ctx.pool.storage.lun(row["SR"])
    path = _lun_dir(ctx.pool, lun) / f"{row['uuid']}.db.json" if lun else None
    if path is None or not path.exists():
        raise XapiError("COULD_NOT_IMPORT_DATABASE", "no database found in the VDI")
    session = ctx.pool.db.create(
        "session",
        {
            "this_host": ctx.pool.host_ref,
            "auth_user_name": "disaster-recovery",
            "is_local_superuser": False,
            "_database": row["uuid"],
        },
    )
    ctx.pool.foreign_dbs[session] = Database.from_doc(json.loads(path.read_text()))
    return session


@handler("VDI.read_database_pool_uuid")
def read_database_pool_uuid(ctx: Ctx, vdi: str) -> str:
    row = require(ctx, "VDI", vdi)
    lun = ctx.pool.storage.lun(row["SR"])
    path = _lun_dir(ctx.pool, lun) / f"{row['uuid']}.db.json" if lun else None
    if path is None or not path.exists():
        return ""
    return str(json.loads(path.read_text()).get("pool_uuid", ""))


# ------------------------------------------------------------------------------------------ recover


def _required_srs(foreign: Database, vm: str) -> list[str]:
    """``list_required_SRs``: SRs of the VM's non-CD VBDs' VDIs, except ISO SRs."""
    out: list[str] = []
    for vbd in foreign.reverse("VM", "VBDs", vm):
        row = foreign.get("VBD", vbd)
        if row["type"] == "CD" or not foreign.exists("VDI", row["VDI"]):
            continue
        sr = foreign.get("VDI", row["VDI"])["SR"]
        if foreign.exists("SR", sr) and foreign.get("SR", sr)["content_type"] != "iso" and sr not in out:
            out.append(sr)
    return out


def _local_sr(local: Database, uuid: str) -> str | None:
    for ref, rec in local.items("SR"):
        if rec["uuid"] == uuid and _attached(local, ref):
            return ref
    return None


def _check_session_to(ctx: Ctx, session_to: str) -> Database:
    ctx.pool.check_session(session_to)
    if session_to in ctx.pool.foreign_dbs:
        raise XapiError(
            "RBAC_PERMISSION_DENIED",
            "VM.recover",
            "The supplied session does not have the required permissions for VM recovery.",
        )
    return ctx.pool.db


def assert_vm_recoverable(ctx: Ctx, vm: str, local: Database) -> None:
    foreign = ctx.db
    require(ctx, "VM", vm)
    for sr in _required_srs(foreign, vm):
        if _local_sr(local, foreign.get("SR", sr)["uuid"]) is None:
            raise XapiError("VM_REQUIRES_SR", vm, sr)


@handler("VM.assert_can_be_recovered")
def vm_assert_can_be_recovered(ctx: Ctx, vm: str, session_to: str) -> None:
    assert_vm_recoverable(ctx, vm, _check_session_to(ctx, session_to))


@handler("VM.get_SRs_required_for_recovery")
def vm_srs_required(ctx: Ctx, vm: str, session_to: str) -> list[str]:
    local = _check_session_to(ctx, session_to)
    require(ctx, "VM", vm)
    return [sr for sr in _required_srs(ctx.db, vm) if _local_sr(local, ctx.db.get("SR", sr)["uuid"]) is None]


def _copy_vm(ctx: Ctx, foreign: Database, local: Database, vm: str, snapshot_of: str) -> str:
    """One VM (or snapshot) with its VBDs and VIFs, same UUIDs, disks matched by UUID."""
    row = foreign.get("VM", vm)
    skip = {
        "resident_on",
        "scheduled_to_be_resident_on",
        "suspend_VDI",
        "metrics",
        "guest_metrics",
        "affinity",
        "parent",
        "appliance",
        "snapshot_of",
        "suspend_SR",
        "current_operations",
        "protection_policy",
        "snapshot_schedule",
    }
    fields = {k: v for k, v in row.items() if k not in skip and not k.startswith("_")}
    fields.update(
        power_state="Halted",
        domid=-1,
        snapshot_of=snapshot_of,
        appliance=NULL_REF,
        version=int(row["version"]) + 1,
    )
    new = local.create("VM", fields)
    create_vm_metrics(local, new)
    vdi_by_uuid = {rec["uuid"]: ref for ref, rec in local.items("VDI")}
    for vbd in foreign.reverse("VM", "VBDs", vm):
        vrow = foreign.get("VBD", vbd)
        vdi = NULL_REF
        if foreign.exists("VDI", vrow["VDI"]):
            vdi = vdi_by_uuid.get(foreign.get("VDI", vrow["VDI"])["uuid"], NULL_REF)
        local.create(
            "VBD",
            {
                **{k: v for k, v in vrow.items() if k not in ("VM", "VDI", "metrics")},
                "VM": new,
                "VDI": vdi,
                "currently_attached": False,
                "empty": vdi == NULL_REF and vrow["type"] == "CD",
            },
        )
    networks = {rec["name_label"]: ref for ref, rec in local.items("network")}
    bridges = {rec["bridge"]: ref for ref, rec in local.items("network")}
    for vif in foreign.reverse("VM", "VIFs", vm):
        frow = foreign.get("VIF", vif)
        fnet = foreign.get("network", frow["network"]) if foreign.exists("network", frow["network"]) else {}
        net = networks.get(fnet.get("name_label", "")) or bridges.get(fnet.get("bridge", "")) or NULL_REF
        local.create(
            "VIF",
            {
                **{k: v for k, v in frow.items() if k not in ("VM", "network", "metrics")},
                "VM": new,
                "network": net,
                "currently_attached": False,
            },
        )
    return new


def recover_vm(ctx: Ctx, vm: str, local: Database, force: bool) -> str | None:
    """``Xapi_dr.recover_vms`` for one VM: a UUID-preserving metadata import (xapi.md 5.3)."""
    foreign = ctx.db
    assert_vm_recoverable(ctx, vm, local)
    row = foreign.get("VM", vm)
    with local.lock:
        existing = [r for r, rec in local.items("VM") if rec["uuid"] == row["uuid"]]
        if existing:
            old = local.get("VM", existing[0])
            if old["power_state"] != "Halted":
                if force:
                    return None
                raise XapiError("VM_BAD_POWER_STATE", existing[0], "Halted", old["power_state"])
            if int(old["version"]) >= int(row["version"]) and not force:
                raise XapiError(
                    "VM_TO_IMPORT_IS_NOT_NEWER_VERSION", existing[0], old["version"], row["version"]
                )
            for cls in ("VBD", "VIF"):
                for ref in local.reverse("VM", f"{cls}s", existing[0]):
                    local.delete(cls, ref)
            local.delete("VM", existing[0])
        new = _copy_vm(ctx, foreign, local, vm, NULL_REF)
        for snap, srec in foreign.items("VM"):
            if srec["snapshot_of"] == vm and not any(r["uuid"] == srec["uuid"] for _, r in local.items("VM")):
                _copy_vm(ctx, foreign, local, snap, new)
        for sr in _required_srs(foreign, vm):
            local_sr = _local_sr(local, foreign.get("SR", sr)["uuid"])
            if local_sr:
                local.update("SR", local_sr, introduced_by=NULL_REF)
        return new


@handler("VM.recover")
def vm_recover(ctx: Ctx, vm: str, session_to: str, force: bool) -> None:
    recover_vm(ctx, vm, _check_session_to(ctx, session_to), force)


@handler("VM_appliance.assert_can_be_recovered")
def app_assert_can_be_recovered(ctx: Ctx, app: str, session_to: str) -> None:
    local = _check_session_to(ctx, session_to)
    require(ctx, "VM_appliance", app)
    for vm in ctx.db.reverse("VM_appliance", "VMs", app):
        assert_vm_recoverable(ctx, vm, local)


@handler("VM_appliance.get_SRs_required_for_recovery")
def app_srs_required(ctx: Ctx, app: str, session_to: str) -> list[str]:
    require(ctx, "VM_appliance", app)
    out: list[str] = []
    for vm in ctx.db.reverse("VM_appliance", "VMs", app):
        out += [sr for sr in vm_srs_required(ctx, vm, session_to) if sr not in out]
    return out


@handler("VM_appliance.recover")
def app_recover(ctx: Ctx, app: str, session_to: str, force: bool) -> None:
    local = _check_session_to(ctx, session_to)
    row = require(ctx, "VM_appliance", app)
    recovered = [recover_vm(ctx, vm, local, force) for vm in ctx.db.reverse("VM_appliance", "VMs", app)]
    with local.lock:
        existing = [r for r, rec in local.items("VM_appliance") if rec["uuid"] == row["uuid"]]
        target = (
            existing[0]
            if existing
            else local.create(
                "VM_appliance",
                {
                    "uuid": row["uuid"],
                    "name_label": row["name_label"],
                    "name_description": row["name_description"],
                },
            )
        )
        for vm in recovered:
            if vm is not None and not local.get("VM", vm)["is_a_template"]:
                local.update("VM", vm, appliance=target)
