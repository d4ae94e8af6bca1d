"""A schedule's bandwidth limit at a given moment: its rate windows, else its rate."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from xencr.config import RateWindow, ScheduleConfig, parse_rate_window


@lru_cache(maxsize=256)
def _window(text: str) -> RateWindow:
    return parse_rate_window(text)


def rate_at(s: ScheduleConfig, t: datetime) -> int | None:
    """Bytes per second at ``t`` (aware), None for unlimited. Windows are read in the schedule's
    time zone and the first matching one wins; a window ending before it starts runs past
    midnight and belongs to the day it starts (``Fri 22:00-06:00`` includes Saturday 05:00)."""
    local = t.astimezone(ZoneInfo(s.timezone))
    minute = local.hour * 60 + local.minute
    today = local.weekday()
    yesterday = (local - timedelta(days=1)).weekday()
    for text in s.rate_windows:
        w = _window(text)
        if w.start < w.end:
            hit = today in w.days and w.start <= minute < w.end
        else:
            hit = (today in w.days and minute >= w.start) or (yesterday in w.days and minute < w.end)
        if hit:
            return w.rate
    return s.rate
