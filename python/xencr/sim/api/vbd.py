"""VBD.* (``ocaml/xapi/xapi_vbd.ml``, ``xapi_vbd_helpers.ml``; xapi.md 1.9, 2.4, 3.8)."""

from __future__ import annotations

import re
from typing import Any

from xencr.sim.api.ctor import ctor_fields
from xencr.sim.db import Database
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError
from xencr.sim.values import NULL_REF

MAX_USERDEVICE = 254  # xapi_vm_helpers.allowed_VBD_devices_HVM = 0..254


def _device_number(userdevice: str) -> int | None:
    """Numeric slot of a userdevice ("3", "xvdd", "hdd", "sdd"); None if invalid."""
    if userdevice.isdigit():
        return int(userdevice)
    m = re.fullmatch(r"(?:xvd|hd|sd)([a-z]+)", userdevice)
    if not m:
        return None
    n = 0
    for ch in m.group(1):
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def used_slots(db: Database, vm: str) -> set[int]:
    out = set()
    for ref in db.reverse("VM", "VBDs", vm):
        n = _device_number(db.get("VBD", ref)["userdevice"])
        if n is not None:
            out.add(n)
    return out


def create_vbd(ctx: Ctx, fields: dict[str, Any]) -> str:
    db = ctx.db
    vm = fields["VM"]
    require(ctx, "VM", vm)
    vdi = fields["VDI"]
    if vdi != NULL_REF:
        vdi_row = require(ctx, "VDI", vdi)
        if fields["mode"] == "RW" and vdi_row["read_only"]:
            raise XapiError("VDI_READONLY", vdi)
        if vdi_row["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
    if fields["empty"] and fields["type"] not in ("CD", "Floppy"):
        raise XapiError("VBD_NOT_REMOVABLE_MEDIA", "in constructor")
    used = used_slots(db, vm)
    userdevice = fields["userdevice"]
    if userdevice == "autodetect":
        free = [n for n in range(MAX_USERDEVICE + 1) if n not in used]
        if not free:
            raise XapiError("INVALID_DEVICE", userdevice)  # xapi_vbd.ml: no possibility left
        userdevice = str(free[0])
    n = _device_number(userdevice)
    if n is None or n > MAX_USERDEVICE:
        raise XapiError("INVALID_DEVICE", userdevice)
    if n in used:
        raise XapiError("DEVICE_ALREADY_EXISTS", userdevice)
    fields["userdevice"] = userdevice
    fields.setdefault("currently_attached", False)
    return db.create("VBD", fields)


@handler("VBD.create")
def create(ctx: Ctx, record: dict[str, Any]) -> str:
    return create_vbd(ctx, ctor_fields("VBD", record))


@handler("VBD.destroy")
def destroy(ctx: Ctx, vbd: str) -> None:
    row = require(ctx, "VBD", vbd)
    if row["currently_attached"]:
        vm_uuid = ctx.db.get("VM", row["VM"])["uuid"] if ctx.db.exists("VM", row["VM"]) else ""
        raise XapiError("OPERATION_NOT_ALLOWED", f"VBD '{row['uuid']}' still attached to '{vm_uuid}'")
    ctx.db.delete("VBD", vbd)


def _check_plug(ctx: Ctx, vbd: str, op: str) -> dict[str, Any]:
    """``xapi_vbd_helpers.ml`` check_operation_error for plug/unplug (first error wins)."""
    row = require(ctx, "VBD", vbd)
    if op != "plug" and not row["unpluggable"]:
        raise XapiError("VBD_NOT_UNPLUGGABLE", vbd)
    power = ctx.db.get("VM", row["VM"])["power_state"]
    if power != "Running":
        raise XapiError("VM_BAD_POWER_STATE", row["VM"], "running", power.lower())
    if op == "plug" and row["currently_attached"]:
        raise XapiError("DEVICE_ALREADY_ATTACHED", vbd)
    if op != "plug" and not row["currently_attached"]:
        raise XapiError("DEVICE_ALREADY_DETACHED", vbd)
    return row


@handler("VBD.plug")
def plug(ctx: Ctx, vbd: str) -> None:
    _check_plug(ctx, vbd, "plug")
    ctx.db.update("VBD", vbd, currently_attached=True)


@handler("VBD.unplug")
def unplug(ctx: Ctx, vbd: str) -> None:
    _check_plug(ctx, vbd, "unplug")
    ctx.db.update("VBD", vbd, currently_attached=False)


@handler("VBD.unplug_force")
def unplug_force(ctx: Ctx, vbd: str) -> None:
    _check_plug(ctx, vbd, "unplug_force")
    ctx.db.update("VBD", vbd, currently_attached=False)
