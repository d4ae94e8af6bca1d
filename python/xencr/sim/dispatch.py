"""RPC dispatch with XAPI's rules (``gen_server.ml``, ``server_helpers.ml``; xapi.md 1.4, 1.10).

Order of checks for a call: method known → arity (defaults may be omitted from the tail) →
unmarshalling (``INTERNAL_ERROR``) → session → then, inside the task for ``Async.`` calls, the
injected fault and the operation itself. Handlers register with :func:`handler`; implicit messages
(getters, setters, map/set helpers, records) are served generically from the schema.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xencr.sim import schema, where, wire_xmlrpc
from xencr.sim.errors import XapiError, handle_invalid
from xencr.sim.values import EPOCH, NULL_REF, now

if TYPE_CHECKING:
    from xencr.sim.db import Database
    from xencr.sim.pool_state import PoolState

HandlerFn = Callable[..., Any]


@dataclass
class Handler:
    fn: HandlerFn
    locked: bool  # run under the pool's database lock (short calls); long calls lock by themselves


HANDLERS: dict[str, Handler] = {}

# Custom messages without an async mode: datamodel calls whose ``~flags`` lack `Async
# (ocaml/idl/datamodel.ml, datamodel_vm.ml); every session.* and event.* call is flagged so.
NO_ASYNC_CLASSES = frozenset({"session", "event"})
NO_ASYNC_MESSAGES = frozenset(
    [
        f"task.{m}"
        for m in (
            "create",
            "destroy",
            "set_status",
            "set_progress",
            "set_result",
            "set_error_info",
            "set_resident_on",
        )
    ]
    + [
        f"VDI.{m}"
        for m in (
            "set_read_only",
            "set_sharable",
            "set_managed",
            "set_virtual_size",
            "set_physical_utilisation",
            "set_is_a_snapshot",
            "set_snapshot_of",
            "set_snapshot_time",
            "set_metadata_of_pool",
            "set_missing",
            "get_nbd_info",
        )
    ]
    + [
        f"SR.{m}"
        for m in (
            "set_virtual_allocation",
            "set_physical_size",
            "set_physical_utilisation",
            "get_supported_types",
            "get_data_sources",
        )
    ]
    + [
        f"VM.{m}"
        for m in (
            "add_to_NVRAM",
            "add_to_other_config",
            "add_to_platform",
            "get_allowed_VBD_devices",
            "get_allowed_VIF_devices",
            "get_boot_record",
            "get_data_sources",
            "remove_from_NVRAM",
            "remove_from_other_config",
            "remove_from_platform",
            "set_HVM_boot_policy",
            "set_HVM_shadow_multiplier",
            "set_NVRAM",
            "set_NVRAM_EFI_variables",
            "set_VCPUs_at_startup",
            "set_VCPUs_max",
            "set_domain_type",
            "set_ha_always_run",
            "set_ha_restart_priority",
            "set_memory_dynamic_max",
            "set_memory_dynamic_min",
            "set_memory_static_max",
            "set_memory_static_min",
            "set_other_config",
            "set_platform",
        )
    ]
)
LOGIN_MESSAGES = frozenset({"session.login_with_password", "session.slave_local_login_with_password"})


def handler(name: str, *, locked: bool = True) -> Callable[[HandlerFn], HandlerFn]:
    def register(fn: HandlerFn) -> HandlerFn:
        HANDLERS[name] = Handler(fn, locked)
        return fn

    return register


@dataclass
class Ctx:
    """What a handler knows about its call."""

    pool: PoolState
    session: str | None
    method: str
    task: str | None = None
    foreign: Database | None = None  # a DR session reads a foreign pool's database
    host: str | None = None  # the host that received the call (None: the master)

    @property
    def db(self) -> Database:
        return self.foreign if self.foreign is not None else self.pool.db

    def progress(self, fraction: float) -> None:
        if self.task is not None:
            with self.pool.db.lock:
                if self.pool.db.exists("task", self.task):
                    self.pool.db.update("task", self.task, progress=max(0.0, min(1.0, fraction)))

    def cancelled(self) -> bool:
        if self.task is None:
            return False
        with self.pool.db.lock:
            if not self.pool.db.exists("task", self.task):
                return False
            return "cancel" in self.pool.db.get("task", self.task)["current_operations"].values()

    def check_cancelled(self) -> None:
        """Operations that poll for cancellation fail with ``TASK_CANCELLED [task]``."""
        if self.cancelled():
            raise XapiError("TASK_CANCELLED", self.task)


def resolve(method: str) -> tuple[str, str, bool] | None:
    """(class, message, is_async) for a wire name, accepting ``Class_msg`` for sync calls."""
    is_async = method.startswith("Async.")
    name = method[len("Async.") :] if is_async else method
    cls_name, dot, msg = name.partition(".")
    if dot:
        if cls_name in schema.class_names() and (
            msg in schema.cls(cls_name).messages or msg == "get_all_records_where"
        ):
            return cls_name, msg, is_async
        return None
    if is_async:
        return None
    for c in sorted(schema.class_names(), key=len, reverse=True):
        if name.startswith(c + "_") and name[len(c) + 1 :] in schema.cls(c).messages:
            return c, name[len(c) + 1 :], False
    return None


# Hidden from xenapi.json but generated for every class (xapi.md 1.8).
GET_ALL_RECORDS_WHERE = schema.Message("get_all_records_where", [("string", "expr")], "records", True)


def has_async(cls_name: str, msg: schema.Message) -> bool:
    if msg.implicit and msg.name not in ("create", "destroy"):
        return False
    return cls_name not in NO_ASYNC_CLASSES and f"{cls_name}.{msg.name}" not in NO_ASYNC_MESSAGES


def dispatch(pool: PoolState, method: str, params: list[Any], host: str | None = None) -> Any:
    """Run one call received by ``host`` (None: the master); returns the value or raises
    :class:`XapiError`. A member answers ``HOST_IS_SLAVE`` once the session is checked."""
    resolved = resolve(method)
    if resolved is None:
        if params and isinstance(params[0], str):
            pool.check_session(params[0], host)
        raise XapiError("MESSAGE_METHOD_UNKNOWN", method.removeprefix("Async."))
    cls_name, msg_name, is_async = resolved
    msg = schema.cls(cls_name).messages.get(msg_name) or GET_ALL_RECORDS_WHERE
    full = f"{cls_name}.{msg_name}"
    has_session = full not in LOGIN_MESSAGES
    args = params[1:] if has_session else list(params)
    defaults = schema.PARAM_DEFAULTS.get(full, {})
    required = [p for p in msg.params if p[1] not in defaults]
    if len(args) < len(required) or (not defaults and len(args) != len(msg.params)):
        raise XapiError(
            "MESSAGE_PARAMETER_COUNT_MISMATCH", full, len(required), len(params) - (1 if has_session else 0)
        )
    values: list[Any] = []
    for i, (type_, pname) in enumerate(msg.params):
        values.append(schema.unmarshal(type_, args[i]) if i < len(args) else defaults[pname])
    session = None
    if has_session:
        session = schema.unmarshal("session ref", params[0])
        pool.check_session(session, host)
    if is_async and not has_async(cls_name, msg):
        # server_helpers.ml do_dispatch: API.response_of_fault, named without the Async. prefix
        raise XapiError("Fault", f"No async mode for this operation (rpc: {full})")
    ctx = Ctx(pool, session, full, foreign=pool.foreign_dbs.get(session or ""), host=host)
    if is_async:
        return pool.tasks.run_async(ctx, method, lambda: _execute(ctx, cls_name, msg, values))
    return _execute(ctx, cls_name, msg, values)


def _execute(ctx: Ctx, cls_name: str, msg: schema.Message, values: list[Any]) -> Any:
    pool = ctx.pool
    full = f"{cls_name}.{msg.name}"
    pool.faults.raise_call_fault(full)
    h = HANDLERS.get(full)
    if h is None:
        # Custom setters of constructor fields (VDI.set_name_label...) behave like implicit ones.
        field_helper = msg.name.startswith(("set_", "add_to_", "remove_from_", "add_", "remove_"))
        if not msg.implicit and not field_helper:
            raise XapiError("NOT_IMPLEMENTED", full)
        with pool.db.lock:
            return implicit(ctx, cls_name, msg, values)
    if h.locked:
        with pool.db.lock:
            return h.fn(ctx, *values)
    return h.fn(ctx, *values)


# ------------------------------------------------------------------------------------------------
# Implicit messages (xapi.md 1.8; ``db_cache_impl.ml`` for map semantics, 3.7)


def _field_of(cls_name: str, prefix: str, msg: str) -> schema.Field:
    name = msg[len(prefix) :]
    fields = schema.cls(cls_name).fields
    if name not in fields:
        raise XapiError("NOT_IMPLEMENTED", f"{cls_name}.{msg}")
    return fields[name]


def implicit(ctx: Ctx, cls_name: str, msg: schema.Message, values: list[Any]) -> Any:
    db = ctx.db
    name = msg.name
    if name == "get_all":
        return db.refs(cls_name)
    if name == "get_all_records":
        return {r: db.record(cls_name, r) for r in db.refs(cls_name)}
    if name == "get_all_records_where":
        predicate = where.parse(values[0])
        return {r: db.record(cls_name, r) for r in db.refs(cls_name) if predicate(db.get(cls_name, r))}
    if name == "get_by_uuid":
        ref = db.by_uuid(cls_name, values[0])
        return ref
    if name == "get_by_name_label":
        return db.find(cls_name, name_label=values[0])
    ref = values[0]
    if name == "get_record":
        return db.record(cls_name, ref)
    if name.startswith("get_"):
        f = _field_of(cls_name, "get_", name)
        return db.record(cls_name, ref)[f.name]
    record = db.get(cls_name, ref)
    if name.startswith("set_"):
        f = _field_of(cls_name, "set_", name)
        db.update(cls_name, ref, **{f.name: values[1]})
        return None
    if name.startswith("add_to_"):
        f = _field_of(cls_name, "add_to_", name)
        key, val = values[1], values[2]
        current = dict(record[f.name])
        if key in current:
            raise XapiError("MAP_DUPLICATE_KEY", cls_name, f.name, ref, key)
        current[key] = val
        db.update(cls_name, ref, **{f.name: current})
        return None
    if name.startswith("remove_from_"):
        f = _field_of(cls_name, "remove_from_", name)
        current = dict(record[f.name])
        current.pop(values[1], None)
        db.update(cls_name, ref, **{f.name: current})
        return None
    if name.startswith("add_"):
        f = _field_of(cls_name, "add_", name)
        items = list(record[f.name])
        if values[1] not in items:
            db.update(cls_name, ref, **{f.name: [*items, values[1]]})
        return None
    if name.startswith("remove_"):
        f = _field_of(cls_name, "remove_", name)
        db.update(cls_name, ref, **{f.name: [x for x in record[f.name] if x != values[1]]})
        return None
    raise XapiError("NOT_IMPLEMENTED", f"{cls_name}.{name}")


# ------------------------------------------------------------------------------------------------
# Tasks (``taskHelper.ml``, ``xapi_task.ml``; xapi.md 1.10)


class TaskRunner:
    """Creates task rows and runs ``Async.`` calls in threads."""

    def __init__(self, pool: PoolState) -> None:
        self.pool = pool

    def create(self, session: str | None, label: str, description: str = "", host: str | None = None) -> str:
        return self.pool.db.create(
            "task",
            {
                "name_label": label,
                "name_description": description,
                "created": now(),
                "finished": EPOCH,
                "status": "pending",
                "progress": 0.0,
                "type": "<none/>",
                "resident_on": host or self.pool.host_ref,
                "allowed_operations": ["cancel"],
                "_session": session or NULL_REF,
            },
        )

    def complete(self, task: str, result: str) -> None:
        with self.pool.db.lock:
            if not self.pool.db.exists("task", task):
                return
            self.pool.db.update(
                "task",
                task,
                status="success",
                progress=1.0,
                result=result,
                finished=now(),
                allowed_operations=["destroy"],
                current_operations={},
            )
            self._maybe_destroy(task)

    def fail(self, task: str, err: XapiError) -> None:
        with self.pool.db.lock:
            if not self.pool.db.exists("task", task):
                return
            status = "cancelled" if err.code == "TASK_CANCELLED" else "failure"
            self.pool.db.update(
                "task",
                task,
                status=status,
                error_info=err.description,
                finished=now(),
                progress=1.0,
                allowed_operations=["destroy"],
                current_operations={},
            )
            self._maybe_destroy(task)

    def _maybe_destroy(self, task: str) -> None:
        # task.destroy on a pending task only marks it; the row goes once the task completes.
        if self.pool.db.get("task", task).get("_destroy_when_done"):
            self.pool.db.delete("task", task)

    def run_async(self, ctx: Ctx, method: str, body: Callable[[], Any]) -> str:
        task = self.create(ctx.session, method)
        ctx.task = task

        def run() -> None:
            try:
                result = body()
            except XapiError as err:
                self.fail(task, err)
            except Exception as err:
                self.pool.log.exception("task %s crashed", method)
                self.fail(task, XapiError("INTERNAL_ERROR", str(err)))
            else:
                self.complete(task, wire_xmlrpc.value("" if result is None else result))
            self.pool.save()

        threading.Thread(target=run, name=f"task {method}", daemon=True).start()
        return task


def require(ctx: Ctx, cls_name: str, ref: str) -> dict[str, Any]:
    """The row of an object parameter (``HANDLE_INVALID`` when it does not exist, NULL included)."""
    if not ctx.db.exists(cls_name, ref):
        raise handle_invalid(cls_name, ref)
    row: dict[str, Any] = ctx.db.get(cls_name, ref)
    return row
