"""The datamodel subset the simulator serves, read from ``schema.json`` (generated from xen-api's
``doc/data/xenapi.json`` by ``_gen_schema.py``): fields, qualifiers, defaults, messages, enums.
Also the typed unmarshalling of call parameters (``ocaml/idl/ocaml_backend/gen_server.ml``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from xencr.sim.errors import XapiError, internal_error
from xencr.sim.values import EPOCH, NULL_REF, XDateTime


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    qualifier: str  # "RW", "RO/constructor" or "RO/runtime"
    default: Any
    has_default: bool


@dataclass(frozen=True)
class Message:
    name: str
    params: list[tuple[str, str]]  # (type, name), session excluded
    result: str
    implicit: bool


@dataclass(frozen=True)
class ClassSchema:
    name: str
    fields: dict[str, Field]
    messages: dict[str, Message]


# Reverse (set) fields computed from a forward ref field of another class (xapi.md 1.8).
REVERSE_LINKS: dict[tuple[str, str], tuple[str, str]] = {
    ("VM", "VBDs"): ("VBD", "VM"),
    ("VM", "VIFs"): ("VIF", "VM"),
    ("VM", "snapshots"): ("VM", "snapshot_of"),
    ("VM", "children"): ("VM", "parent"),
    ("VDI", "VBDs"): ("VBD", "VDI"),
    ("VDI", "snapshots"): ("VDI", "snapshot_of"),
    ("SR", "VDIs"): ("VDI", "SR"),
    ("SR", "PBDs"): ("PBD", "SR"),
    ("host", "PBDs"): ("PBD", "host"),
    ("host", "resident_VMs"): ("VM", "resident_on"),
    ("network", "VIFs"): ("VIF", "network"),
    ("network", "PIFs"): ("PIF", "network"),
    ("host", "PIFs"): ("PIF", "host"),
    ("VM_appliance", "VMs"): ("VM", "appliance"),
    ("task", "subtasks"): ("task", "subtask_of"),
    ("pool", "metadata_VDIs"): ("VDI", "metadata_of_pool"),
    ("DR_task", "introduced_SRs"): ("SR", "introduced_by"),
    ("session", "tasks"): ("task", "_session"),  # tasks carry a hidden owner field
}

# Datamodel parameter defaults (``param_default`` in ocaml/idl/datamodel*.ml) for the messages served.
PARAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "session.login_with_password": {"version": "1.1", "originator": ""},
    "VM.snapshot": {"ignore_vdis": []},
    "VDI.snapshot": {"driver_params": {}},
    "VDI.clone": {"driver_params": {}},
    "VDI.copy": {"sr": NULL_REF, "base_vdi": NULL_REF, "into_vdi": NULL_REF},
    "SR.scan": {},
}


@cache
def _raw() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(__file__).with_name("schema.json").read_text())
    return data


@cache
def cls(name: str) -> ClassSchema:
    raw = _raw()["classes"][name]
    fields = {
        f["name"]: Field(f["name"], f["type"], f["qualifier"], f.get("default"), "default" in f)
        for f in raw["fields"]
    }
    messages = {
        n: Message(n, [(p[0], p[1]) for p in m["params"]], m["result"], m["implicit"])
        for n, m in raw["messages"].items()
    }
    return ClassSchema(name, fields, messages)


def class_names() -> list[str]:
    return list(_raw()["classes"])


@cache
def class_by_lower() -> dict[str, str]:
    return {n.lower(): n for n in class_names()}


def enum_values(name: str) -> list[str]:
    values: list[str] = _raw()["enums"].get(name, [])
    return values


def neutral(type_: str) -> Any:
    """A type-correct value for a field with no datamodel default."""
    if type_.endswith(" set"):
        return []
    if type_.endswith(" map"):
        return {}
    if type_.endswith(" ref"):
        return NULL_REF
    if type_ == "int":
        return 0
    if type_ == "float":
        return 0.0
    if type_ == "bool":
        return False
    if type_ == "datetime":
        return EPOCH
    if type_.startswith("enum "):
        values = enum_values(type_[5:])
        return values[0] if values else ""
    return ""


def default_record(name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in cls(name).fields.values():
        value = f.default if f.has_default else neutral(f.type)
        out[f.name] = json.loads(json.dumps(value))  # deep copy
    return out


def _fail(type_: str, value: Any) -> XapiError:
    # The offending value is not echoed: it may be a password (session.login_with_password).
    return internal_error(f"Failed to unmarshal a value of type {type(value).__name__} as {type_!r}")


def _split_map(type_: str) -> tuple[str, str]:
    inner = type_[1 : type_.rindex(")")]
    key, _, val = inner.partition(" -> ")
    return key.strip(), val.strip()


def unmarshal(type_: str, value: Any) -> Any:
    """Convert a wire value to the stored Python value, as XAPI's generated server would."""
    if type_ == "int":
        if isinstance(value, bool):
            raise _fail(type_, value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise _fail(type_, value) from None
        raise _fail(type_, value)
    if type_ == "float":
        if isinstance(value, bool):
            raise _fail(type_, value)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _fail(type_, value) from None
        raise _fail(type_, value)
    if type_ == "bool":
        if isinstance(value, bool):
            return value
        raise _fail(type_, value)
    if type_ == "datetime":
        if isinstance(value, str):
            return XDateTime(value)
        raise _fail(type_, value)
    if type_.endswith(" set"):
        if not isinstance(value, list):
            raise _fail(type_, value)
        return [unmarshal(type_[:-4], v) for v in value]
    if type_.endswith(" map"):
        if not isinstance(value, dict):
            raise _fail(type_, value)
        ktype, vtype = _split_map(type_)
        return {str(unmarshal(ktype, k)): unmarshal(vtype, v) for k, v in value.items()}
    if type_.startswith("enum "):
        if not isinstance(value, str) or value not in enum_values(type_[5:]):
            raise _fail(type_, value)
        return value
    if type_.endswith(" record"):
        if not isinstance(value, dict):
            raise _fail(type_, value)
        return value
    # string, refs, uuids
    if not isinstance(value, str):
        raise _fail(type_, value)
    return value


def marshal_field(type_: str, value: Any) -> Any:
    """Stored value → value to emit (only datetimes need a wrapper)."""
    if type_ == "datetime":
        return XDateTime(value)
    return value
