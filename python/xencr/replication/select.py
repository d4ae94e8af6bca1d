"""Which VMs a job may protect: never templates, snapshots, the control domain, or replicas
(ours or Xen Orchestra's). The job's own selectors live in `xencr.config`."""

from __future__ import annotations

from typing import Any

from xencr.replication import metadata as md


def is_replica(rec: dict[str, Any]) -> bool:
    oc = rec.get("other_config", {})
    blocked = rec.get("blocked_operations", {})
    return md.ROLE in oc or (md.XO_COPY_OF in oc and "start" in blocked)


def is_candidate(rec: dict[str, Any]) -> bool:
    return not (rec["is_a_template"] or rec["is_a_snapshot"] or rec["is_control_domain"] or is_replica(rec))
