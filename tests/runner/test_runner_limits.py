"""Locks per VM/target (threads and processes), per-pool transfer slots, the rate of a run from
its schedule's windows, the job's report sent after a run (never failing it), and readable
configuration errors from `xencr run`."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import typer
from runnertest import JOB, write_config
from typer.testing import CliRunner
from xapitest import Pools

from xencr.cli.run import run_command
from xencr.config import load_config
from xencr.replication import jobs as jobsmod
from xencr.replication import runner as runnermod
from xencr.replication.jobs import run_configured, spec_of
from xencr.service import limits, locks

VM = "0b1e3a9c-7d1f-4c1e-9a55-2f6f3d1c8e11"
SR = "3c6f1a5e-8d2b-4f7a-b1c9-5e0d4a2b7f68"

app = typer.Typer()
app.command("run")(run_command)


@app.command("version")
def _version() -> None:
    """A second command, so that `run` stays a sub-command as in the real CLI."""


# -- locks


def test_a_lock_conflicts_within_a_process_and_names_its_holder(tmp_path: Path) -> None:
    first = locks.try_lock(tmp_path, VM, SR, "web", job_id="id-web")
    assert first is not None
    assert locks.try_lock(tmp_path, VM, SR, "db") is None, "a second open in the same process conflicts"
    assert locks.try_lock(tmp_path, VM, "another-sr", "db") is not None, "other targets are free"
    h = locks.read_holder(tmp_path, VM, SR)
    assert h is not None and (h.job_id, h.job_name, h.pid) == ("id-web", "web", first.holder.pid)
    assert locks.holder(tmp_path, VM, SR).startswith(f"job web (pid {h.pid}) since ")
    first.release()
    first.release()  # idempotent
    assert locks.read_holder(tmp_path, VM, SR, wait=0) is None
    with locks.try_lock(tmp_path, VM, SR, "db") as again:
        assert again is not None and again.holder.job_name == "db"
    assert locks.try_lock(tmp_path, VM.upper(), SR, "db") is not None, "UUIDs in any case: one lock"


def test_a_lock_holds_across_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from xencr.service.locks import try_lock\n"
        f"lock = try_lock(Path({str(tmp_path)!r}), {VM!r}, {SR!r}, 'nightly')\n"
        "print('held' if lock else 'busy', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        assert locks.try_lock(tmp_path, VM, SR, "web") is None
        assert locks.holder(tmp_path, VM, SR).startswith(f"job nightly (pid {proc.pid}) since ")
    finally:
        proc.kill()
        proc.wait(30)
    lock = locks.try_lock(tmp_path, VM, SR, "web")
    assert lock is not None, "the kernel released the killed holder's lock"
    lock.release()


# -- transfer slots


def test_slots_are_taken_together_and_waiting_gives_up_on_cancel_or_deadline() -> None:
    exp, imp = limits.Slot("export", "a", 1), limits.Slot("import", "b", 2)
    with limits.transfer_slots([exp, imp]):
        assert (limits.in_use("export", "a"), limits.in_use("import", "b")) == (1, 1)
        with limits.transfer_slots([limits.Slot("import", "b", 2)]):
            assert limits.in_use("import", "b") == 2
        cancel = threading.Event()
        cancel.set()
        with (
            pytest.raises(limits.SlotCancelled, match="cancelled"),
            limits.transfer_slots([exp], cancel=cancel),
        ):
            pass
        with (
            pytest.raises(limits.SlotCancelled, match="deadline"),
            limits.transfer_slots([exp, limits.Slot("import", "c", 1)], deadline=time.monotonic()),
        ):
            pass
        assert limits.in_use("import", "c") == 0, "a slot given up is not held"
    assert (limits.in_use("export", "a"), limits.in_use("import", "b")) == (0, 0)


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts the disk copies running at once. Each copy waits (a bounded time) for a second
    one to join it, so that two copies allowed together are certainly seen together."""
    seen = {"now": 0, "peak": 0, "calls": 0}
    lock = threading.Lock()
    together = threading.Barrier(2, timeout=3)
    real: Callable[..., Any] = runnermod.copy_vdi

    def counting(*args: Any, **kwargs: Any) -> Any:
        with lock:
            seen["now"] += 1
            seen["calls"] += 1
            seen["peak"] = max(seen["peak"], seen["now"])
        try:
            # Broken when alone: the limit kept the other copy out.
            with contextlib.suppress(threading.BrokenBarrierError):
                together.wait()
            return real(*args, **kwargs)
        finally:
            with lock:
                seen["now"] -= 1

    monkeypatch.setattr(runnermod, "copy_vdi", counting)
    yield seen


@pytest.mark.parametrize(
    ("pool_a", "pool_b", "peak"),
    [
        ("", "max_imports = 1", 1),
        ("max_exports = 1", "", 1),
        ("", "", 2),
    ],
)
def test_per_pool_limits_bound_concurrent_disk_copies(
    pools: Pools, tmp_path: Path, copies: dict[str, int], pool_a: str, pool_b: str, peak: int
) -> None:
    cfg = write_config(tmp_path, pools, pool_a_extra=pool_a, pool_b_extra=pool_b)
    report = run_configured(load_config(cfg), JOB)  # two VMs at once (concurrency 2)
    assert report.outcome == "success", [t.error for v in report.vms for t in v.targets]
    assert (copies["calls"], copies["peak"]) == (2, peak)
    assert limits.in_use("export", "a") == limits.in_use("import", "b") == 0


# -- rate from the schedule


def test_the_rate_of_a_run_follows_the_schedules_windows(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools)
    text = cfg.read_text().replace(
        'every = "15m"\n',
        'every = "15m"\nrate = "50MiB/s"\ntimezone = "Europe/Paris"\n'
        'rate_windows = ["Mon-Fri 08:00-18:00 2MiB/s", "Sat,Sun 00:00-24:00 unlimited"]\n',
    )
    cfg.write_text(text)
    job = load_config(cfg).job(JOB)
    # 2026-11-23 is a Monday; Paris is UTC+1 in November.
    at = {
        datetime(2026, 11, 23, 9, 0, tzinfo=UTC): 2 << 20,  # 10:00 in Paris: the working-hours window
        datetime(2026, 11, 23, 20, 0, tzinfo=UTC): 50 << 20,  # evening: the schedule's rate
        datetime(2026, 11, 28, 9, 0, tzinfo=UTC): None,  # Saturday: unlimited
    }
    for now, rate in at.items():
        assert spec_of(job, None, now=now).rate_limit == rate, now


# -- the job's report


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Receiver.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    _Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook/s3cr3t-token"
    server.shutdown()
    server.server_close()


def test_the_report_is_sent_after_a_run(pools: Pools, tmp_path: Path, receiver: str) -> None:
    cfg = write_config(tmp_path, pools, job_extra=f'report_when = "always"\nwebhook = "{receiver}"')
    report = run_configured(load_config(cfg), JOB)
    assert report.outcome == "success"
    (doc,) = _Receiver.received
    assert (doc["job"], doc["outcome"], doc["report_reason"]) == (JOB, "success", "every run is reported")
    assert [v["name"] for v in doc["vms"]] == ["vm0", "vm1"]
    assert all(v["snapshot_time"] and v["targets"][0]["restore_point"] for v in doc["vms"])


def test_a_report_that_cannot_be_sent_never_fails_the_run(
    pools: Pools, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(
        tmp_path, pools, job_extra='report_when = "always"\nwebhook = "http://127.0.0.1:9/t0ken"'
    )

    def broken(*args: Any) -> list[str]:
        raise RuntimeError("http://127.0.0.1:9/t0ken exploded")

    monkeypatch.setattr(jobsmod.notify, "notify", broken)
    with caplog.at_level(logging.WARNING, logger="xencr.replication"):
        report = run_configured(load_config(cfg), JOB)
    assert report.outcome == "success"
    lines = [r.getMessage() for r in caplog.records if "report not sent" in r.getMessage()]
    assert lines == [f"job {JOB}: report not sent: RuntimeError"], "one line, without the URL's token"


# -- configuration errors


def test_a_bad_limit_is_one_readable_line(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools, pool_b_extra="max_imports = 0")
    result = CliRunner().invoke(app, ["run", JOB, "--config", str(cfg)])
    assert result.exit_code != 0
    assert result.stderr.strip() == f"xencr: error: {cfg}: pools.b.max_imports: must be at least 1, not 0"
