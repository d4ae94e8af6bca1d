"""A worker: this process's row in ``workers``, and the heartbeat that keeps it and every claim it
holds (leases, slots, queue rows) alive, in one transaction (see the package's rules).

The same heartbeat, without a row, keeps the leases and slots of a manual run (`register=False`):
a `xencr run` holds what it takes only while its process lives."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, delete, func, select, update

from xencr.config import WorkerConfig
from xencr.coordination.sql import now_text, server_now
from xencr.state import RUNNING, StateDB, StateError
from xencr.state.rows import text_time, time_text
from xencr.state.schema import leases, queue, runs, slots, tasks, workers

log = logging.getLogger("xencr.coordination")

CLAIMED, PENDING, DONE = "claimed", "pending", "done"


class WorkerNameInUse(Exception):
    """Another live process runs as this worker; the message names it."""


@dataclass(frozen=True)
class WorkerRow:
    """A worker as recorded (times by the database server's clock)."""

    name: str
    host: str
    pid: int
    pools: tuple[str, ...]  # empty: all
    slots: int
    lease_seconds: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None

    def alive(self, now: datetime) -> bool:
        """Heartbeat within its lease, and not stopped."""
        return self.stopped_at is None and (now - self.heartbeat_at).total_seconds() < self.lease_seconds

    def heartbeat_age(self, now: datetime) -> float:
        return max(0.0, (now - self.heartbeat_at).total_seconds())

    def serves(self, pools: tuple[str, ...]) -> bool:
        """Whether every pool of a task is one this worker may touch."""
        return not self.pools or set(pools) <= set(self.pools)


def pools_text(pools: tuple[str, ...] | list[str]) -> str:
    return ",".join(pools)


def pools_of(text: str) -> tuple[str, ...]:
    return tuple(p for p in text.split(",") if p)


def worker_rows(db: StateDB) -> tuple[datetime, list[WorkerRow]]:
    """The database server's time now and every worker recorded, by name."""
    with db.reading() as conn:
        now = server_now(conn)
        rows = conn.execute(select(workers).order_by(workers.c.name)).all()
    return now, [_row(r) for r in rows]


def _row(r: object) -> WorkerRow:
    m = r._mapping  # type: ignore[attr-defined]
    started, beat = text_time(m["started_at"]), text_time(m["heartbeat_at"])
    assert started is not None and beat is not None
    return WorkerRow(
        name=m["name"],
        host=m["host"],
        pid=int(m["pid"]),
        pools=pools_of(m["pools"]),
        slots=int(m["slots"]),
        lease_seconds=int(m["lease_seconds"]),
        started_at=started,
        heartbeat_at=beat,
        stopped_at=text_time(m["stopped_at"]),
    )


def alive(db: StateDB, name: str) -> bool:
    """Whether worker ``name`` heartbeats within its lease and has not stopped."""
    now, rows = worker_rows(db)
    return any(r.name == name and r.alive(now) for r in rows)


class Worker:
    """This process as a holder of claims: ``start()`` (registers, unless ``register`` is off,
    and starts the heartbeat), ``stop()`` (releases every claim, records the stop).

    ``lost`` is set while the claims could not be renewed for half a lease (they may lapse soon:
    what runs under them should stop); ``on_lost`` is called when it is set; ``on_beat`` after
    each renewal (the daemon's housekeeping)."""

    def __init__(
        self,
        db: StateDB,
        settings: WorkerConfig,
        *,
        register: bool = True,
        on_lost: Callable[[str], None] = lambda why: None,
        on_beat: Callable[[], None] = lambda: None,
    ) -> None:
        self.db = db
        self.name = settings.name
        self.pools = tuple(settings.pools)
        self.lease = float(settings.lease)
        self.capacity = settings.slots
        self.register = register
        self.lost = threading.Event()
        self._on_lost = on_lost
        self._on_beat = on_beat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed = time.monotonic()  # when the last successful renewal was sent
        self._releases: list[Callable[[], None]] = []  # releases that failed, retried each beat
        self._lock = threading.Lock()
        self._started = ""  # the registered row's started_at (`_register`)

    @property
    def period(self) -> float:
        return self.lease / 3

    # -- life

    def start(self) -> None:
        """Register (a name held by another live worker is refused) and start the heartbeat."""
        if self.register:
            self._register()
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.name}", daemon=True)
        self._thread.start()

    def _register(self) -> None:
        host, pid = socket.gethostname(), os.getpid()
        with self.db.transaction() as conn:
            now = server_now(conn)
            found = conn.execute(select(workers).where(workers.c.name == self.name).with_for_update()).first()
            if found is not None:
                other = _row(found)
                if other.alive(now):
                    # Refused even from this host and pid: containers share hostnames and pids.
                    free_in = max(1, round(other.lease_seconds - other.heartbeat_age(now)))
                    raise WorkerNameInUse(
                        f"worker {self.name} is running on host {other.host} (pid {other.pid}, heartbeat "
                        f"{other.heartbeat_age(now):.0f}s ago): give this one another [worker] name "
                        f"(if that worker is dead, its name is free in {free_in}s)"
                    )
                conn.execute(delete(workers).where(workers.c.name == self.name))
                # Whatever that earlier life of this name held is no longer held by anyone, and
                # what it was running is over.
                self._release_all(conn)
                why = f"worker {self.name} was restarted before it finished"
                for table in (runs, tasks):
                    conn.execute(
                        update(table)
                        .where(table.c.worker == self.name, table.c.outcome == RUNNING)
                        .values(
                            outcome="interrupted",
                            finished_at=now_text(conn),
                            error=func.coalesce(table.c.error, why),
                        )
                    )
            self._started = time_text(now)  # this life's mark: `renew` renews only its own row
            conn.execute(
                workers.insert().values(
                    name=self.name,
                    host=host,
                    pid=pid,
                    pools=pools_text(self.pools),
                    slots=self.capacity,
                    lease_seconds=max(1, round(self.lease)),
                    started_at=self._started,
                    heartbeat_at=time_text(now),
                    stopped_at=None,
                )
            )

    def stop(self) -> None:
        """Stop the heartbeat, release every claim (tasks still claimed go back to pending) and
        record the stop. Best effort: a database out of reach leaves the claims to lapse."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.period + 5)
        try:
            with self.db.transaction() as conn:
                self._release_all(conn)
                if self.register:
                    now = now_text(conn)
                    conn.execute(
                        update(workers)
                        .where(workers.c.name == self.name)
                        .values(stopped_at=now, heartbeat_at=now)
                    )
        except StateError as err:
            log.warning("worker %s: claims not released (they lapse after the lease): %s", self.name, err)

    def _release_all(self, conn: Connection) -> None:
        # In `renew`'s order (see there).
        conn.execute(
            update(queue)
            .where(queue.c.worker == self.name, queue.c.state == CLAIMED)
            .values(state=PENDING, worker=None, token=None, slot=None, claimed_at=None, expires_at=None)
        )
        conn.execute(delete(slots).where(slots.c.worker == self.name))
        conn.execute(delete(leases).where(leases.c.worker == self.name))

    # -- the heartbeat

    def renew(self) -> bool:
        """Renew the row and every claim of this worker in one transaction; False when the
        database did not answer (logged; the heartbeat tries again)."""
        sent = time.monotonic()
        try:
            self._retry_releases()
            with self.db.transaction() as conn:
                until = now_text(conn, self.lease)
                if self.register:
                    w = workers.c
                    mine = conn.execute(
                        update(workers)
                        .where(w.name == self.name, w.started_at == self._started, w.stopped_at.is_(None))
                        .values(heartbeat_at=now_text(conn))
                    )
                    if mine.rowcount != 1:
                        # Another process registered this name after this one's lease lapsed:
                        # its claims are not ours to renew.
                        log.warning("worker %s: its row belongs to another process now", self.name)
                        return False
                # Queue rows, then slots, then leases: the order `queue.finish` locks them in (the
                # other order deadlocks with a task finishing on this worker).
                conn.execute(
                    update(queue)
                    .where(queue.c.worker == self.name, queue.c.state == CLAIMED)
                    .values(expires_at=until)
                )
                conn.execute(update(slots).where(slots.c.worker == self.name).values(expires_at=until))
                conn.execute(update(leases).where(leases.c.worker == self.name).values(expires_at=until))
        except StateError as err:
            log.warning("worker %s: heartbeat failed: %s", self.name, err)
            return False
        self._renewed = sent
        if self.lost.is_set():
            log.warning("worker %s: the state database answers again; claims renewed", self.name)
            self.lost.clear()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.period):
            if self.renew():
                try:
                    self._on_beat()
                except Exception as err:  # housekeeping must never stop the heartbeat
                    log.warning("worker %s: housekeeping failed: %s", self.name, err)
            elif not self.lost.is_set() and time.monotonic() - self._renewed > self.lease / 2:
                why = (
                    f"claims not renewed for {time.monotonic() - self._renewed:.0f}s (lease {self.lease:g}s)"
                )
                self.lost.set()
                self._on_lost(why)

    def defer_release(self, release: Callable[[], None]) -> None:
        """A release that failed (the database out of reach): retried before each renewal, so
        that the heartbeat never keeps alive a claim nobody holds."""
        with self._lock:
            self._releases.append(release)

    def _retry_releases(self) -> None:
        with self._lock:
            pending, self._releases = self._releases, []
        for i, release in enumerate(pending):
            try:
                release()
            except StateError:
                with self._lock:
                    self._releases[:0] = pending[i:]
                raise
