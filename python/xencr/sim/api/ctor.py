"""Generated constructors: ``create(session, record)`` (``gen_server.ml`` ``from_ctor_record``)."""

from __future__ import annotations

from typing import Any

from xencr.sim import schema
from xencr.sim.errors import internal_error


def ctor_fields(cls_name: str, record: dict[str, Any]) -> dict[str, Any]:
    """Constructor fields (RW and RO/constructor) from a client record; a missing field without a
    datamodel default fails with ``INTERNAL_ERROR [Server_helpers.Dispatcher_FieldNotFound("f")]``."""
    out: dict[str, Any] = {}
    for f in schema.cls(cls_name).fields.values():
        if f.qualifier == "RO/runtime":
            continue
        if f.name in record:
            out[f.name] = schema.unmarshal(f.type, record[f.name])
        elif not f.has_default:
            raise internal_error(f'Server_helpers.Dispatcher_FieldNotFound("{f.name}")')
    return out
