"""How the status page scales: render time of the page and of /api/status for 1,000 VMs.

Builds a synthetic state in a temporary directory through StateDB's own API: ``--jobs`` jobs
sharing ``--vms`` VMs, each job run every ``--every`` for ``--days`` (every VM replicated at
each run, 1 in 50 runs of a VM failing and 1 in 40 skipped; the newest run of one VM in ten is
late, so some rows breach). Then measures, each the median of ``--repeat`` tries:

- rows: the status rows from the history (what the page shows when it cannot ask the pools;
  asking them is the pools' time, not the page's);
- gather: the page's data from the state database (runs, restore points, age lines);
- html: the page written out;
- api: /api/status's JSON (ages recomputed, dumped);
- GET / and GET /api/status through the HTTP server (the page cached, as between two refreshes).

Usage: .venv/bin/python benches/status_page_bench.py [--vms 1000] [--jobs 10] [--every 1h] [--days 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from xencr.config import Config, load_config, parse_duration
from xencr.monitor.status import StatusReport
from xencr.replication.preview import status_from_history
from xencr.state import StateDB
from xencr.web import data
from xencr.web.render import page_html
from xencr.web.server import Access, Server, Site, Source, fresh, handler_class


def write_config(tmp: Path, jobs: int, every: int) -> Path:
    lines = [
        f'state = "{tmp / "state.sqlite"}"',
        '[pools.a]\nurl = "https://127.0.0.1:9"',
        '[pools.b]\nurl = "https://127.0.0.1:9"',
    ]
    for j in range(jobs):
        lines.append(
            f'[jobs.job{j}]\npool = "a"\nvms = ["vm-{j}-*"]\n[[jobs.job{j}.targets]]\npool = "b"\nsr = "SR"\n'
            f"[[jobs.job{j}.schedules]]\nevery = {every}\nretention = 7\n"
        )
    path = tmp / "xencr.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fill(cfg: Config, vms: int, every: int, days: int, now: datetime) -> int:
    """The synthetic history; the number of tasks written."""
    clock = [now]
    db = StateDB(cfg.state, clock=lambda: clock[0])
    jobs = list(cfg.jobs.values())
    per_job = vms // len(jobs)
    runs = days * 86400 // every
    written = 0
    for j, job in enumerate(jobs):
        for k in range(runs, 0, -1):
            t = now - timedelta(seconds=k * every)
            clock[0] = t
            run = db.start_run(job.id, job.name, job.schedules[0].id, "schedule")
            for v in range(per_job):
                name = f"vm-{j}-{v:04d}"
                if k == 1 and v % 10 == 0:
                    continue  # late: the newest run of one VM in ten has not happened
                if (k + v) % 40 == 0:
                    db.skip_task(
                        run, f"uuid-{name}", name, "sr-b", "skipped: previous run still running", "b/SR"
                    )
                    written += 1
                    continue
                task = db.start_task(run, f"uuid-{name}", name, "sr-b", "b/SR")
                if (k + v) % 50 == 0:
                    db.finish_task(task, "failure", error=f"pool 'b': SR 'SR' is full (SR_FULL) for {name}")
                else:
                    full = k == runs
                    db.finish_task(
                        task,
                        "success",
                        transfer="full" if full else "delta",
                        reasons={"0": "first run" if full else "delta"},
                        bytes_sent=(8 << 30) if full else (40 + v % 30) << 20,
                        restore_point=f"rp-{name}-{k}",
                        snapshot_time=t,
                        maps={"0": f"xxh3:{v:032x}"},
                        detached=1 if v % 97 == 0 else 0,
                    )
                written += 1
            clock[0] = t + timedelta(minutes=5)
            db.finish_run(run, "success")
    db.close()
    return written


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--every", default="1h")
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    every = parse_duration(args.every)
    with tempfile.TemporaryDirectory(prefix="xencr-page-bench-") as d:
        tmp = Path(d)
        cfg = load_config(write_config(tmp, args.jobs, every))
        now = datetime.now(UTC)
        t = time.perf_counter()
        tasks = fill(cfg, args.vms, every, args.days, now)
        print(
            f"state: {args.vms} VMs in {args.jobs} jobs, every {args.every} for {args.days}d: "
            f"{tasks} tasks written in {time.perf_counter() - t:.1f}s"
            f" ({cfg.state.local_path.stat().st_size >> 20} MiB)"
        )
        jobs = list(cfg.jobs.values())

        def rows() -> StatusReport:
            with StateDB(cfg.state) as db:
                return StatusReport(now, [(j.name, r) for j in jobs for r in status_from_history(j, db, now)])

        t_rows, report = timed(rows, args.repeat)
        t_gather, page = timed(lambda: data.page(cfg, jobs, report), args.repeat)
        t_html, html = timed(lambda: page_html(page, 30), args.repeat)
        t_api, api = timed(lambda: json.dumps(fresh(report, datetime.now(UTC)).json(), indent=2), args.repeat)
        breaches = sum(1 for _, r in report.rows if r.breach)
        print(
            f"rows: {len(report.rows)} VM/targets ({breaches} breaches),"
            f" {sum(len(j.runs) for j in page.jobs)} runs charted"
        )
        print(f"  status rows from history   {t_rows * 1000:8.1f} ms")
        print(f"  page data (runs, points)   {t_gather * 1000:8.1f} ms")
        print(f"  page HTML                  {t_html * 1000:8.1f} ms  ({len(html) >> 10} KiB)")
        print(f"  /api/status JSON           {t_api * 1000:8.1f} ms  ({len(api) >> 10} KiB)")
        print(
            f"  page from scratch          {(t_rows + t_gather + t_html) * 1000:8.1f} ms  (once per refresh)"
        )

        source = Source(lambda: cfg)
        # Served as on a refresh boundary: the first GET gathers (from the history: the pools of
        # this state do not exist), the next ones are served from the cache.
        server = Server("127.0.0.1", 0, handler_class(Site(source, Access())), None)
        base = f"http://127.0.0.1:{server.address[1]}/"
        try:
            t = time.perf_counter()
            urllib.request.urlopen(base, timeout=600).read()
            first = time.perf_counter() - t
            t_get, _ = timed(lambda: urllib.request.urlopen(base, timeout=60).read(), args.repeat)
            t_get_api, _ = timed(
                lambda: urllib.request.urlopen(base + "api/status", timeout=60).read(), args.repeat
            )
        finally:
            server.close()
        print(f"  GET / (first, gathering)   {first * 1000:8.1f} ms  (includes trying the pools, refused)")
        print(f"  GET / (cached)             {t_get * 1000:8.1f} ms")
        print(f"  GET /api/status            {t_get_api * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
