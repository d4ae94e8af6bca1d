"""Simulated guest boots: when the guest of a started domain comes up, if ever.

Rule: a domain started unpaused (``VM.start``, ``VM.start_on``, ``VM.unpause`` of a domain whose
guest has not booted) boots its guest after ``sim_boot_delay`` seconds (VM ``other_config``, else
the pool's, else 0, times the pool's delay scale: :mod:`xencr.sim.knobs`); a VM whose
``other_config["sim_boots"]`` is ``"false"`` runs but its guest never comes up. Booting means the
guest agent reports ``VM_guest_metrics`` and the guest's scripts answer their xenstore keys
(:func:`xencr.sim.api.metrics.guest_up`), as xapi learns it from the agent some time after the
domain started (``xapi_guest_agent.ml``). A boot belongs to one domain (its ``domid``): a VM
stopped or restarted in the meantime is left alone.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from xencr.sim import knobs
from xencr.sim.api import metrics

if TYPE_CHECKING:
    from xencr.sim.pool_state import PoolState


class GuestBoots:
    def __init__(self, pool: PoolState) -> None:
        self.pool = pool
        self.timers: dict[str, threading.Timer] = {}  # VM ref -> its pending boot
        self.lock = threading.Lock()
        self.closed = False

    def boot(self, vm: str) -> None:
        """The domain of ``vm`` just started running (caller holds the database lock): boot its
        guest now (no delay), later, or never."""
        db = self.pool.db
        if not knobs.guest_boots(db, vm):
            self.pool.log.info("VM %s: guest does not boot", db.get("VM", vm)["uuid"])
            return
        delay = knobs.scaled(db, vm, knobs.BOOT_DELAY)
        if delay <= 0:
            metrics.guest_up(db, vm, self.pool.index)
            return
        domid = int(db.get("VM", vm)["domid"])
        timer = threading.Timer(delay, self._up, (vm, domid))
        timer.daemon = True
        with self.lock:
            if self.closed:
                return
            old = self.timers.pop(vm, None)
            if old is not None:
                old.cancel()
            self.timers[vm] = timer
        timer.start()

    def _up(self, vm: str, domid: int) -> None:
        db = self.pool.db
        with self.lock:
            if self.timers.get(vm) is threading.current_thread():
                del self.timers[vm]
        with db.lock:
            if not db.exists("VM", vm):
                return
            row = db.get("VM", vm)
            if row["power_state"] != "Running" or int(row["domid"]) != domid or metrics.guest_is_up(db, vm):
                return
            metrics.guest_up(db, vm, self.pool.index)
        self.pool.log.info("VM %s: guest up", row["uuid"])
        self.pool.save()

    def resume(self) -> None:
        """When the simulator starts serving: guests of running domains that had not booted
        boot now, after their full delay (the simulator was not running to count it)."""
        db = self.pool.db
        with self.lock:
            self.closed = False
        with db.lock:
            for vm, row in list(db.items("VM")):
                running = row["power_state"] == "Running" and not row["is_control_domain"]
                if running and not metrics.guest_is_up(db, vm):
                    self.boot(vm)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            timers, self.timers = list(self.timers.values()), {}
        for timer in timers:
            timer.cancel()
