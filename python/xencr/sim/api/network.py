"""network.* (generated constructor; ``xapi_network.ml`` picks a bridge name)."""

from __future__ import annotations

from typing import Any

from xencr.sim.api.ctor import ctor_fields
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError


@handler("network.create")
def create(ctx: Ctx, record: dict[str, Any]) -> str:
    fields = ctor_fields("network", record)
    if not fields.get("bridge"):
        used = {rec["bridge"] for _, rec in ctx.db.items("network")}
        n = 0
        while f"xapi{n}" in used:
            n += 1
        fields["bridge"] = f"xapi{n}"
    return ctx.db.create("network", fields)


@handler("network.destroy")
def destroy(ctx: Ctx, network: str) -> None:
    require(ctx, "network", network)
    vifs = ctx.db.reverse("network", "VIFs", network)
    connected = [v for v in vifs if ctx.db.get("VIF", v)["currently_attached"]]
    if connected:  # xapi_network.ml destroy
        raise XapiError("NETWORK_CONTAINS_VIF", *connected)
    ctx.db.delete("network", network)
