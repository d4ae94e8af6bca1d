"""VM_appliance.* (``ocaml/xapi/xapi_vm_appliance.ml``; xapi.md 2.7, 5.4).

``start`` groups the appliance's VMs by ``order`` ascending, starts each group's VMs in parallel
(``VM.start`` sleeps ``start_delay`` itself) and waits for the whole group before the next one;
shutdowns go by descending order. Failures → ``OPERATION_PARTIALLY_FAILED [op, vm refs...]``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from itertools import groupby
from typing import Any

from xencr.sim.api import vm as vm_api
from xencr.sim.api.ctor import ctor_fields
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError
from xencr.sim.values import NULL_REF


@handler("VM_appliance.create")
def create(ctx: Ctx, record: dict[str, Any]) -> str:
    return ctx.db.create("VM_appliance", ctor_fields("VM_appliance", record))


@handler("VM_appliance.destroy")
def destroy(ctx: Ctx, app: str) -> None:
    require(ctx, "VM_appliance", app)
    for vm in ctx.db.reverse("VM_appliance", "VMs", app):
        ctx.db.update("VM", vm, appliance=NULL_REF)
    ctx.db.delete("VM_appliance", app)


def _run_groups(
    ctx: Ctx, app: str, op: str, descending: bool, skip_state: str | None, action: Callable[[Ctx, str], None]
) -> None:
    with ctx.db.lock:
        require(ctx, "VM_appliance", app)
        vms = [
            v
            for v in ctx.db.reverse("VM_appliance", "VMs", app)
            if skip_state is None or ctx.db.get("VM", v)["power_state"] != skip_state
        ]
        orders = {v: int(ctx.db.get("VM", v)["order"]) for v in vms}
    vms.sort(key=lambda v: orders[v], reverse=descending)
    failed: list[str] = []
    for _, group in groupby(vms, key=lambda v: orders[v]):
        threads = []
        for vm in group:

            def run(vm: str = vm) -> None:
                try:
                    action(Ctx(ctx.pool, ctx.session, f"VM.{op}"), vm)
                except XapiError:
                    failed.append(vm)

            t = threading.Thread(target=run, daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
    if failed:
        raise XapiError("OPERATION_PARTIALLY_FAILED", f"VM_appliance.{op}", *failed)


@handler("VM_appliance.start", locked=False)
def start(ctx: Ctx, app: str, paused: bool) -> None:
    _run_groups(
        ctx,
        app,
        "start",
        False,
        "Paused" if paused else "Running",
        lambda c, vm: vm_api.start(c, vm, paused, False),
    )


@handler("VM_appliance.clean_shutdown", locked=False)
def clean_shutdown(ctx: Ctx, app: str) -> None:
    _run_groups(ctx, app, "clean_shutdown", True, "Halted", vm_api.clean_shutdown)


@handler("VM_appliance.hard_shutdown", locked=False)
def hard_shutdown(ctx: Ctx, app: str) -> None:
    _run_groups(ctx, app, "hard_shutdown", True, "Halted", vm_api.hard_shutdown)


@handler("VM_appliance.shutdown", locked=False)
def shutdown(ctx: Ctx, app: str) -> None:
    _run_groups(ctx, app, "shutdown", True, "Halted", vm_api.shutdown)
