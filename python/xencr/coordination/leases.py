"""The per-(VM, target SR) lock across hosts: a row of ``leases``, the database twin of
`service.locks`' flock files (`service.locks.Locker`).

A lease is taken when there is none, or the one there lapsed (past its expiry: its holder stopped
renewing) or belongs to a worker that stopped cleanly; a holder that already has it is refused
like a second flock in one process. Its holder's heartbeat renews it; ``release()`` deletes it.
Before a commit the runner asks `still_held`, which renews it if it is still this holder's, so a
worker that lost it (cut off from the database longer than the lease) never commits."""

from __future__ import annotations

import functools
import threading
import uuid

from sqlalchemy import delete, select, update

from xencr.coordination.sql import insert, lapsed, now_text, retried, standing
from xencr.coordination.worker import Worker
from xencr.service.locks import Held, Holder
from xencr.state import StateError
from xencr.state.rows import text_time
from xencr.state.schema import leases


class Lease:
    """A lease held; ``release()`` (idempotent) gives it back."""

    def __init__(self, locker: LeaseLocker, vm_uuid: str, sr_uuid: str, token: str) -> None:
        self.locker = locker
        self.key = (vm_uuid, sr_uuid)
        self.token = token
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.locker.give_back(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LeaseLocker:
    """Leases held under ``worker``'s name."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._held: dict[tuple[str, str], str] = {}  # (vm, sr) -> token
        self._lock = threading.Lock()

    def try_lock(self, vm_uuid: str, sr_uuid: str, job_name: str, *, job_id: str = "") -> Held | None:
        vm, sr = vm_uuid.lower(), sr_uuid.lower()
        token = uuid.uuid4().hex
        tries = 0

        def attempt() -> str | None:
            nonlocal tries
            tries += 1
            with self.worker.db.transaction() as conn:
                now = now_text(conn)
                c = leases.c
                if tries > 1 and conn.execute(select(c.token).where(c.token == token)).first() is not None:
                    return token  # a retry after a commit whose answer was lost
                stmt = insert(conn, leases).values(
                    vm_uuid=vm,
                    target_sr=sr,
                    job_id=job_id,
                    job_name=job_name,
                    worker=self.worker.name,
                    token=token,
                    since=now,
                    expires_at=now_text(conn, self.worker.lease),
                )
                stmt = stmt.on_conflict_do_update(
                    index_elements=[c.vm_uuid, c.target_sr],
                    set_={
                        k: stmt.excluded[k]
                        for k in ("job_id", "job_name", "worker", "token", "since", "expires_at")
                    },
                    where=lapsed(c.expires_at, c.worker, now),
                ).returning(c.token)
                got: str | None = conn.execute(stmt).scalar()
                return got

        try:
            got = retried(attempt, seconds=self.worker.lease / 2)
        except StateError:
            # It may have committed with its answer lost: a lease nobody holds must not stay
            # (the heartbeat would renew it for ever).
            self.worker.defer_release(functools.partial(self._delete, token))
            raise
        if got != token:
            return None
        with self._lock:
            self._held[(vm, sr)] = token
        return Lease(self, vm, sr, token)

    def read_holder(self, vm_uuid: str, sr_uuid: str) -> Holder | None:
        c = leases.c
        with self.worker.db.reading() as conn:
            row = conn.execute(
                select(c.job_id, c.job_name, c.worker, c.since).where(
                    c.vm_uuid == vm_uuid.lower(), c.target_sr == sr_uuid.lower()
                )
            ).first()
        if row is None:
            return None
        since = text_time(row.since)
        assert since is not None
        # No pid across hosts: the worker names the holder.
        return Holder(row.job_id, row.job_name, 0, since, worker=row.worker)

    def still_held(self, vm_uuid: str, sr_uuid: str) -> bool:
        key = (vm_uuid.lower(), sr_uuid.lower())
        with self._lock:
            token = self._held.get(key)
        if token is None:
            return False

        def attempt() -> bool:
            with self.worker.db.transaction() as conn:
                until, c = now_text(conn, self.worker.lease), leases.c
                # Only while it stands: a lapsed lease nobody took yet is lost all the same (the
                # task may have gone back to the queue, to run again elsewhere).
                renewed = conn.execute(
                    update(leases)
                    .where(c.token == token, standing(c.expires_at, c.worker, now_text(conn)))
                    .values(expires_at=until)
                )
                return renewed.rowcount == 1

        try:
            return retried(attempt, seconds=self.worker.lease / 3)
        except StateError:
            return False  # cannot tell: not committing is the safe answer (the attempt is kept)

    def give_back(self, lease: Lease) -> None:
        with self._lock:
            if self._held.get(lease.key) == lease.token:
                del self._held[lease.key]

        try:
            self._delete(lease.token)
        except StateError:
            self.worker.defer_release(functools.partial(self._delete, lease.token))

    def _delete(self, token: str) -> None:
        with self.worker.db.transaction() as conn:
            conn.execute(delete(leases).where(leases.c.token == token))
