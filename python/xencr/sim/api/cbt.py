"""Changed block tracking: VDI.enable_cbt / disable_cbt / list_changed_blocks / data_destroy
(``ocaml/xapi/xapi_vdi.ml`` ``check_operation_error``, ``change_cbt_status``, ``_data_destroy``;
xapi.md 3.6).

The simulator derives the changed-block bitmap from the content of the two VDIs (the engine's
``diff`` at 64 KiB granularity) instead of keeping a write log: a block rewritten with identical
data is not reported, which a real CBT log would report. A data-destroyed snapshot keeps its file
as the stand-in for its CBT log, but no longer exposes data (type ``cbt_metadata``).
"""

from __future__ import annotations

import base64

from xencr.sim.api.vdi import assert_not_in_use
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError, sr_backend_failure
from xencr.sim.storage import engine

CBT_BLOCK = 64 * 1024


def _check_cbt_toggle(ctx: Ctx, vdi: str) -> None:
    row = require(ctx, "VDI", vdi)
    if row["is_a_snapshot"]:
        raise XapiError("OPERATION_NOT_ALLOWED", f"VDI is a snapshot: {vdi}")
    if row["type"] not in ("user", "system"):
        raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, row["type"])
    if row["on_boot"] == "reset":
        raise XapiError("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")


@handler("VDI.enable_cbt")
def enable_cbt(ctx: Ctx, vdi: str) -> None:
    _check_cbt_toggle(ctx, vdi)
    ctx.db.update("VDI", vdi, cbt_enabled=True)


@handler("VDI.disable_cbt")
def disable_cbt(ctx: Ctx, vdi: str) -> None:
    _check_cbt_toggle(ctx, vdi)
    ctx.db.update("VDI", vdi, cbt_enabled=False)


def bitmap(changed: list[int], units: int) -> bytes:
    """One bit per 64 KiB block, MSB first (bit i = byte i>>3, mask 0x80 >> (i & 7))."""
    out = bytearray((units + 7) // 8)
    for i in changed:
        out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


@handler("VDI.list_changed_blocks", locked=False)
def list_changed_blocks(ctx: Ctx, vdi_from: str, vdi_to: str) -> str:
    db = ctx.db
    storage = ctx.pool.storage
    with db.lock:
        src, dst = require(ctx, "VDI", vdi_from), require(ctx, "VDI", vdi_to)
        attached = [
            v
            for v in db.reverse("VDI", "VBDs", vdi_to)
            if db.get("VBD", v)["currently_attached"]
            and not db.get("VM", db.get("VBD", v)["VM"])["is_a_snapshot"]
        ]
        if attached:
            raise XapiError("VDI_IN_USE", vdi_to, "list_changed_blocks")
        if not (src["cbt_enabled"] and dst["cbt_enabled"]):
            raise sr_backend_failure(
                460,
                "Failed to calculate changed blocks for given VDIs. [opterr=CBT is not enabled on both VDIs]",
            )
        a, a_parents = str(storage.path(vdi_from)), storage.parents(vdi_from)
        b, b_parents = str(storage.path(vdi_to)), storage.parents(vdi_to)
        ctx.pool.gc.transfer(src["SR"], +1)
        ctx.pool.gc.transfer(dst["SR"], +1)
    try:
        report = engine().diff(a, b, granularity=CBT_BLOCK, a_parents=a_parents, b_parents=b_parents)
    finally:
        ctx.pool.gc.transfer(src["SR"], -1)
        ctx.pool.gc.transfer(dst["SR"], -1)
    return base64.b64encode(bitmap(list(report["changed"]), int(report["units"]))).decode()


@handler("VDI.data_destroy")
def data_destroy(ctx: Ctx, vdi: str) -> None:
    row = require(ctx, "VDI", vdi)
    if row["type"] == "cbt_metadata":
        return  # idempotent
    if not row["is_a_snapshot"]:
        raise XapiError("OPERATION_NOT_ALLOWED", f"VDI is not a snapshot: {vdi}")
    if not row["cbt_enabled"]:
        raise XapiError("VDI_NO_CBT_METADATA", vdi)
    assert_not_in_use(ctx.db, vdi, "data_destroy")
    for vbd in ctx.db.reverse("VDI", "VBDs", vdi):
        ctx.db.delete("VBD", vbd)
    ctx.db.update("VDI", vdi, type="cbt_metadata")
