"""`xencr seed link`: make a hand-made copy of a VM (its snapshot exported, imported on the
target, never started) the restore point a job's next delta continues from.

Everything is checked before the first write; the writes come in an order where an
interruption leaves nothing a run would misuse or destroy, and running the command again
finishes the job. Our layout: the target VM becomes a complete restore point with a commit
snapshot per disk. ``--xo``: Xen Orchestra's keys, as `xo-cr-seed` writes them plus what its
current design also needs (xo-compat.md 6.3), so that XO continues the chain."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from xencr.replication import metadata as md
from xencr.replication.source import Disk, disks_of
from xencr.replication.target import seal
from xencr.xapi.errors import XapiError
from xencr.xapi.session import XapiSession


class SeedRefused(Exception):
    """The link would be wrong; ``str()`` is one line, and nothing was written."""


@dataclass(frozen=True)
class Pairing:
    """A source snapshot and the target VM made from it, disk by disk (by user device)."""

    snapshot: str
    snapshot_rec: dict[str, Any]
    source_vm_rec: dict[str, Any]
    target_vm: str
    target_rec: dict[str, Any]
    sr_uuid: str
    pairs: list[tuple[Disk, Disk]]  # (source snapshot disk, target disk)
    when: datetime  # the snapshot's moment


@dataclass
class Step:
    """One write: what it does (printed by --dry-run) and how."""

    what: str
    run: Callable[[], object] = field(repr=False)


def _vm_by_uuid(s: XapiSession, uuid: str, side: str) -> str:
    try:
        return str(s.api.VM.get_by_uuid(uuid))
    except XapiError as err:
        if err.code == "UUID_INVALID":
            raise SeedRefused(f"no VM or snapshot with UUID {uuid} on the {side} pool") from None
        raise


def snapshot_time(rec: dict[str, Any]) -> datetime:
    """A VM record's `snapshot_time` (an XML-RPC DateTime or its text) as an aware UTC time."""
    raw = str(rec["snapshot_time"]).replace("-", "").replace(":", "")
    for fmt in ("%Y%m%dT%H%M%SZ", "%Y%m%dT%H%M%S"):
        try:
            return datetime.strptime(raw, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise SeedRefused(f"snapshot {rec['uuid']} has an unreadable snapshot_time {rec['snapshot_time']!r}")


def pair(src: XapiSession, snapshot_uuid: str, tgt: XapiSession, target_vm_uuid: str) -> Pairing:
    """Check that ``snapshot_uuid`` is a snapshot of a VM, that ``target_vm_uuid`` is a halted
    VM, and that their disks pair up by user device with equal sizes, on one target SR."""
    snap = _vm_by_uuid(src, snapshot_uuid, "source")
    srec = src.api.VM.get_record(snap)
    if not srec["is_a_snapshot"]:
        raise SeedRefused(
            f"{snapshot_uuid} is a VM, not a snapshot: give the UUID of the snapshot you exported"
        )
    try:
        vm_rec = src.api.VM.get_record(srec["snapshot_of"])
    except XapiError:
        raise SeedRefused(f"the VM snapshot {snapshot_uuid} was taken of no longer exists") from None
    target = _vm_by_uuid(tgt, target_vm_uuid, "target")
    trec = tgt.api.VM.get_record(target)
    if trec["is_a_snapshot"] or trec["is_a_template"] or trec["is_control_domain"]:
        kind = "a snapshot" if trec["is_a_snapshot"] else "a template" if trec["is_a_template"] else "dom0"
        raise SeedRefused(f"target {target_vm_uuid} is {kind}, not the VM you imported")
    if trec["uuid"] in (vm_rec["uuid"], srec["uuid"]):
        raise SeedRefused("the target VM is the source VM itself")
    if trec["power_state"] != "Halted":
        raise SeedRefused(
            f"target VM {target_vm_uuid} is {trec['power_state']}: it must be halted, and never have been"
            " started since the import"
        )
    oc = trec["other_config"]
    if oc.get(md.ROLE) == "replica" and oc.get(md.COPY_OF) != snapshot_uuid:
        raise SeedRefused(
            f"target VM {target_vm_uuid} is already a replica of job {oc.get(md.JOB)} (of snapshot"
            f" {oc.get(md.COPY_OF)})"
        )
    sdisks = {d.userdevice: d for d in disks_of(src, snap)}
    tdisks = {d.userdevice: d for d in disks_of(tgt, target, with_nobak=True)}
    if not sdisks:
        raise SeedRefused(f"snapshot {snapshot_uuid} has no disk to replicate")
    if set(sdisks) != set(tdisks):
        raise SeedRefused(
            f"the disks do not pair up by user device: snapshot has {_devices(sdisks)}, target VM has"
            f" {_devices(tdisks)}"
        )
    for dev, sd in sdisks.items():
        td = tdisks[dev]
        if sd.size != td.size:
            raise SeedRefused(
                f"disk {dev}: the snapshot's is {sd.size} bytes, the target VM's {td.size} bytes"
                " (virtual sizes must be equal)"
            )
    srs = {str(tgt.api.SR.get_uuid(tgt.api.VDI.get_SR(d.vdi))) for d in tdisks.values()}
    if len(srs) != 1:
        raise SeedRefused(f"the target VM's disks are on {len(srs)} SRs; a replica lives on one")
    pairs = [(sdisks[dev], tdisks[dev]) for dev in sorted(sdisks, key=_order)]
    # A job's own snapshot carries its moment to the microsecond, as every restore point of the
    # job does (XAPI's snapshot_time has whole seconds: a link would sort before a newer one).
    ours = md.parse_stamp(srec["other_config"].get(md.SNAPSHOT_TIME, ""))
    return Pairing(snap, srec, vm_rec, target, trec, srs.pop(), pairs, ours or snapshot_time(srec))


def _order(dev: str) -> int:
    return int(dev) if dev.isdigit() else 99


def _devices(disks: dict[str, Disk]) -> str:
    if not disks:
        return "no disk"
    return ", ".join(
        f"{dev} ({d.size} bytes)" for dev, d in sorted(disks.items(), key=lambda x: _order(x[0]))
    )


def _merge(s: XapiSession, cls: str, ref: str, keys: dict[str, str], drop: tuple[str, ...] = ()) -> None:
    """Set ``keys`` in an object's other_config (and remove ``drop``), leaving the rest alone."""
    api = getattr(s.api, cls)
    oc = {k: v for k, v in dict(api.get_other_config(ref)).items() if k not in drop}
    api.set_other_config(ref, oc | keys)


def _protect(s: XapiSession, vm: str) -> None:
    for op in md.PROTECTED_OPS:
        s.api.VM.remove_from_blocked_operations(vm, op)
        s.api.VM.add_to_blocked_operations(vm, op, md.START_BLOCKED)


def _describe(obj: str, keys: dict[str, str], drop: tuple[str, ...] = ()) -> str:
    parts = [f"{k}={v}" for k, v in keys.items()] + [f"-{k}" for k in drop]
    return f"{obj}: other_config " + ", ".join(parts)


def xencr_steps(src: XapiSession, tgt: XapiSession, p: Pairing, job_id: str, schedule_id: str) -> list[Step]:
    """Our layout. Order: protect the target VM; a commit snapshot per disk; its disks' keys; the
    VM's keys with `complete` and its seal (the commit point: from here it is a restore point);
    last, the source snapshot's keys (from then on the job keeps it as the next delta's base)."""
    source_vm = p.source_vm_rec["uuid"]
    keys = {
        md.JOB: job_id,
        md.SCHEDULE: schedule_id,
        md.VM: source_vm,
        md.SR: p.sr_uuid,
        md.SNAPSHOT_TIME: md.precise(p.when),
    }
    steps = [
        Step(f"target VM {p.target_rec['uuid']}: block start, start_on", lambda: _protect(tgt, p.target_vm))
    ]
    for sd, td in p.pairs:
        disk_keys = keys | {md.COPY_OF: sd.uuid, md.FULL_COUNT: "0", md.COMPLETE: "true"}
        steps.append(
            Step(
                f"target disk {td.userdevice} ({td.uuid}): commit snapshot with "
                + ", ".join(f"{k}={v}" for k, v in (disk_keys | {md.ROLE: "commit-snapshot"}).items()),
                partial(_commit_snapshot, tgt, td.vdi, disk_keys),
            )
        )
    name = f"{p.source_vm_rec['name_label']} ({md.stamp(p.when)})"
    startup = {
        f"xencr:{k}": str(p.source_vm_rec.get(k, "")) for k in ("order", "start_delay", "ha_restart_priority")
    }
    vm_keys = (
        keys
        | startup
        | {md.COPY_OF: p.snapshot_rec["uuid"], md.ROLE: "replica", md.COMPLETE: "true", md.BYTES: "0"}
    )
    steps.append(
        Step(
            f"target VM {p.target_rec['uuid']}: name_label {name!r}",
            partial(_name, tgt, p.target_vm, name, md.TAGS),
        )
    )
    for sd, td in p.pairs:
        disk_keys = keys | {
            md.COPY_OF: sd.uuid,
            md.FULL_COUNT: "0",
            md.COMPLETE: "true",
            md.ROLE: "replica-disk",
            md.SELF: td.uuid,
        }
        steps.append(
            Step(
                _describe(f"target disk {td.userdevice} ({td.uuid})", disk_keys),
                partial(_merge, tgt, "VDI", td.vdi, disk_keys, _VERDICTS),
            )
        )
    # The commit point: the VM's keys and its seal (`ownership`) in one write.
    steps.append(
        Step(
            _describe(f"target VM {p.target_rec['uuid']}", vm_keys | {md.SELF: p.target_rec["uuid"]})
            + f", {md.SEAL}=<seal of the VM as linked>",
            lambda: seal(tgt, p.target_vm, vm_keys),
        )
    )
    src_keys = {
        md.JOB: job_id,
        md.SCHEDULE: schedule_id,
        md.VM: source_vm,
        md.SNAPSHOT_TIME: md.precise(p.when),
        md.ROLE: "source-snapshot",
    }
    steps.append(
        Step(
            _describe(f"source snapshot {p.snapshot_rec['uuid']}", src_keys, (md.SEED,)),
            lambda: _merge(src, "VM", p.snapshot, src_keys, (md.SEED,)),
        )
    )
    for sd, _ in p.pairs:
        steps.append(
            Step(
                _describe(f"source snapshot disk {sd.userdevice} ({sd.uuid})", src_keys),
                partial(_merge, src, "VDI", sd.vdi, src_keys),
            )
        )
    return steps


def _name(s: XapiSession, vm: str, name: str, tags: tuple[str, ...]) -> None:
    s.api.VM.set_name_label(vm, name)
    have = set(s.api.VM.get_tags(vm))
    for tag in tags:
        if tag not in have:
            s.api.VM.add_tags(vm, tag)


def _commit_snapshot(t: XapiSession, vdi: str, keys: dict[str, str]) -> str:
    """The disk's commit snapshot (reused if a previous attempt made it): the immutable copy the
    next delta is cloned from, and what tells later whether the disk was written to."""
    for snap in t.api.VDI.get_snapshots(vdi):
        oc = t.api.VDI.get_other_config(snap)
        if oc.get(md.ROLE) == "commit-snapshot" and oc.get(md.COPY_OF) == keys[md.COPY_OF]:
            _merge(t, "VDI", str(snap), keys | {md.ROLE: "commit-snapshot"}, _VERDICTS)
            return str(snap)
    snap = str(t.api.VDI.snapshot(vdi, {}))
    own = {md.ROLE: "commit-snapshot", md.SELF: str(t.api.VDI.get_uuid(snap))}
    _merge(t, "VDI", snap, keys | own, _VERDICTS)
    return snap


# A link is the administrator's word: an earlier verdict on these objects (a run that saw an
# interrupted link's half-written keys) no longer holds.
_VERDICTS = (md.DETACHED, md.EXPIRING)


# -- Xen Orchestra's layout


def xo_steps(src: XapiSession, tgt: XapiSession, p: Pairing, job_id: str, schedule_id: str) -> list[Step]:
    """What `xo-cr-seed` writes (xo-compat.md 6.1), completed so that both XO designs continue
    the chain (6.3): the source snapshot's VM *and* VDIs carry the backup keys (current XO reads
    the VDIs only), the live target disks `xo:copy_of` (classic XO), and a snapshot of the
    target VM whose disks carry the content keys (current XO updates that VM in place)."""
    source_vm = p.source_vm_rec["uuid"]
    when = md.stamp(p.when)
    common = {md.XO_DATETIME: when, md.XO_JOB: job_id, md.XO_SCHEDULE: schedule_id, md.XO_VM: source_vm}
    steps: list[Step] = []
    # Target first: a half-written seed then has no source keys, and XO ignores it.
    for sd, td in p.pairs:
        keys = {md.XO_COPY_OF: sd.uuid}
        steps.append(
            Step(
                _describe(f"target disk {td.userdevice} ({td.uuid})", keys),
                partial(_merge, tgt, "VDI", td.vdi, keys),
            )
        )
    name = f"{p.source_vm_rec['name_label']} ({when})"
    vm_keys = common | {md.XO_SR: p.sr_uuid, md.XO_COPY_OF: p.snapshot_rec["uuid"]}
    steps.append(
        Step(
            f"target VM {p.target_rec['uuid']}: name_label {name!r}",
            partial(_name, tgt, p.target_vm, name, ("Continuous Replication",)),
        )
    )
    steps.append(
        Step(
            _describe(f"target VM {p.target_rec['uuid']}", vm_keys),
            lambda: _merge(tgt, "VM", p.target_vm, vm_keys),
        )
    )
    steps.append(
        Step(f"target VM {p.target_rec['uuid']}: block start, start_on", lambda: _protect(tgt, p.target_vm))
    )
    steps.append(
        Step(
            f"target VM {p.target_rec['uuid']}: a snapshot whose disks carry "
            + ", ".join(f"{k}" for k in _xo_target_disk_keys(common, p.sr_uuid, "<source disk>"))
            + " (what current XO continues from)",
            lambda: _xo_target_snapshot(tgt, p, common),
        )
    )
    src_vm_keys = common | {md.XO_EXPORTED: "true", md.XO_CHAIN_LENGTH: "0"}
    drop = (md.XO_COPY_OF, md.XO_SR)
    steps.append(
        Step(
            _describe(f"source snapshot {p.snapshot_rec['uuid']}", src_vm_keys, drop),
            lambda: _merge(src, "VM", p.snapshot, src_vm_keys, drop),
        )
    )
    for sd, _ in p.pairs:
        keys = src_vm_keys | {md.XO_CONTENT_KEY: sd.uuid}
        steps.append(
            Step(
                _describe(f"source snapshot disk {sd.userdevice} ({sd.uuid})", keys, drop),
                partial(_merge, src, "VDI", sd.vdi, keys, drop),
            )
        )
    return steps


def _xo_target_disk_keys(common: dict[str, str], sr_uuid: str, source_vdi: str) -> dict[str, str]:
    return common | {
        md.XO_SR: sr_uuid,
        md.XO_COPY_OF: source_vdi,
        md.XO_CONTENT_KEY: source_vdi,
        md.XO_QCOW2_FIX: "true",
    }


def _xo_target_snapshot(t: XapiSession, p: Pairing, common: dict[str, str]) -> None:
    """A snapshot of the target VM, as XO takes after each transfer (VM.snapshot copies the VM's
    other_config; the disks' content keys are set on the snapshot's VDIs). Reused on a re-run."""
    existing = [
        s
        for s in t.api.VM.get_snapshots(p.target_vm)
        if t.api.VM.get_other_config(s).get(md.XO_COPY_OF) == p.snapshot_rec["uuid"]
    ]
    snap = (
        str(existing[0])
        if existing
        else str(t.api.VM.snapshot(p.target_vm, f"{p.target_rec['name_label']} (seed)"))
    )
    _merge(
        t,
        "VM",
        snap,
        common | {md.XO_SR: p.sr_uuid, md.XO_COPY_OF: p.snapshot_rec["uuid"], md.XO_QCOW2_FIX: "true"},
    )
    by_device = {sd.userdevice: sd for sd, _ in p.pairs}
    for d in disks_of(t, snap, with_nobak=True):
        sd = by_device.get(d.userdevice)
        if sd is not None:
            _merge(t, "VDI", d.vdi, _xo_target_disk_keys(common, p.sr_uuid, sd.uuid))


def apply(steps: list[Step], say: Callable[[str], None]) -> None:
    for step in steps:
        step.run()
        say(step.what)
