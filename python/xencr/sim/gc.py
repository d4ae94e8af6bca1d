"""The SR garbage collector: coalesce hidden base copies left with a single child.

XenServer's GC (sm ``cleanup.py``) merges a hidden VHD with one child so chains do not grow
without bound; the surviving node keeps the child's identity. Here the engine's crash-safe
``coalesce`` does the merge; runs in a background thread when kicked, or synchronously via
the sim-only ``sim.gc`` call. Nothing runs while a transfer uses the SR.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from xencr.sim.storage import engine

if TYPE_CHECKING:
    from xencr.sim.pool_state import PoolState


class Collector:
    def __init__(self, pool: PoolState) -> None:
        self.pool = pool
        self.lock = threading.Lock()  # one collection at a time
        self.busy: dict[str, int] = {}  # SR ref -> active transfers
        self.enabled = True

    def transfer(self, sr: str, delta: int) -> None:
        with self.pool.db.lock:
            self.busy[sr] = self.busy.get(sr, 0) + delta

    def recover(self) -> int:
        """After a crash between a finished merge and its database update: a base copy whose file
        is gone and which has one child is dropped and the child re-pointed (an interrupted merge,
        with both files present, is simply resumed by the next collection)."""
        db, storage = self.pool.db, self.pool.storage
        fixed = 0
        with db.lock:
            for base, rec in db.items("VDI"):
                if rec["managed"] or storage.path(base).exists():
                    continue
                children = [
                    r
                    for r, c in db.items("VDI")
                    if c["SR"] == rec["SR"] and c["type"] != "cbt_metadata" and storage.parent_ref(r) == base
                ]
                if len(children) != 1:
                    continue
                self._relink(children[0], base)
                fixed += 1
        return fixed

    def _relink(self, child: str, base: str) -> None:
        db = self.pool.db
        sm_config = dict(db.get("VDI", child)["sm_config"])
        grand = db.get("VDI", base)["sm_config"].get("vhd-parent")
        if grand:
            sm_config["vhd-parent"] = grand
        else:
            sm_config.pop("vhd-parent", None)
        db.update("VDI", child, sm_config=sm_config)
        db.delete("VDI", base)

    def close(self) -> None:
        """No new collections; wait for the one in progress (its DB update included)."""
        self.enabled = False
        with self.lock:
            pass

    def kick(self, sr: str) -> None:
        if not self.enabled:
            return
        threading.Thread(target=self.collect, args=(sr,), name="sr-gc", daemon=True).start()

    def _candidate(self, sr: str) -> tuple[str, str] | None:
        """(base copy ref, its only child ref) if one exists and the SR is idle."""
        db = self.pool.db
        storage = self.pool.storage
        if self.busy.get(sr, 0):
            return None
        for ref, rec in db.items("VDI"):
            if rec["SR"] != sr or rec["managed"]:
                continue
            # a data-destroyed snapshot (cbt_metadata) has no file left: not a child any more
            children = [
                r
                for r, c in db.items("VDI")
                if c["SR"] == sr and c["type"] != "cbt_metadata" and storage.parent_ref(r) == ref
            ]
            if len(children) == 1 and not any(
                db.get("VBD", v)["currently_attached"] for v in db.reverse("VDI", "VBDs", children[0])
            ):
                return ref, children[0]
        return None

    def collect(self, sr: str) -> int:
        """Coalesce until nothing is left to do; returns the number of merges.

        Each merge runs under the pool's database lock (no RPC sees a half-merged chain) and
        only while no transfer uses the SR."""
        merges = 0
        db = self.pool.db
        storage = self.pool.storage
        with self.lock:
            while self.enabled:
                with db.lock:
                    if not db.exists("SR", sr):
                        return merges
                    found = self._candidate(sr)
                    if found is None:
                        return merges
                    base, child = found
                    child_row, base_row = db.get("VDI", child), db.get("VDI", base)
                    base_path = str(storage.path(base))
                    with storage.file_lock(child_row["uuid"]):
                        engine().coalesce(str(storage.path(child)), base_path)
                    self._relink(child, base)
                    Path(base_path).unlink(missing_ok=True)  # not journalled: recover() handles it
                    storage.refresh(sr)
                    self.pool.save()
                self.pool.log.info("gc: coalesced %s into base copy %s", child_row["uuid"], base_row["uuid"])
                merges += 1
            return merges
