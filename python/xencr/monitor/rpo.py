"""How old each VM's newest restore point is on each target, against the job's RPO, as the state
database knows it (no pool is asked: metrics and notifications must work when a pool is down,
which is exactly when they matter)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from xencr.config import JobConfig
from xencr.schedule import rpo_of
from xencr.state import StateDB, TaskRow

# A VM/target last seen this long before the job's newest task is no longer in the job (removed
# from the selection, or a target dropped); measured from the newest task rather than from now,
# so a job that stopped running altogether keeps its VMs, and their breaches.
MIN_HORIZON = timedelta(days=1)


def job_rpo(job: JobConfig) -> int | None:
    """Seconds a restore point may age before it is a breach (the job's ``rpo``, else its
    tightest schedule's); ``None``: the job has no RPO."""
    return rpo_of(job)


@dataclass(frozen=True)
class Protection:
    """One VM on one target SR of a job."""

    vm: str
    vm_uuid: str
    target_sr: str
    snapshot_time: datetime | None  # of the newest restore point written by a successful task
    last_success: datetime | None  # when that task finished
    last: TaskRow  # the newest task, whatever its outcome
    rpo: int | None
    detached: int = 0  # objects left alone (`ownership`) that the newest task to look found

    def age(self, now: datetime) -> int | None:
        if self.snapshot_time is None:
            return None
        return max(0, int((now - self.snapshot_time).total_seconds()))

    def breached(self, now: datetime) -> bool:
        if self.rpo is None:
            return False
        age = self.age(now)
        return age is None or age > self.rpo


@dataclass(frozen=True)
class Breach:
    vm: str
    vm_uuid: str
    target_sr: str
    age: int | None  # seconds; None: no restore point at all
    rpo: int


def protection(db: StateDB, job: JobConfig) -> list[Protection]:
    """The job's VM/target pairs (see ``MIN_HORIZON``), by VM name then target."""
    rpo = job_rpo(job)
    newest = db.newest_tasks(job.id)
    if not newest:
        return []
    horizon = max(MIN_HORIZON, timedelta(seconds=4 * rpo)) if rpo else MIN_HORIZON
    latest = max(t.started_at for t in newest)
    good = {(t.vm_uuid, t.target_sr): t for t in db.newest_tasks(job.id, outcome="success")}
    out = []
    for t in newest:
        if t.started_at < latest - horizon:
            continue
        ok = good.get((t.vm_uuid, t.target_sr))
        # A task recorded before schema 2 has no snapshot time: its start is just before it
        # (an over-estimate of the age, the safe side).
        snap = (ok.snapshot_time or ok.started_at) if ok is not None else None
        out.append(
            Protection(
                vm=t.vm_name,
                vm_uuid=t.vm_uuid,
                target_sr=t.target_sr,
                snapshot_time=snap,
                last_success=ok.finished_at if ok is not None else None,
                last=t,
                rpo=rpo,
                # A skipped task did not look at the target: the last one that did says.
                detached=t.detached if t.outcome != "skipped" else (ok.detached if ok else 0),
            )
        )
    return sorted(out, key=lambda p: (p.vm, p.vm_uuid, p.target_sr))


def breaches(db: StateDB, job: JobConfig, now: datetime) -> list[Breach]:
    """The job's VM/targets whose newest restore point is older than the RPO (or missing).

    Strict on purpose: the age is the data a disaster would lose now. With the default RPO (the
    interval) the age exceeds it while each run transfers, until the new restore point is
    recorded; after a run (when reports are decided) it does not. Alert rules absorb that with
    a ``for:`` duration, or the job sets a looser ``rpo``."""
    return [
        Breach(p.vm, p.vm_uuid, p.target_sr, p.age(now), p.rpo)
        for p in protection(db, job)
        if p.rpo is not None and p.breached(now)
    ]
