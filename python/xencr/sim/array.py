"""The simulated storage array shared by every pool of a state directory: ``<state>/array/<SCSIid>/``.

A DR-capable SR (``lvmoiscsi``/``lvmohba``) lives on a LUN: its VHD files, ``sr.json`` (the SR's
own metadata, as LVHD's management volume) and one ``<vdi uuid>.db.json`` per metadata VDI (the
pool database xapi's redo log writes there). Every pool whose PBD names the LUN sees the same
files. The array can mirror one LUN onto another (``sim.array_mirror``): what a storage array's
replication leaves on the secondary LUN when the mirror is broken, a point-in-time copy with the
same SR UUID inside.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid as uuidlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xencr.sim.db import write_json
from xencr.sim.errors import XapiError
from xencr.sim.storage import DR_SR_TYPES

if TYPE_CHECKING:
    from xencr.sim.pool_state import PoolState

ARRAY_DIR = "array"
SR_METADATA = "sr.json"
DATABASE_SUFFIX = ".db.json"
# A LUN id names a directory: SCSI ids are hex/alnum strings, the simulator's also use '-' and '_'.
_LUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
LOG = logging.getLogger("xencr.sim.array")
# How long a mirror waits for transfers into the source LUN to end before giving up.
MIRROR_WAIT = 30.0
# VDI fields carried in the SR's own metadata (enough to re-introduce the VDIs elsewhere).
VDI_FIELDS = (
    "uuid",
    "name_label",
    "name_description",
    "type",
    "virtual_size",
    "sharable",
    "read_only",
    "is_a_snapshot",
    "snapshot_time",
    "managed",
    "sm_config",
    "other_config",
    "tags",
    "on_boot",
    "cbt_enabled",
    "location",
)


@dataclass(frozen=True)
class Attachment:
    """One pool's plugged PBDs for a LUN (``sim.array``)."""

    pool: int  # pool index in the state directory
    pool_uuid: str
    sr_uuid: str
    hosts: tuple[str, ...]  # UUIDs of the hosts whose PBD is plugged


def valid_lun(lun: str) -> bool:
    return bool(_LUN_ID.fullmatch(lun))


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` extent by extent (``SEEK_DATA``/``SEEK_HOLE``): holes stay holes."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            _copy_range(fi.fileno(), fo.fileno(), start, end - start)
            pos = end
        fo.truncate(size)
        fo.flush()
        os.fsync(fo.fileno())


def _copy_range(fi: int, fo: int, offset: int, length: int) -> None:
    while length > 0:
        try:
            n = os.copy_file_range(fi, fo, length, offset, offset)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = 0
        if n == 0:  # not supported here (or a short file): plain reads and writes
            data = os.pread(fi, min(length, 1 << 20), offset)
            if not data:
                return
            n = os.pwrite(fo, data, offset)
        offset += n
        length -= n


class Array:
    """The LUNs of one state directory and the pools that can attach them (all in this process)."""

    def __init__(self, root: Path, pools: list[PoolState]) -> None:
        self.root = root
        self.pools = pools
        # One mirror at a time. Never taken under a pool lock (mirror takes pool locks under it).
        self.lock = threading.Lock()

    def lun_dir(self, lun: str) -> Path:
        return self.root / ARRAY_DIR / lun

    def luns(self) -> list[str]:
        base = self.root / ARRAY_DIR
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and valid_lun(p.name))

    # ------------------------------------------------------------------ who has a LUN plugged

    @staticmethod
    def attachment(pool: PoolState, lun: str) -> Attachment | None:
        """``pool``'s plugged PBDs naming ``lun`` (caller holds ``pool.db.lock``), else None."""
        db = pool.db
        hosts: list[str] = []
        sr_uuid = ""
        for _, pbd in db.items("PBD"):
            if not pbd["currently_attached"] or pbd["device_config"].get("SCSIid") != lun:
                continue
            if not db.exists("SR", pbd["SR"]) or db.get("SR", pbd["SR"])["type"] not in DR_SR_TYPES:
                continue
            sr_uuid = db.get("SR", pbd["SR"])["uuid"]
            if db.exists("host", pbd["host"]):
                hosts.append(db.get("host", pbd["host"])["uuid"])
        if not sr_uuid:
            return None
        pool_uuid = db.get("pool", pool.pool_ref)["uuid"] if db.exists("pool", pool.pool_ref) else ""
        return Attachment(pool.index, pool_uuid, sr_uuid, tuple(sorted(hosts)))

    def attachments(self, lun: str, *, skip: PoolState | None = None) -> list[Attachment]:
        """Every pool (but ``skip``) that has ``lun`` plugged. Takes each pool's lock in turn, so
        the caller must hold no pool lock but ``skip``'s."""
        out = []
        for pool in self.pools:
            if pool is skip:
                continue
            with pool.db.lock:
                found = self.attachment(pool, lun)
            if found is not None:
                out.append(found)
        return out

    # ------------------------------------------------------------------ sim.array

    def describe(self) -> list[dict[str, Any]]:
        """Per LUN: the SR it holds, its metadata VDIs' databases and who has it plugged."""
        out = []
        for lun in self.luns():
            directory = self.lun_dir(lun)
            sr: dict[str, Any] = {}
            path = directory / SR_METADATA
            if path.exists():
                sr = json.loads(path.read_text()).get("sr", {})
            databases = []
            for db_path in sorted(directory.glob("*" + DATABASE_SUFFIX)):
                doc = json.loads(db_path.read_text())
                databases.append(
                    {
                        "vdi": db_path.name[: -len(DATABASE_SUFFIX)],
                        "pool_uuid": doc.get("pool_uuid", ""),
                        "generation": int(doc.get("generation", 0)),
                    }
                )
            out.append(
                {
                    "scsiid": lun,
                    "sr_uuid": sr.get("uuid", ""),
                    "sr_name": sr.get("name_label", ""),
                    "vhds": len(list(directory.glob("*.vhd"))),
                    "databases": databases,
                    "plugged": [
                        {"pool": a.pool, "pool_uuid": a.pool_uuid, "sr_uuid": a.sr_uuid, "hosts": [*a.hosts]}
                        for a in self.attachments(lun)
                    ],
                }
            )
        return out

    # ------------------------------------------------------------------ sim.array_mirror

    def mirror(self, src: str, dst: str) -> None:
        """Replace LUN ``dst`` with a consistent point-in-time copy of LUN ``src``.

        Consistent: taken while every pool's database lock is held (pools in index order, the
        order any multi-pool operation uses) and no transfer writes into the source SR, after the
        pools that have ``src`` plugged wrote their current SR metadata and database into it (an
        array copies blocks that LVHD and xapi's redo log have already written synchronously).
        Refused while some pool has ``dst`` plugged: a replication target is not in use by hosts.
        """
        for name, lun in (("from_scsiid", src), ("to_scsiid", dst)):
            if not valid_lun(lun):
                raise XapiError("INVALID_VALUE", name, lun)
        if src == dst:
            raise XapiError("INVALID_VALUE", "to_scsiid", f"{dst} is the source LUN")
        if not self.lun_dir(src).is_dir():
            raise XapiError("INVALID_VALUE", "from_scsiid", f"no LUN {src} on the array")
        deadline = time.monotonic() + MIRROR_WAIT
        with self.lock:
            while True:
                with ExitStack() as stack:
                    for pool in self.pools:
                        stack.enter_context(pool.db.lock)
                    users = [a for p in self.pools if (a := self.attachment(p, dst)) is not None]
                    if users:
                        raise XapiError(
                            "SIM_LUN_IN_USE", dst, *(f"pool{a.pool} SR {a.sr_uuid}" for a in users)
                        )
                    sources = [p for p in self.pools if self.attachment(p, src) is not None]
                    if not any(_transfers(p, src) for p in sources):
                        for pool in sources:
                            replicate(pool)
                        self._copy_lun(src, dst)
                        LOG.warning("LUN %s mirrored onto LUN %s", src, dst)
                        return
                if time.monotonic() > deadline:
                    raise XapiError("SIM_LUN_BUSY", src, "transfers into the LUN did not end")
                time.sleep(0.02)  # a transfer needs the pool locks to finish

    def _copy_lun(self, src: str, dst: str) -> None:
        source = self.lun_dir(src)
        target = self.lun_dir(dst)
        staging = self.root / ARRAY_DIR / f".{dst}.{uuidlib.uuid4().hex}.tmp"
        staging.mkdir(parents=True)
        try:
            for path in sorted(source.iterdir()):
                if path.name.endswith(".vhd"):
                    copy_sparse(path, staging / path.name)
                elif path.name == SR_METADATA or path.name.endswith(DATABASE_SUFFIX):
                    shutil.copyfile(path, staging / path.name)
            old = None
            if target.exists():
                old = target.with_name(f".{dst}.{uuidlib.uuid4().hex}.old")
                os.rename(target, old)
            os.rename(staging, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def format(self, lun: str) -> None:
        """What ``lvutil.createVG`` leaves: the LUN's previous content gone (caller checks use)."""
        directory = self.lun_dir(lun)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)


def _transfers(pool: PoolState, lun: str) -> int:
    """Transfers writing into (or reading from) the pool's SR on ``lun`` (caller holds the lock)."""
    total = 0
    for sr, _ in pool.db.items("SR"):
        if pool.storage.lun(sr) == lun:
            total += pool.gc.busy.get(sr, 0)
    return total


def replicate(pool: PoolState) -> None:
    """Write what the pool's storage keeps on its LUNs: for every attached DR-capable SR its own
    metadata (``sr.json``: the SR and its VDIs, as LVHD's management volume), and the pool
    database into each metadata VDI xapi's redo log writes to (``pool.redo_logs``). Called after
    each database save, so the LUN is as current as the synchronous LVHD metadata and redo log."""
    db = pool.db
    with db.lock:
        pool_uuid = db.get("pool", pool.pool_ref)["uuid"] if db.exists("pool", pool.pool_ref) else ""
        for sr, rec in db.items("SR"):
            lun = pool.storage.lun(sr)
            pbds = db.reverse("SR", "PBDs", sr)
            if lun is None or not any(db.get("PBD", p)["currently_attached"] for p in pbds):
                continue
            directory = pool.array.lun_dir(lun)
            directory.mkdir(parents=True, exist_ok=True)
            vdis = []
            for ref, vrec in db.items("VDI"):
                if vrec["SR"] != sr:
                    continue
                entry = {k: vrec[k] for k in VDI_FIELDS}
                of = vrec["snapshot_of"]
                entry["snapshot_of_uuid"] = db.get("VDI", of)["uuid"] if db.exists("VDI", of) else ""
                entry["metadata_of_pool"] = vrec["metadata_of_pool"]
                vdis.append(entry)
                if ref in pool.redo_logs:
                    # the database generation is what xapi compares (Xapi_dr.update_metadata_latest)
                    write_json(
                        directory / f"{vrec['uuid']}{DATABASE_SUFFIX}",
                        {"pool_uuid": pool_uuid, "pool_ref": pool.pool_ref, **db.snapshot_doc()},
                    )
            write_json(
                directory / SR_METADATA,
                {
                    "sr": {
                        k: rec[k] for k in ("uuid", "name_label", "name_description", "type", "physical_size")
                    },
                    "vdis": vdis,
                },
            )
