"""Fault injection (SPEC §10; xapi.md 6 "fault injection hooks"): armed at run time by sim-only RPCs
or the CLI, each acting where a real host fails, each logged when armed and when it fires."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from xencr.sim.errors import XapiError


@dataclass
class TransferFaults:
    """Faults applied to the next HTTP data transfers (export and/or import)."""

    drop_after: dict[str, int] = field(default_factory=dict)  # kind -> bytes before the cut (one-shot)
    flip_at: dict[str, int] = field(default_factory=dict)  # kind -> stream offset of a flipped byte
    rate: int | None = None  # bytes/s for every transfer while set
    connection_rate: int | None = None  # bytes/s for each HTTP stream and each NBD connection


class Faults:
    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.lock = threading.Lock()
        self.call_failures: dict[str, list[list[str]]] = {}  # method -> queued error descriptions
        self.transfer = TransferFaults()
        self.sr_fill: dict[str, int] = {}  # SR uuid -> bytes of simulated foreign data
        self.unreachable = False
        self.unreachable_after: int | None = None  # requests still answered before unreachable
        self.down_hosts: set[str] = set()  # names of hosts whose listener is stopped

    def fail_next_call(self, method: str, description: list[str]) -> None:
        with self.lock:
            self.call_failures.setdefault(method, []).append(description)
        self.log.warning("fault armed: next call of %s fails with %s", method, description)

    def raise_call_fault(self, method: str) -> None:
        with self.lock:
            queue = self.call_failures.get(method)
            if not queue:
                return
            description = queue.pop(0)
            if not queue:
                del self.call_failures[method]
        self.log.warning("fault fired: %s failed with %s", method, description)
        raise XapiError(description[0], *description[1:])

    def drop_transfer_after(self, kind: str, nbytes: int) -> None:
        with self.lock:
            self.transfer.drop_after[kind] = nbytes
        self.log.warning("fault armed: next %s connection dropped after %d bytes", kind, nbytes)

    def flip_byte(self, kind: str, offset: int) -> None:
        with self.lock:
            self.transfer.flip_at[kind] = offset
        self.log.warning("fault armed: next %s stream has its byte at offset %d flipped", kind, offset)

    def set_rate(self, rate: int | None) -> None:
        with self.lock:
            self.transfer.rate = rate
        self.log.warning("fault armed: transfers limited to %s bytes/s", rate if rate else "unlimited")

    def set_connection_rate(self, rate: int | None) -> None:
        with self.lock:
            self.transfer.connection_rate = rate
        self.log.warning(
            "fault armed: each data connection limited to %s bytes/s", rate if rate else "unlimited"
        )

    def connection_rate(self) -> int | None:
        with self.lock:
            return self.transfer.connection_rate

    def take_transfer(self, kind: str) -> tuple[int | None, int | None, int | None]:
        """(drop_after, flip_at, rate) for one transfer of ``kind``; one-shot faults are consumed.
        The rate is the lower of the transfer rate and the per-connection rate."""
        with self.lock:
            drop = self.transfer.drop_after.pop(kind, None)
            flip = self.transfer.flip_at.pop(kind, None)
            limits = [r for r in (self.transfer.rate, self.transfer.connection_rate) if r]
            rate = min(limits) if limits else None
        if drop is not None or flip is not None:
            self.log.warning("fault fired: %s transfer (drop_after=%s, flip_at=%s)", kind, drop, flip)
        return drop, flip, rate

    def fill_sr(self, sr_uuid: str, nbytes: int) -> None:
        with self.lock:
            if nbytes > 0:
                self.sr_fill[sr_uuid] = nbytes
            else:
                self.sr_fill.pop(sr_uuid, None)
        self.log.warning("fault armed: SR %s holds %d bytes of foreign data", sr_uuid, nbytes)

    def set_unreachable(self, flag: bool) -> None:
        with self.lock:
            self.unreachable = flag
            self.unreachable_after = None
        self.log.warning("fault armed: host %s", "unreachable" if flag else "reachable again")

    def set_unreachable_after(self, n: int) -> None:
        with self.lock:
            self.unreachable_after = max(0, n)
        self.log.warning("fault armed: pool unreachable after %d more requests", n)

    def dropping(self) -> bool:
        """Whether to drop this request (an API call or a data transfer, not ``sim.*``): the pool
        is unreachable, or becomes so now that its countdown has run out."""
        with self.lock:
            if self.unreachable:
                return True
            if self.unreachable_after is None:
                return False
            if self.unreachable_after > 0:
                self.unreachable_after -= 1
                return False
            self.unreachable_after = None
            self.unreachable = True
        self.log.warning("fault fired: pool unreachable")
        return True

    def set_host_down(self, name: str, down: bool) -> None:
        with self.lock:
            (self.down_hosts.add if down else self.down_hosts.discard)(name)
        self.log.warning(
            "fault %s: host %s %s", "armed" if down else "cleared", name, "down" if down else "up"
        )

    def clear(self) -> None:
        with self.lock:
            self.call_failures.clear()
            self.transfer = TransferFaults()
            self.sr_fill.clear()
            self.unreachable_after = None
        self.unreachable = False
        self.log.warning("faults cleared")

    def describe(self) -> dict[str, Any]:
        with self.lock:
            return {
                "call_failures": {k: [list(d) for d in v] for k, v in self.call_failures.items()},
                "drop_after": dict(self.transfer.drop_after),
                "flip_at": dict(self.transfer.flip_at),
                "rate": self.transfer.rate or 0,
                "connection_rate": self.transfer.connection_rate or 0,
                "sr_fill": dict(self.sr_fill),
                "unreachable": self.unreachable,
                "unreachable_after": -1 if self.unreachable_after is None else self.unreachable_after,
                "down_hosts": sorted(self.down_hosts),
            }
