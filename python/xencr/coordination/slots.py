"""Numbered slots in the database: ``("export" | "import", pool, n)`` for ``n < max_exports`` /
``max_imports``, ``("job", job id, n)`` for ``n < concurrency``; a row is a slot taken, by a
worker, until its claim lapses (see the package's rules).

`DbSlots` keeps `service.limits`' contract across workers: a transfer takes all of its slots in
one transaction or none (so no two transfers ever wait on each other), waits with cancel and
deadline, and gives them back after. Slots are taken in (kind, pool) order (no two takers wait
on each other in a circle); a slot is a row numbered below the limit, so at most ``limit`` are
ever held (after a limit is lowered, the higher numbers still held drain as they are released).
Takers try free numbers at random: two that want the last one meet on its row, and the second
finds it taken once the first commits."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, delete, func, select

from xencr.coordination.sql import insert, lapsed, now_text, retried, standing
from xencr.coordination.worker import Worker
from xencr.service.limits import Slot, SlotCancelled, SlotsUnavailable
from xencr.state import StateError
from xencr.state.schema import slots

Key = tuple[str, str, int]  # (kind, pool, n)


def take(
    conn: Connection,
    wanted: list[Slot],
    worker: str,
    token: str,
    lease: float,
    *,
    again: bool = False,
) -> list[Key] | None:
    """In the caller's transaction: one free slot of each of ``wanted`` for ``worker`` (all
    under ``token``), or None when one of them has no room (the caller rolls back what was
    taken). ``again``: a retry after a commit whose answer was lost, which finds the slots its
    token already holds."""
    s = slots.c
    now = now_text(conn)
    if again:
        mine = conn.execute(select(s.kind, s.pool, s.n).where(s.token == token)).all()
        if mine:
            return [(k, p, n) for k, p, n in mine]
    got: list[Key] = []
    for want in sorted(wanted, key=lambda w: (w.kind, w.pool)):
        limit = max(1, want.limit)
        # A free number picked at random first (one statement while there is room), so that
        # concurrent takers seldom meet on the same row; then every free one.
        first = random.sample(range(limit), min(2, limit))
        taken = next((n for n in first if _take_one(conn, want, n, worker, token, lease)), None)
        if taken is None:
            where = (s.kind == want.kind, s.pool == want.pool, standing(s.expires_at, s.worker, now))
            held = {n for (n,) in conn.execute(select(s.n).where(*where))}
            rest = [n for n in range(limit) if n not in held and n not in first]
            random.shuffle(rest)
            taken = next((n for n in rest if _take_one(conn, want, n, worker, token, lease)), None)
        if taken is None:
            return None
        got.append((want.kind, want.pool, taken))
    return got


def _take_one(conn: Connection, want: Slot, n: int, worker: str, token: str, lease: float) -> bool:
    """Slot ``n`` of ``want`` for ``token`` if it is free (no row, or a lapsed claim)."""
    s = slots.c
    stmt = insert(conn, slots).values(
        kind=want.kind, pool=want.pool, n=n, worker=worker, token=token, expires_at=now_text(conn, lease)
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[s.kind, s.pool, s.n],
        set_={
            "worker": stmt.excluded.worker,
            "token": stmt.excluded.token,
            "expires_at": stmt.excluded.expires_at,
        },
        where=lapsed(s.expires_at, s.worker, now_text(conn)),
    ).returning(s.token)
    return bool(conn.execute(stmt).scalar() == token)


def release(conn: Connection, token: str) -> None:
    """Give back every slot taken under ``token``."""
    conn.execute(delete(slots).where(slots.c.token == token))


def in_use(conn: Connection, kind: str, pool: str) -> int:
    """Slots of (kind, pool) held now."""
    s = slots.c
    held = standing(s.expires_at, s.worker, now_text(conn))
    query = select(func.count()).where(s.kind == kind, s.pool == pool, held)
    return int(conn.execute(query).scalar_one())


class _NoRoom(Exception):
    """Rolls back a transaction that took some slots of a transfer but not all."""


class DbSlots:
    """`service.limits.SlotProvider` across workers: slots held under ``worker``'s name (its
    heartbeat renews them), looked at again every ``poll`` seconds while waiting."""

    def __init__(self, worker: Worker, *, poll: float = 0.25) -> None:
        self.worker = worker
        self.poll = poll

    @contextmanager
    def transfer_slots(
        self, wanted: list[Slot], *, cancel: threading.Event | None = None, deadline: float | None = None
    ) -> Iterator[None]:
        if not wanted:
            yield
            return
        token = uuid.uuid4().hex
        while not self._try(wanted, token, cancel):
            if cancel is not None and cancel.is_set():
                raise SlotCancelled("cancelled while waiting for a transfer slot")
            if deadline is not None and time.monotonic() >= deadline:
                raise SlotCancelled("deadline passed while waiting for a transfer slot")
            if cancel is not None:
                cancel.wait(self.poll)
            else:
                time.sleep(self.poll)
        try:
            yield
        finally:
            self._release(token)

    def _try(self, wanted: list[Slot], token: str, cancel: threading.Event | None) -> bool:
        tries = 0

        def attempt() -> bool:
            nonlocal tries
            tries += 1
            w = self.worker
            try:
                with w.db.transaction() as conn:
                    if take(conn, wanted, w.name, token, w.lease, again=tries > 1) is None:
                        raise _NoRoom
            except _NoRoom:
                return False
            return True

        stop = (lambda: cancel.is_set()) if cancel is not None else (lambda: False)
        try:
            return retried(attempt, seconds=self.worker.lease, stop=stop)
        except StateError as err:
            # A take may have committed with its answer lost: its slots must not stay held (the
            # heartbeat would renew them for ever).
            self._release(token, now=False)
            raise SlotsUnavailable(f"transfer slots unavailable: {err}") from None

    def _release(self, token: str, *, now: bool = True) -> None:
        """Give back the slots of ``token``; if the database does not answer (or ``now`` is off),
        before the worker's next renewal (`Worker.defer_release`)."""

        def attempt() -> None:
            with self.worker.db.transaction() as conn:
                release(conn, token)

        if not now:
            self.worker.defer_release(attempt)
            return
        try:
            attempt()
        except StateError:
            self.worker.defer_release(attempt)
