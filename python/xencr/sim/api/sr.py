"""SR.* and PBD.* (enough for listing, scanning and space accounting, and for DR: SR.create and
SR.destroy of LVM-over-iSCSI/HBA SRs on the simulated array)."""

from __future__ import annotations

import shutil

from xencr.sim.api import dr
from xencr.sim.array import SR_METADATA, valid_lun
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError, sr_backend_failure
from xencr.sim.storage import DR_SR_TYPES

# sm drivers/LVHDSR.py FLAG_USE_VHD, set by every SR.create (no legacy mode)
FLAG_USE_VHD = "use_vhd"


@handler("SR.scan")
def scan(ctx: Ctx, sr: str) -> None:
    require(ctx, "SR", sr)
    if ctx.pool.storage.lun(sr):
        dr.scan_lun(ctx, sr)
    ctx.pool.storage.refresh(sr)


@handler("SR.forget")
def forget(ctx: Ctx, sr: str) -> None:
    dr.forget_sr(ctx, sr)


@handler("PBD.plug")
def plug(ctx: Ctx, pbd: str) -> None:
    require(ctx, "PBD", pbd)
    dr.plug_pbd(ctx, pbd)


@handler("PBD.unplug")
def unplug(ctx: Ctx, pbd: str) -> None:
    dr.unplug_pbd(ctx, pbd)


def _check_lvm_device_config(type_: str, device_config: dict[str, str]) -> str:
    """The SM's ``load`` checks, in its order; returns the LUN's SCSIid. iSCSI (BaseISCSI.py,
    LVHDoISCSISR.py): ``target`` (95), ``targetIQN`` (96), ``SCSIid`` (107); HBA
    (LVHDoHBASR.py): ``SCSIid`` (107). Codes from XE_SR_ERRORCODES.xml."""
    if type_ == "lvmoiscsi":
        if not device_config.get("target"):
            raise sr_backend_failure(95, "The request is missing the target parameter")
        if not device_config.get("targetIQN"):
            raise sr_backend_failure(96, "The request is missing or has an incorrect target IQN parameter")
    scsiid = device_config.get("SCSIid", "")
    if not valid_lun(scsiid):
        raise sr_backend_failure(107, "The SCSIid parameter is missing or incorrect")
    return scsiid


@handler("SR.create")
def create(
    ctx: Ctx,
    host: str,
    device_config: dict[str, str],
    physical_size: int,
    name_label: str,
    name_description: str,
    type_: str,
    content_type: str,
    shared: bool,
    sm_config: dict[str, str],
) -> str:
    """``Xapi_sr.create`` for LVM over iSCSI/HBA: the SR record, a PBD per host (master first)
    when shared else on ``host``, the SM's create, then every PBD plugged.

    The SM (LVHDoISCSISR/LVHDSR ``create``) refuses a LUN that a PBD of *this* pool already
    names (``SR_BACKEND_FAILURE_16`` SRInUse, ``util.test_SCSIid``); anything else on the LUN,
    another pool's SR included, is overwritten (``lvutil.createVG``: ``dd`` + ``pvcreate -ff``).
    """
    require(ctx, "host", host)
    kind = type_.lower()
    if kind not in DR_SR_TYPES:
        raise XapiError("NOT_IMPLEMENTED", "SR.create")  # only LVM over iSCSI/HBA is simulated
    scsiid = _check_lvm_device_config(kind, device_config)
    db = ctx.db
    for _, pbd in db.items("PBD"):
        if pbd["device_config"].get("SCSIid") == scsiid:
            raise sr_backend_failure(16, "The SR device is currently in use")
    sr = dr.introduce(ctx, "", name_label, name_description, kind, content_type, shared, dict(sm_config))
    master = ctx.pool.master_ref
    hosts = [master] + [h for h in ctx.pool.hosts() if h != master] if shared else [host]
    pbds = [
        dr.pbd_create(ctx, {"host": h, "SR": sr, "device_config": dict(device_config), "other_config": {}})
        for h in hosts
    ]
    if (ctx.pool.array.lun_dir(scsiid) / SR_METADATA).exists():
        # what a real array does too; another pool that has the LUN plugged loses its SR
        ctx.pool.log.warning("SR.create formats LUN %s, which held an SR", scsiid)
    ctx.pool.array.format(scsiid)
    db.update(
        "SR",
        sr,
        physical_size=dr.BLANK_LUN_SIZE,
        physical_utilisation=0,
        sm_config={**db.get("SR", sr)["sm_config"], FLAG_USE_VHD: "true", "devserial": f"scsi-{scsiid}"},
    )
    for pbd in pbds:
        dr.plug_pbd(ctx, pbd)
    ctx.pool.storage.refresh(sr)
    return str(sr)


@handler("SR.destroy")
def destroy(ctx: Ctx, sr: str) -> None:
    """``SR.destroy`` (message_forwarding.ml, ``Xapi_sr_operations`` checks in their order):
    ``SR_HAS_PBD [sr]`` while a PBD is plugged, ``SR_HAS_NO_PBDS [sr]`` without PBDs,
    ``SR_NOT_EMPTY []`` while it holds a managed VDI; then the SM deletes it (the LUN's volume
    group, or the file SR's directory) and the SR, its PBDs and VDI records are forgotten."""
    db = ctx.db
    require(ctx, "SR", sr)
    pbds = db.reverse("SR", "PBDs", sr)
    if any(db.get("PBD", p)["currently_attached"] for p in pbds):
        raise XapiError("SR_HAS_PBD", sr)
    if not pbds:
        raise XapiError("SR_HAS_NO_PBDS", sr)
    vdis = [db.get("VDI", v) for v in db.reverse("SR", "VDIs", sr)]
    if any(v["managed"] and v["type"] != "rrd" for v in vdis):
        raise XapiError("SR_NOT_EMPTY")
    lun = ctx.pool.storage.lun(sr)
    directory = ctx.pool.storage.sr_dir(sr)
    dr.forget_sr(ctx, sr)
    if lun:
        ctx.pool.array.format(lun)
    else:
        shutil.rmtree(directory, ignore_errors=True)
