"""File-based VHD SRs (sm ``libs/sm/drivers/FileSR.py``, ``libs/sm/vhdutil.py``; xapi.md 3.9).

Each SR is a directory ``pool<i>/sr-<uuid>/`` of ``<vdi uuid>.vhd`` files. Every managed VDI is a
leaf file; snapshots and clones turn the leaf into a hidden read-only "base copy" (a VDI record with
``managed=false``) and hang two differencing leaves under it, exactly as ``FileVDI._snapshot`` does.
The chain is recorded in ``sm_config["vhd-parent"]`` and handed to the engine explicitly. All VHD
work goes through :mod:`xencr._engine`.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xencr.sim import cbt
from xencr.sim.db import write_json
from xencr.sim.errors import XapiError, sr_backend_failure, sr_no_space

if TYPE_CHECKING:
    from xencr.sim.db import Database
    from xencr.sim.pool_state import PoolState

MIB = 1024 * 1024
VHD_BLOCK_SIZE = 2 * MIB  # vhdutil.VHD_BLOCK_SIZE
MIN_VHD_SIZE = 2 * MIB  # vhdutil.MIN_VHD_SIZE
MAX_VHD_SIZE = 2040 * 1024 * MIB  # vhdutil.MAX_VHD_SIZE
MAX_CHAIN_SIZE = 30  # vhdutil.MAX_CHAIN_SIZE
# SM drivers with the SR_METADATA capability (xapi.md 5.1): the only SRs DR can use.
DR_SR_TYPES = frozenset({"lvmoiscsi", "lvmohba"})
UNALLOCATED = 0xFFFFFFFF  # a BAT entry without a block
# Physical room a new VHD's metadata needs (footer copy, header, BAT): checked before creating one.
METADATA_RESERVE = 64 * 1024


def engine() -> Any:
    """The Rust engine (imported late so the protocol side works while it is being built)."""
    from xencr import _engine

    return _engine


def round_vhd_size(size: int) -> int:
    """``vhdutil.validate_and_round_vhd_size``: up to 2 MiB blocks, min 2 MiB, max 2040 GiB."""
    if size < 0 or size > MAX_VHD_SIZE:
        raise sr_backend_failure(
            79, f"VDI Invalid size [opterr=VDI size must be between 1 MB and {MAX_VHD_SIZE // MIB} MB]"
        )
    size = max(size, MIN_VHD_SIZE)
    return (size + VHD_BLOCK_SIZE - 1) // VHD_BLOCK_SIZE * VHD_BLOCK_SIZE


class Storage:
    def __init__(self, pool: PoolState) -> None:
        self.pool = pool
        # One lock per VDI file: guest writes, imports and merges of one chain never interleave.
        self._file_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self.cbt = cbt.CbtLogs()

    @property
    def db(self) -> Database:
        return self.pool.db

    def file_lock(self, vdi_uuid: str) -> threading.Lock:
        with self._locks_lock:
            return self._file_locks.setdefault(vdi_uuid, threading.Lock())

    # ------------------------------------------------------------------ paths and chains

    def sr_dir(self, sr_ref: str) -> Path:
        """``pool<i>/sr-<uuid>`` for local file SRs; for DR-capable (LVM over iSCSI/HBA) SRs the
        LUN's directory ``array/<SCSIid>``, shared by every pool that attaches the LUN."""
        lun = self.lun(sr_ref)
        if lun:
            path = self.pool.dir.parent / "array" / lun
        else:
            path = self.pool.dir / f"sr-{self.db.get('SR', sr_ref)['uuid']}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lun(self, sr_ref: str) -> str | None:
        row = self.db.get("SR", sr_ref)
        if row["type"] not in DR_SR_TYPES:
            return None
        for pbd in self.db.reverse("SR", "PBDs", sr_ref):
            scsi = self.db.get("PBD", pbd)["device_config"].get("SCSIid")
            if scsi:
                return str(scsi)
        return None

    def path(self, vdi_ref: str) -> Path:
        row = self.db.get("VDI", vdi_ref)
        return self.sr_dir(row["SR"]) / f"{row['uuid']}.vhd"

    def parent_ref(self, vdi_ref: str) -> str | None:
        row = self.db.get("VDI", vdi_ref)
        parent_uuid = row["sm_config"].get("vhd-parent")
        if not parent_uuid:
            return None
        for ref, rec in self.db.items("VDI"):
            if rec["uuid"] == parent_uuid and rec["SR"] == row["SR"]:
                return str(ref)
        return None

    def chain(self, vdi_ref: str) -> list[str]:
        """VDI refs from the leaf up to the root."""
        refs = [vdi_ref]
        while (parent := self.parent_ref(refs[-1])) is not None:
            refs.append(parent)
        return refs

    def parents(self, vdi_ref: str) -> list[str]:
        return [str(self.path(r)) for r in self.chain(vdi_ref)[1:]]

    # ------------------------------------------------------------------ space (xapi.md 3.9)

    def used(self, sr_ref: str) -> int:
        directory = self.sr_dir(sr_ref)
        total = sum(p.stat().st_size for p in directory.glob("*.vhd"))
        return total + self.pool.faults.sr_fill.get(self.db.get("SR", sr_ref)["uuid"], 0)

    def free(self, sr_ref: str) -> int:
        return int(self.db.get("SR", sr_ref)["physical_size"]) - self.used(sr_ref)

    def ensure_space(self, sr_ref: str, needed: int) -> None:
        if self.free(sr_ref) < needed:
            raise sr_no_space()

    def refresh(self, sr_ref: str) -> None:
        """Recompute physical_utilisation of the SR and its VDIs, and virtual_allocation."""
        with self.db.lock:
            for ref, rec in self.db.items("VDI"):
                if rec["SR"] != sr_ref:
                    continue
                path = self.sr_dir(sr_ref) / f"{rec['uuid']}.vhd"
                size = path.stat().st_size if path.exists() else 0
                if rec["physical_utilisation"] != size:
                    self.db.update("VDI", ref, physical_utilisation=size)
            allocation = sum(
                int(rec["virtual_size"])
                for _, rec in self.db.items("VDI")
                if rec["SR"] == sr_ref and rec["managed"]
            )
            self.db.update(
                "SR", sr_ref, physical_utilisation=self.used(sr_ref), virtual_allocation=allocation
            )

    # ------------------------------------------------------------------ file operations

    def create_file(self, sr_ref: str, vdi_uuid: str, size: int) -> None:
        self.ensure_space(sr_ref, METADATA_RESERVE)
        engine().create(str(self.sr_dir(sr_ref) / f"{vdi_uuid}.vhd"), size, uuid=vdi_uuid)

    # ------------------------------------------------------------------ crash safety
    #
    # File changes that the database does not know yet are journalled in pool<i>/journal/ until the
    # next database save: a snapshot records its three file names before touching anything, and a
    # deleted file is only moved aside. On start, journal entries whose database change was never
    # saved are undone, so files and records always agree (sm journals vdi_clone the same way).

    @property
    def journal_dir(self) -> Path:
        path = self.pool.dir / "journal"
        path.mkdir(exist_ok=True)
        return path

    def _journal(self, name: str, entry: dict[str, str]) -> Path:
        path = self.journal_dir / f"{name}.json"
        write_json(path, entry)
        return path

    def delete_file(self, vdi_ref: str) -> None:
        self.delete_file_path(str(self.path(vdi_ref)))

    def delete_file_path(self, path: str) -> None:
        """Move the file aside until the database that no longer references it is saved."""
        p = Path(path)
        if not p.exists():
            return
        aside = self.journal_dir / f"{uuidlib.uuid4()}.deleted"
        self._journal(aside.stem, {"op": "delete", "path": str(p), "aside": str(aside), "uuid": p.stem})
        os.rename(p, aside)

    def committed(self) -> None:
        """The database was saved: journalled changes are now permanent."""
        for entry in self.journal_dir.glob("*.json"):
            doc = json.loads(entry.read_text())
            if doc["op"] == "delete":
                Path(doc["aside"]).unlink(missing_ok=True)
            entry.unlink(missing_ok=True)

    def recover(self) -> int:
        """Undo journalled file changes whose database change was never saved; returns how many."""
        known = {rec["uuid"] for _, rec in self.db.items("VDI")}
        undone = 0
        for entry in sorted(self.journal_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            doc = json.loads(entry.read_text())
            if doc["op"] == "snapshot" and doc["base"] not in known:
                self._undo_snapshot(Path(doc["dir"]), doc["src"], doc["base"], doc["leaf"])
                undone += 1
            elif doc["op"] == "cbt_snapshot" and doc["snap"] not in known:
                self.cbt.undo_snapshot(Path(doc["dir"]), doc["vdi"], doc["snap"])
                undone += 1
            elif doc["op"] == "delete":
                aside = Path(doc["aside"])
                if doc["uuid"] in known and aside.exists():
                    os.rename(aside, doc["path"])
                    undone += 1
                aside.unlink(missing_ok=True)
            entry.unlink(missing_ok=True)
        return undone

    @staticmethod
    def _undo_snapshot(directory: Path, src_uuid: str, base_uuid: str, leaf_uuid: str) -> None:
        src, base = directory / f"{src_uuid}.vhd", directory / f"{base_uuid}.vhd"
        if base.exists():  # the source was renamed: src (if any) is the new empty child
            src.unlink(missing_ok=True)
            os.rename(base, src)
            engine().set_uuid(str(src), src_uuid)
        (directory / f"{leaf_uuid}.vhd").unlink(missing_ok=True)

    def snapshot_files(self, vdi_ref: str, *, cbt_log: bool = False) -> tuple[str, str, bool]:
        """``FileVDI._snapshot`` with SNAPSHOT_DOUBLE: returns (base copy uuid, new leaf uuid,
        whether the leaf has a CBT log).

        The source file is renamed to the base copy (new UUID in its footer), a differencing child
        with the source's UUID takes its old path, and a second child becomes the new leaf. With
        ``cbt_log`` (a snapshot, not a clone) the source's CBT log passes to the new leaf in the
        same step, so that no write can fall between the two (``_cbt_snapshot``).
        """
        row = self.db.get("VDI", vdi_ref)
        sr_ref = row["SR"]
        if len(self.chain(vdi_ref)) >= MAX_CHAIN_SIZE:
            # XE_SR_ERRORCODES.xml 109 SnapshotChainTooLong
            raise sr_backend_failure(109, "The snapshot chain is too long")
        self.ensure_space(sr_ref, 2 * METADATA_RESERVE)
        eng = engine()
        directory = self.sr_dir(sr_ref)
        src = directory / f"{row['uuid']}.vhd"
        base_uuid, leaf_uuid = str(uuidlib.uuid4()), str(uuidlib.uuid4())
        base = directory / f"{base_uuid}.vhd"
        self._journal(
            base_uuid,
            {
                "op": "snapshot",
                "dir": str(directory),
                "src": row["uuid"],
                "base": base_uuid,
                "leaf": leaf_uuid,
            },
        )
        with self.file_lock(row["uuid"]):
            try:
                os.rename(src, base)
                eng.set_uuid(str(base), base_uuid)
                size = int(eng.virtual_size(str(base)))
                eng.create(str(src), size, parent=str(base), uuid=row["uuid"])
                eng.create(str(directory / f"{leaf_uuid}.vhd"), size, parent=str(base), uuid=leaf_uuid)
            except Exception:
                self._undo_snapshot(directory, row["uuid"], base_uuid, leaf_uuid)
                raise
            has_log = False
            if cbt_log and self.cbt.has_log(directory, row["uuid"]):
                self._journal(
                    f"{leaf_uuid}-cbt",
                    {"op": "cbt_snapshot", "dir": str(directory), "vdi": row["uuid"], "snap": leaf_uuid},
                )
                has_log = self.cbt.snapshot(directory, row["uuid"], leaf_uuid, int(row["virtual_size"]))
        return base_uuid, leaf_uuid, has_log

    def write(self, vdi_ref: str, offset: int, data: bytes) -> None:
        row = self.db.get("VDI", vdi_ref)
        if offset < 0 or offset + len(data) > int(row["virtual_size"]):
            raise XapiError("VDI_IO_ERROR", "Device I/O errors")
        self.ensure_space(row["SR"], len(data) + 2 * VHD_BLOCK_SIZE)
        with self.file_lock(row["uuid"]):
            # the CBT log first: a crash between the two over-reports, never under-reports
            self.cbt.mark(self.sr_dir(row["SR"]), row["uuid"], offset, len(data))
            engine().write(str(self.path(vdi_ref)), offset, data, parents=self.parents(vdi_ref))

    def read(self, vdi_ref: str, offset: int, length: int) -> bytes:
        data: bytes = engine().read(str(self.path(vdi_ref)), offset, length, parents=self.parents(vdi_ref))
        return data

    def allocated_blocks(self, vdi_ref: str) -> tuple[int, bytes]:
        """(block size, bitmap of the blocks some file of the chain allocates, one bit per block,
        most significant bit first): the NBD server's ``base:allocation`` (sm reads block
        allocation the same way, ``vhdutil.getBlockBitmap``: the BAT, through ``vhd-util``)."""
        paths = [str(self.path(r)) for r in self.chain(vdi_ref)]
        eng = engine()
        block_size = VHD_BLOCK_SIZE
        blocks = (int(self.db.get("VDI", vdi_ref)["virtual_size"]) + block_size - 1) // block_size
        bitmap = bytearray((blocks + 7) // 8)
        for k, path in enumerate(paths):
            header = eng.info(path, parents=paths[k + 1 :])["header"]
            block_size = int(header["block_size"])
            entries = min(int(header["max_table_entries"]), blocks)
            with open(path, "rb") as f:
                raw = os.pread(f.fileno(), 4 * entries, int(header["table_offset"]))
            for index, entry in enumerate(struct.unpack(f">{len(raw) // 4}I", raw)):
                if entry != UNALLOCATED:
                    bitmap[index >> 3] |= 0x80 >> (index & 7)
        return block_size, bytes(bitmap)

    def sha256(self, vdi_ref: str) -> str:
        digest: str = engine().sha256(str(self.path(vdi_ref)), parents=self.parents(vdi_ref))
        return digest

    def resize(self, vdi_ref: str, size: int) -> None:
        """Grow the leaf (``vhdutil.setSizeVirt``): a new leaf of the new size under the same
        parent receives the old leaf's own blocks, then takes its place (same path, same UUID)."""
        row = self.db.get("VDI", vdi_ref)
        self.ensure_space(row["SR"], int(row["physical_utilisation"]) + METADATA_RESERVE)
        eng = engine()
        path = self.path(vdi_ref)
        parents = self.parents(vdi_ref)
        fresh = path.with_suffix(".resize")
        with self.file_lock(row["uuid"]):
            try:
                eng.create(str(fresh), size, parent=parents[0] if parents else None, uuid=row["uuid"])
                rfd, wfd = os.pipe()
                errors: list[BaseException] = []

                def produce() -> None:
                    try:
                        eng.export_stream(
                            str(path),
                            wfd,
                            base=parents[0] if parents else None,
                            parents=parents,
                            base_parents=parents[1:] if parents else None,
                        )
                    except BaseException as err:
                        errors.append(err)
                    finally:
                        os.close(wfd)

                t = threading.Thread(target=produce, daemon=True)
                t.start()
                try:
                    eng.apply_stream(rfd, str(fresh), parents=parents)
                finally:
                    os.close(rfd)
                    t.join()
                if errors:
                    raise errors[0]
                os.replace(fresh, path)
                self.cbt.resize(self.sr_dir(row["SR"]), row["uuid"], size)
            finally:
                fresh.unlink(missing_ok=True)
