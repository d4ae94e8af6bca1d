"""`xencr seed import DIR --pool P --sr SR`: build the job's first restore point from a seed
directory, on the target side, without the source pool.

Built like a run's replica: marked incomplete from creation, so an interrupted import is an
incomplete replica that the next import (or run) removes before starting again: a *killed*
`seed import` starts over from zero. Each file is checked while it is sent (structure) and
against the manifest (every block's digest), then each disk is read back from the pool and
compared again; only then the commit makes it a restore point. The source snapshot already
carries the job's keys (from `seed export`), so the job's next run is a delta on top of it.

A connection cut while a file is sent (`files.ConnectionCut`) resumes in the same run, into the
same VDI, at most `RESUMES` times: from the blocks that had passed (`_engine.Progress.position`)
less a window of 64 MiB (`replication.resume.resume_point`), because what the pool had written
when the connection went is never acknowledged (socket buffers, the import's pipeline). XAPI's
import writes only the blocks a stream carries into a VDI that keeps the rest (vhd.md 1.5), so
the blocks sent again are written again with the same bytes. A resumed upload checks the blocks
it sent against the manifest; the read-back compares the whole disk, whatever was resumed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from xencr import _engine
from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.replication import target as tgt
from xencr.replication.resume import resume_point
from xencr.replication.runner import TransferMonitor, hold
from xencr.replication.source import Disk
from xencr.seed.manifest import Manifest, SeedDisk, SeedError
from xencr.units import human_bytes
from xencr.xapi.files import FileReport, upload_vdi
from xencr.xapi.handlers import ConnectionCut
from xencr.xapi.session import XapiSession
from xencr.xapi.transfer import read_digests


def existing(ts: XapiSession, m: Manifest, sr_uuid: str) -> tgt.RestorePoint | None:
    """The restore point this seed already became on this SR, if it did."""
    for rp in tgt.restore_points(ts, m.job_id, m.vm_uuid, sr_uuid):
        if rp.copy_of == m.snapshot_uuid:
            return rp
    return None


RESUMES = 3  # a cut upload resumes at most this many times in one import


def _mismatch(what: str, d: SeedDisk, got: list[tuple[int, str]], *, only_got: bool = False) -> str | None:
    """The blocks of ``got`` that differ from the manifest's, and (unless ``only_got``: an
    upload resumed, which sees the blocks it sent only) the manifest's blocks missing from it."""
    want = dict(d.digests)
    have = dict(got)
    bad = sorted(b for b in (set(have) if only_got else set(want) | set(have)) if want.get(b) != have.get(b))
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
            hold("seed-import-transfer")
            r, sent = _upload(ts, vdi, directory / d.file, d, monitor, say)
            problem = _mismatch("the file", d, r.digests, only_got=r.resumed_from > 0)
            if problem:
                raise SeedError(f"{problem} (the file is damaged); nothing was linked")
            total += d.length
            line = f"disk {d.userdevice}: {human_bytes(sent)} sent, {r.blocks} blocks match the manifest"
            say(line + (f", resumed at block {r.resumed_from}" if r.resumed_from else ""))
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


def _upload(
    ts: XapiSession,
    vdi: str,
    path: Path,
    d: SeedDisk,
    monitor: TransferMonitor | None,
    say: Callable[[str], None],
) -> tuple[FileReport, int]:
    """Send ``path`` into ``vdi``, resuming after a cut connection (at most `RESUMES` times);
    the last upload's report and the bytes sent in all."""
    label = f"{d.file} -> disk {d.userdevice}"
    start, sent = 0, 0
    for cuts in range(RESUMES + 1):
        counter = monitor.begin(label, d.length) if monitor else _engine.Progress()
        try:
            r = upload_vdi(ts, vdi, path, progress=counter, resume_from=start)
            return r, sent + counter.sent
        except ConnectionCut as err:
            sent += counter.sent
            if cuts == RESUMES:
                raise SeedError(
                    f"disk {d.userdevice}: {err} ({RESUMES} resumes already); nothing was linked"
                ) from None
            # XAPI's exports, so the seed files, have 2 MiB blocks (vhd.md 1.5).
            start = resume_point(counter.position, _engine.DEFAULT_BLOCK_SIZE, start)
            blocks = max(1, counter.blocks)
            done = min(start, blocks) / blocks
            say(
                f"disk {d.userdevice}: {err}; resumed disk {d.userdevice} at {int(done * 100)}%:"
                f" {human_bytes(int(d.length * (1 - done)))} left"
            )
        finally:
            if monitor:
                monitor.end(label)
    raise AssertionError("unreachable")


def _check_space(ts: XapiSession, sr: str, m: Manifest) -> None:
    rec = ts.api.SR.get_record(sr)
    free = int(rec["physical_size"]) - int(rec["physical_utilisation"])
    need = sum(d.length for d in m.disks)
    if int(rec["physical_size"]) > 0 and need > free:
        raise SeedError(
            f"SR {rec['name_label']} has {human_bytes(free)} free; the seed needs {human_bytes(need)}:"
            " nothing was imported"
        )
