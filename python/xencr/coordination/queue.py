"""Fires and their tasks (see the package's rules): `claim_fire` (once cluster-wide), `enqueue`
(one task per VM, or one for the whole job), `claim_next` (``FOR UPDATE SKIP LOCKED``, with a job
slot), `finish`, `requeue_expired` (tasks of workers that stopped heartbeating go back to
pending, their runs closed as interrupted) and `unserved` (pending tasks no live worker may
take). A task's claim carries a token: a claim or a finish retried after a lost answer finds
its own, and a worker whose claim lapsed can no longer finish what another took over."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, case, delete, exists, func, select, update
from sqlalchemy.orm import aliased

from xencr.coordination import slots as slotmod
from xencr.coordination.sql import insert, now_text, standing
from xencr.coordination.worker import CLAIMED, DONE, PENDING, Worker, pools_of, pools_text, worker_rows
from xencr.service.limits import Slot
from xencr.state import RUNNING, StateDB
from xencr.state.rows import text_time, time_text
from xencr.state.schema import fire_claims, queue, runs, schedule_fires, slots, tasks

# The vm_uuid of a task standing for every VM of its job, not resolved yet.
WHOLE_JOB = ""
# Outcomes of tasks that ran nothing.
SUPERSEDED, EXPANDED, DROPPED = "superseded", "expanded", "dropped"
JOB_SLOT = "job"


@dataclass(frozen=True)
class Fire:
    """A schedule's fire: the scheduled time (the same on every worker) and the job's pools."""

    job_id: str
    schedule_id: str
    fire_at: datetime
    pools: tuple[str, ...]


@dataclass(frozen=True)
class QueuedVm:
    uuid: str
    name: str


@dataclass(frozen=True)
class QueueRow:
    """One task of a fire, as recorded."""

    id: int
    job_id: str
    schedule_id: str
    fire_at: datetime
    vm_uuid: str  # WHOLE_JOB: every VM of the job
    vm_name: str
    pools: tuple[str, ...]
    state: str  # pending | claimed | done
    worker: str | None
    token: str | None
    enqueued_at: datetime
    claimed_at: datetime | None
    finished_at: datetime | None
    run_id: int | None
    outcome: str | None

    @property
    def whole_job(self) -> bool:
        return self.vm_uuid == WHOLE_JOB


def _row(r: Any) -> QueueRow:
    m = r._mapping
    fire_at, enqueued = text_time(m["fire_at"]), text_time(m["enqueued_at"])
    assert fire_at is not None and enqueued is not None
    return QueueRow(
        id=int(m["id"]),
        job_id=m["job_id"],
        schedule_id=m["schedule_id"],
        fire_at=fire_at,
        vm_uuid=m["vm_uuid"],
        vm_name=m["vm_name"],
        pools=pools_of(m["pools"]),
        state=m["state"],
        worker=m["worker"],
        token=m["token"],
        enqueued_at=enqueued,
        claimed_at=text_time(m["claimed_at"]),
        finished_at=text_time(m["finished_at"]),
        run_id=m["run_id"],
        outcome=m["outcome"],
    )


# -- fires


def claim_fire(db: StateDB, fire: Fire, worker: str, next_fire: datetime | None) -> bool:
    """Whether ``worker`` is the first to claim this fire; the winner records it as the
    schedule's last fire (and ``next_fire``) for every host's status, and queues, in the same
    transaction, one task for the whole job, which a worker that may touch its pools expands
    into one task per VM: a winner that dies at once loses no fire."""
    with db.transaction() as conn:
        key = {"job_id": fire.job_id, "schedule_id": fire.schedule_id, "fire_at": time_text(fire.fire_at)}
        conn.execute(
            insert(conn, fire_claims)
            .values(**key, worker=worker, claimed_at=now_text(conn))
            .on_conflict_do_nothing()
        )
        # Read back rather than trust RETURNING: a retry after a commit whose answer was lost
        # finds its own claim (the insert then does nothing).
        c = fire_claims.c
        owner = conn.execute(
            select(c.worker).where(
                c.job_id == fire.job_id, c.schedule_id == fire.schedule_id, c.fire_at == key["fire_at"]
            )
        ).scalar()
        won = owner == worker
        if won:
            record_fires(
                conn,
                {(fire.job_id, fire.schedule_id): next_fire},
                last={(fire.job_id, fire.schedule_id): fire.fire_at},
            )
            _enqueue(conn, fire, [QueuedVm(WHOLE_JOB, "all VMs of the job")])
    return won


def record_fires(
    conn: Connection,
    nexts: Mapping[tuple[str, str], datetime | None],
    *,
    last: Mapping[tuple[str, str], datetime] | None = None,
) -> None:
    """Each pair's next fire, and a last fire never moved backwards (workers write concurrently)."""
    f = schedule_fires.c
    for (job_id, schedule_id), nxt in nexts.items():
        lst = (last or {}).get((job_id, schedule_id))
        stmt = insert(conn, schedule_fires).values(
            job_id=job_id,
            schedule_id=schedule_id,
            last_fire=None if lst is None else time_text(lst),
            next_fire=None if nxt is None else time_text(nxt),
        )
        newer = stmt.excluded.last_fire
        keep_newest = case(
            (newer.is_(None), f.last_fire),
            (f.last_fire.is_(None), newer),
            (newer > f.last_fire, newer),
            else_=f.last_fire,
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[f.job_id, f.schedule_id],
                set_={"next_fire": stmt.excluded.next_fire, "last_fire": keep_newest},
            )
        )


# -- tasks


def enqueue(db: StateDB, fire: Fire, vms: Iterable[QueuedVm]) -> int:
    """Queue one task per VM of the fire (a task already queued for it stays as it is); a pending
    task of an older fire of the same (job, schedule, VM) is superseded. How many were queued."""
    with db.transaction() as conn:
        return _enqueue(conn, fire, vms)


def _enqueue(conn: Connection, fire: Fire, vms: Iterable[QueuedVm]) -> int:
    added = 0
    for vm in vms:
        stmt = insert(conn, queue).values(
            job_id=fire.job_id,
            schedule_id=fire.schedule_id,
            fire_at=time_text(fire.fire_at),
            vm_uuid=vm.uuid,
            vm_name=vm.name,
            pools=pools_text(fire.pools),
            state=PENDING,
            enqueued_at=now_text(conn),
        )
        added += conn.execute(stmt.on_conflict_do_nothing().returning(queue.c.id)).first() is not None
    _supersede(conn, [fire.job_id])
    return added


def _supersede(conn: Connection, job_ids: list[str]) -> None:
    """Pending tasks with a newer pending task of the same (job, schedule, VM): done, superseded
    (missed ticks are not queued)."""
    newer = aliased(queue)
    q = queue.c
    conn.execute(
        update(queue)
        .where(
            q.state == PENDING,
            q.job_id.in_(job_ids),
            exists().where(
                newer.c.job_id == q.job_id,
                newer.c.schedule_id == q.schedule_id,
                newer.c.vm_uuid == q.vm_uuid,
                newer.c.state == PENDING,
                newer.c.fire_at > q.fire_at,
            ),
        )
        .values(state=DONE, outcome=SUPERSEDED, finished_at=now_text(conn))
    )


def claim_next(db: StateDB, worker: Worker, jobs: Mapping[str, int]) -> QueueRow | None:
    """The oldest pending task of one of ``jobs`` (job id -> its concurrency: the jobs whose pools
    this worker may touch), claimed with one of its job's slots; None when none can be taken."""
    if not jobs:
        return None
    with db.transaction() as conn:
        now = now_text(conn)
        s = slots.c
        busy: dict[str, int] = dict(
            conn.execute(
                select(s.pool, func.count())
                .where(s.kind == JOB_SLOT, s.pool.in_(list(jobs)), standing(s.expires_at, s.worker, now))
                .group_by(s.pool)
            ).all()
        )
        open_jobs = [j for j, limit in jobs.items() if busy.get(j, 0) < max(1, limit)]
        if not open_jobs:
            return None
        q = queue.c
        candidates = conn.execute(
            select(queue)
            .where(q.state == PENDING, q.job_id.in_(open_jobs))
            .order_by(q.fire_at, q.id)
            .limit(8)
            .with_for_update(skip_locked=True)
        ).all()
        for found in candidates:
            row = _row(found)
            token = uuid.uuid4().hex
            got = slotmod.take(
                conn, [Slot(JOB_SLOT, row.job_id, jobs[row.job_id])], worker.name, token, worker.lease
            )
            if got is None:
                continue
            claimed = conn.execute(
                update(queue)
                .where(q.id == row.id)
                .values(
                    state=CLAIMED,
                    worker=worker.name,
                    token=token,
                    slot=got[0][2],
                    claimed_at=now,
                    expires_at=now_text(conn, worker.lease),
                )
                .returning(q.claimed_at)
            ).scalar_one()
            return replace(row, state=CLAIMED, worker=worker.name, token=token, claimed_at=text_time(claimed))
    return None


def set_run(db: StateDB, row: QueueRow, run_id: int) -> None:
    """The run that runs a claimed task (closed as interrupted if its worker stops heartbeating)."""
    with db.transaction() as conn:
        conn.execute(
            update(queue).where(queue.c.id == row.id, queue.c.token == row.token).values(run_id=run_id)
        )


def finish(db: StateDB, row: QueueRow, outcome: str) -> bool:
    """Mark a claimed task done with ``outcome`` and free its job slot; False when the claim is no
    longer this one's (it lapsed and went back to the queue)."""
    with db.transaction() as conn:
        done = conn.execute(
            update(queue)
            .where(queue.c.id == row.id, queue.c.token == row.token, queue.c.state == CLAIMED)
            .values(state=DONE, outcome=outcome, finished_at=now_text(conn), expires_at=None)
        )
        slotmod.release(conn, row.token or "")
        if done.rowcount == 1:
            return True
        # Still this claim's and done: a retry of a finish whose answer was lost.
        q = queue.c
        state = conn.execute(select(q.state).where(q.id == row.id, q.token == row.token)).scalar()
        return bool(state == DONE)


def requeue(db: StateDB, row: QueueRow) -> None:
    """Give a claimed task back to the queue (its worker stops before running it to the end)."""
    with db.transaction() as conn:
        conn.execute(
            update(queue)
            .where(queue.c.id == row.id, queue.c.token == row.token, queue.c.state == CLAIMED)
            .values(state=PENDING, worker=None, token=None, slot=None, claimed_at=None, expires_at=None)
        )
        slotmod.release(conn, row.token or "")
        _supersede(conn, [row.job_id])


def requeue_expired(db: StateDB) -> list[QueueRow]:
    """Claimed tasks whose claim lapsed (their worker stopped heartbeating): back to pending for
    the next worker, their job slots freed, their runs (and the runs' tasks still running)
    closed as interrupted. The tasks put back."""
    with db.transaction() as conn:
        q = queue.c
        lapsed = [
            _row(r)
            for r in conn.execute(
                select(queue)
                .where(q.state == CLAIMED, q.expires_at < now_text(conn))
                .with_for_update(skip_locked=True)
            ).all()
        ]
        if not lapsed:
            return []
        ids = [r.id for r in lapsed]
        conn.execute(
            update(queue)
            .where(q.id.in_(ids))
            .values(
                state=PENDING,
                worker=None,
                token=None,
                slot=None,
                claimed_at=None,
                expires_at=None,
                run_id=None,
            )
        )
        for r in lapsed:
            slotmod.release(conn, r.token or "")
        _close_runs(conn, lapsed)
        _supersede(conn, sorted({r.job_id for r in lapsed}))
    return lapsed


def _close_runs(conn: Connection, lapsed: list[QueueRow]) -> None:
    stamp = now_text(conn)
    for r in lapsed:
        if r.run_id is None:
            continue
        why = (
            f"worker {r.worker} stopped answering (no heartbeat within its lease); "
            "the task went back to the queue"
        )
        conn.execute(
            update(runs)
            .where(runs.c.id == r.run_id, runs.c.outcome == RUNNING)
            .values(outcome="interrupted", finished_at=stamp, error=func.coalesce(runs.c.error, why))
        )
        conn.execute(
            update(tasks)
            .where(tasks.c.run_id == r.run_id, tasks.c.outcome == RUNNING)
            .values(outcome="interrupted", finished_at=stamp, error=func.coalesce(tasks.c.error, why))
        )


def close_dead_runs(db: StateDB) -> int:
    """Runs still 'running' under a worker that is no longer alive (its heartbeat older than its
    lease, or stopped): interrupted, with their running tasks. How many."""
    now, workers = worker_rows(db)
    dead = [w.name for w in workers if not w.alive(now)]
    if not dead:
        return 0
    with db.transaction() as conn:
        found = [
            i
            for (i,) in conn.execute(
                select(runs.c.id).where(runs.c.outcome == RUNNING, runs.c.worker.in_(dead))
            ).all()
        ]
        if not found:
            return 0
        stamp = now_text(conn)
        why = "its worker stopped answering (no heartbeat within its lease)"
        conn.execute(
            update(runs)
            .where(runs.c.id.in_(found))
            .values(outcome="interrupted", finished_at=stamp, error=func.coalesce(runs.c.error, why))
        )
        conn.execute(
            update(tasks)
            .where(tasks.c.run_id.in_(found), tasks.c.outcome == RUNNING)
            .values(outcome="interrupted", finished_at=stamp, error=func.coalesce(tasks.c.error, why))
        )
        return len(found)


def requeue_strays(db: StateDB, worker: str, running: Iterable[int], *, older_than: timedelta) -> int:
    """Tasks claimed by ``worker`` that none of its threads runs (a claim whose commit answer was
    lost), claimed longer ago than ``older_than``: back to pending. How many."""
    ids = list(running)
    with db.transaction() as conn:
        q = queue.c
        strays = conn.execute(
            select(q.id, q.token).where(
                q.worker == worker,
                q.state == CLAIMED,
                q.id.not_in(ids),
                q.claimed_at < now_text(conn, -older_than.total_seconds()),
            )
        ).all()
        for _, token in strays:
            slotmod.release(conn, token or "")
        if strays:
            conn.execute(
                update(queue)
                .where(q.id.in_([i for i, _ in strays]))
                .values(state=PENDING, worker=None, token=None, slot=None, claimed_at=None, expires_at=None)
            )
        return len(strays)


def drop_unscheduled(db: StateDB, enabled: Iterable[str], *, older_than: timedelta) -> int:
    """Pending tasks of jobs not enabled in the configuration, queued longer ago than
    ``older_than`` (time for every worker to read the same configuration): done, dropped."""
    ids = list(enabled)
    with db.transaction() as conn:
        done = conn.execute(
            update(queue)
            .where(
                queue.c.state == PENDING,
                queue.c.job_id.not_in(ids),
                queue.c.enqueued_at < now_text(conn, -older_than.total_seconds()),
            )
            .values(state=DONE, outcome=DROPPED, finished_at=now_text(conn))
        )
        return int(done.rowcount)


def prune(db: StateDB, keep: timedelta = timedelta(days=1)) -> None:
    """Forget tasks done, and fires claimed, longer ago than ``keep`` (the history keeps runs)."""
    with db.transaction() as conn:
        cut = now_text(conn, -keep.total_seconds())
        conn.execute(delete(queue).where(queue.c.state == DONE, queue.c.finished_at < cut))
        conn.execute(delete(fire_claims).where(fire_claims.c.claimed_at < cut))


# -- reading


def rows(db: StateDB, *, job_id: str | None = None, state: str | None = None) -> list[QueueRow]:
    """Tasks recorded, oldest first."""
    query = select(queue).order_by(queue.c.id)
    if job_id is not None:
        query = query.where(queue.c.job_id == job_id)
    if state is not None:
        query = query.where(queue.c.state == state)
    with db.reading() as conn:
        return [_row(r) for r in conn.execute(query).all()]


def running(db: StateDB) -> dict[str, int]:
    """Worker name -> tasks it has claimed now."""
    with db.reading() as conn:
        found = conn.execute(
            select(queue.c.worker, func.count()).where(queue.c.state == CLAIMED).group_by(queue.c.worker)
        ).all()
    return {str(w): int(n) for w, n in found}


def unserved(db: StateDB) -> list[QueueRow]:
    """Pending tasks whose pools no live worker may all touch: they wait for a worker that will
    not come (reported, not silently late)."""
    now, workers = worker_rows(db)
    live = [w for w in workers if w.alive(now)]
    return [r for r in rows(db, state=PENDING) if not any(w.serves(r.pools) for w in live)]
