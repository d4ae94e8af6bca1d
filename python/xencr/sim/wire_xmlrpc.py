"""XML-RPC as XAPI speaks it (ocaml-rpc ``src/lib/xmlrpc.ml``): Status structs, untyped strings.

Requests are parsed with the stdlib (it accepts every scalar tag XAPI accepts, ``<i8>`` and
``<nil/>`` included); responses are written by hand because XAPI's output differs from Python's
marshaller: ints are untyped strings, strings carry no ``<string>`` tag, faults are never used.
"""

from __future__ import annotations

import re
import xmlrpc.client
from typing import Any

from xencr.sim.errors import XapiError
from xencr.sim.values import I4, XDateTime

# ocaml-rpc drops control characters other than TAB, LF and CR.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


class MalformedRequest(Exception):
    """The body is not an XML-RPC methodCall: XAPI answers with an HTML 500."""


def _escape(text: str) -> str:
    text = _CONTROL.sub("", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _normalise(value: Any) -> Any:
    """Turn stdlib-parsed values into plain Python: DateTime → its string, Binary → bytes."""
    if isinstance(value, xmlrpc.client.DateTime):
        return XDateTime(value.value)
    if isinstance(value, xmlrpc.client.Binary):
        return value.data
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    return value


def parse_call(body: bytes) -> tuple[str, list[Any]]:
    try:
        params, method = xmlrpc.client.loads(body, use_builtin_types=False)
    except Exception as err:  # any parse failure is XAPI's HTML 500
        raise MalformedRequest(str(err)) from err
    if method is None:
        raise MalformedRequest("no methodName")
    return method, [_normalise(p) for p in params]


def value(v: Any) -> str:
    """Serialise one value the way XAPI does (xapi.md 1.3)."""
    if v is None:
        return "<value></value>"
    if isinstance(v, bool):
        return f"<value><boolean>{1 if v else 0}</boolean></value>"
    if isinstance(v, I4):
        return f"<value><i4>{int(v)}</i4></value>"
    if isinstance(v, int):
        return f"<value>{v}</value>"
    if isinstance(v, float):
        return f"<value><double>{v:.16g}</double></value>"
    if isinstance(v, XDateTime):
        return f"<value><dateTime.iso8601>{_escape(v)}</dateTime.iso8601></value>"
    if isinstance(v, str):
        return f"<value>{_escape(v)}</value>"
    if isinstance(v, bytes):
        return f"<value>{_escape(v.decode('utf-8', 'replace'))}</value>"
    if isinstance(v, list | tuple):
        return "<value><array><data>" + "".join(value(x) for x in v) + "</data></array></value>"
    if isinstance(v, dict):
        members = "".join(f"<member><name>{_escape(str(k))}</name>{value(x)}</member>" for k, x in v.items())
        return f"<value><struct>{members}</struct></value>"
    raise TypeError(f"cannot serialise {type(v).__name__}")


def _response(struct_members: str) -> bytes:
    return (
        '<?xml version="1.0"?><methodResponse><params><param><value><struct>'
        + struct_members
        + "</struct></value></param></params></methodResponse>"
    ).encode()


def success(v: Any) -> bytes:
    return _response(
        "<member><name>Status</name><value>Success</value></member>"
        f"<member><name>Value</name>{value('' if v is None else v)}</member>"
    )


def failure(err: XapiError) -> bytes:
    return _response(
        "<member><name>Status</name><value>Failure</value></member>"
        f"<member><name>ErrorDescription</name>{value(err.description)}</member>"
    )


def bare(v: Any) -> bytes:
    """A methodResponse without the Status struct (``system.listMethods``)."""
    return (
        '<?xml version="1.0"?><methodResponse><params><param>'
        + value(v)
        + "</param></params></methodResponse>"
    ).encode()
