"""XenServer native disaster recovery (xapi.md 5; ``ocaml/xapi/xapi_sr.ml``, ``xapi_dr.ml``,
``xapi_dr_task.ml``, ``xapi_vdi_helpers.ml``, ``xapi_pbd.ml``, ``xapi_vm.ml`` / ``import.ml``
recover, ``xapi_vdi.ml`` open_database).

The storage is the simulated array (:mod:`xencr.sim.array`): a DR-capable SR lives on a LUN that
any pool can attach. A metadata VDI holds a pool database, written by the pool's redo log while
replication to it is enabled (``pool.redo_logs``). A pool that plugs a shared SR reads the
databases of the *foreign* metadata VDIs on it and flags, per foreign pool, the one with the
highest database generation ``metadata_latest`` (``Xapi_dr.update_metadata_latest``).
"""

from __future__ import annotations

import json
import random
import uuid as uuidlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

from xencr.sim.api.ctor import ctor_fields
from xencr.sim.api.metrics import create_vm_metrics, destroy_vm_metrics
from xencr.sim.api.vdi import destroy_vdi, new_vdi
from xencr.sim.array import DATABASE_SUFFIX, SR_METADATA, VDI_FIELDS
from xencr.sim.db import Database, new_ref
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError
from xencr.sim.storage import DR_SR_TYPES
from xencr.sim.values import NULL_REF

if TYPE_CHECKING:
    from xencr.sim.pool_state import PoolState

# Redo_log.minimum_vdi_size (xapi.md 5.2)
METADATA_VDI_SIZE = 3_988_783_104
REDO_LOG_MAX_INSTANCES = 8  # xapi_globs.ml redo_log_max_instances
REDO_LOG_SM_CONFIG = {"type": "raw"}  # Redo_log.redo_log_sm_config
BLANK_LUN_SIZE = 16 * 1024**3  # what a freshly attached, empty simulated LUN reports


def _attached(db: Database, sr: str) -> bool:
    return any(db.get("PBD", p)["currently_attached"] for p in db.reverse("SR", "PBDs", sr))


# ----------------------------------------------------------------------------------- LUN content


def _read_lun(pool: PoolState, lun: str) -> dict[str, Any] | None:
    path = pool.array.lun_dir(lun) / SR_METADATA
    if not path.exists():
        return None
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def _read_database(pool: PoolState, vdi: str) -> dict[str, Any] | None:
    """The pool database a metadata VDI holds, as its redo log last wrote it (None: none)."""
    row = pool.db.get("VDI", vdi)
    lun = pool.storage.lun(row["SR"])
    path = pool.array.lun_dir(lun) / f"{row['uuid']}{DATABASE_SUFFIX}" if lun else None
    if path is None or not path.exists():
        return None
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def scan_lun(ctx: Ctx, sr: str) -> None:
    """SR.scan of a DR-capable SR: introduce the VDIs its metadata lists that this pool lacks,
    with ``metadata_latest=false`` and ``metadata_of_pool`` as the SM stored it (``xapi_sr.ml``
    ``update_vdis``)."""
    db = ctx.db
    lun = ctx.pool.storage.lun(sr)
    doc = _read_lun(ctx.pool, lun) if lun else None
    if doc is None:  # a blank LUN: the SM reports its size
        if int(db.get("SR", sr)["physical_size"]) < 0:
            db.update("SR", sr, physical_size=BLANK_LUN_SIZE)
        return
    known = {rec["uuid"]: ref for ref, rec in db.items("VDI")}
    for entry in doc["vdis"]:
        if entry["uuid"] in known:
            ref = known[entry["uuid"]]
            if db.get("VDI", ref)["metadata_of_pool"] != entry["metadata_of_pool"]:
                db.update("VDI", ref, metadata_of_pool=entry["metadata_of_pool"])
            continue
        fields = {k: entry[k] for k in VDI_FIELDS if k in entry}
        fields.update(metadata_of_pool=entry["metadata_of_pool"], metadata_latest=False)
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


# ------------------------------------------------------------- redo logs (xapi_vdi_helpers.ml)


def _master_dom0(pool: PoolState) -> str:
    db = pool.db
    dom0s = [r for r, rec in db.items("VM") if rec["is_control_domain"]]
    return next((r for r in dom0s if db.get("VM", r)["resident_on"] == pool.master_ref), dom0s[0])


def _destroy_all_vbds(pool: PoolState, vdi: str) -> None:
    for vbd in pool.db.reverse("VDI", "VBDs", vdi):
        pool.db.delete("VBD", vbd)


def enable_replication(pool: PoolState, vdi: str) -> None:
    """``Xapi_vdi_helpers.enable_database_replication``: the limit is checked first (also for a
    VDI already replicated to), then a RW VBD of the master's control domain is plugged and the
    redo log writes the database there; ``metadata_latest`` becomes true."""
    pool.redo_logs.intersection_update(pool.db.refs("VDI"))  # a VDI forgotten meanwhile
    if len(pool.redo_logs) >= REDO_LOG_MAX_INSTANCES:
        raise XapiError("NO_MORE_REDO_LOGS_ALLOWED")
    if vdi in pool.redo_logs:
        return
    db = pool.db
    _destroy_all_vbds(pool, vdi)
    dom0 = _master_dom0(pool)
    used = {db.get("VBD", v)["userdevice"] for v in db.reverse("VM", "VBDs", dom0)}
    slot = next(str(n) for n in range(256) if str(n) not in used)
    db.create(
        "VBD",
        {
            "VM": dom0,
            "VDI": vdi,
            "userdevice": slot,
            "bootable": False,
            "mode": "RW",
            "type": "Disk",
            "unpluggable": True,
            "currently_attached": True,
            "device": f"xvd{chr(ord('a') + int(slot) % 26)}",
        },
    )
    pool.redo_logs.add(vdi)
    db.update("VDI", vdi, metadata_latest=True)


def disable_replication(pool: PoolState, vdi: str) -> None:
    """``Xapi_vdi_helpers.disable_database_replication``: the redo log stops, its VBD goes,
    ``metadata_latest`` becomes false (nothing happens for a VDI not replicated to)."""
    if vdi not in pool.redo_logs:
        return
    pool.redo_logs.discard(vdi)
    db = pool.db
    for vbd in db.reverse("VDI", "VBDs", vdi):
        if db.get("VM", db.get("VBD", vbd)["VM"])["is_control_domain"]:
            db.delete("VBD", vbd)
    db.update("VDI", vdi, metadata_latest=False)


# ------------------------------------------------------ foreign metadata VDIs (xapi_dr.ml cache)


def _update_metadata_latest(pool: PoolState) -> None:
    """Per foreign pool (``metadata_of_pool``), ``metadata_latest`` is true exactly on the cached
    VDIs whose database generation is the highest known for that pool."""
    db = pool.db
    for vdi in [v for v in pool.metadata_cache if not db.exists("VDI", v)]:
        del pool.metadata_cache[vdi]
    by_pool: dict[str, list[tuple[str, int]]] = {}
    for vdi, (generation, _) in pool.metadata_cache.items():
        by_pool.setdefault(db.get("VDI", vdi)["metadata_of_pool"], []).append((vdi, generation))
    for vdis in by_pool.values():
        highest = max(generation for _, generation in vdis)
        for vdi, generation in vdis:
            if db.get("VDI", vdi)["metadata_latest"] != (generation == highest):
                db.update("VDI", vdi, metadata_latest=generation == highest)


def add_vdis_to_cache(pool: PoolState, vdis: list[str]) -> None:
    """Open each VDI's database and cache its generation and pool UUID (a VDI whose database
    cannot be read is left out), then re-evaluate ``metadata_latest``."""
    for vdi in vdis:
        doc = _read_database(pool, vdi) if _attached(pool.db, pool.db.get("VDI", vdi)["SR"]) else None
        if doc is not None:
            pool.metadata_cache[vdi] = (int(doc["generation"]), str(doc.get("pool_uuid", "")))
    _update_metadata_latest(pool)


def remove_vdis_from_cache(pool: PoolState, vdis: list[str]) -> None:
    for vdi in vdis:
        pool.metadata_cache.pop(vdi, None)
    _update_metadata_latest(pool)


def _metadata_vdis_by_pool(pool: PoolState, sr: str) -> tuple[list[str], list[str]]:
    """(metadata VDIs of this pool, metadata VDIs of foreign pools) on ``sr``."""
    db = pool.db
    metadata = [v for v in db.reverse("SR", "VDIs", sr) if db.get("VDI", v)["type"] == "metadata"]
    own = [v for v in metadata if db.get("VDI", v)["metadata_of_pool"] == pool.pool_ref]
    return own, [v for v in metadata if v not in own]


def handle_metadata_vdis(pool: PoolState, sr: str) -> None:
    """A shared SR plugged on the master: cache the foreign metadata VDIs, and replicate again
    to this pool's own one (best effort, as xapi)."""
    own, foreign = _metadata_vdis_by_pool(pool, sr)
    add_vdis_to_cache(pool, foreign)
    if own:
        try:
            enable_replication(pool, own[0])
        except XapiError as err:
            pool.log.info("could not re-enable database replication to VDI %s: %s", own[0], err)


def resume(pool: PoolState) -> None:
    """What xapi does when it starts (``xapi.ml`` start_dr_redo_logs, cache_metadata_vdis):
    replicate again to every SR holding a metadata VDI of this pool, cache the foreign ones."""
    db = pool.db
    with db.lock:
        pool.redo_logs.clear()
        pool.metadata_cache.clear()
        for sr in dict.fromkeys(
            rec["SR"]
            for _, rec in db.items("VDI")
            if rec["type"] == "metadata" and rec["metadata_of_pool"] == pool.pool_ref
        ):
            try:
                _assert_supports(pool.db, sr)
                enable_replication(pool, _find_or_create_metadata_vdi(pool, sr))
            except XapiError as err:
                pool.log.info("could not re-enable database replication to SR %s: %s", sr, err)
        add_vdis_to_cache(
            pool,
            [
                v
                for v, rec in db.items("VDI")
                if rec["type"] == "metadata" and rec["metadata_of_pool"] != pool.pool_ref
            ],
        )


# --------------------------------------------------------------------------------------- SR calls


def _assert_supports(db: Database, sr: str) -> None:
    """``Xapi_sr.assert_supports_database_replication``: every host has a PBD for the SR and
    every PBD is plugged (``SR_HAS_NO_PBDS``), and its SM has ``SR_METADATA``."""
    row = db.get("SR", sr)
    pbds = db.reverse("SR", "PBDs", sr)
    if len({db.get("PBD", p)["host"] for p in pbds}) < len(db.refs("host")):
        raise XapiError("SR_HAS_NO_PBDS", sr)
    if not all(db.get("PBD", p)["currently_attached"] for p in pbds):
        raise XapiError("SR_HAS_NO_PBDS", sr)
    if row["type"] not in DR_SR_TYPES:
        raise XapiError("SR_OPERATION_NOT_SUPPORTED", sr)


@handler("SR.assert_supports_database_replication")
def assert_supports_database_replication(ctx: Ctx, sr: str) -> None:
    require(ctx, "SR", sr)
    _assert_supports(ctx.db, sr)


def _find_or_create_metadata_vdi(pool: PoolState, sr: str) -> str:
    db = pool.db
    for vdi in db.reverse("SR", "VDIs", sr):
        row = db.get("VDI", vdi)
        if (
            row["type"] == "metadata"
            and row["metadata_of_pool"] == pool.pool_ref
            and int(row["virtual_size"]) >= METADATA_VDI_SIZE
        ):
            return vdi
    vdi = new_vdi(
        Ctx(pool, NULL_REF, "VDI.create"),
        sr,
        {
            "name_label": "Metadata for DR",
            "name_description": "Used for disaster recovery",
            "virtual_size": METADATA_VDI_SIZE,
            "type": "metadata",
            "sm_config": dict(REDO_LOG_SM_CONFIG),
        },
        file_size=METADATA_VDI_SIZE,
    )
    db.update("VDI", vdi, metadata_latest=False, metadata_of_pool=pool.pool_ref)
    return vdi


@handler("SR.enable_database_replication")
def enable_database_replication(ctx: Ctx, sr: str) -> None:
    require(ctx, "SR", sr)
    _assert_supports(ctx.db, sr)
    ctx.pool.redo_logs.intersection_update(ctx.db.refs("VDI"))
    if len(ctx.pool.redo_logs) >= REDO_LOG_MAX_INSTANCES:  # before the VDI is found or made
        raise XapiError("NO_MORE_REDO_LOGS_ALLOWED")
    enable_replication(ctx.pool, _find_or_create_metadata_vdi(ctx.pool, sr))


@handler("SR.disable_database_replication")
def disable_database_replication(ctx: Ctx, sr: str) -> None:
    require(ctx, "SR", sr)
    own, _ = _metadata_vdis_by_pool(ctx.pool, sr)
    for vdi in own:
        uuid = ctx.db.get("VDI", vdi)["uuid"]
        disable_replication(ctx.pool, vdi)
        _destroy_all_vbds(ctx.pool, vdi)
        lun = ctx.pool.storage.lun(sr)
        destroy_vdi(ctx, vdi)
        if lun:  # the replicated database goes with its volume
            (ctx.pool.array.lun_dir(lun) / f"{uuid}{DATABASE_SUFFIX}").unlink(missing_ok=True)


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


def plug_pbd(ctx: Ctx, pbd: str) -> None:
    """``PBD.plug``: attach (the SM needs nothing of other pools: LVHD checks no ownership, so a
    LUN another pool has plugged attaches as well), then, for the master's PBD of a shared SR,
    ``Xapi_dr.handle_metadata_vdis`` (message_forwarding.ml)."""
    row = require(ctx, "PBD", pbd)
    sr = row["SR"]
    if not row["currently_attached"]:
        ctx.db.update("PBD", pbd, currently_attached=True)
    if ctx.pool.storage.lun(sr):
        scan_lun(ctx, sr)
    if row["host"] == ctx.pool.master_ref and ctx.db.get("SR", sr)["shared"]:
        handle_metadata_vdis(ctx.pool, sr)


def unplug_pbd(ctx: Ctx, pbd: str) -> None:
    """``Xapi_pbd.unplug``: refused while a VM on the PBD's host has a disk of the SR attached
    (metadata VDIs excepted) → ``VDI_IN_USE [vdis]``; on the SR master the foreign metadata VDIs
    leave the cache (``metadata_latest=false``) and replication to this pool's own stops."""
    db = ctx.db
    row = require(ctx, "PBD", pbd)
    if not row["currently_attached"]:
        return
    sr, host = row["SR"], row["host"]
    in_use = []
    for vm, rec in db.items("VM"):
        if rec["resident_on"] != host:
            continue
        for vbd in db.reverse("VM", "VBDs", vm):
            vrow = db.get("VBD", vbd)
            vdi = vrow["VDI"]
            active = (vrow["currently_attached"] or vrow.get("reserved")) and not vrow["empty"]
            if active and db.exists("VDI", vdi) and vdi not in in_use:
                vdi_row = db.get("VDI", vdi)
                if vdi_row["SR"] == sr and vdi_row["type"] != "metadata":
                    in_use.append(vdi)
    if in_use:
        raise XapiError("VDI_IN_USE", *in_use)
    if host == ctx.pool.master_ref:
        own, foreign = _metadata_vdis_by_pool(ctx.pool, sr)
        remove_vdis_from_cache(ctx.pool, foreign)
        for vdi in foreign:
            db.update("VDI", vdi, metadata_latest=False)
        for vdi in own:
            disable_replication(ctx.pool, vdi)
    db.update("PBD", pbd, currently_attached=False)


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


def _unplug_all(ctx: Ctx, sr: str) -> None:
    """Unplug the SR's attached PBDs, the master's last (``Xapi_sr.get_pbds ~master_pos:`Last``)."""
    master = ctx.pool.master_ref
    pbds = [p for p in ctx.db.reverse("SR", "PBDs", sr) if ctx.db.get("PBD", p)["currently_attached"]]
    for pbd in sorted(pbds, key=lambda p: ctx.db.get("PBD", p)["host"] == master):
        unplug_pbd(ctx, pbd)


@handler("DR_task.destroy")
def dr_task_destroy(ctx: Ctx, task: str) -> None:
    require(ctx, "DR_task", task)
    for sr, rec in ctx.db.items("SR"):
        if rec["introduced_by"] != task:
            continue
        _unplug_all(ctx, sr)
        forget_sr(ctx, sr)
    ctx.db.delete("DR_task", task)


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
    doc = _read_database(ctx.pool, vdi)
    if doc is None:
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
    ctx.pool.foreign_dbs[session] = Database.from_doc(doc)
    return session


@handler("VDI.read_database_pool_uuid")
def read_database_pool_uuid(ctx: Ctx, vdi: str) -> str:
    """The pool UUID cached when the VDI's SR was plugged (``""`` for a VDI not in the cache:
    this pool's own metadata VDIs, or one whose database could not be read)."""
    require(ctx, "VDI", vdi)
    cached = ctx.pool.metadata_cache.get(vdi)
    return cached[1] if cached else ""


# ------------------------------------------------------------------------------------------ recover


def _required_srs(foreign: Database, vm: str) -> list[str]:
    """``list_required_SRs``: SRs of the VM's non-CD VBDs' VDIs, except ISO SRs, as a set (sorted)."""
    out: set[str] = set()
    for vbd in foreign.reverse("VM", "VBDs", vm):
        row = foreign.get("VBD", vbd)
        if row["type"] == "CD" or not foreign.exists("VDI", row["VDI"]):
            continue
        sr = foreign.get("VDI", row["VDI"])["SR"]
        if foreign.exists("SR", sr) and foreign.get("SR", sr)["content_type"] != "iso":
            out.add(sr)
    return sorted(out)


def _missing_sr(foreign: Database, local: Database, sr: str) -> str | None:
    """The ref ``VM_REQUIRES_SR`` names when the target lacks ``sr``: the local SR with that UUID
    when it has no attached PBD, the foreign ref when no such SR exists; None when present."""
    uuid = foreign.get("SR", sr)["uuid"]
    local_refs = [ref for ref, rec in local.items("SR") if rec["uuid"] == uuid]
    if not local_refs:
        return sr
    return None if _attached(local, local_refs[0]) else local_refs[0]


def _local_sr(local: Database, uuid: str) -> str | None:
    for ref, rec in local.items("SR"):
        if rec["uuid"] == uuid and _attached(local, ref):
            return ref
    return None


def _check_session_to(ctx: Ctx, session_to: str, action: str) -> Database:
    """``Xapi_dr.assert_session_allows_dr``: ``session_to`` must be able to call
    ``VDI.open_database``, which a database session cannot."""
    ctx.pool.check_session(session_to)
    if session_to in ctx.pool.foreign_dbs:
        raise XapiError(
            "RBAC_PERMISSION_DENIED",
            action,
            "The supplied session does not have the required permissions for VM recovery.",
        )
    return ctx.pool.db


def assert_vm_recoverable(ctx: Ctx, vm: str, local: Database) -> None:
    foreign = ctx.db
    require(ctx, "VM", vm)
    for sr in _required_srs(foreign, vm):
        missing = _missing_sr(foreign, local, sr)
        if missing is not None:
            raise XapiError("VM_REQUIRES_SR", vm, missing)


@handler("VM.assert_can_be_recovered")
def vm_assert_can_be_recovered(ctx: Ctx, vm: str, session_to: str) -> None:
    ctx.pool.check_session(session_to)
    assert_vm_recoverable(ctx, vm, ctx.pool.db)


@handler("VM.get_SRs_required_for_recovery")
def vm_srs_required(ctx: Ctx, vm: str, session_to: str) -> list[str]:
    ctx.pool.check_session(session_to)
    require(ctx, "VM", vm)
    local = ctx.pool.db
    return [sr for sr in _required_srs(ctx.db, vm) if _local_sr(local, ctx.db.get("SR", sr)["uuid"]) is None]


@dataclass
class _Plan:
    """What the import does with one VM of the foreign database (``import.ml`` VM.precheck)."""

    vm: str  # foreign ref
    replace: str | None  # the local VM with the same UUID that goes first
    skip: bool  # forced import of a VM whose namesake is not halted


def _plan(foreign: Database, local: Database, vm: str, force: bool) -> _Plan:
    row = foreign.get("VM", vm)
    existing = [r for r, rec in local.items("VM") if rec["uuid"] == row["uuid"]]
    if not existing:
        return _Plan(vm, None, False)
    old = local.get("VM", existing[0])
    if old["power_state"] != "Halted":
        if force:
            return _Plan(vm, None, True)
        raise XapiError("VM_BAD_POWER_STATE", existing[0], "Halted", old["power_state"])
    if int(old["version"]) >= int(row["version"]) and not force:
        raise XapiError("VM_TO_IMPORT_IS_NOT_NEWER_VERSION", existing[0], old["version"], row["version"])
    return _Plan(vm, existing[0], False)


# VM fields the import sets itself rather than copying (import.ml VM.handle, export.ml make_vm).
_VM_NOT_COPIED = frozenset(
    {
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
        "allowed_operations",
        "protection_policy",
        "snapshot_schedule",
        "crash_dumps",
        "consoles",
        "blobs",
    }
)


def _destroy_local_vm(local: Database, vm: str) -> None:
    """The Replace branch: the existing VM's VIFs, VBDs, then the VM (with its metrics)."""
    for cls in ("VIF", "VBD"):
        for ref in local.reverse("VM", f"{cls}s", vm):
            local.delete(cls, ref)
    destroy_vm_metrics(local, vm)
    local.delete("VM", vm)


def _create_vm(pool: PoolState, foreign: Database, vm: str, task: str) -> str:
    """``import.ml`` VM.handle do_import for a full restore: same UUID, version + 1, no appliance,
    fresh generation id, Halted (Suspended when its suspend VDI is present), ``import_task`` in
    other_config, affinity to a host of the same UUID, metrics copied from the foreign database."""
    local = pool.db
    row = foreign.get("VM", vm)
    fields = {k: v for k, v in row.items() if k not in _VM_NOT_COPIED and not k.startswith("_")}
    other_config = {k: v for k, v in row["other_config"].items() if k != "grant_api_access"}
    other_config["import_task"] = task
    fields.update(
        power_state="Halted",
        domid=-1,
        appliance=NULL_REF,
        version=int(row["version"]) + 1,
        other_config=other_config,
    )
    if row["ha_restart_priority"] in ("0", "1", "2", "3"):  # pre-Boston priorities
        fields.update(ha_restart_priority="restart", order=int(row["ha_restart_priority"]))
    if not row["is_a_template"] and row["generation_id"] != "":
        fields["generation_id"] = f"{random.getrandbits(63)}:{random.getrandbits(63)}"
    hosts = {rec["uuid"]: ref for ref, rec in local.items("host")}
    if foreign.exists("host", row["affinity"]):
        fields["affinity"] = hosts.get(foreign.get("host", row["affinity"])["uuid"], NULL_REF)
    if row["power_state"] == "Suspended" and foreign.exists("VDI", row["suspend_VDI"]):
        suspend_uuid = foreign.get("VDI", row["suspend_VDI"])["uuid"]
        suspend = [r for r, v in local.items("VDI") if v["uuid"] == suspend_uuid]
        if suspend:
            fields.update(power_state="Suspended", suspend_VDI=suspend[0])
    new = local.create("VM", fields)
    if foreign.exists("VM_metrics", row["metrics"]):
        foreign_metrics = foreign.get("VM_metrics", row["metrics"])
        metrics = {k: v for k, v in foreign_metrics.items() if not k.startswith("_")}
        metrics["uuid"] = str(uuidlib.uuid4())
        if fields["power_state"] == "Suspended":
            metrics["current_domain_type"] = row["domain_type"]
        local.update("VM", new, metrics=local.create("VM_metrics", metrics))
    else:
        create_vm_metrics(local, new)
    return new


def _network_for(pool: PoolState, foreign: Database, net: str, task: str) -> str:
    """``import.ml`` Net: a network of the same name, else of the same bridge, else a copy of
    the foreign one tagged with ``import_task``."""
    local = pool.db
    if not foreign.exists("network", net):
        return NULL_REF
    row = foreign.get("network", net)
    for ref, rec in local.items("network"):
        if rec["name_label"] == row["name_label"]:
            return ref
    for ref, rec in local.items("network"):
        if rec["bridge"] == row["bridge"]:
            return ref
    skip = ("current_operations", "allowed_operations")
    fields = {k: v for k, v in row.items() if k not in skip and not k.startswith("_")}
    fields.update(uuid=str(uuidlib.uuid4()), other_config={**row["other_config"], "import_task": task})
    return local.create("network", fields)


def recover_vms(ctx: Ctx, vms: list[str], local: Database, force: bool) -> list[str]:
    """``Xapi_dr.recover_vms``: the VMs with their snapshots exported from the foreign database
    and imported as a full restore (xapi.md 5.3). Every VM is checked before anything changes
    (a failed import without ``force`` is cleaned up). Returns the VMs (and snapshots) created."""
    foreign = ctx.db
    pool = ctx.pool
    objects: list[str] = []
    for vm in vms:
        for obj in [vm] + [s for s, rec in foreign.items("VM") if rec["snapshot_of"] == vm]:
            if obj not in objects:
                objects.append(obj)
    with local.lock:
        plans = [_plan(foreign, local, obj, force) for obj in objects]
        task = new_ref()  # the "Importing VMs" task, gone once the import returns
        table: dict[str, str] = {}
        for plan in plans:
            if plan.skip:
                continue
            if plan.replace is not None:
                _destroy_local_vm(local, plan.replace)
            table[plan.vm] = _create_vm(pool, foreign, plan.vm, task)
        vdis = {rec["uuid"]: ref for ref, rec in local.items("VDI")}
        networks: dict[str, str] = {}
        for old, new in table.items():
            for vbd in foreign.reverse("VM", "VBDs", old):
                row = foreign.get("VBD", vbd)
                vdi = NULL_REF
                if not row["empty"] and foreign.exists("VDI", row["VDI"]):
                    vdi = vdis.get(foreign.get("VDI", row["VDI"])["uuid"], NULL_REF)
                if vdi == NULL_REF and row["type"] == "Disk":
                    continue  # import.ml: "cannot have empty disks"
                fields = {
                    k: v
                    for k, v in row.items()
                    if k not in ("VM", "VDI", "metrics", "current_operations", "allowed_operations")
                    and not k.startswith("_")
                }
                fields.update(VM=new, VDI=vdi, device="", currently_attached=False, empty=vdi == NULL_REF)
                local.create("VBD", fields)
            for vif in foreign.reverse("VM", "VIFs", old):
                row = foreign.get("VIF", vif)
                if row["network"] not in networks:
                    networks[row["network"]] = _network_for(pool, foreign, row["network"], task)
                fields = {
                    k: v
                    for k, v in row.items()
                    if k not in ("VM", "network", "metrics", "current_operations", "allowed_operations")
                    and not k.startswith("_")
                }
                fields.update(VM=new, network=networks[row["network"]], currently_attached=False)
                local.create("VIF", fields)
        by_uuid = {rec["uuid"]: ref for ref, rec in local.items("VM")}
        for old, new in table.items():  # import.ml update_snapshot_and_parent_links
            row = foreign.get("VM", old)
            for field in ("snapshot_of", "parent"):
                target = row[field]
                link = table.get(target)
                if link is None and foreign.exists("VM", target):
                    link = by_uuid.get(foreign.get("VM", target)["uuid"])
                local.update("VM", new, **{field: link or NULL_REF})
        recovered = list(table.values())
        for vm in recovered:  # Xapi_dr.clear_sr_introduced_by
            for vbd in local.reverse("VM", "VBDs", vm):
                vdi = local.get("VBD", vbd)["VDI"]
                if local.get("VBD", vbd)["type"] != "CD" and local.exists("VDI", vdi):
                    local_sr = local.get("VDI", vdi)["SR"]
                    if local.get("SR", local_sr)["content_type"] != "iso":
                        local.update("SR", local_sr, introduced_by=NULL_REF)
        return recovered


@handler("VM.recover")
def vm_recover(ctx: Ctx, vm: str, session_to: str, force: bool) -> None:
    local = _check_session_to(ctx, session_to, "VM.recover")
    assert_vm_recoverable(ctx, vm, local)
    recover_vms(ctx, [vm], local, force)


@handler("VM_appliance.assert_can_be_recovered")
def app_assert_can_be_recovered(ctx: Ctx, app: str, session_to: str) -> None:
    ctx.pool.check_session(session_to)
    require(ctx, "VM_appliance", app)
    for vm in ctx.db.reverse("VM_appliance", "VMs", app):
        assert_vm_recoverable(ctx, vm, ctx.pool.db)


@handler("VM_appliance.get_SRs_required_for_recovery")
def app_srs_required(ctx: Ctx, app: str, session_to: str) -> list[str]:
    require(ctx, "VM_appliance", app)
    out: set[str] = set()
    for vm in ctx.db.reverse("VM_appliance", "VMs", app):
        out.update(vm_srs_required(ctx, vm, session_to))
    return sorted(out)


@handler("VM_appliance.recover")
def app_recover(ctx: Ctx, app: str, session_to: str, force: bool) -> None:
    """``Xapi_vm_appliance.recover``: its VMs recovered in one import, then the appliance found
    by UUID (emptied, renamed) or re-created with the same UUID, holding the non-template VMs."""
    local = _check_session_to(ctx, session_to, "VM_appliance.recover")
    row = require(ctx, "VM_appliance", app)
    for vm in ctx.db.reverse("VM_appliance", "VMs", app):
        assert_vm_recoverable(ctx, vm, local)
    recovered = recover_vms(ctx, ctx.db.reverse("VM_appliance", "VMs", app), local, force)
    with local.lock:
        existing = [r for r, rec in local.items("VM_appliance") if rec["uuid"] == row["uuid"]]
        if existing:
            target = existing[0]
            for vm in local.reverse("VM_appliance", "VMs", target):
                local.update("VM", vm, appliance=NULL_REF)
            local.update(
                "VM_appliance", target, name_label=row["name_label"], name_description=row["name_description"]
            )
        else:
            target = local.create(
                "VM_appliance",
                {
                    "uuid": row["uuid"],
                    "name_label": row["name_label"],
                    "name_description": row["name_description"],
                },
            )
        for vm in recovered:
            if not local.get("VM", vm)["is_a_template"]:
                local.update("VM", vm, appliance=target)
