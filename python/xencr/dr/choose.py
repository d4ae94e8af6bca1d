"""The restore point a VM is recovered from: **the newest complete restore point across all
the targets** of the jobs that replicate it.

Candidates are the intact restore points `ownership.survey` finds (a detached replica is never
one), on every configured target (pool and SR) of the given jobs. The VMs are known from the
replicas alone (`xencr:vm` is the source VM's UUID, the replica's name carries the source VM's
name): the source pool is never asked, so this works with the primary site lost.

The most recent snapshot time wins. Equal times (one snapshot sent to several targets by one
run) are broken by configuration order: the job listed first in the file, then its target
listed first, then the restore point's UUID; the choice says so (`Choice.tie`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from xencr.config import Config, ConfigError, JobConfig
from xencr.replication import metadata as md
from xencr.replication.ownership import RestorePoint
from xencr.replication.target import restore_points
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import XapiSession


@dataclass(frozen=True)
class Place:
    """One configured target of one job: where its restore points may be. ``rank`` is the
    configuration order (jobs as in the file, then their targets), the tie-break."""

    job: JobConfig
    pool: str
    sr: str  # as configured: UUID or name
    rank: int


@dataclass(frozen=True)
class Candidate:
    """One intact restore point of a VM on one place."""

    vm_uuid: str  # the source VM (`xencr:vm`)
    vm_name: str  # the source VM's name, as the replica's name carries it
    tags: tuple[str, ...]  # the replica's tags: the source VM's, and xencr's
    place: Place
    sr_uuid: str
    sr_name: str
    point: RestorePoint
    snapshot_time: datetime

    @property
    def target(self) -> str:
        return f"{self.place.pool}/{self.sr_name}"


@dataclass(frozen=True)
class Choice:
    """The restore point a VM is recovered from, the others found (newest first), and how a
    tie was broken (None: the chosen one is strictly the newest)."""

    chosen: Candidate
    others: tuple[Candidate, ...] = ()
    tie: str | None = None

    @property
    def vm_uuid(self) -> str:
        return self.chosen.vm_uuid

    @property
    def vm_name(self) -> str:
        return self.chosen.vm_name


@dataclass
class Found:
    """Every candidate found, and a line per place that could not be looked at."""

    candidates: list[Candidate] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def places(config: Config, jobs: Iterable[str] | None = None) -> list[Place]:
    """Every target of the named jobs (default: all), ranked in configuration order."""
    wanted = set(jobs) if jobs is not None else None
    out: list[Place] = []
    for job in config.jobs.values():
        if wanted is not None and job.name not in wanted:
            continue
        out += [Place(job, t.pool, t.sr, len(out) + i) for i, t in enumerate(job.targets)]
    return out


# An intact restore point keeps the commit's name: "<source VM name> (<md.stamp>)".
_REPLICA_NAME = re.compile(r"^(.*) \(\d{8}T\d{2}:\d{2}:\d{2}Z\)$")


def source_name(replica_name: str) -> str:
    """The source VM's name from a restore point's name."""
    m = _REPLICA_NAME.match(replica_name)
    return m.group(1) if m else replica_name


def replicated_vms(t: XapiSession, job_id: str, sr_uuid: str) -> list[str]:
    """The source VM UUIDs that this job has replicas of on this SR, read from the replicas."""
    found = set()
    for rec in t.api.VM.get_all_records().values():
        oc = rec["other_config"]
        if (
            not rec["is_a_snapshot"]
            and oc.get(md.JOB) == job_id
            and oc.get(md.SR) == sr_uuid
            and oc.get(md.ROLE) == "replica"
            and md.VM in oc
        ):
            found.add(str(oc[md.VM]))
    return sorted(found)


def _sr(t: XapiSession, sr: str, pool: str) -> tuple[str, str]:
    """(uuid, name_label) of an SR named by UUID or name."""
    for rec in t.api.SR.get_all_records().values():
        if sr in (rec["uuid"], rec["name_label"]):
            return str(rec["uuid"]), str(rec["name_label"])
    raise ConfigError(f"no SR {sr!r} on pool {pool!r}")


def candidates_at(t: XapiSession, place: Place) -> list[Candidate]:
    """The intact restore points of every VM the place's job replicated to it."""
    sr_uuid, sr_name = _sr(t, place.sr, place.pool)
    out = []
    for vm_uuid in replicated_vms(t, place.job.id, sr_uuid):
        for rp in restore_points(t, place.job.id, vm_uuid, sr_uuid):
            when = md.parse_stamp(rp.snapshot_time)
            if when is None:
                continue  # a restore point always has one: a record without is not ours to trust
            tags = tuple(sorted(str(x) for x in rp.record.get("tags", [])))
            out.append(Candidate(vm_uuid, source_name(rp.name), tags, place, sr_uuid, sr_name, rp, when))
    return out


def gather(sessions: Mapping[str, XapiSession], where: Sequence[Place]) -> Found:
    """The candidates on every place whose pool has a session; a place that cannot be looked at
    (its pool not connected, gone meanwhile, its SR missing) is a problem line, not an error."""
    found = Found()
    for place in where:
        t = sessions.get(place.pool)
        if t is None:
            found.problems.append(
                f"job {place.job.name}: target {place.pool}/{place.sr} not looked at (pool not connected)"
            )
            continue
        try:
            found.candidates += candidates_at(t, place)
        except (ConfigError, XapiError, PoolUnreachable) as err:
            found.problems.append(f"job {place.job.name}: target {place.pool}/{place.sr}: {err}")
    return found


def _order(c: Candidate) -> tuple[float, int, str]:
    # Newest first; then configuration order; then the UUID, so that the result never depends
    # on the order the pools answered in.
    return (-c.snapshot_time.timestamp(), c.place.rank, c.point.uuid)


def newest(candidates: Sequence[Candidate]) -> Choice:
    """The choice among one VM's candidates (at least one)."""
    ranked = sorted(candidates, key=_order)
    best, rest = ranked[0], tuple(ranked[1:])
    tied = [c for c in rest if c.snapshot_time == best.snapshot_time]
    tie = None
    if tied:
        names = ", ".join(c.target for c in tied)
        tie = (
            f"same snapshot time on {best.target} and {names}: "
            f"{best.target} chosen (first in the configuration)"
        )
    return Choice(best, rest, tie)


def choose(candidates: Iterable[Candidate]) -> dict[str, Choice]:
    """Source VM UUID -> its choice, for every VM with at least one candidate."""
    by_vm: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_vm.setdefault(c.vm_uuid, []).append(c)
    return {vm: newest(cs) for vm, cs in sorted(by_vm.items())}
