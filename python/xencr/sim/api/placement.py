"""Where a VM may run (``ocaml/xapi/xapi_vm_helpers.ml``): a host can boot a VM when it is live,
enabled, sees every SR holding the VM's disks through an attached PBD, and has the memory.

``assert_can_boot_here`` checks in xapi's order and raises xapi's errors: ``HOST_NOT_LIVE []``,
``HOST_DISABLED [host]``, ``VM_REQUIRES_SR [vm, sr]`` (the first SR not seen),
``HOST_NOT_ENOUGH_FREE_MEMORY [needed, available]``. ``VM.start`` takes the first host that
passes; when none does, the first that passes without the memory check, whose check then fails
``HOST_NOT_ENOUGH_FREE_MEMORY`` (``choose_host_for_vm_no_wlb``, ``reserve_memory_for_vm``);
``NO_HOSTS_AVAILABLE []`` when none passes even so. ``host_metrics.memory_free`` follows the
domains that run. Callers hold the database lock.
"""

from __future__ import annotations

from xencr.sim.db import Database
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError
from xencr.sim.values import NULL_REF


def required_srs(db: Database, vm: str) -> list[str]:
    """SRs of the VM's non-empty VBDs, and of its suspend image when suspended
    (``assert_can_see_SRs``), in VBD order."""
    row = db.get("VM", vm)
    vdis = [db.get("VBD", v)["VDI"] for v in db.reverse("VM", "VBDs", vm) if not db.get("VBD", v)["empty"]]
    if row["power_state"] == "Suspended" and row["suspend_VDI"] != NULL_REF:
        vdis.append(row["suspend_VDI"])
    srs: list[str] = []
    for vdi in vdis:
        if db.exists("VDI", vdi) and db.get("VDI", vdi)["SR"] not in srs:
            srs.append(db.get("VDI", vdi)["SR"])
    return srs


def srs_seen_by(db: Database, host: str) -> set[str]:
    """SRs with a currently attached PBD on ``host`` (``which_specified_SRs_not_available_on_host``)."""
    return {
        db.get("PBD", p)["SR"]
        for p in db.reverse("host", "PBDs", host)
        if db.get("PBD", p)["currently_attached"]
    }


def hosts_seeing(db: Database, sr: str) -> list[str]:
    """Hosts that can see ``sr`` (``Importexport.find_host_for_sr``'s candidates)."""
    return [
        db.get("PBD", p)["host"]
        for p in db.reverse("SR", "PBDs", sr)
        if db.get("PBD", p)["currently_attached"]
    ]


def _memory_used(row: dict[str, object]) -> int:
    # Memory_check's Dynamic_min policy (ballooning counted), plus the VM's overhead
    return int(str(row["memory_dynamic_min"])) + int(str(row["memory_overhead"]))


def free_memory(db: Database, host: str) -> int:
    """The host's total memory less its own overhead and what its resident domains need at
    minimum (``Memory_check.host_compute_free_memory_with_maximum_compression``: computed from
    what runs, not from the reported ``memory_free``)."""
    metrics = db.get("host", host)["metrics"]
    total = int(db.get("host_metrics", metrics)["memory_total"]) if db.exists("host_metrics", metrics) else 0
    used = sum(_memory_used(db.get("VM", v)) for v in db.reverse("host", "resident_VMs", host))
    return total - int(db.get("host", host)["memory_overhead"]) - used


def refresh_memory_free(db: Database, host: str) -> None:
    """``host_metrics.memory_free``: total less what the resident domains occupy (dynamic maximum and
    overhead); xapi refreshes it from the host's reports, the simulator when a domain starts or stops."""
    metrics = db.get("host", host)["metrics"]
    if not db.exists("host_metrics", metrics):
        return
    used = sum(
        int(db.get("VM", v)["memory_dynamic_max"]) + int(db.get("VM", v)["memory_overhead"])
        for v in db.reverse("host", "resident_VMs", host)
    )
    total = int(db.get("host_metrics", metrics)["memory_total"])
    db.update(
        "host_metrics", metrics, memory_free=total - int(db.get("host", host)["memory_overhead"]) - used
    )


def _live(db: Database, host: str) -> bool:
    metrics = db.get("host", host)["metrics"]
    return bool(db.exists("host_metrics", metrics) and db.get("host_metrics", metrics)["live"])


def assert_can_boot_here(db: Database, vm: str, host: str, *, memory: bool = True) -> None:
    row = db.get("VM", vm)
    if not _live(db, host):
        raise XapiError("HOST_NOT_LIVE")
    if not row["is_control_domain"] and not db.get("host", host)["enabled"]:
        raise XapiError("HOST_DISABLED", host)
    seen = srs_seen_by(db, host)
    missing = [sr for sr in required_srs(db, vm) if sr not in seen]
    if missing:
        raise XapiError("VM_REQUIRES_SR", vm, missing[0])
    if memory:
        needed, available = _memory_used(row) - int(row["memory_overhead"]), free_memory(db, host)
        if available < needed:
            raise XapiError("HOST_NOT_ENOUGH_FREE_MEMORY", needed, available)


def candidate_order(ctx: Ctx, vm: str) -> list[str]:
    """Hosts in the order the simulator tries them: the VM's affinity host, the master, then the
    others (xapi picks at random among the fitting hosts, biased by ``coordinator_bias``)."""
    db = ctx.db
    hosts = ctx.pool.hosts()
    affinity = db.get("VM", vm)["affinity"]
    first = [h for h in (affinity, ctx.pool.master_ref) if h in hosts]
    return list(dict.fromkeys(first + hosts))


def possible_hosts(ctx: Ctx, vm: str) -> list[str]:
    out = []
    for host in candidate_order(ctx, vm):
        try:
            assert_can_boot_here(ctx.db, vm, host)
        except XapiError:
            continue
        out.append(host)
    return out


def choose_host(ctx: Ctx, vm: str) -> str:
    """The host ``VM.start`` runs ``vm`` on (``choose_host_for_vm_no_wlb``)."""
    hosts = possible_hosts(ctx, vm)
    if hosts:
        return hosts[0]
    # "No hosts guaranteed to satisfy VM constraints. Trying again ignoring memory checks"
    for host in candidate_order(ctx, vm):
        try:
            assert_can_boot_here(ctx.db, vm, host, memory=False)
        except XapiError:
            continue
        assert_can_boot_here(ctx.db, vm, host)  # reserve_memory_for_vm: HOST_NOT_ENOUGH_FREE_MEMORY
        return host
    raise XapiError("NO_HOSTS_AVAILABLE")


@handler("VM.assert_can_boot_here")
def vm_assert_can_boot_here(ctx: Ctx, vm: str, host: str) -> None:
    require(ctx, "VM", vm)
    require(ctx, "host", host)
    assert_can_boot_here(ctx.db, vm, host)


@handler("VM.get_possible_hosts")
def vm_get_possible_hosts(ctx: Ctx, vm: str) -> list[str]:
    require(ctx, "VM", vm)
    return possible_hosts(ctx, vm)


@handler("host.compute_free_memory")
def host_compute_free_memory(ctx: Ctx, host: str) -> int:
    require(ctx, "host", host)
    return free_memory(ctx.db, host)
