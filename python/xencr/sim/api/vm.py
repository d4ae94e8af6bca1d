"""VM.* lifecycle (``xapi_vm.ml``, ``xapi_vm_snapshot.ml``, ``xapi_vm_clone.ml``,
``xapi_vm_lifecycle.ml``, ``xapi_vm_helpers.ml``; xapi.md 2.6, 3.1-3.5, 5.4)."""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from xencr.sim import knobs
from xencr.sim.api import metrics, placement
from xencr.sim.api import vdi as vdi_api
from xencr.sim.api.ctor import ctor_fields
from xencr.sim.api.vbd import used_slots
from xencr.sim.api.vif import generate_mac
from xencr.sim.api.vm_checks import assert_operation
from xencr.sim.db import new_ref
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError
from xencr.sim.values import EPOCH, NULL_REF, now

_VBD_COPIED = (
    "userdevice",
    "bootable",
    "mode",
    "type",
    "unpluggable",
    "empty",
    "other_config",
    "qos_algorithm_type",
    "qos_algorithm_params",
)
_VIF_COPIED = (
    "device",
    "network",
    "MTU",
    "other_config",
    "qos_algorithm_type",
    "qos_algorithm_params",
    "locking_mode",
    "ipv4_allowed",
    "ipv6_allowed",
)
# Fields a snapshot/clone/copy takes from the source (xapi_vm_clone.ml copy_vm_record).
_VM_COPIED = (
    "name_description",
    "user_version",
    "affinity",
    "memory_overhead",
    "memory_target",
    "memory_static_max",
    "memory_dynamic_max",
    "memory_dynamic_min",
    "memory_static_min",
    "VCPUs_params",
    "VCPUs_max",
    "VCPUs_at_startup",
    "actions_after_softreboot",
    "actions_after_shutdown",
    "actions_after_reboot",
    "actions_after_crash",
    "PV_bootloader",
    "PV_kernel",
    "PV_ramdisk",
    "PV_args",
    "PV_bootloader_args",
    "PV_legacy_args",
    "HVM_boot_policy",
    "HVM_boot_params",
    "HVM_shadow_multiplier",
    "platform",
    "PCI_bus",
    "other_config",
    "recommendations",
    "xenstore_data",
    "tags",
    "bios_strings",
    "ha_restart_priority",
    "NVRAM",
    "domain_type",
    "has_vendor_device",
    "hardware_platform_version",
    "generation_id",
    "reference_label",
    "suspend_SR",
    "last_boot_CPU_flags",
)


@contextmanager
def vm_operation(ctx: Ctx, vm: str, op: str) -> Iterator[dict[str, Any]]:
    """Check ``op`` and keep it in the VM's ``current_operations`` while it runs (keyed by the
    call's task, as xapi does), so overlapping calls see ``OTHER_OPERATION_IN_PROGRESS``."""
    key = ctx.task or new_ref()
    with ctx.db.lock:
        row = _vm(ctx, vm)
        assert_operation(vm, row, op)
        ctx.db.update("VM", vm, current_operations={**row["current_operations"], key: op})
    try:
        yield row
    finally:
        with ctx.db.lock:
            if ctx.db.exists("VM", vm):
                ops = dict(ctx.db.get("VM", vm)["current_operations"])
                ops.pop(key, None)
                ctx.db.update("VM", vm, current_operations=ops)


def _vm(ctx: Ctx, vm: str) -> dict[str, Any]:
    return require(ctx, "VM", vm)


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


@handler("VM.create")
def create(ctx: Ctx, record: dict[str, Any]) -> str:
    fields = ctor_fields("VM", record)
    fields["other_config"] = {"mac_seed": str(uuidlib.uuid4()), **fields["other_config"]}
    vm = ctx.db.create("VM", fields)
    metrics.create_vm_metrics(ctx.db, vm)
    return vm


@handler("VM.destroy")
def destroy(ctx: Ctx, vm: str) -> None:
    db = ctx.db
    row = _vm(ctx, vm)
    assert_operation(vm, row, "destroy")
    for vbd in db.reverse("VM", "VBDs", vm):
        db.delete("VBD", vbd)
    for vif in db.reverse("VM", "VIFs", vm):
        db.delete("VIF", vif)
    for child in db.reverse("VM", "children", vm):
        db.update("VM", child, parent=row["parent"])
    metrics.destroy_vm_metrics(db, vm)
    db.delete("VM", vm)


# ------------------------------------------------------------------------------------------ power


def _set_power(ctx: Ctx, vm: str, state: str, host: str | None = None) -> None:
    """Power state and its consequences; a domain that (re)starts runs on ``host``, else stays
    where it is (reboot, unpause), else runs on the master."""
    db = ctx.db
    running = state in ("Running", "Paused")
    fields: dict[str, Any] = {"power_state": state}
    was_on = db.get("VM", vm)["resident_on"]
    if running:
        current = db.get("VM", vm)["resident_on"]
        where = host or (current if db.exists("host", current) else ctx.pool.master_ref)
        fields.update(resident_on=where, domid=_next_domid(ctx))
    elif state == "Halted":
        fields.update(resident_on=NULL_REF, domid=-1)
    else:  # Suspended: the domain is gone
        fields.update(resident_on=NULL_REF, domid=-1)
    db.update("VM", vm, **fields)
    for vbd in db.reverse("VM", "VBDs", vm):
        attached = running and not db.get("VBD", vbd)["empty"]
        db.update("VBD", vbd, currently_attached=attached)
    for vif in db.reverse("VM", "VIFs", vm):
        db.update("VIF", vif, currently_attached=running)
    for h in {was_on, db.get("VM", vm)["resident_on"]}:
        if db.exists("host", h):
            placement.refresh_memory_free(db, h)


def _next_domid(ctx: Ctx) -> int:
    return 1 + max([int(rec["domid"]) for _, rec in ctx.db.items("VM")] + [0])


def _start(ctx: Ctx, vm: str, paused: bool, op: str, host: str | None = None) -> None:
    """Start on ``host`` (``VM.start_on``: ``reserve_memory_for_vm`` checks it can boot there)
    or on a host chosen among those that can (``VM.start``: ``forward_to_suitable_host``); the
    checks come after the VM's own operation checks, as in message_forwarding.ml."""
    with vm_operation(ctx, vm, op) as row:
        with ctx.db.lock:
            if host is None:
                host = placement.choose_host(ctx, vm)
            else:
                placement.assert_can_boot_here(ctx.db, vm, host)
            _set_power(ctx, vm, "Paused" if paused else "Running", host)
            metrics.on_start(ctx.db, vm)
            ctx.pool.record_start(vm, host)
            if not paused:
                ctx.pool.boots.boot(vm)
        # xapi_vm.ml start: sleeps start_delay seconds after the domain runs, before returning.
        time.sleep(float(row["start_delay"]) * ctx.pool.delay_scale)


@handler("VM.start", locked=False)
def start(ctx: Ctx, vm: str, start_paused: bool, force: bool) -> None:
    _start(ctx, vm, start_paused, "start")


@handler("VM.start_on", locked=False)
def start_on(ctx: Ctx, vm: str, host: str, start_paused: bool, force: bool) -> None:
    with ctx.db.lock:
        require(ctx, "host", host)
    _start(ctx, vm, start_paused, "start_on", host)


def _transition(ctx: Ctx, vm: str, op: str, state: str) -> None:
    row = _vm(ctx, vm)
    assert_operation(vm, row, op)
    _set_power(ctx, vm, state)


# xapi_globs.ml domain_shutdown_total_timeout; xenops_server.ml domain_shutdown_ack_timeout
SHUTDOWN_TOTAL_TIMEOUT = 1200.0
SHUTDOWN_ACK_TIMEOUT = 60.0


def ocaml_float(x: float) -> str:
    """OCaml's ``string_of_float`` (``%.12g``, a trailing dot for integral values)."""
    text = f"{x:.12g}"
    return text + "." if text.lstrip("-").isdigit() else text


def _wait(ctx: Ctx, vm: str, domid: int, seconds: float) -> bool:
    """Sleep ``seconds`` unless the task is cancelled (``TASK_CANCELLED``); False when the
    domain went away meanwhile (a hard shutdown ran alongside)."""
    deadline = time.monotonic() + seconds
    while True:
        ctx.check_cancelled()
        with ctx.db.lock:
            if not ctx.db.exists("VM", vm) or int(ctx.db.get("VM", vm)["domid"]) != domid:
                return False
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(left, 0.05))


def _guest_shutdown(ctx: Ctx, vm: str, domid: int, timeout: float) -> None:
    """xenops_server.ml ``VM_shutdown_domain``: request the shutdown and wait at most
    ``min(ack timeout, timeout)`` for the guest's acknowledgement (``VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT
    [vm]``), then the rest of ``timeout`` for the domain to halt (``VM_SHUTDOWN_TIMEOUT [vm,
    timeout]``). An HVM domain without PV drivers is not expected to acknowledge: it is shut down
    at once by the hypervisor (domain.ml ``shutdown_wait_for_ack``); PV/PVH guests always are."""
    db = ctx.db
    with db.lock:
        scale = knobs.delay_scale(db)
        row = db.get("VM", vm)
        pv_kernel = row["domain_type"] in ("pv", "pvh", "pv_in_pvh")
        expecting_ack = pv_kernel or metrics.has_pv_drivers(db, vm)
        answers = metrics.guest_is_up(db, vm) and row["power_state"] == "Running"
        behaviour = knobs.guest_shutdown(db, vm)
        clean_delay = knobs.scaled(db, vm, knobs.CLEAN_SHUTDOWN_DELAY)
        hard_delay = knobs.scaled(db, vm, knobs.HARD_SHUTDOWN_DELAY)
    if not expecting_ack:
        _wait(ctx, vm, domid, hard_delay)
        return
    if not answers or behaviour == "ignore":
        if _wait(ctx, vm, domid, min(SHUTDOWN_ACK_TIMEOUT, timeout) * scale):
            raise XapiError("VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT", vm)
        return
    if behaviour == "hang" or clean_delay > timeout * scale:
        if _wait(ctx, vm, domid, timeout * scale):
            raise XapiError("VM_SHUTDOWN_TIMEOUT", vm, ocaml_float(timeout))
        return
    _wait(ctx, vm, domid, clean_delay)


def _halt(ctx: Ctx, vm: str, domid: int) -> None:
    with ctx.db.lock:
        row = ctx.db.get("VM", vm)
        if row["power_state"] in ("Running", "Paused") and int(row["domid"]) == domid:
            _set_power(ctx, vm, "Halted")


def _shutdown_delay(ctx: Ctx, row: dict[str, Any]) -> None:
    # xapi_vm_helpers.ml shutdown_delay: VM.shutdown_delay seconds slept once the VM is down
    time.sleep(float(row["shutdown_delay"]) * ctx.pool.delay_scale)


def _clean_shutdown(ctx: Ctx, vm: str, op: str, timeout: float) -> None:
    with vm_operation(ctx, vm, op) as row:
        with ctx.db.lock:
            ctx.db.update("VM", vm, ha_always_run=False)
            domid = int(row["domid"])
        _guest_shutdown(ctx, vm, domid, timeout)
        _halt(ctx, vm, domid)
        _shutdown_delay(ctx, row)


def _hard_shutdown(ctx: Ctx, vm: str, op: str) -> None:
    with vm_operation(ctx, vm, op) as row:
        with ctx.db.lock:
            ctx.db.update("VM", vm, ha_always_run=False)
            if row["power_state"] == "Suspended":  # xapi_vm.ml: the suspend image goes, no delay
                _set_power(ctx, vm, "Halted")
                return
            domid = int(row["domid"])
            delay = knobs.scaled(ctx.db, vm, knobs.HARD_SHUTDOWN_DELAY)
        _wait(ctx, vm, domid, delay)
        _halt(ctx, vm, domid)
        _shutdown_delay(ctx, row)


@handler("VM.clean_shutdown", locked=False)
def clean_shutdown(ctx: Ctx, vm: str) -> None:
    _clean_shutdown(ctx, vm, "clean_shutdown", SHUTDOWN_TOTAL_TIMEOUT)


@handler("VM.hard_shutdown", locked=False)
def hard_shutdown(ctx: Ctx, vm: str) -> None:
    _hard_shutdown(ctx, vm, "hard_shutdown")


@handler("VM.shutdown", locked=False)
def shutdown(ctx: Ctx, vm: str) -> None:
    """xapi_vm.ml shutdown: a clean shutdown (timeout = ``shutdown_delay`` when positive), and a
    hard one when it fails. A suspended VM only loses its suspend image."""
    with ctx.db.lock:
        row = _vm(ctx, vm)
        if row["power_state"] == "Suspended":
            assert_operation(vm, row, "shutdown")
            _set_power(ctx, vm, "Halted")
            return
        timeout = float(row["shutdown_delay"]) if int(row["shutdown_delay"]) > 0 else SHUTDOWN_TOTAL_TIMEOUT
    try:
        _clean_shutdown(ctx, vm, "shutdown", timeout)
    except XapiError as err:
        ctx.pool.log.warning("VM.shutdown: clean shutdown of %s failed (%s); hard shutdown", vm, err.code)
        _hard_shutdown(ctx, vm, "shutdown")


@handler("VM.suspend")
def suspend(ctx: Ctx, vm: str) -> None:
    _transition(ctx, vm, "suspend", "Suspended")


@handler("VM.resume")
def resume(ctx: Ctx, vm: str, start_paused: bool, force: bool) -> None:
    row = _vm(ctx, vm)
    assert_operation(vm, row, "resume")
    # resume, like start, goes to a suitable host (message_forwarding.ml forward_to_suitable_host)
    _set_power(ctx, vm, "Paused" if start_paused else "Running", placement.choose_host(ctx, vm))


@handler("VM.pause")
def pause(ctx: Ctx, vm: str) -> None:
    _transition(ctx, vm, "pause", "Paused")


@handler("VM.unpause")
def unpause(ctx: Ctx, vm: str) -> None:
    row = _vm(ctx, vm)
    assert_operation(vm, row, "unpause")
    ctx.db.update("VM", vm, power_state="Running")  # the same domain goes on
    if not metrics.guest_is_up(ctx.db, vm):
        ctx.pool.boots.boot(vm)  # a domain started paused boots its guest now


@handler("VM.clean_reboot")
def clean_reboot(ctx: Ctx, vm: str) -> None:
    _transition(ctx, vm, "clean_reboot", "Running")


@handler("VM.hard_reboot")
def hard_reboot(ctx: Ctx, vm: str) -> None:
    _transition(ctx, vm, "hard_reboot", "Running")


@handler("VM.power_state_reset")
def power_state_reset(ctx: Ctx, vm: str) -> None:
    _vm(ctx, vm)
    _set_power(ctx, vm, "Halted")


# ------------------------------------------------------------------------------ snapshot / clone


def _disk_vbds(ctx: Ctx, vm: str) -> list[str]:
    return sorted(ctx.db.reverse("VM", "VBDs", vm), key=lambda r: str(ctx.db.get("VBD", r)["userdevice"]))


def _copy_devices(ctx: Ctx, src: str, dst: str, disk_map: dict[str, str], *, keep_mac: bool) -> None:
    db = ctx.db
    for vbd in _disk_vbds(ctx, src):
        row = db.get("VBD", vbd)
        vdi = row["VDI"]
        if row["type"] == "Disk" and vdi != NULL_REF:
            if vdi not in disk_map:
                continue  # ignored VDI
            vdi = disk_map[vdi]
        fields = {k: _copy(row[k]) for k in _VBD_COPIED}
        fields.update(VM=dst, VDI=vdi, currently_attached=False)
        if row["type"] == "Disk":
            fields["other_config"] = {**fields["other_config"], "owner": ""}
        db.create("VBD", fields)
    dst_seed = db.get("VM", dst)["other_config"].get("mac_seed", str(uuidlib.uuid4()))
    for vif in db.reverse("VM", "VIFs", src):
        row = db.get("VIF", vif)
        fields = {k: _copy(row[k]) for k in _VIF_COPIED}
        mac = row["MAC"] if keep_mac else generate_mac(dst_seed, row["device"])
        fields.update(
            VM=dst,
            MAC=mac,
            MAC_autogenerated=row["MAC_autogenerated"] or not keep_mac,
            currently_attached=False,
        )
        db.create("VIF", fields)


def _disks(ctx: Ctx, vm: str, ignore: list[str]) -> list[str]:
    out = []
    for vbd in _disk_vbds(ctx, vm):
        row = ctx.db.get("VBD", vbd)
        if row["type"] == "Disk" and row["VDI"] != NULL_REF and row["VDI"] not in ignore:
            out.append(row["VDI"])
    return out


def _map_disks(ctx: Ctx, vdis: list[str], fn: Any) -> dict[str, str]:
    """Apply ``fn`` to each disk; on failure destroy what was made and re-raise (xapi_vm_clone.ml)."""
    made: dict[str, str] = {}
    try:
        for i, vdi in enumerate(vdis):
            ctx.check_cancelled()
            made[vdi] = fn(vdi)
            ctx.progress((i + 1) / (len(vdis) + 1))
    except BaseException:
        for new in made.values():
            try:
                with ctx.db.lock:
                    vdi_api.destroy_vdi(ctx, new)
            except XapiError:
                pass
        raise
    return made


def _new_vm(ctx: Ctx, src: str, name: str, extra: dict[str, Any]) -> str:
    row = ctx.db.get("VM", src)
    fields = {k: _copy(row[k]) for k in _VM_COPIED if k in row}
    fields.update(
        name_label=name,
        power_state="Halted",
        blocked_operations={},
        appliance=NULL_REF,
        order=0,
        start_delay=0,
        shutdown_delay=0,
        ha_always_run=False,
        suspend_VDI=NULL_REF,
        is_a_template=row["is_a_template"],
        domid=-1,
    )
    fields.update(extra)
    fields.update(metrics=NULL_REF, guest_metrics=NULL_REF)
    new = ctx.db.create("VM", fields)
    metrics.create_vm_metrics(ctx.db, new)  # xapi_vm_helpers.copy_metrics: a fresh row per VM
    return new


def snapshot_vm(ctx: Ctx, vm: str, new_name: str, ignore_vdis: list[str], *, checkpoint: bool) -> str:
    db = ctx.db
    with db.lock:
        row = _vm(ctx, vm)
        assert_operation(vm, row, "checkpoint" if checkpoint else "snapshot")
        for v in ignore_vdis:
            require(ctx, "VDI", v)
        vdis = _disks(ctx, vm, ignore_vdis)
        power = row["power_state"]

        def snap(v: str) -> str:
            return vdi_api.snapshot_vdi(ctx, v)

        disk_map = _map_disks(ctx, vdis, snap)
        snap_ref = _new_vm(
            ctx,
            vm,
            new_name,
            {
                "is_a_snapshot": True,
                "is_a_template": True,
                "snapshot_of": vm,
                "snapshot_time": now(),
                "snapshot_info": {"disk-snapshot-type": "crash_consistent", "power-state-at-snapshot": power},
                "parent": row["parent"],
                "power_state": "Suspended" if checkpoint else "Halted",
            },
        )
        db.update("VM", vm, parent=snap_ref)
        _copy_devices(ctx, vm, snap_ref, disk_map, keep_mac=True)
        return snap_ref


@handler("VM.snapshot", locked=False)
def snapshot(ctx: Ctx, vm: str, new_name: str, ignore_vdis: list[str]) -> str:
    return snapshot_vm(ctx, vm, new_name, ignore_vdis, checkpoint=False)


@handler("VM.checkpoint", locked=False)
def checkpoint(ctx: Ctx, vm: str, new_name: str) -> str:
    return snapshot_vm(ctx, vm, new_name, [], checkpoint=True)


def _clone_or_copy(ctx: Ctx, vm: str, new_name: str, sr: str | None) -> str:
    is_copy = sr is not None
    with vm_operation(ctx, vm, "copy" if is_copy else "clone") as row:
        return _clone_or_copy_body(ctx, vm, row, new_name, sr)


def _clone_or_copy_body(ctx: Ctx, vm: str, row: dict[str, Any], new_name: str, sr: str | None) -> str:
    db = ctx.db
    is_copy = sr is not None
    with db.lock:
        if sr is not None and sr != NULL_REF:
            require(ctx, "SR", sr)
        vdis = _disks(ctx, vm, [])

    def one(v: str) -> str:
        if is_copy:
            return vdi_api.copy_vdi(ctx, v, sr or NULL_REF, NULL_REF, NULL_REF)
        with db.lock:
            return vdi_api.clone_vdi(ctx, v)

    disk_map = _map_disks(ctx, vdis, one)
    with db.lock:
        dropped = ("default_template", "xensource_internal")
        other = {k: v for k, v in row["other_config"].items() if k not in dropped}
        other["mac_seed"] = str(uuidlib.uuid4())
        new = _new_vm(
            ctx,
            vm,
            new_name,
            {
                "is_a_snapshot": False,
                "snapshot_of": NULL_REF,
                "snapshot_time": EPOCH,
                "parent": NULL_REF,
                "other_config": other,
                "snapshot_info": {},
                "power_state": "Halted",
            },
        )
        _copy_devices(ctx, vm, new, disk_map, keep_mac=False)
        return new


@handler("VM.clone", locked=False)
def clone(ctx: Ctx, vm: str, new_name: str) -> str:
    return _clone_or_copy(ctx, vm, new_name, None)


@handler("VM.copy", locked=False)
def copy(ctx: Ctx, vm: str, new_name: str, sr: str) -> str:
    return _clone_or_copy(ctx, vm, new_name, sr)


@handler("VM.revert", locked=False)
def revert(ctx: Ctx, snapshot: str) -> None:
    """Replace the VM's disks by clones of the snapshot's (xapi_vm_snapshot.ml revert)."""
    db = ctx.db
    with db.lock:
        snap = _vm(ctx, snapshot)
        assert_operation(snapshot, snap, "revert")
        if not snap["is_a_snapshot"]:
            raise XapiError("REVERT_ONLY_ALLOWED_ON_SNAPSHOT")  # chosen: no params in datamodel
        vm = snap["snapshot_of"]
        row = _vm(ctx, vm)
        old_disks = _disks(ctx, vm, [])
        if row["power_state"] != "Halted":
            _set_power(ctx, vm, "Halted")
        for vbd in db.reverse("VM", "VBDs", vm):
            db.delete("VBD", vbd)
        for vif in db.reverse("VM", "VIFs", vm):
            db.delete("VIF", vif)
        disk_map = {v: vdi_api.clone_vdi(ctx, v) for v in _disks(ctx, snapshot, [])}
        _copy_devices(ctx, snapshot, vm, disk_map, keep_mac=True)
        for v in old_disks:
            vdi_api.destroy_vdi(ctx, v)
        db.update("VM", vm, parent=snapshot)
        if snap["snapshot_info"].get("power-state-at-snapshot") == "Suspended":
            _set_power(ctx, vm, "Suspended")


# --------------------------------------------------------------------------------- field setters


def _halted_setter(ctx: Ctx, vm: str, op: str, **fields: Any) -> None:
    row = _vm(ctx, vm)
    assert_operation(vm, row, op)
    ctx.db.update("VM", vm, **fields)


@handler("VM.set_memory_limits")
def set_memory_limits(
    ctx: Ctx, vm: str, static_min: int, static_max: int, dynamic_min: int, dynamic_max: int
) -> None:
    if not static_min <= dynamic_min <= dynamic_max <= static_max:
        # xapi_vm_memory_constraints.ml assert_valid
        raise XapiError("MEMORY_CONSTRAINT_VIOLATION_ORDER")
    _halted_setter(
        ctx,
        vm,
        "changing_memory_limits",
        memory_static_min=static_min,
        memory_static_max=static_max,
        memory_dynamic_min=dynamic_min,
        memory_dynamic_max=dynamic_max,
    )


for _field, _op in (
    ("memory_static_max", "changing_static_range"),
    ("memory_static_min", "changing_static_range"),
    ("memory_dynamic_max", "changing_dynamic_range"),
    ("memory_dynamic_min", "changing_dynamic_range"),
    ("VCPUs_max", "changing_VCPUs"),
    ("VCPUs_at_startup", "changing_VCPUs"),
    ("HVM_boot_policy", "changing_static_range"),
    ("NVRAM", "changing_NVRAM"),
):

    def _make(field: str, op: str) -> Any:
        def setter(ctx: Ctx, vm: str, value: Any) -> None:
            _halted_setter(ctx, vm, op, **{field: value})

        return setter

    handler(f"VM.set_{_field}")(_make(_field, _op))


def _non_negative(name: str, value: int) -> None:
    if value < 0:
        raise XapiError("INVALID_VALUE", name, value)


@handler("VM.set_order")
def set_order(ctx: Ctx, vm: str, value: int) -> None:
    _vm(ctx, vm)
    _non_negative("order", value)
    ctx.db.update("VM", vm, order=value)


@handler("VM.set_start_delay")
def set_start_delay(ctx: Ctx, vm: str, value: int) -> None:
    _vm(ctx, vm)
    _non_negative("start_delay", value)
    ctx.db.update("VM", vm, start_delay=value)


@handler("VM.set_shutdown_delay")
def set_shutdown_delay(ctx: Ctx, vm: str, value: int) -> None:
    _vm(ctx, vm)
    _non_negative("shutdown_delay", value)
    ctx.db.update("VM", vm, shutdown_delay=value)


@handler("VM.set_appliance")
def set_appliance(ctx: Ctx, vm: str, value: str) -> None:
    _vm(ctx, vm)
    if value != NULL_REF:
        require(ctx, "VM_appliance", value)
    ctx.db.update("VM", vm, appliance=value)


@handler("VM.set_ha_restart_priority")
def set_ha_restart_priority(ctx: Ctx, vm: str, value: str) -> None:
    _vm(ctx, vm)
    if value not in ("", "restart", "best-effort"):
        raise XapiError("INVALID_VALUE", "ha_restart_priority", value)
    ctx.db.update("VM", vm, ha_restart_priority=value)


@handler("VM.set_suspend_VDI")
def set_suspend_vdi(ctx: Ctx, vm: str, value: str) -> None:
    _vm(ctx, vm)
    ctx.db.update("VM", vm, suspend_VDI=value)


@handler("VM.get_allowed_VBD_devices")
def get_allowed_vbd_devices(ctx: Ctx, vm: str) -> list[str]:
    _vm(ctx, vm)
    used = used_slots(ctx.db, vm)
    return [str(n) for n in range(255) if n not in used]


@handler("VM.get_allowed_VIF_devices")
def get_allowed_vif_devices(ctx: Ctx, vm: str) -> list[str]:
    _vm(ctx, vm)
    used = {ctx.db.get("VIF", v)["device"] for v in ctx.db.reverse("VM", "VIFs", vm)}
    return [str(n) for n in range(16) if str(n) not in used]


@handler("VM.assert_operation_valid")
def assert_operation_valid(ctx: Ctx, vm: str, op: str) -> None:
    assert_operation(vm, _vm(ctx, vm), op)


@handler("VM.update_allowed_operations")
def update_allowed_operations(ctx: Ctx, vm: str) -> None:
    _vm(ctx, vm)
    ctx.db.touch("VM", vm)
