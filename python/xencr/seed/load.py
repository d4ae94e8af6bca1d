"""`xencr seed import DIR --pool P --sr SR`: build the job's first restore point from a seed
directory, on the target side, without the source pool.

Built like a run's replica: marked incomplete from creation, so an interrupted import is an
incomplete replica that the next import (or run) removes before starting again. Each file is
checked while it is sent (structure) and against the manifest (every block's digest), then each
disk is read back from the pool and compared again; only then the commit makes it a restore
point. The source snapshot already carries the job's keys (from `seed export`), so the job's
next run is a delta on top of it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from xencr import _engine
from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.replication import target as tgt
from xencr.replication.runner import TransferMonitor, hold
from xencr.replication.source import Disk
from xencr.seed.manifest import Manifest, SeedDisk, SeedError
from xencr.units import human_bytes
from xencr.xapi.files import upload_vdi
from xencr.xapi.session import XapiSession
from xencr.xapi.transfer import read_digests


def existing(ts: XapiSession, m: Manifest, sr_uuid: str) -> tgt.RestorePoint | None:
    """The restore point this seed already became on this SR, if it did."""
    for rp in tgt.restore_points(ts, m.job_id, m.vm_uuid, sr_uuid):
        if rp.copy_of == m.snapshot_uuid:
            return rp
    return None


def _mismatch(what: str, d: SeedDisk, got: list[tuple[int, str]]) -> str | None:
    want = dict(d.digests)
    have = dict(got)
    bad = sorted(b for b in set(want) | set(have) if want.get(b) != have.get(b))
    if not bad:
        return None
    blocks = md.ranges(bad[:50])
    return f"disk {d.userdevice} ({d.file}): {what}: block(s) {blocks} differ from the manifest's digests"


def import_seed(
    ts: XapiSession,
    sr: str,
    sr_uuid: str,
    directory: Path,
    m: Manifest,
    *,
    network_map: dict[str, str] | None = None,
    say: Callable[[str], None] = lambda _: None,
    monitor: TransferMonitor | None = None,
) -> tgt.RestorePoint:
    """The restore point made from the seed in ``directory`` (read into ``m``) on SR ``sr``."""
    done = existing(ts, m, sr_uuid)
    if done is not None:
        say(f"already imported: restore point {done.uuid}")
        return done
    tidied = ownership.tidy(ts, m.job_id, m.vm_uuid, sr_uuid)
    for line in tidied.removed:
        say(f"cleaned up: {line}")
    for left in tidied.detached:
        say(f"detached: {left.line()}")
    _check_space(ts, sr, m)
    keys = {
        md.JOB: m.job_id,
        md.SCHEDULE: m.schedule_id,
        md.VM: m.vm_uuid,
        md.SR: sr_uuid,
        md.COPY_OF: m.snapshot_uuid,
        md.SNAPSHOT_TIME: m.snapshot_time,
        md.ATTEMPT: ownership.new_attempt(m.job_id),
    }
    replica = tgt.create_replica(ts, m.vm_record, keys)
    vdis: list[str] = []
    try:
        for d in m.disks:
            disk = Disk(d.userdevice, "", d.source_vdi, d.name, d.virtual_size, d.bootable)
            disk_keys = {k: v for k, v in keys.items() if k != md.COPY_OF} | {md.FULL_COUNT: "0"}
            vdi = tgt.create_disk(ts, sr, disk, None, disk_keys)
            vdis.append(vdi)
            tgt.attach(ts, replica, vdi, disk)
        warnings = tgt.create_vifs(ts, replica, m.vifs, network_map or {})
        for w in warnings:
            say(f"warning: {w}")
        total = 0
        for d, vdi in zip(m.disks, vdis, strict=True):
            path = directory / d.file
            label = f"{d.file} -> disk {d.userdevice}"
            counter = monitor.begin(label, d.length) if monitor else _engine.Progress()
            try:
                hold("seed-import-transfer")
                r = upload_vdi(ts, vdi, path, progress=counter)
            finally:
                if monitor:
                    monitor.end(label)
            problem = _mismatch("the file", d, r.digests)
            if problem:
                raise SeedError(f"{problem} (the file is damaged); nothing was linked")
            total += r.length
            say(f"disk {d.userdevice}: {human_bytes(r.length)} sent, {r.blocks} blocks match the manifest")
        for d, vdi in zip(m.disks, vdis, strict=True):
            # Read back what the pool stored: the copy is only linked if it is the exported one.
            again = read_digests(ts, vdi)
            indices = [b for b, _ in d.digests]
            now = dict(again["digests"])
            problem = _mismatch("read back from the pool", d, [(b, now.get(b, "")) for b in indices])
            if problem:
                raise SeedError(f"{problem}; nothing was linked")
            oc = dict(ts.api.VDI.get_other_config(vdi))
            ts.api.VDI.set_other_config(vdi, oc | {md.DIGEST: d.digest, md.BLOCKS: md.ranges(indices)})
            say(f"disk {d.userdevice}: read back, every block equals the export")
        hold("seed-import-commit")
        when = md.parse_stamp(m.snapshot_time)
        stamp = md.stamp(when) if when else m.snapshot_time
        tgt.commit(
            ts,
            replica,
            vdis,
            keys | {md.BYTES: str(total)},
            f"{m.vm_name} ({stamp})",
            f"xencr replica of {m.vm_name} at {stamp}: seeded from files ({human_bytes(total)})",
        )
    except BaseException:
        ownership.discard(ts, replica, vdis)
        raise
    rp = existing(ts, m, sr_uuid)
    assert rp is not None, "a committed seed is a restore point"
    return rp


def _check_space(ts: XapiSession, sr: str, m: Manifest) -> None:
    rec = ts.api.SR.get_record(sr)
    free = int(rec["physical_size"]) - int(rec["physical_utilisation"])
    need = sum(d.length for d in m.disks)
    if int(rec["physical_size"]) > 0 and need > free:
        raise SeedError(
            f"SR {rec['name_label']} has {human_bytes(free)} free; the seed needs {human_bytes(need)}:"
            " nothing was imported"
        )
