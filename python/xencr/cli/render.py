"""Plain-text rendering of the engine's reports: one ``key  value`` line per field."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any


def _scalar(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list | tuple):
        return ", ".join(_scalar(x) for x in v) if v else "-"
    return str(v)


def flatten(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """Yield (dotted key, text) for every leaf of a nested report."""
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(x, Mapping) for x in value):
            for i, item in enumerate(value):
                yield f"{name}[{i}]", " ".join(f"{k}={_scalar(v)}" for k, v in item.items())
        else:
            yield name, _scalar(value)


def table(rows: Iterable[tuple[str, str]]) -> str:
    rows = list(rows)
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# The order a person reads an image in; any other key follows, so no field is ever hidden.
_FIRST = ("path", "disk_type", "virtual_size", "file_size", "chain", "parent_uuid")
_THEN = (
    "footer",
    "footer_copy_identical",
    "header",
    "locators",
    "bitmap_bytes_per_block",
    "blocks",
    "batmap",
)


def render_info(info: Mapping[str, Any]) -> str:
    """Every field of :func:`xencr._engine.info`, summary first, warnings last."""
    head = {k: info[k] for k in _FIRST if k in info}
    body = {k: info[k] for k in _THEN if k in info}
    rest = {k: v for k, v in info.items() if k not in head and k not in body and k != "warnings"}
    if isinstance(head.get("chain"), list):
        head["chain"] = " <- ".join(str(p) for p in head["chain"])
    text = table([*flatten(head), *flatten(body), *flatten(rest)])
    warnings = info.get("warnings") or []
    lines = [f"warning: {w}" for w in warnings]
    return "\n".join([text, *lines])


def ranges(indices: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out: list[str] = []
    start = prev = None
    for i in indices:
        if start is None:
            start = prev = i
        elif prev is not None and i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out)
