"""Changed block tracking: VDI.enable_cbt / disable_cbt / list_changed_blocks / data_destroy
(``ocaml/xapi/xapi_vdi.ml`` ``check_operation_error``, ``change_cbt_status``,
``list_changed_blocks``, ``_data_destroy``, ``wait_for_vbds_to_be_unplugged_and_destroyed``;
sm ``libs/sm/VDI.py``). The logs themselves are :mod:`xencr.sim.cbt`.
"""

from __future__ import annotations

import base64
import time

from xencr.sim import knobs
from xencr.sim.api.vdi import assert_managed
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError

# xapi_vdi.ml data_destroy: "Wait for 4 seconds in total for all the VBDs of this VDI to be
# unplugged & destroyed" (scaled by the pool's sim_delay_scale, as every xapi timeout here)
DATA_DESTROY_WAIT = 4.0


def _check_cbt_toggle(ctx: Ctx, vdi: str) -> dict[str, object]:
    """``check_operation_error`` for enable_cbt/disable_cbt, in xapi's order."""
    row = require(ctx, "VDI", vdi)
    if row["type"] == "cbt_metadata":
        raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
    if row["is_a_snapshot"]:
        raise XapiError("OPERATION_NOT_ALLOWED", f"VDI is a snapshot: {vdi}")
    if row["type"] not in ("user", "system"):
        raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, row["type"])
    if row["on_boot"] == "reset":
        raise XapiError("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")
    return row


@handler("VDI.enable_cbt")
def enable_cbt(ctx: Ctx, vdi: str) -> None:
    """Starts an empty log (sm ``configure_blocktracking``); idempotent."""
    row = _check_cbt_toggle(ctx, vdi)
    if not row["cbt_enabled"]:
        storage = ctx.pool.storage
        storage.cbt.enable(storage.sr_dir(str(row["SR"])), str(row["uuid"]), int(str(row["virtual_size"])))
        ctx.db.update("VDI", vdi, cbt_enabled=True)


@handler("VDI.disable_cbt")
def disable_cbt(ctx: Ctx, vdi: str) -> None:
    """Deletes the VDI's log: the chain from its snapshots to later ones is broken; idempotent."""
    row = _check_cbt_toggle(ctx, vdi)
    if row["cbt_enabled"]:
        storage = ctx.pool.storage
        storage.cbt.disable(storage.sr_dir(str(row["SR"])), str(row["uuid"]))
        ctx.db.update("VDI", vdi, cbt_enabled=False)


def bitmap(changed: list[int], units: int) -> bytes:
    """One bit per 64 KiB block, MSB first (bit i = byte i>>3, mask 0x80 >> (i & 7))."""
    out = bytearray((units + 7) // 8)
    for i in changed:
        out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


@handler("VDI.list_changed_blocks")
def list_changed_blocks(ctx: Ctx, vdi_from: str, vdi_to: str) -> str:
    """The base64 bitmap of the 64 KiB blocks written after ``vdi_from`` up to ``vdi_to``.

    ``VDI_IN_USE [vdi_to, "list_changed_blocks"]`` while ``vdi_to`` is attached (other than to a
    snapshot VM); then sm's answer (``SR_BACKEND_FAILURE_460`` for the same VDI twice, a VDI
    without a log or two logs not chained in that order)."""
    db = ctx.db
    require(ctx, "VDI", vdi_from)
    dst = require(ctx, "VDI", vdi_to)
    attached = [
        v
        for v in db.reverse("VDI", "VBDs", vdi_to)
        if db.get("VBD", v)["currently_attached"]
        and not (
            db.exists("VM", db.get("VBD", v)["VM"]) and db.get("VM", db.get("VBD", v)["VM"])["is_a_snapshot"]
        )
    ]
    if attached:
        raise XapiError("VDI_IN_USE", vdi_to, "list_changed_blocks")
    storage = ctx.pool.storage
    # sm works on the SR of vdi_to (xapi passes that SR) and looks the logs up there
    changed = storage.cbt.changed_blocks(
        storage.sr_dir(dst["SR"]), db.get("VDI", vdi_from)["uuid"], str(dst["uuid"])
    )
    return base64.b64encode(changed).decode()


@handler("VDI.data_destroy", locked=False)
def data_destroy(ctx: Ctx, vdi: str) -> None:
    """Delete a CBT-enabled snapshot's data, keeping its CBT log: the VDI becomes
    ``cbt_metadata``. First waits up to 4 s for every VBD of the VDI to be gone (a snapshot VM's
    included: destroy the snapshot VM first), else ``VDI_IN_USE [vdi, "data_destroy"]``."""
    db = ctx.db
    with db.lock:
        row = require(ctx, "VDI", vdi)
        if not row["is_a_snapshot"]:
            raise XapiError("OPERATION_NOT_ALLOWED", f"VDI is not a snapshot: {vdi}")
        if not row["cbt_enabled"]:
            raise XapiError("VDI_NO_CBT_METADATA", vdi)
        if row["type"] == "cbt_metadata":
            return  # idempotent
        assert_managed(row, vdi)
        previous_type = row["type"]
        # marked at once, so that no new VBD is made for it meanwhile (xapi_vdi.ml)
        db.update("VDI", vdi, type="cbt_metadata")
        deadline = time.monotonic() + DATA_DESTROY_WAIT * knobs.delay_scale(db)
        while db.exists("VDI", vdi) and db.reverse("VDI", "VBDs", vdi):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                db.update("VDI", vdi, type=previous_type)
                raise XapiError("VDI_IN_USE", vdi, "data_destroy")
            db.changed.wait(remaining)
        if not db.exists("VDI", vdi):
            raise XapiError("HANDLE_INVALID", "VDI", vdi)
        storage = ctx.pool.storage
        sr = db.get("VDI", vdi)["SR"]
        # FileVDI.delete(data_only=True): the VHD goes, the record and the CBT log stay
        storage.delete_file(vdi)
        storage.refresh(sr)
    ctx.pool.gc.kick(sr)
