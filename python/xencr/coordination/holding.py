"""What a run needs to take leases and slots in the database: a `Worker` (registered by the
daemon, or unregistered for a manual run), its `LeaseLocker` and its `DbSlots`."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from xencr.config import Config, WorkerConfig
from xencr.coordination.leases import LeaseLocker
from xencr.coordination.slots import DbSlots
from xencr.coordination.worker import Worker
from xencr.service.locks import FileLocker, Locker, lock_dir
from xencr.state import StateDB, open_state


@dataclass(frozen=True)
class Holding:
    """A holder's locker and slot provider (`service.locks.Locker`, `service.limits.SlotProvider`)."""

    worker: Worker
    locker: LeaseLocker
    slots: DbSlots

    @classmethod
    def of(cls, worker: Worker) -> Holding:
        return cls(worker, LeaseLocker(worker), DbSlots(worker))


@contextmanager
def holding(db: StateDB, settings: WorkerConfig) -> Iterator[Holding]:
    """Leases and slots for one manual run (`xencr run` with a PostgreSQL state): held under
    ``<hostname>-<pid>`` (no worker row), renewed by a heartbeat while the block runs, all given
    back at its end."""
    # Several runs of one process hold apart (one's end must not release another's claims), and
    # so do processes of hosts that share a name and pids (containers): a random part.
    name = f"{socket.gethostname()}-{os.getpid()}-run-{uuid.uuid4().hex[:6]}"
    worker = Worker(db, WorkerConfig(name=name, lease=settings.lease, slots=1), register=False)
    worker.start()
    try:
        yield Holding.of(worker)
    finally:
        worker.stop()


@contextmanager
def locker_for(config: Config) -> Iterator[Locker]:
    """The per-(VM, SR) locks of the configured state, for a command that takes one outside a
    run (`xencr seed`): this host's flock files with SQLite, leases held by this process (as
    `holding`) with PostgreSQL."""
    if config.state.engine != "postgresql":
        yield FileLocker(lock_dir(config.state.local_path))
        return
    with open_state(config) as db, holding(db, config.worker) as h:
        yield h.locker
