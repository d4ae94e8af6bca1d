"""NBD + CBT or the VHD stream, per disk, and why: the one rule (SPEC §13).

- ``transfer = "stream"``: the stream.
- ``transfer = "auto"`` or ``"nbd"``: NBD where the source pool serves the snapshot's disk over NBD
  (`VDI.get_nbd_info` names a host: a network has the ``nbd`` or ``insecure_nbd`` purpose and a
  host sees the SR). Otherwise the stream (``auto``, the reason said: ``no NBD network on pool a``)
  or the VM fails (``nbd``).
- On the NBD path a full reads the allocated extents. A delta needs an unbroken CBT chain from the
  base snapshot to the new one: CBT on in both VDIs (the base may be data-destroyed: its CBT log
  is what counts) and `VDI.list_changed_blocks(base, new)` answering. Anything else (CBT off when
  the base was taken, disabled or reset since, the base gone, XAPI refusing) is a broken chain and
  **never a wrong delta**: XAPI's VHD stream delta when the base snapshot still holds its data
  (the pool's own walker computes the difference from the VHD chain), else a full over NBD.
- On the stream path, a delta against a base whose data was destroyed is impossible: a full.

`enable_cbt` turns CBT on for the source disks before the snapshot (xencr says so), so that the
next run has a chain; the first run after that has none yet."""

from __future__ import annotations

import base64
from dataclasses import dataclass, replace

from xencr.config import TransferPath
from xencr.replication.decide import DiskPlan, TargetPlan
from xencr.replication.source import Disk
from xencr.xapi.errors import XapiError
from xencr.xapi.nbd import CBT_UNIT, endpoints, nbd_networks
from xencr.xapi.session import XapiSession


class NbdRequired(Exception):
    """``transfer = "nbd"`` and the pool cannot serve the disk over NBD: the line says why."""


@dataclass(frozen=True)
class PoolPaths:
    """What the source pool offers, asked once per VM."""

    pool: str  # its name in the configuration
    nbd: str | None  # None: it serves NBD; else why not


def offer(src: XapiSession, pool: str, transfer: TransferPath) -> PoolPaths:
    if transfer == "stream":
        return PoolPaths(pool, "stream configured")
    return PoolPaths(pool, None if nbd_networks(src) else f"no NBD network on pool {pool}")


def enable_cbt(src: XapiSession, disks: list[Disk], offered: PoolPaths) -> list[str]:
    """CBT on for each disk that lacks it, where the NBD path may be taken; a line each."""
    if offered.nbd is not None:
        return []
    out = []
    for d in disks:
        if not src.api.VDI.get_cbt_enabled(d.vdi):
            src.call_once("VDI.enable_cbt", d.vdi)
            out.append(f"enabled changed block tracking on disk {d.userdevice} ({d.name}) for NBD + CBT")
    return out


def _cbt_break(src: XapiSession, base: str, new: str) -> tuple[str | None, bytes | None]:
    """(why the CBT chain from ``base`` to ``new`` is broken, None) or (None, the bitmap)."""
    base_rec = src.api.VDI.get_record(base)
    if not base_rec["cbt_enabled"]:
        return f"CBT was off when base snapshot {base_rec['uuid']} was taken", None
    if not src.api.VDI.get_cbt_enabled(new):
        return "CBT was turned off on the disk since the base snapshot", None
    try:
        text = str(src.call_once("VDI.list_changed_blocks", base, new))
    except XapiError as err:
        return f"CBT chain broken: {err}", None
    return None, base64.b64decode(text)


def _data_destroyed(src: XapiSession, vdi: str) -> bool:
    return str(src.api.VDI.get_type(vdi)) == "cbt_metadata"


def choose(src: XapiSession, plan: TargetPlan, offered: PoolPaths, transfer: TransferPath) -> TargetPlan:
    """``plan`` with each disk's path, its CBT bitmap (NBD deltas) and the reason."""
    out = []
    for dp in plan.disks:
        nbd_why = offered.nbd
        if nbd_why is None and not endpoints(src, dp.disk.vdi):
            nbd_why = f"disk {dp.disk.userdevice} is not served over NBD by pool {offered.pool}"
        if nbd_why is not None and transfer == "nbd":
            raise NbdRequired(f'transfer = "nbd": {nbd_why}')
        base = dp.base_source_vdi
        if nbd_why is not None:
            if base is not None and _data_destroyed(src, base):
                out.append(
                    _full(dp, "base snapshot data destroyed (no NBD to read it by CBT)", "stream", nbd_why)
                )
            else:
                out.append(replace(dp, path="stream", path_reason=f"stream: {nbd_why}"))
            continue
        if base is None:
            out.append(replace(dp, path="nbd", path_reason="NBD"))
            continue
        why, changed = _cbt_break(src, base, dp.disk.vdi)
        if why is None:
            out.append(replace(dp, path="nbd", path_reason="NBD + CBT", changed=changed))
        elif _data_destroyed(src, base):
            out.append(_full(dp, why, "nbd", "NBD"))
        else:
            out.append(replace(dp, path="stream", path_reason=f"stream: {why}"))
    return replace(plan, disks=out)


def _full(dp: DiskPlan, why: str, path: str, path_reason: str) -> DiskPlan:
    return DiskPlan(dp.disk, why, path=path, path_reason=path_reason)


def predict(src: XapiSession, dp: DiskPlan, offered: PoolPaths, transfer: TransferPath) -> DiskPlan:
    """What `choose` will decide for this disk at the next run, read without a snapshot (`xencr
    plan`): the live disk stands for the snapshot to come; its CBT is on when xencr enables it."""
    nbd_why = offered.nbd
    if nbd_why is None and not endpoints(src, dp.disk.vdi):
        nbd_why = f"disk {dp.disk.userdevice} is not served over NBD by pool {offered.pool}"
    if nbd_why is not None and transfer == "nbd":
        return replace(dp, path="none", path_reason=f'fails: transfer = "nbd": {nbd_why}')
    base = dp.base_source_vdi
    if nbd_why is not None:
        if base is not None and _data_destroyed(src, base):
            return _full(dp, "base snapshot data destroyed (no NBD to read it by CBT)", "stream", nbd_why)
        return replace(dp, path="stream", path_reason=f"stream: {nbd_why}")
    cbt_note = "" if src.api.VDI.get_cbt_enabled(dp.disk.vdi) else " (xencr enables CBT on the disk first)"
    if base is None:
        return replace(dp, path="nbd", path_reason="NBD" + cbt_note)
    base_rec = src.api.VDI.get_record(base)
    why = None
    if not base_rec["cbt_enabled"]:
        why = f"CBT was off when base snapshot {base_rec['uuid']} was taken"
    elif cbt_note:
        why = "CBT is off on the disk"
    if why is None:
        return replace(dp, path="nbd", path_reason="NBD + CBT")
    if _data_destroyed(src, base):
        return _full(dp, why, "nbd", "NBD")
    return replace(dp, path="stream", path_reason=f"stream: {why}" + cbt_note)


def changed_estimate(src: XapiSession, base: str, disk: Disk) -> int:
    """Bytes an NBD delta of ``disk`` against ``base`` would read now: its changed 64 KiB units by
    CBT (the disk of a running VM cannot be asked: XAPI says VDI_IN_USE; then the whole disk)."""
    try:
        bitmap = base64.b64decode(str(src.call_once("VDI.list_changed_blocks", base, disk.vdi)))
    except XapiError:
        return disk.size
    return sum(bin(b).count("1") for b in bitmap) * CBT_UNIT
