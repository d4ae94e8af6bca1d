"""JSON-RPC v1 and v2 at ``/jsonrpc`` (ocaml-rpc ``src/lib/jsonrpc.ml``; xapi.md 1.12)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from xencr.sim.errors import XapiError


class MalformedJson(Exception):
    """Missing method or id (a notification): XAPI answers with an HTML 500."""


@dataclass
class JsonCall:
    method: str
    params: list[Any]
    id: int | str
    v2: bool


def parse_call(body: bytes) -> JsonCall:
    try:
        doc = json.loads(body)
    except ValueError as err:
        raise MalformedJson(str(err)) from err
    if not isinstance(doc, dict) or not isinstance(doc.get("method"), str):
        raise MalformedJson("missing method")
    ident = doc.get("id")
    if isinstance(ident, bool) or not isinstance(ident, int | str):
        raise MalformedJson("missing or invalid id")
    v2 = doc.get("jsonrpc") == "2.0"
    params = doc.get("params", [] if v2 else None)
    if not isinstance(params, list):
        raise MalformedJson("params must be an array")
    return JsonCall(doc["method"], params, ident, v2)


def success(call: JsonCall, v: Any) -> bytes:
    result = "" if v is None else v
    doc: dict[str, Any] = (
        {"jsonrpc": "2.0", "result": result, "id": call.id}
        if call.v2
        else {"result": result, "error": None, "id": call.id}
    )
    return json.dumps(doc).encode()


def failure(call: JsonCall, err: XapiError) -> bytes:
    doc: dict[str, Any] = (
        {"jsonrpc": "2.0", "error": {"code": 1, "message": err.code, "data": err.params}, "id": call.id}
        if call.v2
        else {"result": None, "error": err.description, "id": call.id}
    )
    return json.dumps(doc).encode()
