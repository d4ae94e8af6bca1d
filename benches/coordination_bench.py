"""What the coordination of several workers costs (issue 17): tasks per second one PostgreSQL
sustains, and the latency each task adds, with 1, 4 and 16 workers, no data moved.

Each worker is a process of its own with its own connections, registered and heartbeating as
`xencr daemon` does (its lease renewed by its heartbeat thread). Per task it does what a worker
and the runner do in the database around a real transfer: claim the next task (``FOR UPDATE SKIP
LOCKED`` plus a job slot), record its run and task (the history a worker writes for each task),
take the (VM, SR) lease, take and give back an export and an import slot, check the lease before
the commit, finish the task and run, give the lease back, and mark the task done. One fire of
1,000 VMs is queued first (timed too).

Then what keeping that history bounded costs: ``--prune`` runs (a day of 1,000 VMs at a 1-minute
RPO is 1.44 million) written in bulk as old, then forgotten by `StateDB.prune_history`, which the
daemon runs every hour (an hour of that cluster is 60,000 runs).

Run from the repository root:

    .venv/bin/python benches/coordination_bench.py              # 1, 4, 16 workers, ~2 min
    .venv/bin/python benches/coordination_bench.py --tasks 4000 --workers 1 4 16 32

The server is $XENCR_TEST_PG (password in $XENCR_TEST_PG_PASSWORD), else a throwaway cluster
started here (tests/pgcluster.py). Each round gets a fresh database.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import pgcluster  # noqa: E402
from pgtest import PG_ENV, PG_PASSWORD_ENV, PgServer, pg_location  # noqa: E402
from xencr.config import WorkerConfig  # noqa: E402
from xencr.coordination import Holding, Worker  # noqa: E402
from xencr.coordination import queue as q  # noqa: E402
from xencr.service.limits import Slot  # noqa: E402
from xencr.state import StateDB  # noqa: E402
from xencr.state.rows import time_text  # noqa: E402
from xencr.state.schema import runs, task_disks, tasks  # noqa: E402

RPO_TASKS_PER_SECOND = 1000 / 60  # 1,000 VMs, each once a minute
JOBS = 20  # the VMs spread over this many jobs, each running up to 50 at once


def _work(url: str, name: str, jobs: dict[str, int], start: Any, out: Any) -> None:
    """One worker: drain the queue, timing each task's coordination."""
    with StateDB(pg_location(url), worker=name) as db:
        worker = Worker(db, WorkerConfig(name=name, lease=30, slots=4))
        worker.start()
        h = Holding.of(worker)
        start.wait()
        latencies: list[float] = []
        beats: list[float] = []
        while True:
            t0 = time.perf_counter()
            row = q.claim_next(db, worker, jobs)
            if row is None:
                break
            run_id = db.start_run(row.job_id, row.job_id, "tick", "schedule")
            q.set_run(db, row, run_id)
            lease = h.locker.try_lock(row.vm_uuid, "sr-bench", row.job_id, job_id=row.job_id)
            assert lease is not None, "a VM's lease is free: one task per VM"
            task_id = db.start_task(run_id, row.vm_uuid, row.vm_name, "sr-bench", "dst/sr")
            with h.slots.transfer_slots([Slot("export", "src", 64), Slot("import", "dst", 64)]):
                pass
            assert h.locker.still_held(row.vm_uuid, "sr-bench")
            db.finish_task(task_id, "success", transfer="delta", reasons={"0": "delta"}, bytes_sent=1 << 20)
            lease.release()
            db.finish_run(run_id, "success")
            assert q.finish(db, row, "success")
            latencies.append(time.perf_counter() - t0)
            if len(latencies) % 50 == 0:
                b0 = time.perf_counter()
                worker.renew()  # a heartbeat: every claim this worker holds, renewed in one go
                beats.append(time.perf_counter() - b0)
        worker.stop()
    out.put((name, latencies, beats))


def _server_cpu(port: int) -> float | None:
    """CPU seconds the PostgreSQL server listening on ``port`` has used: its postmaster with the
    backends it reaped, and those alive (Linux /proc; None when it is not found here)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        stats[int(d.name)] = (int(fields[1]), [int(x) for x in fields[11:15]], cmdline)
    master = next(
        (
            pid
            for pid, (_, _, cmd) in stats.items()
            if b"-p" in cmd and str(port).encode() in cmd and b"postgres" in cmd[0]
        ),
        None,
    )
    if master is None:
        return None
    _, (ut, st, cut, cst), _ = stats[master]
    total = ut + st + cut + cst
    total += sum(u + s for pid, (pp, (u, s, _, _), _) in stats.items() if pp == master)
    return total / tick


def _commits(server: PgServer, name: str) -> int:
    with server.admin() as conn:
        row = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (name,)).fetchone()
    return int(row[0]) if row else 0


def round_of(server: PgServer, workers: int, tasks: int) -> dict[str, float]:
    name = f"xencr_bench_{uuid.uuid4().hex[:8]}"
    with server.admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = server.database_url(name)
    try:
        with StateDB(pg_location(url)) as db:
            fire_at = datetime(2030, 1, 1, tzinfo=UTC)
            per_job = tasks // JOBS
            t0 = time.perf_counter()
            for j in range(JOBS):
                vms = [q.QueuedVm(str(uuid.uuid4()), f"vm{j}-{i}") for i in range(per_job)]
                q.enqueue(db, q.Fire(f"job-{j}", "tick", fire_at, ("src", "dst")), vms)
            enqueue = time.perf_counter() - t0
        jobs = {f"job-{j}": 50 for j in range(JOBS)}
        port = urlsplit(server.url).port or 5432
        commits, cpu = _commits(server, name), _server_cpu(port)
        ctx = mp.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_work, args=(url, f"w{i}", jobs, start, out)) for i in range(workers)]
        for p in procs:
            p.start()
        time.sleep(2.0 + workers * 0.25)  # every worker registered and waiting
        t0 = time.perf_counter()
        start.set()
        results = [out.get(timeout=600) for _ in procs]
        wall = time.perf_counter() - t0
        for p in procs:
            p.join(60)
        time.sleep(1.0)  # the backends gone, their statistics and CPU with the postmaster
        cpu_after = _server_cpu(port)
        server_cpu = (cpu_after - cpu) if cpu is not None and cpu_after is not None else float("nan")
        commits = _commits(server, name) - commits
        lat = sorted(x for _, ls, _ in results for x in ls)
        beats = [x for _, _, bs in results for x in bs]
        done = len(lat)
        with StateDB(pg_location(url)) as db:
            rows = q.rows(db)
        assert done == per_job * JOBS == sum(r.outcome == "success" for r in rows), (done, len(rows))
        return {
            "workers": workers,
            "tasks": done,
            "enqueue_s": enqueue,
            "wall_s": wall,
            "per_s": done / wall,
            "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "beat_ms": 1000 * statistics.median(beats) if beats else 0.0,
            "busiest": max(len(ls) for _, ls, _ in results),
            "tx_per_task": commits / done,
            "server_ms": 1000 * server_cpu / done,
        }
    finally:
        with server.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def prune_round(server: PgServer, n: int) -> dict[str, float]:
    """``n`` finished runs (one task, one disk each; 1,000 VMs) written in bulk as 400 days old, then
    forgotten by `StateDB.prune_history` (what every hour of the daemon does, at a larger size)."""
    name = f"xencr_bench_{uuid.uuid4().hex[:8]}"
    with server.admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = server.database_url(name)
    try:
        with StateDB(pg_location(url)) as db:
            old = datetime.now(UTC) - timedelta(days=400)
            t0 = time.perf_counter()
            for first in range(1, n + 1, 10_000):
                ids = range(first, min(n, first + 9_999) + 1)
                at = [time_text(old + timedelta(seconds=i)) for i in ids]
                with db.transaction() as conn:
                    conn.execute(
                        runs.insert(),
                        [
                            dict(
                                id=i,
                                job_id=f"job-{i % JOBS}",
                                job_name=f"job-{i % JOBS}",
                                schedule_id="tick",
                                trigger="schedule",
                                started_at=t,
                                finished_at=t,
                                outcome="success",
                                host="bench",
                                pid=1,
                                worker=f"w{i % 4}",
                            )
                            for i, t in zip(ids, at, strict=True)
                        ],
                    )
                    conn.execute(
                        tasks.insert(),
                        [
                            dict(
                                id=i,
                                run_id=i,
                                vm_uuid=f"vm-{i % 1000}",
                                vm_name=f"vm{i % 1000}",
                                target_sr="sr",
                                started_at=t,
                                finished_at=t,
                                outcome="success",
                                transfer="delta",
                                bytes_sent=1 << 20,
                                target="dst/sr",
                                worker=f"w{i % 4}",
                            )
                            for i, t in zip(ids, at, strict=True)
                        ],
                    )
                    conn.execute(
                        task_disks.insert(), [dict(task_id=i, disk="0", reason="delta") for i in ids]
                    )
            written = time.perf_counter() - t0
            before = db.job_totals()
            t0 = time.perf_counter()
            forgotten = db.prune_history(timedelta(days=365))
            took = time.perf_counter() - t0
            assert db.job_totals() == before, "the counters are what they were"
            left = len(db.runs())
        # Every job's newest run and each VM's newest task stay: 1,000 VMs over 20 jobs.
        assert forgotten == n - left and left <= 1000 + JOBS, (forgotten, left)
        return {
            "runs": n,
            "forgotten": forgotten,
            "write_s": written,
            "prune_s": took,
            "per_s": forgotten / took,
        }
    finally:
        with server.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=2000, help="tasks per round (default 2000)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prune", type=int, default=100_000, help="runs to forget (default 100000; 0: skip)")
    args = ap.parse_args()
    root = None
    given = os.environ.get(PG_ENV)
    if given:
        server = PgServer(given, os.environ.get(PG_PASSWORD_ENV, ""))
    else:
        root = Path(tempfile.mkdtemp(prefix="xencr-pg-bench-"))
        cluster = pgcluster.start(root)
        os.environ[PG_ENV], os.environ[PG_PASSWORD_ENV] = cluster.url, cluster.password
        server = PgServer(cluster.url, cluster.password)
    try:
        rows = [round_of(server, n, args.tasks) for n in args.workers]
        pruned = prune_round(server, args.prune) if args.prune else None
    finally:
        if root is not None:
            pgcluster.stop(root)
            shutil.rmtree(root, ignore_errors=True)
    print(f"need: {RPO_TASKS_PER_SECOND:.1f} tasks/s (1,000 VMs at a 1-minute RPO)")
    print(f"queueing one fire: {args.tasks} VMs in {JOBS} jobs, {rows[0]['enqueue_s']:.2f} s")
    head = (
        "workers",
        "tasks",
        "wall s",
        "tasks/s",
        "p50 ms",
        "p99 ms",
        "beat ms",
        "x need",
        "tx/task",
        "db ms",
    )
    print(" ".join(f"{h:>8}" for h in head))
    for r in rows:
        print(
            f"{r['workers']:>8} {r['tasks']:>8} {r['wall_s']:>8.1f} {r['per_s']:>8.1f} {r['p50_ms']:>8.1f}"
            f" {r['p99_ms']:>8.1f} {r['beat_ms']:>8.1f} {r['per_s'] / RPO_TASKS_PER_SECOND:>8.1f}"
            f" {r['tx_per_task']:>8.1f} {r['server_ms']:>8.2f}"
        )
    db_ms = statistics.median(r["server_ms"] for r in rows)
    if db_ms == db_ms:  # measured (not NaN)
        print(
            f"database CPU per task {db_ms:.2f} ms: one server core coordinates ~{1000 / db_ms:.0f} tasks/s "
            f"({1000 / db_ms / RPO_TASKS_PER_SECOND:.0f}x what 1,000 VMs at a 1-minute RPO need)"
        )
    if pruned is not None:
        print(
            f"history: {pruned['forgotten']:.0f} of {pruned['runs']:.0f} runs forgotten"
            f" in {pruned['prune_s']:.1f} s"
            f" ({pruned['per_s']:.0f} runs/s; an hour of 1,000 VMs at a 1-minute RPO is 60,000 runs:"
            f" {60_000 / pruned['per_s']:.1f} s of pruning per hour)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
