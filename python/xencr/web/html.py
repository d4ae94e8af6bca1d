"""What every page and report written here shares: escaping, times in words, and the
self-contained document (its stylesheet inline) of a report."""

from __future__ import annotations

from datetime import datetime
from html import escape
from importlib import resources

from xencr import __version__
from xencr.config import format_duration


def e(value: object) -> str:
    """Text for HTML (element content or a quoted attribute): VM names and error lines come
    from the pools."""
    return escape(str(value), quote=True)


def when(t: datetime | None, now: datetime) -> str:
    """``2026-11-20 12:00Z (4m ago)`` in a ``<time>`` element."""
    if t is None:
        return "-"
    delta = int((t - now).total_seconds())
    rel = f"in {format_duration(delta)}" if delta >= 0 else f"{format_duration(-delta)} ago"
    return f'<time datetime="{e(t.isoformat())}">{t.strftime("%Y-%m-%d %H:%M")}Z</time> ({rel})'


def stylesheet() -> str:
    """The page's stylesheet, shipped in the package."""
    return resources.files("xencr.web").joinpath("static", "status.css").read_text(encoding="utf-8")


def document(title: str, body: str, since: datetime, now: datetime) -> str:
    """A self-contained report: the stylesheet inline, no script, nothing fetched when opened,
    everything shown at once (a kept or printed report has nothing to click)."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)}</title><style>{stylesheet()}"
        "@page { size: A4 landscape; margin: 12mm; }"
        "</style></head><body>"
        f"<header><h1>{e(title)}</h1><p>Period: {when(since, now)} to "
        f'<time datetime="{e(now.isoformat())}">{now.strftime("%Y-%m-%d %H:%M:%S")}Z</time> '
        f"({format_duration(int((now - since).total_seconds()))}). Made by xencr {e(__version__)} from its "
        "recorded history.</p></header><main>"
        + body.replace("<details ", "<details open ").replace("<details>", "<details open>")
        + "</main></body></html>"
    )
