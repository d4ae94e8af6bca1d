"""The coordination primitives on a real PostgreSQL, without pools: leases, numbered slots, fires
claimed once, the task queue (claims, job concurrency, affinity, superseding, lapsed claims put
back with their runs closed). Claims are made to lapse by moving their expiry into the past (the
database's view of a worker that stopped heartbeating), never by waiting."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from xencr.config import StateLocation, WorkerConfig
from xencr.coordination import Holding, Worker, WorkerNameInUse
from xencr.coordination import leases as leasemod
from xencr.coordination import queue as q
from xencr.coordination import slots as slotsmod
from xencr.coordination.slots import in_use
from xencr.coordination.view import cluster_view
from xencr.service.limits import Slot, SlotCancelled, SlotsUnavailable
from xencr.state import StateDB, StateError
from xencr.state.rows import time_text
from xencr.state.schema import leases, queue, slots, workers

VM, SR = "0b1f6c6e-0000-4000-8000-00000000000a", "5e3c1d2a-0000-4000-8000-0000000000b0"
T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def db(fresh_pg: StateLocation) -> Iterator[StateDB]:
    with StateDB(fresh_pg) as d:
        yield d


def worker(db: StateDB, name: str, *, pools: list[str] | None = None, start: bool = True) -> Worker:
    """A registered worker; its heartbeat runs only when a test starts it (claims stay as set)."""
    w = Worker(db, WorkerConfig(name=name, pools=pools or [], lease=30, slots=2))
    if start:
        w._register()  # the row, without the heartbeat thread
    return w


def lapse(db: StateDB, worker_name: str) -> None:
    """What the database sees of a worker that stopped heartbeating a lease ago."""
    past = time_text(datetime(2000, 1, 1, tzinfo=UTC))
    with db.transaction() as conn:
        for table in (leases, slots):
            conn.execute(update(table).where(table.c.worker == worker_name).values(expires_at=past))
        conn.execute(update(queue).where(queue.c.worker == worker_name).values(expires_at=past))
        conn.execute(update(workers).where(workers.c.name == worker_name).values(heartbeat_at=past))


def test_a_lease_is_held_once_across_workers_and_names_its_holder(db: StateDB) -> None:
    a, b = Holding.of(worker(db, "A")), Holding.of(worker(db, "B"))
    held = a.locker.try_lock(VM, SR, "web", job_id="job-web")
    assert held is not None and a.locker.still_held(VM, SR)
    assert b.locker.try_lock(VM.upper(), SR, "db") is None, "UUIDs in any case: one lease"
    assert a.locker.try_lock(VM, SR, "web") is None, "a second holder in one worker conflicts too"
    h = b.locker.read_holder(VM, SR)
    assert h is not None and (h.job_id, h.job_name, h.worker) == ("job-web", "web", "A")
    assert h.describe().startswith("job web on worker A since ")
    assert b.locker.try_lock(VM, "another-sr", "db") is not None, "other targets are free"
    held.release()
    held.release()  # idempotent
    assert b.locker.read_holder(VM, SR) is None
    again = b.locker.try_lock(VM, SR, "db")
    assert again is not None and not a.locker.still_held(VM, SR)


def test_a_lapsed_or_stopped_holders_lease_is_taken_over_and_never_committed_by_it(db: StateDB) -> None:
    wa = worker(db, "A")
    a, b = Holding.of(wa), Holding.of(worker(db, "B"))
    assert a.locker.try_lock(VM, SR, "web") is not None
    lapse(db, "A")
    taken = b.locker.try_lock(VM, SR, "web")
    assert taken is not None
    assert not a.locker.still_held(VM, SR), "the first holder must not commit"
    assert b.locker.still_held(VM, SR)
    h = a.locker.read_holder(VM, SR)
    assert h is not None and h.worker == "B"
    # A clean stop releases at once.
    c = Holding.of(worker(db, "C"))
    assert c.locker.try_lock(VM, "sr-2", "web") is not None
    c.worker.stop()
    assert b.locker.try_lock(VM, "sr-2", "web") is not None


def test_a_lapsed_lease_is_lost_even_when_nobody_took_it(db: StateDB) -> None:
    a = Holding.of(worker(db, "A"))
    assert a.locker.try_lock(VM, SR, "web") is not None
    lapse(db, "A")
    assert not a.locker.still_held(VM, SR), "its task may be running again elsewhere"


def test_a_worker_whose_name_was_taken_over_renews_nothing(db: StateDB) -> None:
    old = worker(db, "A")
    lapse(db, "A")  # cut off past its lease: the name is free
    new = worker(db, "A")  # another process takes it
    assert Holding.of(new).locker.try_lock(VM, SR, "web") is not None
    past = time_text(datetime(2000, 1, 1, tzinfo=UTC))
    with db.transaction() as conn:
        conn.execute(update(leases).values(expires_at=past))
    assert not old.renew(), "the old life's claims are gone; the new one's are not its to renew"
    with db.reading() as conn:
        assert conn.execute(select(leases.c.expires_at)).scalar_one() == past
    assert new.renew()
    with db.reading() as conn:
        assert conn.execute(select(leases.c.expires_at)).scalar_one() > past


def test_a_claim_whose_answer_was_lost_is_given_back(db: StateDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lease or slots taken in a commit whose answer never came (the database went away for
    longer than the retries): given back at the next heartbeat, never renewed for ever."""

    def answer_lost(attempt: Callable[[], object], **_: object) -> object:
        attempt()  # committed...
        raise StateError("PostgreSQL test: server closed the connection unexpectedly")  # ...unanswered

    w = worker(db, "A")
    h = Holding.of(w)
    monkeypatch.setattr(leasemod, "retried", answer_lost)
    monkeypatch.setattr(slotsmod, "retried", answer_lost)
    with pytest.raises(StateError):
        h.locker.try_lock(VM, SR, "web")
    unavailable = pytest.raises(SlotsUnavailable, match="transfer slots unavailable: PostgreSQL test")
    with unavailable, h.slots.transfer_slots([Slot("export", "a", 1)]):
        pass
    with db.reading() as conn:
        assert conn.execute(select(leases.c.worker)).scalars().all() == ["A"]
        assert conn.execute(select(slots.c.worker)).scalars().all() == ["A"]
    assert w.renew()
    with db.reading() as conn:
        assert conn.execute(select(leases.c.worker)).scalars().all() == []
        assert conn.execute(select(slots.c.worker)).scalars().all() == []


def test_a_worker_name_in_use_by_a_live_worker_elsewhere_is_refused(db: StateDB) -> None:
    worker(db, "dr1")
    with db.transaction() as conn:
        conn.execute(update(workers).where(workers.c.name == "dr1").values(host="elsewhere", pid=1))
    with pytest.raises(
        WorkerNameInUse, match=r"worker dr1 is running on host elsewhere \(pid 1.*is free in \d+s\)"
    ):
        worker(db, "dr1")
    with StateDB(db.location, worker="dr1") as earlier:
        run_id = earlier.start_run("job-web", "web", "tick", "schedule")
        earlier.start_task(run_id, VM, "vm0", SR)
    lapse(db, "dr1")
    worker(db, "dr1")  # a dead worker's name is free again; what it was running is over
    run = db.run(run_id)
    assert (run.outcome, run.worker, run.error) == (
        "interrupted",
        "dr1",
        "worker dr1 was restarted before it finished",
    )
    assert [(t.outcome, t.worker) for t in db.tasks(run_id)] == [("interrupted", "dr1")]


def test_transfer_slots_hold_their_limits_across_workers(db: StateDB) -> None:
    holders = [Holding.of(worker(db, f"W{i}")) for i in range(4)]
    wanted = [Slot("export", "a", 2), Slot("import", "b", 1)]
    running: dict[str, int] = {"export": 0, "import": 0}
    peak: dict[str, int] = {"export": 0, "import": 0}
    lock = threading.Lock()
    seen: list[int] = []
    errors: list[BaseException] = []

    def transfer(h: Holding, i: int) -> None:
        try:
            with h.slots.transfer_slots(wanted if i % 2 else wanted[:1]):
                with lock:
                    for s in wanted if i % 2 else wanted[:1]:
                        running[s.kind] += 1
                        peak[s.kind] = max(peak[s.kind], running[s.kind])
                    with db.reading() as conn:
                        seen.append(in_use(conn, "export", "a"))
                threading.Event().wait(0.05)
                with lock:
                    for s in wanted if i % 2 else wanted[:1]:
                        running[s.kind] -= 1
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=transfer, args=(holders[i % 4], i)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert peak["export"] <= 2 and peak["import"] == 1
    assert max(seen) <= 2 and len(seen) == 12
    with db.reading() as conn:
        assert conn.execute(select(slots)).all() == [], "every slot given back"


def test_waiting_for_a_slot_gives_up_on_cancel_and_deadline(db: StateDB) -> None:
    a, b = Holding.of(worker(db, "A")), Holding.of(worker(db, "B"))
    one = [Slot("export", "a", 1)]
    with a.slots.transfer_slots(one):
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(SlotCancelled, match="cancelled"), b.slots.transfer_slots(one, cancel=cancel):
            pass
        with pytest.raises(SlotCancelled, match="deadline"), b.slots.transfer_slots(one, deadline=0.0):
            pass
    with b.slots.transfer_slots(one):
        pass
    lapse(db, "A")
    with a.slots.transfer_slots(one):
        lapse(db, "A")
        with b.slots.transfer_slots(one):  # A's slot lapsed: B takes it
            pass


def fire(job: str = "job-a", at: datetime = T0, pools: tuple[str, ...] = ("a", "b")) -> q.Fire:
    return q.Fire(job, "tick", at, pools)


def test_a_fire_is_claimed_once_and_records_the_last_fire(db: StateDB) -> None:
    won: list[str] = []

    def claim(name: str) -> None:
        with StateDB(db.location) as own:
            if q.claim_fire(own, fire(), name, T0 + timedelta(minutes=1)):
                won.append(name)

    threads = [threading.Thread(target=claim, args=(f"W{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert db.fires() == {("job-a", "tick"): (T0, T0 + timedelta(minutes=1))}
    # The fire's one task for the whole job came with the claim (a winner that dies loses no
    # fire), and the winner asking again (its commit's answer lost) finds its own claim.
    assert [(r.vm_uuid, r.state) for r in q.rows(db)] == [(q.WHOLE_JOB, "pending")]
    assert q.claim_fire(db, fire(), won[0], T0 + timedelta(minutes=1))
    assert not q.claim_fire(db, fire(), "another", T0 + timedelta(minutes=1))
    assert len(q.rows(db)) == 1
    # A worker recording only next fires never moves the last one back.
    with db.transaction() as conn:
        q.record_fires(
            conn,
            {("job-a", "tick"): T0 + timedelta(minutes=2)},
            last={("job-a", "tick"): T0 - timedelta(hours=1)},
        )
    assert db.fires() == {("job-a", "tick"): (T0, T0 + timedelta(minutes=2))}


def test_claims_keep_job_concurrency_and_affinity_across_workers(db: StateDB) -> None:
    vms = [q.QueuedVm(f"vm-{i}", f"vm{i}") for i in range(5)]
    assert q.enqueue(db, fire(), vms) == 5
    assert q.enqueue(db, fire(), vms) == 0, "a fire's tasks are queued once"
    assert q.enqueue(db, fire("job-c", pools=("c", "b")), vms[:2]) == 2
    wa, wb, wc = worker(db, "A", pools=["a", "b"]), worker(db, "B"), worker(db, "C", pools=["c", "b"])
    jobs_a = {"job-a": 2}
    claimed = [q.claim_next(db, w, jobs_a) for w in (wa, wb, wa)]
    assert [c.vm_name if c else None for c in claimed] == ["vm0", "vm1", None], "job-a runs 2 at once"
    got = q.claim_next(db, wc, {"job-c": 2})
    assert got is not None and got.job_id == "job-c" and got.worker == "C"
    first = claimed[0]
    assert first is not None and q.finish(db, first, "success")
    assert q.finish(db, first, "success"), "a finish retried (its answer lost) finds it done"
    assert [r.outcome for r in q.rows(db, state="done") if r.id == first.id] == ["success"]
    nxt = q.claim_next(db, wb, jobs_a)
    assert nxt is not None and nxt.vm_name == "vm2"
    view = cluster_view(db)
    assert {w.row.name: w.tasks_running for w in view.workers} == {"A": 0, "B": 2, "C": 1}
    assert view.unserved == [], "every pending task has a live worker"


def test_a_lapsed_claim_goes_back_with_its_run_closed(db: StateDB) -> None:
    q.enqueue(db, fire(), [q.QueuedVm("vm-0", "vm0")])
    wa, wb = worker(db, "A"), worker(db, "B")
    row = q.claim_next(db, wa, {"job-a": 1})
    assert row is not None
    run_id = db.start_run("job-a", "web", "tick", "schedule")
    task_id = db.start_task(run_id, "vm-0", "vm0", SR)
    q.set_run(db, row, run_id)
    assert q.claim_next(db, wb, {"job-a": 1}) is None, "the job's one slot is A's"
    assert q.requeue_expired(db) == []
    lapse(db, "A")
    (back,) = q.requeue_expired(db)
    assert (back.id, back.worker) == (row.id, "A")
    run = db.run(run_id)
    assert (
        run.outcome == "interrupted" and run.error is not None and "worker A stopped answering" in run.error
    )
    assert db.tasks(run_id)[0].outcome == "interrupted" and db.tasks(run_id)[0].id == task_id
    again = q.claim_next(db, wb, {"job-a": 1})
    assert again is not None and again.id == row.id and again.worker == "B"
    assert not q.finish(db, row, "success"), "A's claim is no longer A's"
    assert q.finish(db, again, "success")
    (done,) = q.rows(db)
    assert (done.state, done.outcome, done.worker) == ("done", "success", "B")


def test_a_newer_fire_supersedes_a_pending_task_and_unserved_tasks_are_reported(db: StateDB) -> None:
    vm = [q.QueuedVm("vm-0", "vm0")]
    q.enqueue(db, fire(pools=("c", "b")), vm)
    q.enqueue(db, fire(at=T0 + timedelta(minutes=1), pools=("c", "b")), vm)
    old, new = q.rows(db)
    assert (old.state, old.outcome) == ("done", q.SUPERSEDED) and new.state == "pending"
    worker(db, "A", pools=["a", "b"])
    (waiting,) = q.unserved(db)
    assert waiting.id == new.id and waiting.pools == ("c", "b")
    worker(db, "C", pools=["c", "b"])
    assert q.unserved(db) == []
    lapse(db, "C")
    assert [r.id for r in q.unserved(db)] == [new.id], "a dead worker serves nothing"
