"""The daemon's loop driven by a fake clock, with an injected run function: what fires when,
fire times in the state DB, overlap, reload, stop with grace and cancel, metrics."""

from __future__ import annotations

import io
import queue
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xencr.config import Config, load_config
from xencr.replication.runner import RunReport
from xencr.schedule import FakeClock
from xencr.service.daemon import Daemon
from xencr.state import StateDB

T0 = datetime(2026, 3, 7, 23, 55, tzinfo=UTC)


def config_text(tmp: Path, *, extra: str = "", daemon: str = "grace = 0") -> str:
    return (
        f'state = "{tmp / "state.sqlite"}"\n'
        '[pools.a]\nurl = "http://127.0.0.1:9"\n'
        '[jobs.ten]\npool = "a"\nvms = ["vm*"]\n'
        '[[jobs.ten.targets]]\npool = "a"\nsr = "sr"\n'
        '[[jobs.ten.schedules]]\nid = "ten"\nevery = "10m"\n'
        '[jobs.nightly]\npool = "a"\nvms = ["vm*"]\n'
        '[[jobs.nightly.targets]]\npool = "a"\nsr = "sr"\n'
        '[[jobs.nightly.schedules]]\nid = "night"\ncron = "30 2 * * *"\ntimezone = "America/New_York"\n'
        '[jobs.off]\npool = "a"\nvms = ["vm*"]\nenabled = false\n'
        '[[jobs.off.targets]]\npool = "a"\nsr = "sr"\n'
        '[[jobs.off.schedules]]\nid = "off"\nevery = "1m"\n' + extra + f"[daemon]\n{daemon}\n"
    )


@dataclass
class Call:
    job: str
    schedule_id: str | None
    trigger: str
    cancel: threading.Event | None
    release: threading.Event = field(default_factory=threading.Event)


class FakeRuns:
    """Stands for run_configured: records each call; a call blocks until released (or cancelled)
    when ``hold`` is set."""

    def __init__(self) -> None:
        self.calls: queue.Queue[Call] = queue.Queue()
        self.hold = False

    def __call__(self, config: Config, job_ref: str, **kw: Any) -> RunReport:
        call = Call(job_ref, kw.get("schedule_id"), kw.get("trigger", ""), kw.get("cancel"))
        self.calls.put(call)
        if self.hold:
            while not call.release.wait(0.01):
                if call.cancel is not None and call.cancel.is_set():
                    break
        return RunReport(job=job_ref, started=datetime.now(UTC), finished=datetime.now(UTC))

    def next(self) -> Call:
        return self.calls.get(timeout=10)

    def none_pending(self) -> bool:
        return self.calls.empty()


@dataclass
class Running:
    daemon: Daemon
    clock: FakeClock
    runs: FakeRuns
    out: io.StringIO
    thread: threading.Thread
    result: list[int]
    cfg: Path

    def step(self, delta: timedelta) -> None:
        """Move the clock and return once the loop has handled it and sleeps again."""
        n = self.clock.waits
        self.clock.advance(delta)
        assert self.clock.wait_for_sleeper(since=n)

    def poke(self, action: Callable[[], None]) -> None:
        n = self.clock.waits
        action()
        assert self.clock.wait_for_sleeper(since=n)

    def stop(self) -> int:
        self.daemon.request_stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self.result[0]

    def wait_event(self, name: str) -> str:
        """The first line of event ``name``, once the daemon has logged it (10 s at most)."""
        deadline = time.monotonic() + 10
        while not self.events(name):
            assert time.monotonic() < deadline, f"no event={name} in:\n{self.out.getvalue()}"
            time.sleep(0.01)
        return self.events(name)[0]

    def events(self, name: str) -> list[str]:
        return [line for line in self.out.getvalue().splitlines() if f" event={name}" in line]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(text: str | None = None, **kw: Any) -> Running:
        cfg = tmp_path / "xencr.toml"
        cfg.write_text(text or config_text(tmp_path))
        clock, runs, out = FakeClock(T0), FakeRuns(), io.StringIO()
        daemon = Daemon(lambda: load_config(cfg), stream=out, clock=clock, run=runs, **kw)
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(daemon.run_forever()), daemon=True)
        thread.start()
        assert clock.wait_for_sleeper()
        r = Running(daemon, clock, runs, out, thread, result, cfg)
        started.append(r)
        return r

    yield start
    for r in started:
        if r.thread.is_alive():
            r.runs.hold = False
            r.stop()


def test_fires_enabled_schedules_and_records_next_fires(running: Callable[..., Running]) -> None:
    r = running()
    with StateDB(r.daemon.config.state.path) as db:
        fires = db.fires()
    ten, night = r.daemon.config.job("ten"), r.daemon.config.job("nightly")
    assert fires == {
        (ten.id, "ten"): (None, datetime(2026, 3, 8, 0, 0, tzinfo=UTC)),
        # 02:30 does not exist in New York that night: right after the gap, 03:00 EDT.
        (night.id, "night"): (None, datetime(2026, 3, 8, 7, 0, tzinfo=UTC)),
    }
    r.step(timedelta(minutes=5))
    call = r.runs.next()
    assert (call.job, call.schedule_id, call.trigger) == ("ten", "ten", "schedule")
    assert call.cancel is r.daemon.cancel
    with StateDB(r.daemon.config.state.path) as db:
        assert db.fires()[(ten.id, "ten")] == (
            datetime(2026, 3, 8, 0, 0, tzinfo=UTC),
            datetime(2026, 3, 8, 0, 10, tzinfo=UTC),
        )
    assert r.events("fired") and "job=ten schedule=ten" in r.events("fired")[0]
    assert r.stop() == 0


def test_missed_ticks_fire_once(running: Callable[..., Running]) -> None:
    r = running()
    r.step(timedelta(hours=8))  # 07:55 UTC: ten missed 48 ticks, nightly one
    fired = sorted((r.runs.next().job, r.runs.next().job))
    assert fired == ["nightly", "ten"]
    assert r.runs.none_pending()
    assert r.daemon.scheduler.next_wake() == datetime(2026, 3, 8, 8, 0, tzinfo=UTC)
    r.step(timedelta(minutes=5))
    assert r.runs.next().job == "ten"
    assert r.runs.none_pending()


def test_runs_overlap_and_a_stop_lets_them_finish(running: Callable[..., Running], tmp_path: Path) -> None:
    r = running(config_text(tmp_path, daemon="grace = 30"))
    r.runs.hold = True
    r.step(timedelta(minutes=5))
    first = r.runs.next()
    r.step(timedelta(minutes=10))
    second = r.runs.next()  # the same job again while the first still runs: best effort is below
    assert first.job == second.job == "ten"
    r.daemon.request_stop()
    assert "running=2" in r.wait_event("stopping")
    first.release.set()
    second.release.set()
    r.thread.join(30)
    assert r.result == [0]
    assert not r.daemon.cancel.is_set(), "finished within the grace: nothing cancelled"
    assert len(r.events("run_finished")) == 2 and not r.events("cancelling")


def test_stop_cancels_what_outlives_the_grace(running: Callable[..., Running]) -> None:
    r = running()  # grace = 0
    r.runs.hold = True
    r.step(timedelta(minutes=5))
    call = r.runs.next()
    assert r.stop() == 0
    assert call.cancel is not None and call.cancel.is_set()
    assert r.events("cancelling") and r.events("stopped")
    assert r.events("run_finished"), "the cancelled run returned its report"


def test_second_stop_skips_the_grace(running: Callable[..., Running], tmp_path: Path) -> None:
    r = running(config_text(tmp_path, daemon="grace = 3600"))
    r.runs.hold = True
    r.step(timedelta(minutes=5))
    call = r.runs.next()
    r.daemon.request_stop()
    r.wait_event("stopping")
    r.daemon.request_stop()
    r.thread.join(30)
    assert r.result == [0] and call.cancel is not None and call.cancel.is_set()


def test_reload_takes_a_good_config_and_keeps_the_old_on_a_bad_one(
    running: Callable[..., Running], tmp_path: Path
) -> None:
    r = running()
    extra = (
        '[jobs.five]\npool = "a"\nvms = ["vm*"]\n[[jobs.five.targets]]\npool = "a"\nsr = "sr"\n'
        '[[jobs.five.schedules]]\nid = "five"\nevery = "5m"\n'
    )
    r.cfg.write_text(config_text(tmp_path, extra=extra))
    r.poke(r.daemon.request_reload)
    assert r.events("reloaded")
    # Unchanged schedules keep their next fire; the new one starts from now.
    assert {k[1]: v for k, v in r.daemon.scheduler.next_fires().items()} == {
        "ten": datetime(2026, 3, 8, 0, 0, tzinfo=UTC),
        "night": datetime(2026, 3, 8, 7, 0, tzinfo=UTC),
        "five": datetime(2026, 3, 8, 0, 0, tzinfo=UTC),
    }
    r.cfg.write_text(config_text(tmp_path, extra="[jobs.broken]\nbogus = 1\n"))
    r.poke(r.daemon.request_reload)
    failed = r.events("reload_failed")
    assert len(failed) == 1 and "jobs.broken" in failed[0]
    r.step(timedelta(minutes=5))
    assert sorted((r.runs.next().job, r.runs.next().job)) == ["five", "ten"]


def test_metrics_served_and_textfile_written(running: Callable[..., Running], tmp_path: Path) -> None:
    textfile = tmp_path / "xencr.prom"
    r = running(
        config_text(tmp_path, daemon=f'grace = 0\nmetrics_textfile = "{textfile}"'),
        metrics_listen="127.0.0.1:0",
    )
    assert r.daemon.metrics_address is not None
    host, port = r.daemon.metrics_address
    assert any(f"metrics={host}:{port}" in line for line in r.events("started"))
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"xencr_tasks", "xencr_rpo_seconds", "xencr_bytes_sent"} <= names
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{host}:{port}/other", timeout=10)
    assert err.value.code == 404
    assert list(text_string_to_metric_families(textfile.read_text())), "written at start"
    textfile.unlink()
    r.step(timedelta(minutes=5))
    r.runs.next()
    r.stop()
    assert list(text_string_to_metric_families(textfile.read_text()))


def test_a_restart_keeps_last_fires_and_clears_unscheduled_ones(
    running: Callable[..., Running], tmp_path: Path
) -> None:
    r = running()
    r.step(timedelta(minutes=5))
    r.runs.next()
    r.stop()
    ten, night = r.daemon.config.job("ten"), r.daemon.config.job("nightly")
    text = config_text(tmp_path).replace("[jobs.nightly]", "[jobs.nightly]\nenabled = false")
    running(text)
    with StateDB(r.daemon.config.state.path) as db:
        fires = db.fires()
    first_fire = datetime(2026, 3, 8, 0, 0, tzinfo=UTC)
    assert fires[(ten.id, "ten")] == (first_fire, first_fire)  # the new daemon's clock starts at T0 again
    assert fires[(night.id, "night")] == (None, None), "a disabled job promises no next run"


def test_metrics_address_in_use_is_one_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "xencr.toml"
    cfg.write_text(config_text(tmp_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        daemon = Daemon(
            lambda: load_config(cfg),
            stream=io.StringIO(),
            clock=FakeClock(T0),
            metrics_listen=f"127.0.0.1:{port}",
        )
        with pytest.raises(OSError) as err:
            daemon.run_forever()
    assert err.value.filename == f"metrics listen address 127.0.0.1:{port}"


def test_old_history_is_forgotten_at_start_and_every_hour(
    running: Callable[..., Running], tmp_path: Path
) -> None:
    """The ages are the state's clock's (the real one, which stamps the runs); the hourly
    cadence is the loop's (the fake clock)."""
    text = config_text(tmp_path, daemon='grace = 0\nkeep_history = "30d"')
    (tmp_path / "xencr.toml").write_text(text)
    job = load_config(tmp_path / "xencr.toml").job("ten")
    real = datetime.now(UTC)

    def record(age: timedelta, outcome: str = "failure") -> int:
        with StateDB(tmp_path / "state.sqlite", clock=lambda: real - age) as db:
            run = db.start_run(job.id, "ten", "ten", "schedule")
            db.finish_task(db.start_task(run, "vm-1", "vm1", "sr"), outcome, bytes_sent=5)
            db.finish_run(run, outcome)
        return run

    def runs_left() -> list[int]:
        with StateDB(tmp_path / "state.sqlite") as db:
            return [run.id for run in db.runs()]

    record(timedelta(days=100))
    record(timedelta(days=40))
    recent = record(timedelta(days=29))
    newest = record(timedelta(days=20), "success")
    with StateDB(tmp_path / "state.sqlite") as db:
        totals = db.job_totals()

    r = running(text)
    assert "runs=2 older_than=30d" in r.wait_event("history_pruned")  # 100 and 40 days old
    assert runs_left() == [recent, newest]
    late = record(timedelta(days=50))  # recorded late (another process's): the next hour's
    latest = record(timedelta(days=1), "success")
    r.step(timedelta(minutes=50))
    assert len(r.events("history_pruned")) == 1 and late in runs_left(), "once an hour"
    r.step(timedelta(minutes=15))
    deadline = time.monotonic() + 10
    while late in runs_left():
        assert time.monotonic() < deadline, r.out.getvalue()
        time.sleep(0.05)
    assert runs_left() == [recent, newest, latest]
    with StateDB(tmp_path / "state.sqlite") as db:
        assert {j.job_id: j.tasks for j in db.job_totals()} == {job.id: {"failure": 4, "success": 2}}
        assert totals[0].tasks == {"failure": 3, "success": 1}
    assert r.stop() == 0
