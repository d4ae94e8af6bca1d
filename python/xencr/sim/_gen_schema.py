"""Regenerate ``schema.json`` from xen-api's ``doc/data/xenapi.json``.

Run by hand (``python -m xencr.sim._gen_schema PATH/xenapi.json``) when the source is updated. The
checked-in ``schema.json`` was generated from xapi-project/xen-api commit e2ee48d688 (2026-08-21).
Only the classes the simulator serves are kept; per field: type, qualifier and datamodel default;
per message: parameter types/names (session excluded), result type, and whether it is implicit.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

CLASSES = [
    "session",
    "pool",
    "host",
    "SR",
    "PBD",
    "VDI",
    "VBD",
    "VIF",
    "network",
    "VM",
    "VM_appliance",
    "task",
    "event",
    "message",
    "VM_metrics",
    "VBD_metrics",
    "VIF_metrics",
    "VM_guest_metrics",
    "host_metrics",
    "SM",
    "console",
    "PIF",
    "DR_task",
]


def parse_default(text: str, type_: str) -> Any:
    """Turn a datamodel default as printed in xenapi.json into a Python value."""
    if text in ("Null", "OpaqueRef:NULL"):
        return "OpaqueRef:NULL"
    if type_ == "bool":
        return text == "true"
    if type_ == "int":
        return int(text)
    if type_ == "float":
        return float(text)
    if type_ == "datetime":
        return text
    if type_.endswith(" set"):
        inner = text.strip("{}").strip()
        return [] if not inner else [x.strip() for x in inner.split(";") if x.strip()]
    if type_.endswith(" map"):
        pairs = re.findall(r'"([^"]*)"\s*->\s*"([^"]*)"', text)
        return dict(pairs)
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    return text


def main(source: str) -> None:
    classes = {c["name"]: c for c in json.loads(Path(source).read_text())}
    out: dict[str, Any] = {"classes": {}, "enums": {}}
    for name in CLASSES:
        c = classes[name]
        fields = []
        for f in c["fields"]:
            entry: dict[str, Any] = {"name": f["name"], "type": f["type"], "qualifier": f["qualifier"]}
            if "default" in f:
                entry["default"] = parse_default(f["default"], f["type"])
            fields.append(entry)
        messages = {}
        for m in c["messages"]:
            params = [[p["type"], p["name"]] for p in m["params"]]
            if params and params[0][0] == "session ref":
                params = params[1:]
            messages[m["name"]] = {
                "params": params,
                "result": m["result"][0] if m["result"] else "void",
                "implicit": m["implicit"],
            }
        for e in c["enums"]:
            out["enums"][e["name"]] = [v["name"] for v in e["values"]]
        out["classes"][name] = {"fields": fields, "messages": messages}
    target = Path(__file__).with_name("schema.json")
    target.write_text(json.dumps(out, separators=(",", ":"), sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
