"""The runner's last check in a cluster: a worker whose lease on a (VM, target) lapsed before the
commit (cut from the state database longer than the lease, and another worker took the lease)
commits nothing, says why, and keeps its attempt; once the lease is its own again the next run
resumes that attempt and commits a restore point equal to the source snapshot."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from clustertest import Cluster, Job, assert_hash_equal, incomplete
from sqlalchemy import update

from xencr.config import StateLocation, WorkerConfig, job_id_for, load_config
from xencr.coordination import Holding, Worker
from xencr.coordination.leases import LeaseLocker
from xencr.replication.jobs import Placement, run_configured
from xencr.service.locks import Held, Holder
from xencr.sim.harness import RunningSimulator
from xencr.state import StateDB
from xencr.state.rows import time_text
from xencr.state.schema import leases

JOB, VM = "jl", "vm3"


class TakenOverBeforeCommit:
    """A worker's real lease locker; as the runner asks, right before its commit, whether its
    lease still stands, the database is first made to see what a partition shows: this worker's
    lease past its expiry, and another worker taking it over."""

    def __init__(self, real: LeaseLocker, other: LeaseLocker) -> None:
        self.real, self.other = real, other
        self.taken: Held | None = None

    def try_lock(self, vm_uuid: str, sr_uuid: str, job_name: str, *, job_id: str = "") -> Held | None:
        return self.real.try_lock(vm_uuid, sr_uuid, job_name, job_id=job_id)

    def read_holder(self, vm_uuid: str, sr_uuid: str) -> Holder | None:
        return self.real.read_holder(vm_uuid, sr_uuid)

    def still_held(self, vm_uuid: str, sr_uuid: str) -> bool:
        past = time_text(datetime(2000, 1, 1, tzinfo=UTC))
        mine = leases.c.worker == self.real.worker.name
        with self.real.worker.db.transaction() as conn:
            conn.execute(update(leases).where(mine).values(expires_at=past))
        self.taken = self.other.try_lock(vm_uuid, sr_uuid, JOB)
        assert self.taken is not None, "the other worker takes the lapsed lease"
        return self.real.still_held(vm_uuid, sr_uuid)


def test_a_lease_lost_before_the_commit_commits_nothing_and_the_attempt_is_resumed(
    sim: RunningSimulator, tmp_path: Path, fresh_pg: StateLocation, pg_password: str
) -> None:
    c = Cluster(tmp_path, sim, fresh_pg, pg_password, [Job(JOB, "c", [VM])])
    config = load_config(c.config("solo", [], lease="30s", slots=1))
    job_id = job_id_for(JOB)
    with StateDB(fresh_pg) as db:
        me = Worker(db, config.worker)
        other = Worker(db, WorkerConfig(name="other", lease=30, slots=1))
        me.start()
        other.start()
        try:
            mine = Holding.of(me)
            cut = TakenOverBeforeCommit(mine.locker, LeaseLocker(other))
            placement = Placement(worker="solo", locker=cut, slots=mine.slots)
            first = run_configured(config, JOB, schedule_id="tick", placement=placement)
            (task,) = [t for v in first.vms for t in v.targets]
            assert task.outcome == "interrupted", task
            assert task.error is not None and "not committed: the lease" in task.error, task.error
            assert task.restore_point is None
            (row,) = db.resumes(job_id)
            assert (row.vm_uuid, row.target_sr) == (first.vms[0].vm_uuid, c.sr), "the attempt is kept"
            assert row.replica in incomplete(sim), "its replica stays, marked incomplete"
            (run,) = db.runs(JOB, limit=1)
            (recorded,) = db.tasks(run.id)
            assert (recorded.outcome, recorded.worker) == ("interrupted", "solo")
            assert recorded.error == task.error, "the history says why"

            # The other worker is done with it: the next run takes the lease and resumes.
            assert cut.taken is not None
            cut.taken.release()
            again = Placement(worker="solo", locker=mine.locker, slots=mine.slots)
            second = run_configured(config, JOB, schedule_id="tick", placement=again)
            (task,) = [t for v in second.vms for t in v.targets]
            assert task.outcome == "success", task
            assert task.restore_point is not None
            assert [d.resumed.startswith("resumed at") for d in task.disks] == [True], task.disks
            assert db.resumes(job_id) == []
        finally:
            other.stop()
            me.stop()
    assert_hash_equal(sim, "c", task.restore_point)
    assert incomplete(sim) == [], "nothing left in flight"
