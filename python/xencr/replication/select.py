"""Which VMs a job protects, evaluated at run time: UUIDs, name globs, `tag:NAME`, minus the
exclusions; never templates, snapshots, the control domain, or replicas (ours or XO's)."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from xencr.replication import metadata as md

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


def is_replica(rec: dict[str, Any]) -> bool:
    oc = rec.get("other_config", {})
    blocked = rec.get("blocked_operations", {})
    return md.COPY_OF in oc or md.ROLE in oc or (md.XO_COPY_OF in oc and "start" in blocked)


def is_candidate(rec: dict[str, Any]) -> bool:
    return not (rec["is_a_template"] or rec["is_a_snapshot"] or rec["is_control_domain"] or is_replica(rec))


def matches(rec: dict[str, Any], pattern: str) -> bool:
    if pattern.startswith("tag:"):
        return pattern[4:] in rec.get("tags", [])
    if _UUID.match(pattern):
        return str(rec["uuid"]).lower() == pattern.lower()
    return fnmatch.fnmatchcase(str(rec["name_label"]), pattern)


def select_vms(records: dict[str, dict[str, Any]], include: list[str], exclude: list[str]) -> list[str]:
    """Refs of the selected VMs, sorted by name for a stable order."""
    chosen = [
        ref
        for ref, rec in records.items()
        if is_candidate(rec)
        and any(matches(rec, p) for p in include)
        and not any(matches(rec, p) for p in exclude)
    ]
    return sorted(chosen, key=lambda r: (str(records[r]["name_label"]), str(records[r]["uuid"])))


def unmatched(records: dict[str, dict[str, Any]], include: list[str]) -> list[str]:
    """Include patterns that name nothing (a UUID or name that does not exist is worth saying)."""
    return [p for p in include if not any(matches(rec, p) for rec in records.values() if is_candidate(rec))]
