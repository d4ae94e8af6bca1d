"""network.* (``xapi_network.ml`` create/destroy/add_purpose/remove_purpose).

A network needs no PIF: one without (an internal network, e.g. xencr's isolated test network)
gets a bridge ``xapi<N>`` (N from a counter per xapi process, skipping names in use) and its VIFs
plug like any others. ``destroy`` refuses while a VIF on it is attached (``NETWORK_CONTAINS_VIF``
with those VIFs) or while it has PIFs (``NETWORK_CONTAINS_PIF``), then destroys its other VIFs.

Purposes (``nbd``, ``insecure_nbd``) open the hosts' NBD service on the network (xapi's firewall
follows them, ``network_event_loop.ml``); the two exclude each other pool-wide.
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
    pifs = db.reverse("network", "PIFs", network)  # the layout's networks have PIFs, created ones none
    if pifs:
        raise XapiError("NETWORK_CONTAINS_PIF", *pifs)
    if str(db.get("network", network)["other_config"].get("is_host_internal_management_network")) == "true":
        raise XapiError("CANNOT_DESTROY_SYSTEM_NETWORK", network)
    for vif in vifs:  # "destroy all the VIFs now rather than wait for the GC thread"
        db.delete("VIF", vif)
    db.delete("network", network)


@handler("network.add_purpose", locked=False)
def add_purpose(ctx: Ctx, network: str, value: str) -> None:
    """``assert_network_is_managed`` (``NETWORK_UNMANAGED [network]``), then, unless the network
    already has it, ``NETWORK_INCOMPATIBLE_PURPOSES [new, conflicting]`` when any network of the
    pool has the other NBD purpose; the new purpose goes first."""
    db = ctx.db
    with db.lock:
        row = require(ctx, "network", network)
        if not row["managed"]:
            raise XapiError("NETWORK_UNMANAGED", network)
        current = list(row["purpose"])
        if value in current:
            return
        conflicting = {"nbd": "insecure_nbd", "insecure_nbd": "nbd"}[value]
        for _, other in db.items("network"):
            if conflicting in other["purpose"]:
                raise XapiError("NETWORK_INCOMPATIBLE_PURPOSES", value, conflicting)
        db.update("network", network, purpose=[value, *current])
    ctx.pool.nbd_changed()


@handler("network.remove_purpose", locked=False)
def remove_purpose(ctx: Ctx, network: str, value: str) -> None:
    """Silent when the network does not have the purpose."""
    db = ctx.db
    with db.lock:
        row = require(ctx, "network", network)
        if value not in row["purpose"]:
            return
        db.update("network", network, purpose=[p for p in row["purpose"] if p != value])
    ctx.pool.nbd_changed()
