"""`xencr verify`: re-read a restore point's disks *whole* and compare every block with the disk's
block map (`blockmap`: what the whole disk must hold, kept in the state database at the commit).

Rules:
- Each disk is read through a full export (every allocated block; an unallocated block and a zero
  one are the same) and every block of the disk is compared with the map; a difference is named
  by block range. A disk whose map key is absent, or whose map is not in the state database,
  fails and says so; a restore point made before maps existed (it carries only its transfer's
  digests) is checked the old way, and the line says that only its transfer's blocks were.
- A sample (``percent`` of the disk's blocks, chosen by a seeded generator so that a check can be
  repeated) digests and compares only those blocks; XAPI's export cannot seek, so the export is
  still read from the start up to the last sampled block. A 100 % sample is the full check.
- Against the source: the source snapshot's disk (the replica disk's `copy_of`), while it still
  exists, is read the same way (whole or the same sample) and compared block by block.
- A disk written since the commit (its commit snapshot differs) fails too.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from xencr.replication import metadata as md
from xencr.replication.blockmap import KEY as MAP_KEY
from xencr.replication.blockmap import BlockMap, MapStore, differing
from xencr.replication.target import NULL
from xencr.xapi.errors import XapiError
from xencr.xapi.session import XapiSession
from xencr.xapi.transfer import (
    ReadBack,
    changed_blocks,
    export_digests,
    read_digests,
    read_sample,
    zero_digest,
)


@dataclass(frozen=True)
class Sample:
    """``percent`` of a disk's blocks, the same ones for the same ``seed`` and disk size."""

    percent: float
    seed: int

    def choose(self, block_count: int) -> set[int]:
        k = min(block_count, math.ceil(block_count * self.percent / 100))
        return set(random.Random(self.seed).sample(range(block_count), k))


@dataclass
class DiskCheck:
    userdevice: str
    ok: bool
    blocks: int  # blocks compared (all of the disk's, or the sample's; before maps: its transfer's)
    detail: str
    bytes_read: int = 0  # from the target, and from the source when compared with it
    differing: list[str] = field(default_factory=list)  # block ranges that differ from the map
    source_differing: list[str] = field(default_factory=list)  # ... that differ from the source
    map: str | None = None

    def lines(self) -> list[str]:
        """One line per differing block range."""
        out = [
            f"disk {self.userdevice}: {_blocks(r)} differ{'s' if _single(r) else ''}" for r in self.differing
        ]
        out += [
            f"disk {self.userdevice}: {_blocks(r)} differ{'s' if _single(r) else ''} from the source"
            for r in self.source_differing
        ]
        return out


def verify_replica(
    t: XapiSession,
    replica: str,
    maps: MapStore | None,
    *,
    sample: Sample | None = None,
    source: XapiSession | None = None,
) -> list[DiskCheck]:
    """Check every disk of the restore point ``replica`` (a VM ref on ``t``); ``maps`` is the
    state database (None: there is none); ``source`` the source pool, to compare with it too."""
    out = []
    for vbd in t.api.VM.get_VBDs(replica):
        b = t.api.VBD.get_record(vbd)
        if b["type"] != "Disk" or b["VDI"] == NULL:
            continue
        vdi = str(b["VDI"])
        oc = t.api.VDI.get_other_config(vdi)
        check = _check_disk(t, vdi, str(b["userdevice"]), oc, maps, sample, source)
        snaps = [
            x
            for x in t.api.VDI.get_snapshots(vdi)
            if t.api.VDI.get_other_config(x).get(md.ROLE) == "commit-snapshot"
        ]
        if snaps and changed_blocks(t, vdi, str(snaps[0])) > 0:
            check.ok = False
            check.detail += "; the disk was written since the commit"
        out.append(check)
    return out


def _check_disk(
    t: XapiSession,
    vdi: str,
    device: str,
    oc: dict[str, str],
    maps: MapStore | None,
    sample: Sample | None,
    source: XapiSession | None,
) -> DiskCheck:
    key = oc.get(MAP_KEY)
    if key is None:
        return _before_maps(t, vdi, device, oc)
    expected = maps.get_map(key) if maps is not None else None
    if expected is None:
        return DiskCheck(device, False, 0, f"its block map {key} is not in the state database", map=key)
    got, chosen = _read(t, vdi, sample)
    if (got.algorithm, got.block_size) != (expected.algorithm, expected.block_size):
        detail = f"read as {got.algorithm} over {got.block_size}-byte blocks, its map is not"
        return DiskCheck(device, False, 0, detail, got.bytes_read, map=key)
    found = _nonzero(got)
    bad = differing(expected, found, chosen)
    checked = len(chosen) if chosen is not None else got.block_count
    check = DiskCheck(
        device, not bad, checked, "", got.bytes_read, md.ranges(bad).split(",") if bad else [], map=key
    )
    what = f"{checked} block(s)"  # sampled or not: the output's first line says which
    check.detail = (
        f"{what} equal its block map" if not bad else f"{len(bad)} of {what} differ from its block map"
    )
    if source is not None:
        _against_source(source, oc, sample, found, chosen, check)
    return check


def _read(t: XapiSession, vdi: str, sample: Sample | None) -> tuple[ReadBack, set[int] | None]:
    if sample is None:
        return export_digests(t, vdi), None
    return read_sample(t, vdi, sample.choose)


def _nonzero(got: ReadBack) -> dict[int, str]:
    zero = zero_digest(got.algorithm, got.block_size)
    return {i: h for i, h in got.digests if h != zero}


def _against_source(
    s: XapiSession,
    oc: dict[str, str],
    sample: Sample | None,
    found: dict[int, str],
    chosen: set[int] | None,
    check: DiskCheck,
) -> None:
    uuid = oc.get(md.COPY_OF)
    try:
        vdi = str(s.api.VDI.get_by_uuid(uuid)) if uuid else None
    except XapiError:
        vdi = None
    if vdi is None:
        check.detail += (
            f"; its source snapshot disk {uuid or '(not recorded)'} no longer exists: not compared"
        )
        return
    got, _ = _read(s, vdi, sample)
    check.bytes_read += got.bytes_read
    source = BlockMap(got.algorithm, got.block_size, _nonzero(got))
    bad = differing(source, found, chosen)
    if bad:
        check.ok = False
        check.source_differing = md.ranges(bad).split(",")
        check.detail += f"; {len(bad)} block(s) differ from the source snapshot"
    else:
        check.detail += "; the source snapshot holds the same"


def _before_maps(t: XapiSession, vdi: str, device: str, oc: dict[str, str]) -> DiskCheck:
    """A restore point made before block maps: only its own transfer's blocks can be checked."""
    recorded, blocks = oc.get(md.DIGEST), oc.get(md.BLOCKS)
    if recorded is None or blocks is None:
        return DiskCheck(device, False, 0, "no block map and no digests were recorded for this disk")
    indices = md.parse_ranges(blocks)
    report = read_digests(t, vdi)
    now = dict(report["digests"])
    missing = [i for i in indices if i not in now]
    again = md.digest_of_list(report["digest_algorithm"], [(i, now[i]) for i in indices if i in now])
    ok = not missing and again == recorded
    note = "no block map (made before xencr kept them): checked only the blocks of its own transfer"
    if ok:
        detail = f"{note}, which equal what was sent"
    elif missing:
        detail = f"{note}: blocks {md.ranges(missing)} are gone"
    else:
        detail = f"{note}: they no longer read back the same"
    return DiskCheck(device, ok, len(indices), detail, int(report["bytes_in"]))


def _single(r: str) -> bool:
    return "-" not in r


def _blocks(r: str) -> str:
    return f"block {r}" if _single(r) else f"blocks {r}"
