"""How quantities read in text output: sizes in binary units with one decimal (``4.0 GiB``),
rates, durations left, and a disk's transfer with its reason. Text only: ``--json`` output
carries exact bytes and seconds, never these strings. Every layer may import this module."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """``512`` -> ``"512 B"``, ``4294967296`` -> ``"4.0 GiB"``; negative sizes keep their sign."""
    size = float(n)
    for unit in _UNITS:
        if abs(size) < 1024 or unit == _UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_rate(nbytes: float, seconds: float) -> str:
    """``"12.5 MiB/s"``; ``"-"`` when no time has passed."""
    return f"{human_bytes(nbytes / seconds)}/s" if seconds > 0 else "-"


def human_eta(seconds: float | None) -> str:
    """Time left as ``m:ss`` (``h:mm:ss`` past an hour); ``"-"`` when unknown."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def transfer_text(kind: str, reason: str) -> str:
    """A disk's transfer and why: ``"full (first run)"``, but ``"delta"`` alone when the reason
    only repeats the kind."""
    return kind if not reason or reason == kind else f"{kind} ({reason})"
