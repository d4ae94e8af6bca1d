"""What a test failover did, VM by VM, kept for the status page and the auditor's report.

A test failover is recorded in the state database as a run (trigger ``dr-test``, job name
``plan NAME``) with its outcome, and its VMs (start group, when each VM was started, how long its
gate took, the gate's line) in the ``rehearsals`` tables beside it. A run without that record (an
older xencr, or a test interrupted before the end) is shown from the run alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xencr.dr.start import StartReport
from xencr.state import RehearsalRow, RehearsedVmRow, StateDB

TRIGGER = "dr-test"
Rehearsal = RehearsalRow
RehearsedVm = RehearsedVmRow


def run_name(plan: str) -> str:
    """The job name a plan's test failover runs are recorded under (`dr.testrun`)."""
    return f"plan {plan}"


def record(
    plan: str, run_id: int, booted: bool, kept: bool, clones: Mapping[str, str], start: StartReport
) -> Rehearsal:
    """The record of a finished test failover (`dr.testrun.RehearsalReport`'s fields): the clones
    it made (source VM name -> clone UUID) and what starting them gave (`dr.start.VmResult`)."""
    results = {x.name: x for x in start.results}
    vms = []
    for name, clone in clones.items():
        x = results.get(name)
        vms.append(
            RehearsedVm(
                name=name,
                vm_uuid=x.vm_uuid if x is not None else "",
                clone=clone,
                ok=x.ok if x is not None else True,
                group=x.group if x is not None and x.started else None,
                started_at=x.started_at if x is not None else None,
                boot_seconds=x.boot_seconds if x is not None else None,
                detail=x.detail if x is not None else None,
            )
        )
    return Rehearsal(plan, run_id, booted, start.ok, kept, tuple(vms))


def as_json(r: Rehearsal) -> dict[str, Any]:
    """The record as `/api/plans` gives it."""
    return {
        "plan": r.plan,
        "run": r.run_id,
        "booted": r.booted,
        "ok": r.ok,
        "kept": r.kept,
        "vms": [
            {
                "name": v.name,
                "vm_uuid": v.vm_uuid,
                "clone": v.clone,
                "ok": v.ok,
                "group": v.group,
                "started_at": v.started_at.isoformat() if v.started_at is not None else None,
                "boot_seconds": v.boot_seconds,
                "detail": v.detail,
            }
            for v in r.vms
        ],
    }


def save(db: StateDB, rehearsal: Rehearsal) -> None:
    db.record_rehearsal(rehearsal)


def load(db: StateDB, run_id: int) -> Rehearsal | None:
    """The record of a test failover run, or None when there is none."""
    return db.rehearsal(run_id)
