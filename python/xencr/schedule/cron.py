"""Cron expressions: what they match, and when they next fire in a time zone.

The grammar and the semantics are Vixie cron's (cronie on Linux):

- 5 fields ``minute hour day-of-month month day-of-week``, or a preset (``@hourly``...);
  each field a list of ``*``, ``N``, ``N-M``, each optionally ``/STEP``; month and day names
  (``jan``, ``mon``); day of week 0 and 7 are both Sunday. ``N/STEP`` means ``N-max/STEP``.
- Day of month and day of week: when both are restricted, a day matching **either** fires; a
  field is "unrestricted" when it starts with ``*`` (so ``*/2`` counts as unrestricted, as in
  cron's source).
- Time changes (cron(8), "Daylight Saving Time and other time changes"): changes of less than
  three hours get special care for *fixed-time* jobs, those whose minute and hour fields do not
  start with ``*``: times skipped when the clock moves forward fire once, right after the change;
  times repeated when it moves back fire once, the first time. *Wildcard* jobs are scheduled
  normally, per real time: a skipped wall time never fires, a repeated one fires twice (so
  ``0 * * * *`` stays hourly). Larger changes are corrections: skipped times are not caught up.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cached_property
from zoneinfo import ZoneInfo

from xencr.config import check_cron

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
PRESETS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MINUTE = timedelta(minutes=1)
# cron(8): a larger change of the offset is a correction of the clock, not a DST change.
_DST_LIMIT = timedelta(hours=3)
# Far enough for any satisfiable expression (Feb 29 on a given weekday recurs within 28 years).
_SEARCH_YEARS = 30


def _field(text: str, lo: int, hi: int, names: tuple[str, ...]) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        base, slash, step_text = item.partition("/")
        step = int(step_text) if slash else 1
        if base == "*":
            first, last = lo, hi
        else:
            a, dash, b = base.partition("-")
            first = _value(a, lo, names)
            last = _value(b, lo, names) if dash else (hi if slash else first)
        values.update(range(first, last + 1, step))
    return frozenset(values)


def _value(text: str, lo: int, names: tuple[str, ...]) -> int:
    low = text.lower()
    return lo + names.index(low) if low in names else int(text)


@dataclass(frozen=True)
class Cron:
    """A parsed cron expression (see the module's docstring for its meaning)."""

    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]  # of the month, 1-31
    months: frozenset[int]  # 1-12
    weekdays: frozenset[int]  # 0 = Sunday ... 6 = Saturday
    dom_star: bool
    dow_star: bool
    wildcard: bool  # minute or hour starts with '*': scheduled per real time across DST changes

    @cached_property
    def _hours(self) -> list[int]:
        return sorted(self.hours)

    @cached_property
    def _minutes(self) -> list[int]:
        return sorted(self.minutes)

    @classmethod
    def parse(cls, expr: str) -> Cron:
        """Parse 5 fields or a preset; ``ValueError`` with a readable message if invalid or if the
        expression can never fire (``0 0 30 2 *``)."""
        tidy = check_cron(expr)
        fields = PRESETS.get(tidy, tidy).split(" ")
        m, h, dom, mon, dow = fields
        weekdays = frozenset(d % 7 for d in _field(dow, 0, 7, _DAYS))
        cron = cls(
            expr=tidy,
            minutes=_field(m, 0, 59, ()),
            hours=_field(h, 0, 23, ()),
            days=_field(dom, 1, 31, ()),
            months=_field(mon, 1, 12, _MONTHS),
            weekdays=weekdays,
            dom_star=dom.startswith("*"),
            dow_star=dow.startswith("*"),
            wildcard=m.startswith("*") or h.startswith("*"),
        )
        if cron.dom_star or cron.dow_star:
            # Days must match the day of the month (both restricted: a weekday alone suffices).
            longest = {mo: calendar.monthrange(2024, mo)[1] for mo in cron.months}  # a leap year
            if not any(d <= longest[mo] for mo in cron.months for d in cron.days):
                raise ValueError(f"cron expression {expr!r} never fires (no such day in those months)")
        return cron

    def day_matches(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        dom_ok = d.day in self.days
        dow_ok = (d.isoweekday() % 7) in self.weekdays
        if self.dom_star or self.dow_star:
            return dom_ok and dow_ok
        return dom_ok or dow_ok

    def next_wall(self, start: datetime) -> datetime:
        """The first matching wall time (naive, whole minute) at or after naive ``start``."""
        t = start.replace(second=0, microsecond=0)
        if t < start:
            t += _MINUTE
        limit = t.year + _SEARCH_YEARS
        d = t.date()
        first_day = True
        while d.year < limit:
            if self.day_matches(d):
                hour0, minute0 = (t.hour, t.minute) if first_day else (0, 0)
                for hour in self._hours:
                    if hour < hour0:
                        continue
                    for minute in self._minutes:
                        if hour == hour0 and minute < minute0:
                            continue
                        return datetime(d.year, d.month, d.day, hour, minute)
            d += timedelta(days=1)
            first_day = False
        raise ValueError(f"cron expression {self.expr!r} does not fire within {_SEARCH_YEARS} years")

    def next_after(self, after: datetime, tz: ZoneInfo) -> datetime:
        """The first fire strictly after ``after`` (aware), as an aware UTC datetime.

        Walks the offset-constant stretches of ``tz`` from ``after``: inside one, wall time and real
        time advance together; at a change of offset the DST rules of the module's docstring apply.
        """
        if after.tzinfo is None:
            raise ValueError("after must be an aware datetime")
        t = after.astimezone(UTC).replace(second=0, microsecond=0) + _MINUTE
        while True:
            off = _offset(t, tz)
            wall = self.next_wall((t + off).replace(tzinfo=None))
            u = (wall - off).replace(tzinfo=UTC)
            change = _next_change(t, u, tz)
            if change is None:
                if not self.wildcard and u.astimezone(tz).fold == 1:
                    # The second pass through a repeated wall time: a fixed-time job fired the first.
                    t = u + _MINUTE
                    continue
                return u
            new_off = _offset(change, tz)
            jump = new_off - off
            gap_end = (change + new_off).replace(tzinfo=None)
            if not self.wildcard and timedelta(0) < jump < _DST_LIMIT and wall < gap_end:
                return change  # a fixed time skipped by the clock moving forward: right after it
            t = change


def _offset(t: datetime, tz: ZoneInfo) -> timedelta:
    off = t.astimezone(tz).utcoffset()
    assert off is not None
    return off


def _next_change(t: datetime, until: datetime, tz: ZoneInfo) -> datetime | None:
    """The first instant in (t, until] where ``tz``'s offset differs from the one at ``t``, to the
    second; ``None`` if there is none. Probes daily (offsets change at most a few times a year),
    then bisects."""
    if until <= t:
        return None
    off = _offset(t, tz)
    lo = t
    while True:
        hi = min(lo + timedelta(days=1), until)
        if _offset(hi, tz) != off:
            break
        if hi == until:
            return None
        lo = hi
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        mid = mid.replace(microsecond=0)
        if mid <= lo:
            break
        if _offset(mid, tz) != off:
            hi = mid
        else:
            lo = mid
    return hi
