"""Helpers of the status page and report tests: a configuration whose pools do not answer (the
page shows the recorded history, as `xencr status` does), a state written through StateDB's own
API with a breach, a skip, a failure and a detached object, a tested plan, and an in-process
server of the page."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from xencr.config import Config, load_config
from xencr.monitor import rehearsals
from xencr.monitor.rehearsals import Rehearsal, RehearsedVm
from xencr.sim.tls import ensure_certificate
from xencr.state import StateDB
from xencr.web.server import Server, Site, Source, access_for, handler_class

POOL_PASSWORD = "pool-Secret-7f3a"
STATUS_PASSWORD = "status-Secret-91bd"
SMTP_PASSWORD = "smtp-Secret-c044"
SECRETS = (POOL_PASSWORD, STATUS_PASSWORD, SMTP_PASSWORD)
DIGEST = "xxh3:" + "ab" * 16  # a block map digest as the runner records it


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def secret_file(path: Path, value: str) -> Path:
    path.write_text(value)
    path.chmod(0o600)
    return path


def write_config(tmp: Path, *, status: str = "", tls: bool = False) -> Path:
    """Jobs web (every 10m, 4 VMs) and db (hourly, RPO 2h) from pool a to b, both pools
    unreachable (a's password in its URL, b's in a file); plan site-b recovers both in two
    groups. ``tls``: a certificate for [status]."""
    pw = secret_file(tmp / "pool.pw", POOL_PASSWORD)
    spw = secret_file(tmp / "status.pw", STATUS_PASSWORD)
    smtp = secret_file(tmp / "smtp.pw", SMTP_PASSWORD)
    tls_lines = ""
    if tls:
        cert, key = ensure_certificate(tmp)
        tls_lines = f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
    path = tmp / "xencr.toml"
    path.write_text(
        f'state = "{tmp / "state.sqlite"}"\n'
        f'[smtp]\nhost = "127.0.0.1"\nusername = "mailer"\npassword_file = "{smtp}"\n'
        f'[status]\nrefresh = "5s"\nusername = "auditor"\npassword_file = "{spw}"\n{tls_lines}{status}\n'
        # Pool a's password is in the file itself (accepted with a warning): no page may show it.
        f'[pools.a]\nurl = "https://root:{POOL_PASSWORD}@127.0.0.1:{closed_port()}"\n'
        f'[pools.b]\nurl = "https://127.0.0.1:{closed_port()}"\npassword_file = "{pw}"\n'
        '[jobs.web]\npool = "a"\nvms = ["web-*"]\n'
        '[[jobs.web.targets]]\npool = "b"\nsr = "SR1"\n'
        '[[jobs.web.schedules]]\nid = "ten"\nevery = "10m"\nretention = 3\n'
        '[jobs.db]\npool = "a"\nvms = ["db-*"]\nrpo = "2h"\n'
        '[[jobs.db.targets]]\npool = "b"\nsr = "SR1"\n'
        '[[jobs.db.schedules]]\nid = "hourly"\nevery = "1h"\n'
        '[[plan]]\nname = "site-b"\njobs = ["web", "db"]\n'
        '[[plan.groups]]\nvms = ["db-*"]\nstart_delay = "10s"\n'
        '[[plan.groups]]\nvms = ["web-*"]\n'
    )
    return path


@dataclass
class State:
    """What `fill` recorded: run ids per job, and the moment it was filled at."""

    now: datetime
    web_runs: list[int]
    db_runs: list[int]
    test_run: int


def fill(cfg: Config, now: datetime) -> State:
    """web: five runs over the last two days. web-1 is fine (4 minutes old); web-2's last run
    was skipped and its newest restore point is 2 hours old (BREACH); web-3's last run failed
    and its newest is 8 minutes old; web-4 succeeded and found 2 detached objects. db: hourly,
    db-1 fine. Plan site-b: a test failover yesterday that passed, in two groups."""
    web, db_job = cfg.jobs["web"], cfg.jobs["db"]
    clock = [now]
    db = StateDB(cfg.state.path, clock=lambda: clock[0])

    def at(t: datetime) -> None:
        clock[0] = t

    def ok(run: int, vm: str, transfer: str, size: int, snap: datetime, **kw: object) -> None:
        task = db.start_task(run, f"uuid-{vm}", vm, "sr-b", "b/SR1")
        reasons = {
            "0": "first run" if transfer == "full" else "delta",
            "1": "disk added" if transfer == "mixed" else ("first run" if transfer == "full" else "delta"),
        }
        db.finish_task(
            task,
            "success",
            transfer=transfer,
            reasons=reasons,
            bytes_sent=size,
            restore_point=f"rp-{vm}-{run}",
            snapshot_time=snap,
            maps={"0": DIGEST, "1": DIGEST},
            **kw,  # type: ignore[arg-type]
        )

    web_runs = []
    # Two days ago: the first, full run of every VM.
    for i, (ago, kind, size) in enumerate(
        [
            (timedelta(days=2), "full", 4 << 30),
            (timedelta(days=1), "delta", 96 << 20),
            (timedelta(hours=2), "delta", 64 << 20),
        ]
    ):
        t = now - ago
        at(t)
        r = db.start_run(web.id, "web", "ten", "schedule")
        web_runs.append(r)
        for vm in ("web-1", "web-2", "web-3", "web-4"):
            ok(
                r,
                vm,
                kind,
                size,
                t,
                health_check="passed: guest tools up in 12s" if i == 2 and vm == "web-1" else None,
            )
        at(t + timedelta(minutes=3 + 20 * (i == 0)))
        db.finish_run(r, "success")
    # 8 minutes ago: web-2 still busy (skipped), the others delta; web-4 finds 2 detached objects.
    t = now - timedelta(minutes=8)
    at(t)
    r = db.start_run(web.id, "web", "ten", "schedule")
    web_runs.append(r)
    ok(r, "web-1", "delta", 8 << 20, t)
    db.skip_task(r, "uuid-web-2", "web-2", "sr-b", "skipped: previous run still running", "b/SR1")
    ok(r, "web-3", "delta", 12 << 20, t)
    ok(r, "web-4", "mixed", 2 << 30, t, detached=2)
    at(t + timedelta(minutes=2))
    db.finish_run(r, "partial")
    # 4 minutes ago: web-1 delta, web-2 skipped again, web-3 fails (its newest stays 8 minutes old).
    t = now - timedelta(minutes=4)
    at(t)
    r = db.start_run(web.id, "web", "ten", "schedule")
    web_runs.append(r)
    ok(r, "web-1", "delta", 4 << 20, t)
    db.skip_task(r, "uuid-web-2", "web-2", "sr-b", "skipped: previous run still running", "b/SR1")
    task = db.start_task(r, "uuid-web-3", "web-3", "sr-b", "b/SR1")
    at(t + timedelta(seconds=50))
    db.finish_task(task, "failure", error="pool 'b': SR 'SR1' is full (SR_FULL: needs 12.0 MiB more)")
    db.finish_run(r, "partial")
    db.set_fire(web.id, "ten", last=t, next=now + timedelta(minutes=6))

    db_runs = []
    for hours in (3, 2, 1):
        t = now - timedelta(hours=hours, minutes=-30)
        at(t)
        r = db.start_run(db_job.id, "db", "hourly", "schedule")
        db_runs.append(r)
        ok(r, "db-1", "full" if hours == 3 else "delta", (1 << 30) if hours == 3 else (16 << 20), t)
        at(t + timedelta(minutes=1))
        db.finish_run(r, "success")
    db.set_fire(db_job.id, "hourly", last=now - timedelta(minutes=30), next=now + timedelta(minutes=30))

    # The test failover of plan site-b, yesterday: db-1 in group 1, the web VMs in group 2.
    t = now - timedelta(days=1, hours=3)
    at(t)
    test_run = db.start_run("plan-site-b", rehearsals.run_name("site-b"), None, rehearsals.TRIGGER)
    at(t + timedelta(seconds=95))
    db.finish_run(test_run, "success")
    vms = [
        RehearsedVm(
            "db-1", "uuid-db-1", "clone-db-1", True, 1, t + timedelta(seconds=5), 21.5, "running within 21s"
        )
    ]
    vms += [
        RehearsedVm(
            f"web-{i}",
            f"uuid-web-{i}",
            f"clone-web-{i}",
            True,
            2,
            t + timedelta(seconds=37 + i),
            30.0 + i,
            "guest tools up",
        )
        for i in range(1, 5)
    ]
    rehearsals.save(db, Rehearsal("site-b", test_run, True, True, False, tuple(vms)))
    db.close()
    return State(now, web_runs, db_runs, test_run)


@contextlib.contextmanager
def serving(cfg_path: Path, host: str = "127.0.0.1") -> Iterator[tuple[str, Config]]:
    """The page served in this process (the tests make unreachable pools fail at once); its URL."""
    cfg = load_config(cfg_path)
    access = access_for(cfg.status, host)
    site = Site(Source(lambda: cfg), access)
    server = Server(host, 0, handler_class(site), access.tls)
    try:
        yield f"{access.scheme}://{host}:{server.address[1]}/", cfg
    finally:
        server.close()


def env_without_secrets() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not (k.startswith("XENCR_") and k.endswith("_PASSWORD"))}


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
