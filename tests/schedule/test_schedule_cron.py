"""Cron expressions: grammar, day rules, and Vixie cron's handling of DST changes."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from xencr.schedule import Cron

NY = ZoneInfo("America/New_York")
PARIS = ZoneInfo("Europe/Paris")


def fires(expr: str, start: datetime, n: int, tz: ZoneInfo) -> list[str]:
    """The next ``n`` fires as local wall times with the zone's abbreviation."""
    cron, t, out = Cron.parse(expr), start, []
    for _ in range(n):
        t = cron.next_after(t, tz)
        assert t.tzinfo is UTC
        out.append(t.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z"))
    return out


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_fields_names_ranges_steps_lists() -> None:
    c = Cron.parse("0,30 */6 1-10/3 jan-mar,DEC mon-fri")
    assert c.minutes == {0, 30}
    assert c.hours == {0, 6, 12, 18}
    assert c.days == {1, 4, 7, 10}
    assert c.months == {1, 2, 3, 12}
    assert c.weekdays == {1, 2, 3, 4, 5}
    assert Cron.parse("0 0 * * 7").weekdays == {0} == Cron.parse("0 0 * * sun").weekdays
    assert Cron.parse("5/20 * * * *").minutes == {5, 25, 45}  # N/STEP: N-max/STEP


@pytest.mark.parametrize(
    ("preset", "fields"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
    ],
)
def test_presets_equal_their_fields(preset: str, fields: str) -> None:
    start = utc(2026, 2, 27, 13, 7)
    assert fires(preset, start, 3, PARIS) == fires(fields, start, 3, PARIS)


@pytest.mark.parametrize(
    ("expr", "words"),
    [
        ("0 0 * *", "4 fields, expected 5"),
        ("60 * * * *", "bad minute '60'"),
        ("* 24 * * *", "bad hour"),
        ("* * 0 * *", "bad day of month"),
        ("* * * 13 *", "bad month"),
        ("* * * * 8", "bad day of week"),
        ("*/0 * * * *", "bad minute"),
        ("5-1 * * * *", "bad minute"),
        ("@often", "invalid cron preset"),
        ("0 0 30 2 *", "never fires"),
        ("0 0 31 4,6,9,11 *", "never fires"),
    ],
)
def test_invalid_expressions_say_why(expr: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Cron.parse(expr)


def test_day_of_month_or_day_of_week_when_both_restricted() -> None:
    # Both restricted: the 13th OR a Friday (2026-11: Fridays 6, 13, 20, 27).
    assert fires("0 9 13 * 5", utc(2026, 11, 1), 5, ZoneInfo("UTC")) == [
        "2026-11-06 09:00 UTC",
        "2026-11-13 09:00 UTC",
        "2026-11-20 09:00 UTC",
        "2026-11-27 09:00 UTC",
        "2026-12-04 09:00 UTC",
    ]
    # A field starting with '*' counts as unrestricted: odd days AND Mondays.
    assert fires("0 9 */2 * mon", utc(2026, 11, 1), 2, ZoneInfo("UTC")) == [
        "2026-11-09 09:00 UTC",
        "2026-11-23 09:00 UTC",
    ]


def test_strictly_after_and_leap_day() -> None:
    c = Cron.parse("0 0 29 2 *")
    assert c.next_after(utc(2028, 2, 29), ZoneInfo("UTC")) == utc(2032, 2, 29)
    assert c.next_after(utc(2028, 2, 28, 23, 59, 59), ZoneInfo("UTC")) == utc(2028, 2, 29)
    with pytest.raises(ValueError, match="aware"):
        c.next_after(datetime(2028, 1, 1), ZoneInfo("UTC"))


# America/New_York: 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.
# Europe/Paris: 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET.


def test_fixed_time_in_spring_gap_fires_once_right_after_it() -> None:
    assert fires("30 2 * * *", utc(2026, 3, 7), 3, NY) == [
        "2026-03-07 02:30 EST",
        "2026-03-08 03:00 EDT",
        "2026-03-09 02:30 EDT",
    ]
    assert fires("15,45 2 * * *", utc(2026, 3, 28, 12), 3, PARIS) == [
        "2026-03-29 03:00 CEST",  # both skipped times: one fire
        "2026-03-30 02:15 CEST",
        "2026-03-30 02:45 CEST",
    ]


def test_fixed_time_repeated_in_autumn_fires_once() -> None:
    assert fires("30 1 * * *", utc(2026, 10, 31, 12), 2, NY) == [
        "2026-11-01 01:30 EDT",
        "2026-11-02 01:30 EST",
    ]
    assert fires("30 2 * * *", utc(2026, 10, 24, 12), 2, PARIS) == [
        "2026-10-25 02:30 CEST",
        "2026-10-26 02:30 CET",
    ]


def test_wildcard_hours_keep_firing_per_real_time() -> None:
    assert fires("0 * * * *", utc(2026, 3, 8, 5, 30), 3, NY) == [
        "2026-03-08 01:00 EST",
        "2026-03-08 03:00 EDT",  # one real hour later: 02:00 does not exist
        "2026-03-08 04:00 EDT",
    ]
    assert fires("*/30 * * * *", utc(2026, 11, 1, 4, 45), 6, NY) == [
        "2026-11-01 01:00 EDT",
        "2026-11-01 01:30 EDT",
        "2026-11-01 01:00 EST",  # the repeated hour fires again, per real time
        "2026-11-01 01:30 EST",
        "2026-11-01 02:00 EST",
        "2026-11-01 02:30 EST",
    ]
    # Only minutes wildcarded within a fixed hour: skipped wall times are not caught up.
    assert fires("*/20 2 * * *", utc(2026, 3, 28, 12), 2, PARIS) == [
        "2026-03-30 02:00 CEST",
        "2026-03-30 02:20 CEST",
    ]


def test_changes_do_not_disturb_other_times() -> None:
    assert fires("0 4 * * *", utc(2026, 10, 24, 12), 2, PARIS) == [
        "2026-10-25 04:00 CET",
        "2026-10-26 04:00 CET",
    ]
    c = Cron.parse("0 4 * * *")
    # 04:00 CEST (02:00 UTC) to 04:00 CET (03:00 UTC): a 25-hour day.
    assert (c.next_after(utc(2026, 10, 24, 12), PARIS) - utc(2026, 10, 24, 2)).total_seconds() == 25 * 3600
