"""Full or delta, per disk and per target, with the reason a user is shown.

Delta needs: an intact restore point of this job on the target (`ownership`: protected, never
started, exactly as xencr left it) whose source snapshot still exists on the source, and its copy
of the disk unchanged since the transfer (compared with its commit snapshot). A replica found
detached (started, unprotected, changed...) is never a base: when it is newer than any base, its
reason is the reason shown for the full ("replica started")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.replication.ownership import RestorePoint
from xencr.replication.source import Disk, disks_of
from xencr.replication.target import xo_restore_points
from xencr.xapi.handlers import TransferError
from xencr.xapi.session import XapiSession
from xencr.xapi.transfer import changed_blocks


class SeedPending(TransferError):
    """A seed of this VM was written to files and not imported yet: sending a full copy over the
    network is what the seed is there to avoid, so the run refuses (``--full`` overrides)."""


@dataclass(frozen=True)
class DiskPlan:
    disk: Disk
    reason: str  # why full, or "delta"
    base_source_vdi: str | None = None  # source snapshot VDI the delta is relative to
    base_target_vdi: str | None = None  # target commit snapshot the new VDI is cloned from
    chain: int = 0  # deltas since the last full, this one included
    path: str = "stream"  # "stream" or "nbd" (`path.choose`)
    path_reason: str = ""  # why that path ("NBD + CBT", "stream: no NBD network on pool a"...)
    changed: bytes | None = field(default=None, repr=False)  # CBT bitmap of an NBD delta

    @property
    def kind(self) -> str:
        return "delta" if self.base_source_vdi else "full"


@dataclass(frozen=True)
class TargetPlan:
    disks: list[DiskPlan]
    base: RestorePoint | None
    points: list[RestorePoint]


def _vm_level_reason(rp: RestorePoint) -> str | None:
    # Xen Orchestra's legacy procedure blocked `start` only (xo-compat.md 6.2).
    if not (rp.protected or (rp.xo and "start" in rp.record["blocked_operations"])):
        return "replica unprotected"
    if rp.record["power_state"] != "Halted":
        return "replica started"
    return None


def plan_target(
    src: XapiSession,
    t: XapiSession,
    *,
    job_id: str,
    vm_uuid: str,
    sr_uuid: str,
    previous: list[tuple[str, dict[str, Any]]],
    disks: list[Disk],
    full_interval: int,
    force_full: bool,
    probe: bool = True,
    xo_snapshots: list[tuple[str, dict[str, Any]]] | None = None,
) -> TargetPlan:
    """``previous``: this job's earlier snapshots of the VM on the source, oldest first;
    ``xo_snapshots``: its other snapshots, which a Xen Orchestra chain may continue from."""
    found = ownership.survey(t, job_id, vm_uuid, sr_uuid)
    points = found.points

    def all_full(reason: str) -> TargetPlan:
        return TargetPlan([DiskPlan(d, reason) for d in disks], None, points)

    if force_full:
        return all_full("full forced")
    # The target is the truth: the base is the newest restore point whose source snapshot still
    # exists (a run killed between the commit and the source bookkeeping loses nothing).
    by_uuid = {rec["uuid"]: (ref, rec) for ref, rec in previous}
    rp = next((p for p in reversed(points) if p.copy_of in by_uuid), None)
    if rp is None and xo_snapshots:
        # No chain of ours: continue one Xen Orchestra left (classic keys or a seed).
        xo_by_uuid = {rec["uuid"]: (ref, rec) for ref, rec in xo_snapshots}
        # Legacy CR named its base on the source VM itself; the key is read, never required.
        vm_oc = src.api.VM.get_other_config(src.api.VM.get_by_uuid(vm_uuid))
        legacy = vm_oc.get(md.XO_BASE_DELTA + sr_uuid)
        legacy = legacy if legacy in xo_by_uuid else None
        rp = next(
            (
                p
                for p in reversed(xo_restore_points(t, vm_uuid, sr_uuid, legacy_copy_of=legacy))
                if p.copy_of in xo_by_uuid
            ),
            None,
        )
        by_uuid |= xo_by_uuid
    if rp is None:
        seeds = [rec for _, rec in previous if rec["other_config"].get(md.SEED)]
        if seeds:
            snap = seeds[-1]
            raise SeedPending(
                f"a seed of this VM (snapshot {snap['uuid']}, exported"
                f" {snap['other_config'][md.SEED][:19].replace('T', ' ')}) has no replica on this SR yet:"
                " import it with `xencr seed import`, or run with --full to send a full copy"
            )
        taken = found.newest_detached
        if taken is not None and (not points or taken[0] > points[-1].snapshot_time):
            return all_full(f"replica {taken[1]}")
        return all_full("base snapshot deleted" if points else "first run")
    base_snap = by_uuid[rp.copy_of][0]
    vm_reason = _vm_level_reason(rp)
    if vm_reason:
        return all_full(vm_reason)
    base_disks = {d.userdevice: d for d in disks_of(src, base_snap)}
    plans = []
    for d in disks:
        b = base_disks.get(d.userdevice)
        held = rp.disks.get(d.userdevice)
        reason = None
        if b is None or held is None:
            reason = "disk added"
        elif b.size != d.size:
            reason = "disk resized"
        elif held[2] != b.uuid:
            reason = "disk replaced"
        elif held[1] is None and not rp.xo:
            reason = "replica commit snapshot missing"
        elif probe and held[1] is not None and changed_blocks(t, held[0], held[1]) > 0:
            reason = "replica disk modified"
        if reason is None and b is not None and held is not None:
            # Xen Orchestra's live replica disks are their own base (its classic flow clones them).
            base_vdi = held[1] or held[0]
            chain = int(t.api.VDI.get_other_config(base_vdi).get(md.FULL_COUNT, "0")) + 1
            if full_interval and chain >= full_interval:
                reason = "full interval reached"
            else:
                why = f"continues Xen Orchestra replica {rp.uuid}" if rp.xo else "delta"
                plans.append(DiskPlan(d, why, b.vdi, base_vdi, chain))
                continue
        plans.append(DiskPlan(d, reason or "no base"))
    return TargetPlan(plans, rp, points)
