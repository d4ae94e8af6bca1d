"""network.* (``xapi_network.ml`` create/destroy).

A network needs no PIF: one without (an internal network, e.g. xencr's isolated test network)
gets a bridge ``xapi<N>`` (N from a counter per xapi process, skipping names in use) and its VIFs
plug like any others. ``destroy`` refuses while a VIF on it is attached (``NETWORK_CONTAINS_VIF``
with those VIFs) or while it has PIFs (``NETWORK_CONTAINS_PIF``), then destroys its other VIFs.
"""

from __future__ import annotations

from typing import Any

from xencr.sim.api.ctor import ctor_fields
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError

BRIDGE_BLACKLIST = ("xen", "xapi", "vif", "tap", "eth")  # xapi_network.ml bridge_blacklist


@handler("network.create")
def create(ctx: Ctx, record: dict[str, Any]) -> str:
    fields = ctor_fields("network", record)
    if int(fields.get("MTU") or 0) <= 0:
        fields["MTU"] = 1500
    used = {rec["bridge"] for _, rec in ctx.db.items("network")}
    bridge = str(fields.get("bridge") or "")
    if not bridge:
        while True:
            bridge = f"xapi{ctx.pool.bridge_counter}"
            ctx.pool.bridge_counter += 1
            if bridge not in used:
                break
    else:
        # client sessions only: pool-internal ones (VM import) are trusted
        if len(bridge) > 15 or bridge.startswith(BRIDGE_BLACKLIST):
            raise XapiError("INVALID_VALUE", "bridge", bridge)
        if bridge in used:
            raise XapiError("BRIDGE_NAME_EXISTS", bridge)
    fields["bridge"] = bridge
    return ctx.db.create("network", fields)


@handler("network.destroy")
def destroy(ctx: Ctx, network: str) -> None:
    db = ctx.db
    require(ctx, "network", network)
    vifs = db.reverse("network", "VIFs", network)
    connected = [
        v for v in vifs if db.get("VIF", v)["currently_attached"] or db.get("VIF", v).get("reserved")
    ]
    if connected:
        raise XapiError("NETWORK_CONTAINS_VIF", *connected)
    pifs = list(db.record("network", network).get("PIFs", []))  # no PIF is simulated: always []
    if pifs:
        raise XapiError("NETWORK_CONTAINS_PIF", *pifs)
    if str(db.get("network", network)["other_config"].get("is_host_internal_management_network")) == "true":
        raise XapiError("CANNOT_DESTROY_SYSTEM_NETWORK", network)
    for vif in vifs:  # "destroy all the VIFs now rather than wait for the GC thread"
        db.delete("VIF", vif)
    db.delete("network", network)
