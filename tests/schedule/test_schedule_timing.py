"""Interval alignment, nominal intervals (default RPO), and bandwidth windows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from xencr.config import JobConfig, ScheduleConfig, TargetConfig
from xencr.schedule import next_fire, nominal_interval, rate_at, rpo_of

MiB = 1 << 20


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def every(seconds: int, **kw: object) -> ScheduleConfig:
    return ScheduleConfig(id=f"every-{seconds}", every=seconds, **kw)  # type: ignore[arg-type]


def cron(expr: str, tz: str = "UTC", **kw: object) -> ScheduleConfig:
    return ScheduleConfig(id=f"cron-{expr}", cron=expr, timezone=tz, **kw)  # type: ignore[arg-type]


def job(*schedules: ScheduleConfig, rpo: int | None = None) -> JobConfig:
    return JobConfig(
        name="j",
        id="j",
        pool="p",
        vms=["*"],
        exclude=[],
        targets=[TargetConfig(pool="p", sr="sr")],
        schedules=list(schedules),
        rpo=rpo,
    )


def test_every_is_aligned_on_the_epoch_and_strictly_after() -> None:
    s = every(900)
    assert next_fire(s, utc(2026, 5, 1, 10, 7, 31)) == utc(2026, 5, 1, 10, 15)
    assert next_fire(s, utc(2026, 5, 1, 10, 15)) == utc(2026, 5, 1, 10, 30)
    assert next_fire(every(7200), utc(2026, 5, 1, 23, 0, 1)) == utc(2026, 5, 2, 0, 0)
    # Any zone for `after`: the answer is the same instant, in UTC.
    paris = datetime(2026, 5, 1, 12, 7, tzinfo=__import__("zoneinfo").ZoneInfo("Europe/Paris"))
    assert next_fire(s, paris) == utc(2026, 5, 1, 10, 15)


def test_cron_schedule_uses_its_time_zone() -> None:
    s = cron("30 1 * * *", "Europe/Paris")
    assert next_fire(s, utc(2026, 7, 1, 0)) == utc(2026, 7, 1, 23, 30)  # 01:30 CEST next day
    assert next_fire(s, utc(2026, 12, 1, 0)) == utc(2026, 12, 1, 0, 30)  # 01:30 CET


@pytest.mark.parametrize(
    ("schedule", "seconds"),
    [
        (every(600), 600),
        (cron("*/15 * * * *"), 900),
        (cron("*/15 * * * *", "Europe/Paris"), 900),  # the repeated hour fires too
        (cron("0 * * * *", "America/New_York"), 3600),
        (cron("@daily"), 86400),
        (cron("30 2 * * *", "America/New_York"), 25 * 3600),  # the autumn change stretches a day
        (cron("0 */2 * * *", "America/New_York"), 3 * 3600),
        (cron("0 9 * * 1-5"), 3 * 86400),  # Friday to Monday
        (cron("@weekly"), 7 * 86400),
        (cron("0 0 1 * *"), 31 * 86400),
        (cron("0 0 29 2 *"), (366 + 3 * 365) * 86400),
    ],
)
def test_nominal_interval(schedule: ScheduleConfig, seconds: int) -> None:
    assert nominal_interval(schedule) == seconds


def test_rpo_of_job() -> None:
    assert rpo_of(job()) is None
    assert rpo_of(job(every(3600), cron("*/10 * * * *"))) == 600
    assert rpo_of(job(every(3600, rpo=1800), every(7200))) == 1800
    assert rpo_of(job(every(600), rpo=5400)) == 5400  # the job's rpo wins


def test_rate_windows_in_the_schedule_zone_first_match_wins() -> None:
    s = every(
        600,
        timezone="Europe/Paris",
        rate=50 * MiB,
        rate_windows=["Mon-Fri 08:00-18:00 2MiB/s", "* 07:00-19:00 unlimited", "Fri 22:00-06:00 1MiB/s"],
    )
    # Monday 2026-06-01; Paris is UTC+2 in June.
    assert rate_at(s, utc(2026, 6, 1, 6, 0)) == 2 * MiB  # 08:00 local: the first window
    assert rate_at(s, utc(2026, 6, 1, 5, 59)) is None  # 07:59 local: the second, unlimited
    assert rate_at(s, utc(2026, 6, 1, 16, 0)) is None  # 18:00 local: end excluded
    assert rate_at(s, utc(2026, 6, 1, 17, 0)) == 50 * MiB  # 19:00 local: the schedule's rate
    assert rate_at(s, utc(2026, 6, 6, 3, 0)) == 1 * MiB  # Saturday 05:00: Friday's night window
    assert rate_at(s, utc(2026, 6, 7, 3, 0)) == 50 * MiB  # Sunday 05:00: not after Saturday
    assert rate_at(every(60), utc(2026, 6, 1)) is None
