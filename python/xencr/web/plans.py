"""The DR plans as the page and the reports show them: each plan with its last test failover
(when, passed or failed, how long ago) and the test's start groups as a timeline, from the run
the test recorded and its kept per-VM record (`monitor.rehearsals`); and a real failover's VMs."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from xencr.config import Config, HealthGate, PlanConfig, format_duration
from xencr.monitor import rehearsals
from xencr.monitor.rehearsals import Rehearsal
from xencr.state import FailoverRow, RunRow, StateDB
from xencr.web import charts
from xencr.web.html import e, when


@dataclass
class PlanView:
    plan: PlanConfig
    last_test: RunRow | None = None
    record: Rehearsal | None = None  # the per-VM detail of the last test (None: not recorded)
    failover: list[FailoverRow] = field(default_factory=list)  # a real failover, if one was done

    @property
    def name(self) -> str:
        return self.plan.name


def plan_view(db: StateDB | None, config: Config, plan: PlanConfig) -> PlanView:
    """A plan with its last test failover (and the record of a real failover, if any)."""
    view = PlanView(plan)
    if db is None:
        return view
    tests = [r for r in db.runs(rehearsals.run_name(plan.name), limit=20) if r.trigger == rehearsals.TRIGGER]
    if tests:
        view.last_test = tests[-1]
        view.record = rehearsals.load(db, tests[-1].id)
    view.failover = db.failover_rows(plan.name)
    return view


def test_timeline(view: PlanView) -> str:
    """The last test failover's start groups as a timeline, with a table of its VMs."""
    rec, run = view.record, view.last_test
    if rec is None or run is None:
        return ""
    groups: dict[int, list[tuple[float, float | None, bool]]] = {}
    for v in rec.vms:
        if v.group is None or v.started_at is None:
            continue
        start = (v.started_at - run.started_at).total_seconds()
        end = start + v.boot_seconds if v.boot_seconds is not None else None
        groups.setdefault(v.group, []).append((start, end, v.ok))
    bars = []
    for number in sorted(groups):
        items = groups[number]
        ends = [x[1] for x in items if x[1] is not None]
        bars.append((number, min(x[0] for x in items), max(ends) if ends else None, all(x[2] for x in items)))
    total = (run.finished_at - run.started_at).total_seconds() if run.finished_at else 0.0
    total = max([total, *(b[2] or b[1] for b in bars)])
    rows = "".join(
        f'<tr><th scope="row">{e(v.name)}</th><td>{v.group if v.group is not None else "-"}</td>'
        f"<td>{v.started_at.strftime('%H:%M:%S') + 'Z' if v.started_at else 'not booted'}</td>"
        f"<td>{f'{v.boot_seconds:.1f}s' if v.boot_seconds is not None else '-'}</td>"
        f"<td>{'passed' if v.ok else 'FAILED'}</td><td>{e(v.detail or '')}</td></tr>"
        for v in sorted(rec.vms, key=lambda v: (v.group or 0, v.name))
    )
    head = "".join(
        f'<th scope="col">{h}</th>' for h in ("VM", "Group", "Started", "Gate after", "Result", "Detail")
    )
    return (
        (charts.timeline(bars, total) if bars else "")
        + f'<table class="test"><caption>VMs of the test failover of plan {e(view.name)} (run {run.id})'
        f"</caption><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    )


def plan_section(
    view: PlanView, now: datetime, *, heading: str = "h3", label: str = "Last test failover", key: str = ""
) -> str:
    """A plan: what it covers, its start groups, ``view.last_test`` (as ``label``) with its
    timeline, a real failover's VMs. ``key`` keeps the ids apart when a report lists several
    tests of one plan."""
    p = view.plan
    parts = ([f"jobs {', '.join(p.jobs)}"] if p.jobs else []) + ([f"VMs {', '.join(p.vms)}"] if p.vms else [])
    what = ", ".join(parts)
    groups = (
        "; ".join(
            f"group {i}: {', '.join(g.vms)}"
            + (f", then {format_duration(g.start_delay)}" if g.start_delay else "")
            for i, g in enumerate(p.groups, 1)
        )
        or "the start order the replicas carry"
    )
    run = view.last_test
    if run is None:
        test = (
            '<p class="never"><strong>Never tested</strong>: run <code>xencr failover '
            + e(p.name)
            + " --test --boot</code>.</p>"
        )
    else:
        verdict = {"success": "passed", "failure": "FAILED", "interrupted": "interrupted"}.get(
            run.outcome, run.outcome
        )
        age = int((now - run.started_at).total_seconds())
        took = f", took {format_duration(int(run.duration.total_seconds()))}" if run.duration else ""
        booted = ""
        if view.record is not None:
            booted = " (booted, gates checked)" if view.record.booted else " (clones made, not booted)"
        test = (
            f'<p class="test-{e(run.outcome)}">{e(label)}: <strong>{verdict}</strong>{booted}, '
            f"{when(run.started_at, now)}, {format_duration(age)} old{took}"
            + (f": {e(run.error)}" if run.error else "")
            + "</p>"
            + test_timeline(view)
        )
    failed_over = ""
    if view.failover:
        states = ", ".join(f"{e(f.vm_name)}: {e(f.state)}" for f in view.failover)
        failed_over = f'<p class="failover">Failed over: {states}</p>'
    return (
        f'<section class="plan" id="plan-{e(p.name)}{e(key)}" aria-labelledby="h-plan-{e(p.name)}{e(key)}">'
        f'<{heading} id="h-plan-{e(p.name)}{e(key)}">Plan {e(p.name)}</{heading}>'
        f"<p>Covers {e(what)}; starts {e(groups)}.</p>{test}{failed_over}</section>"
    )


def _describe(gate: HealthGate | None) -> str | None:
    return gate.describe() if gate is not None else None


def plan_json(v: PlanView, now: datetime) -> dict[str, Any]:
    """A plan as `/api/plans` shows it: its groups, its last test failover (with the per-VM
    record, when kept), and the VMs of a real failover, if one was done."""
    p = v.plan
    test: dict[str, Any] | None = None
    if v.last_test is not None:
        r = v.last_test
        test = {
            "run": r.id,
            "outcome": r.outcome,
            "passed": r.outcome == "success",
            "started": r.started_at.isoformat(),
            "finished": r.finished_at.isoformat() if r.finished_at else None,
            "seconds": r.duration.total_seconds() if r.duration else None,
            "age_seconds": max(0, int((now - r.started_at).total_seconds())),
            "error": r.error,
            "record": rehearsals.as_json(v.record) if v.record is not None else None,
        }
    return {
        "name": p.name,
        "jobs": list(p.jobs),
        "vms": list(p.vms),
        "groups": [
            {
                "number": i,
                "vms": list(g.vms),
                "start_delay": g.start_delay,
                "gate": _describe(g.gate or p.gate),
            }
            for i, g in enumerate(p.groups, 1)
        ],
        "last_test": test,
        "failover": [
            {
                "vm_uuid": f.vm_uuid,
                "vm_name": f.vm_name,
                "job": f.job,
                "pool": f.pool,
                "restore_point": f.restore_point,
                "group": f.group,
                "state": f.state,
                "started_at": f.started_at.isoformat() if f.started_at else None,
                "detail": f.detail,
            }
            for f in v.failover
        ],
    }
