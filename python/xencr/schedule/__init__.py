"""Schedules: cron and interval timing, the default RPO, bandwidth windows, and the scheduler
the daemon drives with a clock."""

from xencr.schedule.clock import Clock, FakeClock, SystemClock
from xencr.schedule.cron import Cron
from xencr.schedule.rates import rate_at
from xencr.schedule.scheduler import Scheduler
from xencr.schedule.timing import next_fire, nominal_interval, rpo_of

__all__ = [
    "Clock",
    "Cron",
    "FakeClock",
    "Scheduler",
    "SystemClock",
    "next_fire",
    "nominal_interval",
    "rate_at",
    "rpo_of",
]
