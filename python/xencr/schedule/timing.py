"""When a schedule fires, and how far apart its fires are (the default RPO)."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from xencr.config import JobConfig, ScheduleConfig
from xencr.schedule.cron import Cron

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A fixed stretch of calendar, so a cron schedule's interval does not depend on today's date:
# eight years from a leap year hold every weekday/leap-day pattern that recurs in practice.
_REF_START = date(2024, 1, 1)
_REF_DAYS = (date(2032, 1, 1) - _REF_START).days


@lru_cache(maxsize=512)
def parse_cron(expr: str) -> Cron:
    return Cron.parse(expr)


def next_fire(s: ScheduleConfig, after: datetime) -> datetime:
    """The schedule's first fire strictly after ``after`` (aware), as aware UTC.

    Cron in ``s.timezone``; ``every`` at multiples of the interval since the Unix epoch (UTC), so
    ``every = "15m"`` fires at :00, :15, :30, :45 whatever the start time of the daemon.
    """
    if after.tzinfo is None:
        raise ValueError("after must be an aware datetime")
    if s.cron is not None:
        return parse_cron(s.cron).next_after(after, ZoneInfo(s.timezone))
    assert s.every is not None
    step = timedelta(seconds=s.every)
    return EPOCH + ((after - EPOCH) // step + 1) * step


def nominal_interval(s: ScheduleConfig) -> int:
    """Seconds: ``every``, or for cron the longest gap between consecutive fires, time changes
    of ``s.timezone`` included (a daily job gets 25 hours across the autumn change)."""
    if s.every is not None:
        return s.every
    assert s.cron is not None
    return _cron_interval(s.cron, s.timezone)


def rpo_of(job: JobConfig) -> int | None:
    """Seconds: the job's ``rpo``, else the smallest of its schedules' (``rpo`` or interval);
    None for a job without schedules."""
    if job.rpo is not None:
        return job.rpo
    values = [s.rpo if s.rpo is not None else nominal_interval(s) for s in job.schedules]
    return min(values, default=None)


@lru_cache(maxsize=512)
def _cron_interval(expr: str, tz_name: str) -> int:
    cron = parse_cron(expr)
    # Wall clock: the hours and minutes are the same on every matching day.
    minutes = sorted(h * 60 + m for h in cron.hours for m in cron.minutes)
    gap = max((b - a for a, b in itertools.pairwise(minutes)), default=0)
    days = [i for i in range(_REF_DAYS) if cron.day_matches(_REF_START + timedelta(days=i))]
    day_gap = max((b - a for a, b in itertools.pairwise(days)), default=_REF_DAYS)
    gap = max(gap, day_gap * 1440 - (minutes[-1] - minutes[0])) * 60
    # Real time: only a gap across a change of offset can differ; walk the fires around each.
    tz = ZoneInfo(tz_name)
    longest = gap
    margin = timedelta(seconds=gap) + timedelta(hours=3)
    for change in _offset_changes(tz, datetime(2025, 1, 1, tzinfo=UTC), 366):
        prev = cron.next_after(change - margin, tz)
        while prev < change + margin:
            nxt = cron.next_after(prev, tz)
            longest = max(longest, int((nxt - prev).total_seconds()))
            prev = nxt
    return longest


def _offset_changes(tz: ZoneInfo, start: datetime, days: int) -> list[datetime]:
    """Instants (to the hour; enough as a starting point) where ``tz``'s offset changes."""
    out = []
    t = start
    off = t.astimezone(tz).utcoffset()
    for _ in range(days):
        nxt = t + timedelta(days=1)
        if nxt.astimezone(tz).utcoffset() != off:
            h = t
            while h.astimezone(tz).utcoffset() == off:
                h += timedelta(hours=1)
            out.append(h)
            off = nxt.astimezone(tz).utcoffset()
        t = nxt
    return out
