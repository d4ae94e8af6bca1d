"""`xencr seed export JOB VM --to DIR`: snapshot the VM as the job would, write each disk as a
VHD file with its per-block digests, and the manifest last.

The snapshot is the job's own (its keys) and marked as a seed: until a replica of it exists the
job refuses to send a full copy over the network, and the snapshot is kept. An interrupted
export resumes on the same snapshot (the disks already written are kept), or restarts if that
snapshot is gone."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xencr import _engine
from xencr.config import JobConfig
from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.replication import source as srcmod
from xencr.replication import target as tgt
from xencr.replication.runner import TransferMonitor, hold
from xencr.seed.manifest import MANIFEST, PROGRESS, Manifest, SeedDisk, SeedError, read, write_atomically
from xencr.xapi.errors import XapiError
from xencr.xapi.files import download_vdi
from xencr.xapi.session import XapiSession

# What builds the replica VM on the other side, plus its name, keys and tags (all JSON-safe).
_VM_FIELDS = (*tgt.VM_FIELDS, "name_label", "other_config", "tags")
_STARTUP = ("order", "start_delay", "shutdown_delay", "ha_restart_priority")


def _snapshot_alive(s: XapiSession, uuid: str) -> str | None:
    try:
        return str(s.api.VM.get_by_uuid(uuid))
    except XapiError as err:
        if err.code == "UUID_INVALID":
            return None
        raise


def export_seed(
    s: XapiSession,
    job: JobConfig,
    schedule_id: str,
    pool_name: str,
    vm: str,
    directory: Path,
    *,
    say: Callable[[str], None] = lambda _: None,
    monitor: TransferMonitor | None = None,
) -> Manifest:
    """Export ``vm`` (a ref on ``s``) for ``job`` into ``directory``; the finished manifest."""
    rec = s.api.VM.get_record(vm)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / MANIFEST).exists():
        m = read(directory)
        if (m.job_id, m.vm_uuid) != (job.id, rec["uuid"]):
            raise SeedError(
                f"{directory} holds a seed of VM {m.vm_name} for job {m.job_name}: use another directory"
            )
        if _snapshot_alive(s, m.snapshot_uuid) is None:
            raise SeedError(
                f"{directory}: the seed's snapshot {m.snapshot_uuid} was deleted on the source; the seed is"
                " useless: remove the directory and export again"
            )
        say(f"{directory}: already exported (snapshot {m.snapshot_uuid})")
        return m
    snap, done = _resume(s, job, rec, directory, say)
    if snap is None:
        nobak = [d.vdi for d in srcmod.disks_of(s, vm, with_nobak=True) if md.NOBAK in d.name]
        attempt = ownership.new_attempt(job.id)
        snap, when = srcmod.take_snapshot(
            s, vm, rec, job.id, job.name, schedule_id, job.snapshot_mode, nobak, attempt
        )
        # From here the job keeps this snapshot, and refuses a full until a replica of it exists.
        s.api.VM.set_other_config(snap, dict(s.api.VM.get_other_config(snap)) | {md.SEED: md.precise(when)})
        _save_progress(directory, str(s.api.VM.get_uuid(snap)), {})
        say(f"{rec['name_label']}: snapshot {s.api.VM.get_uuid(snap)}")
    snap_rec = s.api.VM.get_record(snap)
    disks = srcmod.disks_of(s, snap)
    for d in disks:
        if d.userdevice in done:
            say(f"disk {d.userdevice}: already written ({done[d.userdevice].file})")
            continue
        name = f"disk-{d.userdevice}.vhd"
        partial = directory / (name + ".partial")
        partial.unlink(missing_ok=True)
        hold("seed-export-disk")
        label = f"{rec['name_label']} disk {d.userdevice} -> {directory / name}"
        counter = monitor.begin(label, 0) if monitor else _engine.Progress()
        try:
            r = download_vdi(s, d.vdi, partial, progress=counter)
        finally:
            if monitor:
                monitor.end(label)
        partial.rename(directory / name)
        done[d.userdevice] = SeedDisk(
            d.userdevice, d.name, d.uuid, d.size, d.bootable, name, r.length, r.digest_algorithm, r.digests
        )
        _save_progress(directory, str(snap_rec["uuid"]), done)
        say(f"disk {d.userdevice}: {r.length} bytes, {r.blocks} blocks written to {directory / name}")
    m = Manifest(
        job_id=job.id,
        job_name=job.name,
        schedule_id=snap_rec["other_config"].get(md.SCHEDULE, schedule_id),
        pool=pool_name,
        vm_uuid=rec["uuid"],
        vm_name=rec["name_label"],
        snapshot_uuid=snap_rec["uuid"],
        snapshot_time=snap_rec["other_config"][md.SNAPSHOT_TIME],
        vm_record=_vm_record(snap_rec, rec),
        vifs=tgt.vifs_of(s, vm),
        disks=[done[d.userdevice] for d in disks],
        created=md.precise(datetime.now(UTC)),
    )
    write_atomically(directory / MANIFEST, m.to_json())
    (directory / PROGRESS).unlink(missing_ok=True)
    return m


def _resume(
    s: XapiSession, job: JobConfig, rec: dict[str, Any], directory: Path, say: Callable[[str], None]
) -> tuple[str | None, dict[str, SeedDisk]]:
    """The snapshot and finished disks of an interrupted export into ``directory``, if its
    snapshot still exists; otherwise what it left is removed."""
    path = directory / PROGRESS
    if not path.exists():
        return None, {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        uuid = str(state["snapshot"])
        done = {dev: SeedDisk.from_dict(d) for dev, d in state["disks"].items()}
    except (ValueError, KeyError, TypeError) as err:
        raise SeedError(f"{path}: damaged ({err}); remove the directory and export again") from None
    snap = _snapshot_alive(s, uuid)
    oc = s.api.VM.get_other_config(snap) if snap else {}
    if snap is None or oc.get(md.JOB) != job.id or oc.get(md.VM) != rec["uuid"]:
        say(f"{directory}: the interrupted export's snapshot {uuid} is gone: starting again")
        for d in done.values():
            (directory / d.file).unlink(missing_ok=True)
        path.unlink()
        return None, {}
    # A disk file without its record in the progress file was not finished: written again.
    done = {dev: d for dev, d in done.items() if (directory / d.file).is_file()}
    say(f"{directory}: resuming the export of snapshot {uuid} ({len(done)} disk(s) already written)")
    return snap, done


def _save_progress(directory: Path, snapshot: str, done: dict[str, SeedDisk]) -> None:
    state = {"snapshot": snapshot, "disks": {dev: asdict(d) for dev, d in done.items()}}
    write_atomically(directory / PROGRESS, json.dumps(state))


def _vm_record(snap_rec: dict[str, Any], vm_rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: snap_rec[k] for k in _VM_FIELDS if k in snap_rec}
    out["name_label"] = vm_rec["name_label"]
    # Snapshots reset the startup settings: they come from the VM (as in a run).
    out |= {k: vm_rec[k] for k in _STARTUP if k in vm_rec}
    return json.loads(json.dumps(out, default=str))  # type: ignore[no-any-return]
