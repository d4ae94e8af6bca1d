"""The scheduler and the fake clock: due pairs, missed ticks not queued, reloads."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from xencr.config import ScheduleConfig
from xencr.schedule import FakeClock, Scheduler, SystemClock

T0 = datetime(2026, 3, 7, 23, 50, tzinfo=UTC)
TEN = ScheduleConfig(id="ten", every=600)
NIGHTLY = ScheduleConfig(id="nightly", cron="30 2 * * *", timezone="America/New_York")


def test_due_once_per_pair_and_missed_ticks_not_queued() -> None:
    clock = FakeClock(T0)
    sch = Scheduler([("a", TEN), ("b", TEN), ("a", NIGHTLY)], clock.now())
    assert sch.next_fires() == {
        ("a", "ten"): T0 + timedelta(minutes=10),
        ("b", "ten"): T0 + timedelta(minutes=10),
        ("a", "nightly"): datetime(2026, 3, 8, 7, 0, tzinfo=UTC),  # 02:30 is skipped: 03:00 EDT
    }
    assert sch.due(clock.now()) == []
    clock.advance(timedelta(minutes=10))
    assert sch.due(clock.now()) == [("a", TEN), ("b", TEN)]
    assert sch.due(clock.now()) == []
    # Asleep for eight hours: each pair is due once, and then at its next tick after now.
    clock.advance(timedelta(hours=8, minutes=3))
    assert sch.due(clock.now()) == [("a", TEN), ("b", TEN), ("a", NIGHTLY)]
    now = clock.now()
    assert sch.next_fires()[("a", "ten")] == now + timedelta(minutes=7)
    assert sch.next_fires()[("a", "nightly")] == datetime(2026, 3, 9, 6, 30, tzinfo=UTC)  # 02:30 EDT
    assert sch.next_wake() == now + timedelta(minutes=7)


def test_cron_over_the_spring_gap_with_the_fake_clock() -> None:
    clock = FakeClock(datetime(2026, 3, 8, 6, 0, tzinfo=UTC))  # 01:00 EST
    sch = Scheduler([("a", NIGHTLY)], clock.now())
    wake = sch.next_wake()
    assert wake == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)  # 03:00 EDT, right after the gap
    clock.set(wake)
    assert sch.due(clock.now()) == [("a", NIGHTLY)]
    assert sch.next_wake() == datetime(2026, 3, 9, 6, 30, tzinfo=UTC)


def test_update_keeps_unchanged_pairs_and_restarts_changed_ones() -> None:
    sch = Scheduler([("a", TEN), ("a", NIGHTLY)], T0)
    later = T0 + timedelta(minutes=5)
    faster = ScheduleConfig(id="ten", every=120)
    sch.update([("a", NIGHTLY), ("b", faster)], later)
    assert sch.next_fires() == {
        ("a", "nightly"): datetime(2026, 3, 8, 7, 0, tzinfo=UTC),
        ("b", "ten"): datetime(2026, 3, 7, 23, 56, tzinfo=UTC),
    }
    sch.update([("b", ScheduleConfig(id="ten", every=60))], later)
    assert sch.next_fires() == {("b", "ten"): datetime(2026, 3, 7, 23, 56, tzinfo=UTC)}


def test_fake_clock_wakes_a_waiting_thread_when_moved() -> None:
    clock = FakeClock(T0)
    stop = threading.Event()
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(clock.wait_until(T0 + timedelta(hours=1), stop)))
    waiter.start()
    assert clock.wait_for_sleeper()
    clock.advance(timedelta(minutes=59))
    assert waiter.is_alive()
    clock.advance(timedelta(minutes=1))
    waiter.join(5)
    assert results == [True]
    # A stop ends the wait with False.
    waiter = threading.Thread(target=lambda: results.append(clock.wait_until(T0 + timedelta(days=1), stop)))
    waiter.start()
    assert clock.wait_for_sleeper()
    stop.set()
    waiter.join(5)
    assert results == [True, False]


def test_system_clock_is_utc_and_stops_at_once() -> None:
    clock = SystemClock()
    assert clock.now().tzinfo is UTC
    stop = threading.Event()
    assert clock.wait_until(clock.now() - timedelta(seconds=1), stop)
    stop.set()
    assert not clock.wait_until(clock.now() + timedelta(days=1), stop)
