"""`xencr seed export JOB VM --to DIR`: snapshot the VM as the job would, write each disk as a
VHD file with its per-block digests, and the manifest last.

The snapshot is the job's own (its keys) and marked as a seed: until a replica of it exists the
job refuses to send a full copy over the network, and the snapshot is kept. An interrupted
export resumes on the same snapshot (the disks already written are kept), or restarts if that
snapshot is gone.

A disk cut mid-download resumes inside the disk. Its ``.partial`` file is kept, and the progress
file records how far the disk's stream had passed (`_engine.Progress.position`: blocks in stream
order, each written in full to the file), about once a second and when the download stops. The
next export of the same snapshot asks the engine to write from block ``K = position - 32`` on
(`replication.resume.resume_point`: a window of 64 MiB, 32 blocks of 2 MiB): the position is up
to a second old only in the safe direction, but what the engine wrote may not all have reached
the disk when the machine, not just the process, stopped (the page cache), and the window
re-writes the last blocks. The export cannot seek, so the engine reads and digests it from its
start; the file's head must be this export's (else the disk starts over). Whatever the window
did not cover is caught after the download: the whole file is read back and its blocks compared
with the export's digests, and a file that differs is downloaded again from zero."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xencr import _engine
from xencr.config import JobConfig
from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.replication import source as srcmod
from xencr.replication import target as tgt
from xencr.replication.resume import RECORD_EVERY, resume_point
from xencr.replication.runner import TransferMonitor, hold
from xencr.replication.source import Disk
from xencr.seed.manifest import MANIFEST, PROGRESS, Manifest, SeedDisk, SeedError, read, write_atomically
from xencr.units import human_bytes
from xencr.xapi.errors import XapiError
from xencr.xapi.files import FileReport, download_vdi
from xencr.xapi.session import XapiSession

# What builds the replica VM on the other side, plus its name, keys and tags (all JSON-safe).
_VM_FIELDS = (*tgt.VM_FIELDS, "name_label", "other_config", "tags")
_STARTUP = ("order", "start_delay", "shutdown_delay", "ha_restart_priority")


@dataclass
class Partial:
    """A disk whose download stopped part way: the blocks of its stream that had passed
    (`_engine.Progress.position`), of how many, and the stream's bytes."""

    position: int
    blocks: int
    length: int

    def line(self, start: int) -> str:
        """``78%: 1.6 GiB left`` for a download resumed at block ``start``."""
        done = min(start, self.blocks) / self.blocks if self.blocks else 0.0
        return f"{int(done * 100)}%: {human_bytes(int(self.length * (1 - done)))} left"


class _ProgressFile:
    """The progress file of an export in progress: its snapshot, the disks written, and the
    disks part way (written by the export and its recording thread: one at a time)."""

    def __init__(
        self, directory: Path, snapshot: str, done: dict[str, SeedDisk], partial: dict[str, Partial]
    ) -> None:
        self.directory = directory
        self.snapshot = snapshot
        self.done = done
        self.partial = partial
        self._lock = threading.Lock()

    def save(self) -> None:
        with self._lock:
            state = {
                "snapshot": self.snapshot,
                "disks": {dev: asdict(d) for dev, d in self.done.items()},
                "partial": {dev: asdict(p) for dev, p in self.partial.items()},
            }
            write_atomically(self.directory / PROGRESS, json.dumps(state))

    def note(self, dev: str, p: Partial | None) -> None:
        with self._lock:
            if p is None:
                self.partial.pop(dev, None)
            else:
                self.partial[dev] = p
        self.save()

    def finished(self, d: SeedDisk) -> None:
        with self._lock:
            self.done[d.userdevice] = d
            self.partial.pop(d.userdevice, None)
        self.save()


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
    snap, progress = _resume(s, job, rec, directory, say)
    if snap is None:
        nobak = [d.vdi for d in srcmod.disks_of(s, vm, with_nobak=True) if md.NOBAK in d.name]
        attempt = ownership.new_attempt(job.id)
        snap, when = srcmod.take_snapshot(
            s, vm, rec, job.id, job.name, schedule_id, job.snapshot_mode, nobak, attempt
        )
        # From here the job keeps this snapshot, and refuses a full until a replica of it exists.
        s.api.VM.set_other_config(snap, dict(s.api.VM.get_other_config(snap)) | {md.SEED: md.precise(when)})
        progress = _ProgressFile(directory, str(s.api.VM.get_uuid(snap)), {}, {})
        progress.save()
        say(f"{rec['name_label']}: snapshot {s.api.VM.get_uuid(snap)}")
    snap_rec = s.api.VM.get_record(snap)
    disks = srcmod.disks_of(s, snap)
    done = progress.done
    for d in disks:
        if d.userdevice in done:
            say(f"disk {d.userdevice}: already written ({done[d.userdevice].file})")
            continue
        name = f"disk-{d.userdevice}.vhd"
        partial = directory / (name + ".partial")
        hold("seed-export-disk")
        label = f"{rec['name_label']} disk {d.userdevice} -> {directory / name}"
        r = _download_disk(s, progress, d, partial, label, monitor, say)
        partial.rename(directory / name)
        progress.finished(
            SeedDisk(
                d.userdevice,
                d.name,
                d.uuid,
                d.size,
                d.bootable,
                name,
                r.length,
                r.digest_algorithm,
                r.digests,
            )
        )
        line = f"disk {d.userdevice}: {r.length} bytes, {r.blocks} blocks written to {directory / name}"
        if r.resumed_from:
            line += f" (resumed at block {r.resumed_from}: {r.bytes_out} bytes written by this run)"
        say(line)
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
) -> tuple[str | None, _ProgressFile]:
    """The snapshot of an interrupted export into ``directory`` and what it got done (disks
    written, disks part way), if its snapshot still exists; otherwise what it left is removed."""
    path = directory / PROGRESS
    if not path.exists():
        return None, _ProgressFile(directory, "", {}, {})
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        uuid = str(state["snapshot"])
        done = {dev: SeedDisk.from_dict(d) for dev, d in state["disks"].items()}
        partial = {dev: Partial(**p) for dev, p in state.get("partial", {}).items()}
    except (ValueError, KeyError, TypeError) as err:
        raise SeedError(f"{path}: damaged ({err}); remove the directory and export again") from None
    snap = _snapshot_alive(s, uuid)
    oc = s.api.VM.get_other_config(snap) if snap else {}
    if snap is None or oc.get(md.JOB) != job.id or oc.get(md.VM) != rec["uuid"]:
        say(f"{directory}: the interrupted export's snapshot {uuid} is gone: starting again")
        for d in done.values():
            (directory / d.file).unlink(missing_ok=True)
        for f in directory.glob("disk-*.vhd.partial"):
            f.unlink()
        path.unlink()
        return None, _ProgressFile(directory, "", {}, {})
    # A disk file without its record in the progress file was not finished: written again.
    done = {dev: d for dev, d in done.items() if (directory / d.file).is_file()}
    say(f"{directory}: resuming the export of snapshot {uuid} ({len(done)} disk(s) already written)")
    return snap, _ProgressFile(directory, uuid, done, partial)


def _download_disk(
    s: XapiSession,
    progress: _ProgressFile,
    d: Disk,
    path: Path,
    label: str,
    monitor: TransferMonitor | None,
    say: Callable[[str], None],
) -> FileReport:
    """Download disk ``d`` into ``path``: resumed inside the disk when an earlier download left
    it part way (the window before its recorded position written again), else from zero. A
    resumed file is read back whole and compared with the export's digests; if its start is not
    this export's, or its blocks differ, the disk is downloaded again from zero."""
    dev = d.userdevice
    was = progress.partial.get(dev)
    # XAPI's exports have 2 MiB blocks (vhd.md 1.5): the window is 32 of them.
    start = resume_point(was.position, _engine.DEFAULT_BLOCK_SIZE) if was and path.is_file() else 0
    if start:
        assert was is not None
        say(f"resumed disk {dev} at {was.line(start)}")
        try:
            r = _download(s, progress, d, path, start, label, monitor)
        except _engine.VhdError as err:
            if err.kind != "resume_mismatch":
                raise
            say(f"disk {dev}: {err}: downloading it again from the start")
        else:
            if _file_digests(path) == r.digests:
                return r
            say(
                f"disk {dev}: {path.name} does not read back as the export (its part written before"
                " the interruption differs): downloading it again from the start"
            )
    path.unlink(missing_ok=True)
    progress.note(dev, None)
    return _download(s, progress, d, path, 0, label, monitor)


def _download(
    s: XapiSession,
    progress: _ProgressFile,
    d: Disk,
    path: Path,
    start: int,
    label: str,
    monitor: TransferMonitor | None,
) -> FileReport:
    counter = monitor.begin(label, 0) if monitor else _engine.Progress()
    try:
        with _recording(progress, d.userdevice, counter, start):
            return download_vdi(s, d.vdi, path, progress=counter, resume_from=start, keep=True)
    finally:
        if monitor:
            monitor.end(label)


@contextmanager
def _recording(progress: _ProgressFile, dev: str, counter: _engine.Progress, start: int) -> Iterator[None]:
    """Record how far disk ``dev``'s download got, every `RECORD_EVERY` seconds while it runs
    and when it stops. A download resumed at ``start`` truncated the file there, so the file
    holds at least ``start`` blocks even before the engine has read that far again."""

    def note() -> None:
        if counter.blocks:  # the export has answered: its stream is known
            progress.note(dev, Partial(max(start, counter.position), counter.blocks, counter.total))

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(RECORD_EVERY):
            note()

    worker = threading.Thread(target=loop, name=f"xencr-seed-{dev}", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
        note()


def _file_digests(path: Path) -> list[tuple[int, str]]:
    """Every block's digest of the stream held in ``path``, read back whole."""
    with open(os.devnull, "wb") as sink:
        r = _engine.transform(str(path), sink.fileno())
    return [(int(b), str(h)) for b, h in r["digests"]]


def _vm_record(snap_rec: dict[str, Any], vm_rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: snap_rec[k] for k in _VM_FIELDS if k in snap_rec}
    out["name_label"] = vm_rec["name_label"]
    # Snapshots reset the startup settings: they come from the VM (as in a run).
    out |= {k: vm_rec[k] for k in _STARTUP if k in vm_rec}
    return json.loads(json.dumps(out, default=str))  # type: ignore[no-any-return]
