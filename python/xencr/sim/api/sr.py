"""SR.* and PBD.* for file-based VHD SRs (enough for listing, scanning and space accounting)."""

from __future__ import annotations

from xencr.sim.api import dr
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError


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
    row = require(ctx, "PBD", pbd)
    sr = row["SR"]
    for vdi in ctx.db.reverse("SR", "VDIs", sr):
        for vbd in ctx.db.reverse("VDI", "VBDs", vdi):
            if ctx.db.get("VBD", vbd)["currently_attached"]:
                raise XapiError("VDI_IN_USE", vdi, "unplug")  # chosen without source
    ctx.db.update("PBD", pbd, currently_attached=False)
