"""task.* (``ocaml/xapi/xapi_task.ml``, ``taskHelper.ml``; xapi.md 1.10)."""

from __future__ import annotations

from xencr.sim.db import new_ref
from xencr.sim.dispatch import Ctx, handler, require


@handler("task.create")
def create(ctx: Ctx, label: str, description: str) -> str:
    return ctx.pool.tasks.create(ctx.session, label, description)


@handler("task.cancel")
def cancel(ctx: Ctx, task: str) -> None:
    # xapi_task.ml: records {<caller's task>: cancel} whatever the status; the operation polls for it.
    require(ctx, "task", task)
    ctx.db.update("task", task, current_operations={new_ref(): "cancel"})


@handler("task.destroy")
def destroy(ctx: Ctx, task: str) -> None:
    # A completed task is deleted; a pending one only gets {"task": destroy} and goes when it ends.
    row = require(ctx, "task", task)
    if row["status"] in ("pending", "cancelling"):
        ops = dict(row["current_operations"])
        ops["task"] = "destroy"
        ctx.db.update("task", task, current_operations=ops, _destroy_when_done=True)
        return
    ctx.db.delete("task", task)


@handler("task.set_status")
def set_status(ctx: Ctx, task: str, value: str) -> None:
    require(ctx, "task", task)
    ctx.db.update("task", task, status=value)


@handler("task.set_progress")
def set_progress(ctx: Ctx, task: str, value: float) -> None:
    require(ctx, "task", task)
    ctx.db.update("task", task, progress=value)
