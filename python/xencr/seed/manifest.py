"""What a seed directory holds: one VHD file per disk and `manifest.json`, written last, which
names the job, the source VM and its snapshot, the VM's settings and networks, and each disk's
file, size and per-block digests. A directory without a manifest is an unfinished export."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xencr.replication import metadata as md

FORMAT = "xencr-seed/1"
MANIFEST = "manifest.json"
PROGRESS = "export-progress.json"  # an export in progress: its snapshot, the disks done


class SeedError(Exception):
    """A seed directory cannot be used as it is; ``str()`` is one line."""


@dataclass
class SeedDisk:
    userdevice: str
    name: str
    source_vdi: str  # UUID of the source snapshot's VDI (the replica disk's copy_of)
    virtual_size: int
    bootable: bool
    file: str  # relative to the directory
    length: int  # bytes of the file
    digest_algorithm: str
    digests: list[tuple[int, str]] = field(default_factory=list)  # (block, digest) of each block held

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeedDisk:
        """From its JSON form (digest pairs come back as lists)."""
        return cls(**(d | {"digests": [(int(b), str(h)) for b, h in d["digests"]]}))

    @property
    def digest(self) -> str:
        return md.digest_of_list(self.digest_algorithm, self.digests)


@dataclass
class Manifest:
    job_id: str
    job_name: str
    schedule_id: str
    pool: str  # source pool's name in the exporting side's configuration
    vm_uuid: str
    vm_name: str
    snapshot_uuid: str
    snapshot_time: str  # md.precise()
    vm_record: dict[str, Any]  # what builds the replica VM (target._vm_record's input)
    vifs: list[dict[str, str]]  # device, network (name), MAC, MTU
    disks: list[SeedDisk]
    created: str
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise SeedError(f"{where}: not a seed manifest of this version ({raw.get('format')!r})")
            disks = [SeedDisk.from_dict(d) for d in raw.pop("disks")]
            return cls(**raw, disks=disks)
        except SeedError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise SeedError(f"{where}: damaged manifest ({type(err).__name__}: {err})") from None


def write_atomically(path: Path, text: str) -> None:
    """Write then rename, fsynced: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(directory: Path) -> Manifest:
    """The manifest of a finished export, its files present with their recorded sizes."""
    path = directory / MANIFEST
    if not path.exists():
        if (directory / PROGRESS).exists():
            raise SeedError(
                f"{directory}: the export did not finish; run `xencr seed export` again to resume it"
            )
        raise SeedError(f"{directory}: no {MANIFEST} (not a seed directory)")
    m = Manifest.from_json(path.read_text(encoding="utf-8"), path)
    for d in m.disks:
        f = directory / d.file
        if not f.is_file():
            raise SeedError(f"no such file: {f} (disk {d.userdevice} of the seed)")
        size = f.stat().st_size
        if size < d.length:
            raise SeedError(f"{f}: truncated: file ends at {size}, expected at least {d.length}")
        if size != d.length:
            raise SeedError(f"{f}: {size} bytes, the manifest says {d.length} (replaced?)")
    return m
