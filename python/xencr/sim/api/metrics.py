"""VM_metrics and VM_guest_metrics rows (``xapi_vm.ml`` create, ``xapi_vm_helpers.ml``
``copy_metrics``/``delete_guest_metrics``/``destroy``, ``xapi_guest_agent.ml``).

Every VM has a VM_metrics row from creation; ``VM.start`` deletes stale guest metrics
(:func:`on_start`); when the guest has booted (:mod:`xencr.sim.boot` decides when, or never) its
agent reports fresh ones (tools detected, an IP per VIF) and its scripts run (:func:`guest_up`),
unless the VM's ``other_config["sim_guest_tools"]`` is ``"false"`` (a guest without tools: it
boots, but reports nothing and runs no script).
"""

from __future__ import annotations

from xencr.sim.db import Database
from xencr.sim.values import NULL_REF, now

GUEST_TOOLS_KEY = "sim_guest_tools"
HEALTH_CHECK_RESULT_KEY = "sim_health_check"  # "success" (default) or "failure"


def run_guest_scripts(db: Database, vm: str) -> None:
    """A booted guest's health-check script (Xen Orchestra's protocol, ``docs/healthcheck/example.sh``):
    a ``vm-data/...health-check`` key set to ``planned`` is answered ``success`` or ``failure``
    (with ``<key>-error``). xenopsd reflects the guest's ``vm-data`` writes into
    ``VM.xenstore_data`` (``xapi_xenops.ml``), which is where clients read the answer."""
    row = db.get("VM", vm)
    data = dict(row["xenstore_data"])
    outcome = row["other_config"].get(HEALTH_CHECK_RESULT_KEY, "success")
    changed = False
    for key, value in list(data.items()):
        if key.startswith("vm-data/") and key.endswith("health-check") and value == "planned":
            data[key] = "failure" if outcome == "failure" else "success"
            if outcome == "failure":
                data[f"{key}-error"] = "simulated health-check failure"
            changed = True
    if changed:
        db.update("VM", vm, xenstore_data=data)


def create_vm_metrics(db: Database, vm: str) -> str:
    row = db.get("VM", vm)
    metrics = db.create(
        "VM_metrics",
        {
            "memory_actual": int(row["memory_target"]) or int(row["memory_static_max"]),
            "VCPUs_number": int(row["VCPUs_at_startup"]),
            "install_time": now(),
            "last_updated": now(),
            "hvm": row["domain_type"] == "hvm" or bool(row["HVM_boot_policy"]),
            "current_domain_type": row["domain_type"] or "unspecified",
        },
    )
    db.update("VM", vm, metrics=metrics)
    return metrics


def destroy_vm_metrics(db: Database, vm: str) -> None:
    row = db.get("VM", vm)
    for cls, field in (("VM_metrics", "metrics"), ("VM_guest_metrics", "guest_metrics")):
        if row[field] != NULL_REF and db.exists(cls, row[field]):
            db.delete(cls, row[field])


def delete_guest_metrics(db: Database, vm: str) -> None:
    gm = db.get("VM", vm)["guest_metrics"]
    db.update("VM", vm, guest_metrics=NULL_REF)
    if gm != NULL_REF and db.exists("VM_guest_metrics", gm):
        db.delete("VM_guest_metrics", gm)


GUEST_UP = "_guest_up"  # hidden VM field: the current domain's guest has booted


def guest_is_up(db: Database, vm: str) -> bool:
    row = db.get("VM", vm)
    # rows saved before the field existed: a guest that reported metrics had booted
    return bool(row.get(GUEST_UP, row["guest_metrics"] != NULL_REF))


def has_pv_drivers(db: Database, vm: str) -> bool:
    """The guest's PV drivers are up (what xenopsd sees as HVM_PARAM_CALLBACK_IRQ set)."""
    gm = db.get("VM", vm)["guest_metrics"]
    return bool(
        gm != NULL_REF
        and db.exists("VM_guest_metrics", gm)
        and db.get("VM_guest_metrics", gm)["PV_drivers_detected"]
    )


def on_start(db: Database, vm: str) -> None:
    """Metrics of a domain that just started: its guest has not booted yet."""
    row = db.get("VM", vm)
    if row["metrics"] == NULL_REF or not db.exists("VM_metrics", row["metrics"]):
        create_vm_metrics(db, vm)
        row = db.get("VM", vm)
    db.update(
        "VM_metrics",
        row["metrics"],
        start_time=now(),
        last_updated=now(),
        VCPUs_number=int(row["VCPUs_at_startup"]),
        state=[],
    )
    delete_guest_metrics(db, vm)
    db.update("VM", vm, **{GUEST_UP: False})


def guest_up(db: Database, vm: str, pool_index: int) -> None:
    """The guest has booted: its agent's first report, then its scripts."""
    db.update("VM", vm, **{GUEST_UP: True})
    row = db.get("VM", vm)
    if row["other_config"].get(GUEST_TOOLS_KEY, "true") == "false":
        return
    networks: dict[str, str] = {}
    for i, vif in enumerate(sorted(db.reverse("VM", "VIFs", vm), key=lambda v: db.get("VIF", v)["device"])):
        device = db.get("VIF", vif)["device"]
        ip = f"10.{pool_index}.{int(row['domid']) % 250}.{10 + i}"
        networks[f"{device}/ip"] = ip
        networks[f"{device}/ipv4/0"] = ip
    gm = db.create(
        "VM_guest_metrics",
        {
            "os_version": {"name": "Simulated guest", "distro": "xencr-sim", "major": "1", "minor": "0"},
            "PV_drivers_version": {"major": "9", "minor": "4", "micro": "0", "build": "0"},
            "PV_drivers_up_to_date": True,
            "PV_drivers_detected": True,
            "networks": networks,
            "other": {"feature-shutdown": "1", "feature-suspend": "1", "has-vendor-device": "0"},
            "last_updated": now(),
            "live": True,
            "can_use_hotplug_vbd": "yes",
            "can_use_hotplug_vif": "yes",
        },
    )
    db.update("VM", vm, guest_metrics=gm)
    run_guest_scripts(db, vm)
