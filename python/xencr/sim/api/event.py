"""event.from / inject / get_current_id (``ocaml/xapi/xapi_event.ml``; xapi.md 1.11)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from xencr.sim import schema
from xencr.sim.dispatch import Ctx, handler
from xencr.sim.errors import XapiError, handle_invalid
from xencr.sim.values import I4


def _token(generation: int) -> str:
    return f"{generation:020d},{0:020d}"


def _parse_token(token: str) -> int:
    if token == "":
        return -1
    head = token.split(",", 1)[0]
    try:
        return int(head)
    except ValueError:
        raise XapiError("EVENT_FROM_TOKEN_PARSE_FAILURE", token) from None


def _subscription(classes: list[str]) -> Callable[[str, str], bool]:
    all_classes = False
    wanted_classes: set[str] = set()
    wanted_objects: set[tuple[str, str]] = set()
    lower = schema.class_by_lower()
    for sub in classes:
        if sub == "*":
            all_classes = True
            continue
        name, slash, ref = sub.partition("/")
        cls = lower.get(name.lower())
        if cls is None:
            raise XapiError("EVENT_SUBSCRIPTION_PARSE_FAILURE", sub)
        if slash:
            wanted_objects.add((cls, ref))
        else:
            wanted_classes.add(cls)

    def wanted(cls: str, ref: str) -> bool:
        return all_classes or cls in wanted_classes or (cls, ref) in wanted_objects

    return wanted


@handler("event.from", locked=False)
def event_from(ctx: Ctx, classes: list[str], token: str, timeout: float) -> dict[str, Any]:
    wanted = _subscription(classes)
    since = _parse_token(token)
    db = ctx.pool.db
    deadline = time.monotonic() + max(0.0, timeout)
    with db.lock:
        while True:
            events = db.changes_since(since, wanted)
            remaining = deadline - time.monotonic()
            # Empty batches are suppressed until the timeout (xapi_event.ml).
            if events or remaining <= 0:
                break
            db.changed.wait(remaining)
        counts = {c.lower(): I4(len(db.tables[c])) for c in schema.class_names()}
        return {"events": events, "valid_ref_counts": counts, "token": _token(db.generation)}


@handler("event.get_current_id")
def get_current_id(ctx: Ctx) -> int:
    return int(ctx.db.generation)


@handler("event.inject")
def inject(ctx: Ctx, cls: str, ref: str) -> str:
    name = schema.class_by_lower().get(cls.lower())
    if name is None or not ctx.db.exists(name, ref):
        raise handle_invalid(cls, ref)
    before = ctx.db.generation
    ctx.db.touch(name, ref)
    return _token(before)
