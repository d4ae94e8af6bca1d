"""Live-guest imitation: a running VM whose ``other_config["sim_writes_per_minute"]`` is N writes
N pattern blocks per minute to its writable disks, as a busy guest would between replication runs.

Offsets and data are deterministic per VM (seeded by the VM's UUID and a counter), so a test can
recompute what was written; the writes go through the same path as ``sim.write``.
"""

from __future__ import annotations

import random
import threading
from typing import TYPE_CHECKING

from xencr.sim.guest import pattern

if TYPE_CHECKING:
    from xencr.sim.pool_state import PoolState

KEY = "sim_writes_per_minute"
WRITE_SIZE = 64 * 1024
TICK = 1.0


class GuestActivity:
    def __init__(self, pool: PoolState) -> None:
        self.pool = pool
        self.stop = threading.Event()
        self.counters: dict[str, int] = {}
        self.credit: dict[str, float] = {}
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"guests-{self.pool.index}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)

    def _run(self) -> None:
        while not self.stop.wait(TICK):
            try:
                self.tick(TICK)
            except Exception:
                self.pool.log.exception("guest activity failed")

    def tick(self, seconds: float) -> int:
        """Do the writes due in ``seconds``; returns how many were made."""
        db = self.pool.db
        done = 0
        with db.lock:
            for vm, rec in db.items("VM"):
                rate = rec["other_config"].get(KEY)
                if rec["power_state"] != "Running" or not rate or rec["is_control_domain"]:
                    continue
                try:
                    per_minute = float(rate)
                except ValueError:
                    continue
                self.credit[vm] = self.credit.get(vm, 0.0) + per_minute * seconds / 60.0
                disks = [
                    db.get("VBD", v)["VDI"]
                    for v in db.reverse("VM", "VBDs", vm)
                    if db.get("VBD", v)["type"] == "Disk" and db.get("VBD", v)["mode"] == "RW"
                ]
                while self.credit[vm] >= 1.0 and disks:
                    self.credit[vm] -= 1.0
                    n = self.counters.get(vm, 0)
                    self.counters[vm] = n + 1
                    rng = random.Random(f"{rec['uuid']}/{n}")
                    vdi = disks[n % len(disks)]
                    size = int(db.get("VDI", vdi)["virtual_size"])
                    offset = rng.randrange(0, max(1, size - WRITE_SIZE)) & ~511
                    for pos, chunk in pattern(f"auto/{rec['uuid']}/{n}", offset, WRITE_SIZE):
                        self.pool.storage.write(vdi, pos, chunk)
                    done += 1
        return done
