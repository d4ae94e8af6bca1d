"""Which VM operations are allowed now (``ocaml/xapi/xapi_vm_lifecycle.ml`` ``check_operation_error``;
xapi.md 3.3). First failing check wins: blocked → power state → template → snapshot → dom0."""

from __future__ import annotations

from typing import Any

from xencr.sim.db import Database
from xencr.sim.errors import XapiError

_ALL = ["halted", "paused", "suspended", "running"]

# allowed_power_states, in xapi's list order (the `expected` error parameter keeps it).
_POWER: dict[str, list[str]] = {
    "start": ["halted"],
    "start_on": ["halted"],
    "provision": ["halted"],
    "changing_NVRAM": ["halted"],
    "make_into_template": ["halted"],
    "changing_shadow_memory": ["halted"],
    "create_vtpm": ["halted"],
    "changing_VCPUs": ["halted"],
    "changing_static_range": ["halted"],
    "changing_memory_limits": ["halted"],
    "unpause": ["paused"],
    "resume": ["suspended"],
    "resume_on": ["suspended"],
    "csvm": ["suspended"],
    "clean_reboot": ["running"],
    "clean_shutdown": ["running"],
    "pause": ["running"],
    "suspend": ["running"],
    "pool_migrate": ["running"],
    "snapshot_with_quiesce": ["running"],
    "changing_dynamic_range": ["halted", "running"],
    "create_template": ["halted", "suspended"],
    "destroy": ["halted", "suspended"],
    "export": ["halted", "suspended"],
    "hard_reboot": ["paused", "running"],
    "checkpoint": ["paused", "suspended", "running"],
    "get_boot_record": ["paused", "suspended", "running"],
    "shutdown": ["paused", "suspended", "running"],
    "hard_shutdown": ["paused", "suspended", "running"],
    "migrate_send": ["halted", "suspended", "running"],
    "assert_operation_valid": _ALL,
    "metadata_export": _ALL,
    "power_state_reset": _ALL,
    "revert": _ALL,
    "snapshot": _ALL,
    "update_allowed_operations": _ALL,
    "query_services": _ALL,
}
_TEMPLATE_OK = {
    "changing_dynamic_range",
    "changing_static_range",
    "changing_memory_limits",
    "changing_shadow_memory",
    "changing_VCPUs",
    "changing_NVRAM",
    "clone",
    "copy",
    "export",
    "metadata_export",
    "provision",
}
_SNAPSHOT_OK = {"revert", "clone", "copy", "export", "destroy", "hard_shutdown", "metadata_export"}
_DOM0_OK = {
    "data_source_op",
    "changing_memory_live",
    "awaiting_memory_live",
    "metadata_export",
    "changing_dynamic_range",
    "changing_memory_limits",
    "changing_static_range",
    "start",
    "start_on",
    "changing_VCPUs",
    "destroy",
}
# Operations listed in allowed_operations (the advisory field XenCenter reads).
LISTED_OPS = [
    "snapshot",
    "clone",
    "copy",
    "checkpoint",
    "start",
    "start_on",
    "pause",
    "unpause",
    "clean_shutdown",
    "clean_reboot",
    "hard_shutdown",
    "hard_reboot",
    "suspend",
    "resume",
    "destroy",
    "export",
    "changing_memory_limits",
    "changing_VCPUs",
    "changing_NVRAM",
    "metadata_export",
]


_LONG_COPIES = {"clone", "copy", "export"}
_SNAPSHOTS = {"snapshot", "checkpoint"}
_BOOT_RECORD = {"get_boot_record"}


def allowed_concurrently(op: str, current: list[str]) -> bool:
    """``is_allowed_concurrently``: ops of one family may overlap; hard_shutdown/hard_reboot
    may interrupt most things."""
    if op == "hard_shutdown":
        return "hard_shutdown" not in current
    if op == "hard_reboot":
        return not any(o in ("hard_shutdown", "hard_reboot") for o in current)
    return any(
        op in family and all(o in family for o in current)
        for family in (_LONG_COPIES, _SNAPSHOTS, _BOOT_RECORD)
    )


def allowed_power_states(vm: dict[str, Any], op: str) -> list[str]:
    if op in ("clone", "copy"):
        # clone_suspended_vm_enabled is off by default (xapi_globs)
        return ["halted", "suspended"] if vm["is_a_snapshot"] else ["halted"]
    if vm["is_control_domain"] and op in (
        "changing_VCPUs",
        "changing_static_range",
        "changing_memory_limits",
    ):
        return ["halted", "running"]
    return _POWER.get(op, _ALL)


def operation_error(vm_ref: str, vm: dict[str, Any], op: str) -> XapiError | None:
    blocked = vm["blocked_operations"]
    if op in blocked:
        return XapiError("OPERATION_BLOCKED", vm_ref, blocked[op])
    power = str(vm["power_state"]).lower()
    allowed = allowed_power_states(vm, op)
    if power not in allowed:
        return XapiError("VM_BAD_POWER_STATE", vm_ref, ", ".join(allowed), power)
    current: dict[str, str] = vm["current_operations"]
    if current and not allowed_concurrently(op, list(current.values())):
        if len(current) == 1:
            ((task, running),) = current.items()
            return XapiError("OTHER_OPERATION_IN_PROGRESS", "VM", vm_ref, running, task)
        return XapiError(
            "OTHER_OPERATION_IN_PROGRESS",
            "VM",
            vm_ref,
            "{" + ",".join(current.values()) + "}",
            "{" + ",".join(current) + "}",
        )
    is_snapshot = bool(vm["is_a_snapshot"])
    if vm["is_a_template"] and not is_snapshot and op not in _TEMPLATE_OK:
        default_template = vm["is_default_template"] or vm["other_config"].get("default_template") == "true"
        if not (op == "destroy" and not default_template):
            return XapiError("VM_IS_TEMPLATE", vm_ref, op)
    if is_snapshot and op not in _SNAPSHOT_OK:
        return XapiError("VM_IS_SNAPSHOT", vm_ref, op)
    if vm["is_control_domain"] and (op in ("changing_VCPUs", "destroy") or op not in _DOM0_OK):
        return XapiError("OPERATION_NOT_ALLOWED", "This operation is not allowed on dom0")
    return None


def assert_operation(vm_ref: str, vm: dict[str, Any], op: str) -> None:
    err = operation_error(vm_ref, vm, op)
    if err is not None:
        raise err


def compute_allowed_operations(db: Database, ref: str, out: dict[str, Any]) -> None:
    out["allowed_operations"] = [op for op in LISTED_OPS if operation_error(ref, out, op) is None]
