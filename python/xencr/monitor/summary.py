"""A run report (the JSON payload of ``xencr run --json``) as a few readable lines: the body of
the report e-mail, where the JSON itself travels as an attachment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from xencr.config import format_duration
from xencr.monitor.rpo import Breach
from xencr.units import human_bytes

# A VM or target in one of these did not get its restore point this run.
FAILED = frozenset({"failure", "interrupted"})


def _age(seconds: int | None) -> str:
    return "none yet" if seconds is None else f"{format_duration(seconds)} old"


def failed(payload: Mapping[str, Any]) -> bool:
    """Whether some VM or target failed or was interrupted (skips are not failures)."""
    if payload.get("outcome") in FAILED:
        return True
    for vm in payload.get("vms") or []:
        if vm.get("outcome") in FAILED or any(t.get("outcome") in FAILED for t in vm.get("targets") or []):
            return True
    return False


def health_check_failed(payload: Mapping[str, Any]) -> bool:
    """Whether a new restore point failed its health check (the run itself may have succeeded)."""
    for vm in payload.get("vms") or []:
        for t in vm.get("targets") or []:
            if (t.get("health_check") or {}).get("passed") is False:
                return True
    return False


def counts(payload: Mapping[str, Any]) -> dict[str, int]:
    """VMs by outcome."""
    out: dict[str, int] = {}
    for vm in payload.get("vms") or []:
        out[str(vm.get("outcome"))] = out.get(str(vm.get("outcome")), 0) + 1
    return out


def subject(payload: Mapping[str, Any], breaches: Sequence[Breach]) -> str:
    by = counts(payload)
    what = ", ".join(f"{n} {o}" for o, n in sorted(by.items())) or "no VM"
    text = f"xencr: job {payload.get('job', '?')}: {payload.get('outcome', '?')} ({what})"
    if breaches:
        text += f", {len(breaches)} RPO breach" + ("es" if len(breaches) > 1 else "")
    return text


def _took(payload: Mapping[str, Any]) -> str:
    try:
        start = datetime.fromisoformat(str(payload["started"]))
        end = datetime.fromisoformat(str(payload["finished"]))
    except (KeyError, TypeError, ValueError):
        return ""
    return f" ({format_duration(max(0, int((end - start).total_seconds())))})"


def summary(payload: Mapping[str, Any], breaches: Sequence[Breach], why: str) -> str:
    """The readable text of a run report, with the RPO breaches after it."""
    lines = [
        f"Job {payload.get('job', '?')}: {payload.get('outcome', '?')}",
        f"Started {payload.get('started', '?')}, finished {payload.get('finished') or '-'}{_took(payload)}",
        f"Reported because: {why}",
    ]
    if payload.get("error"):
        lines.append(f"Error: {payload['error']}")  # the run could not start (pool down, SR missing)
    lines.append("")
    vms = payload.get("vms") or []
    if not vms:
        lines.append("No VM was replicated.")
    for vm in vms:
        head = f"{vm.get('name', '?')} ({vm.get('uuid', '?')}): {vm.get('outcome', '?')}"
        lines.append(head + (f": {vm['error']}" if vm.get("error") else ""))
        for t in vm.get("targets") or []:
            line = f"  -> {t.get('target', '?')}: {t.get('outcome', '?')}"
            if t.get("outcome") == "success":
                line += f", {t.get('kind') or '?'}, {human_bytes(t.get('bytes') or 0)}"
            lines.append(line)
            if t.get("error"):
                lines.append(f"     {t['error']}")
            for d in t.get("disks") or []:
                if d.get("kind") == "full":
                    lines.append(f"     disk {d.get('userdevice')}: full ({d.get('reason')})")
            for w in t.get("warnings") or []:
                lines.append(f"     warning: {w}")
            if t.get("health_check"):
                hc = t["health_check"]
                verdict = "passed" if hc.get("passed") else "FAILED"
                lines.append(f"     health check {verdict}: {hc.get('detail')} ({hc.get('seconds')}s)")
            if t.get("cleaned"):
                lines.append(f"     cleaned up {len(t['cleaned'])} leftover(s) of earlier runs")
            for d in t.get("detached") or []:
                lines.append(f"     detached: {d}")
    if breaches:
        lines += ["", "RPO breaches (newest restore point older than the RPO):"]
        lines += [
            f"  {b.vm} ({b.vm_uuid}) -> SR {b.target_sr}: {_age(b.age)}, RPO {format_duration(b.rpo)}"
            for b in breaches
        ]
    lines += ["", "The full report is attached as JSON (report.json)."]
    return "\n".join(lines) + "\n"
