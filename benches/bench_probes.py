#!/usr/bin/env python3
"""Run the xencr command line in this process with a probe, for replication_bench.py:

    python benches/bench_probes.py calls run JOB --config F --json   # wall time per XAPI call
    python benches/bench_probes.py heap run JOB --config F --json    # Python heap (tracemalloc)

`calls` times every `XapiSession.call` / `call_once` / `call_async` (by method), the logins and
logouts and the engine's relay, and prints them to stderr as one JSON line ``probe-calls {...}``.
`heap` traces Python allocations from the start, and prints ``probe-heap {...}``: the heap after
the imports, its peak during the command, and the source files that grew most between the imports
and the largest heap a sampling thread saw. Diagnostics only: each probe costs some time.
"""

from __future__ import annotations

import collections
import functools
import json
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))


def calls_probe() -> Callable[[], dict[str, Any]]:
    """Time the pools' calls and the relay; returns what reads the totals."""
    from xencr import _engine
    from xencr.xapi.session import XapiSession

    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    lock = threading.Lock()

    def add(label: str, seconds: float) -> None:
        with lock:
            entry = totals[label]
            entry[0] += 1
            entry[1] += seconds

    def timed(fn: Callable[..., Any], label: Callable[[tuple[Any, ...]], str]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                add(label(args), time.perf_counter() - t)

        return wrapper

    cls: Any = XapiSession
    cls.call = timed(cls.call, lambda a: str(a[1]))
    cls.call_once = timed(cls.call_once, lambda a: str(a[1]))
    cls.call_async = timed(cls.call_async, lambda a: f"Async.{a[1]} (until its task ends)")
    cls.__init__ = timed(cls.__init__, lambda a: "login")
    cls.logout = timed(cls.logout, lambda a: "logout")
    engine: Any = _engine
    engine.relay = timed(engine.relay, lambda a: "engine relay (the disk's stream)")
    return lambda: {k: {"n": int(v[0]), "s": round(v[1], 4)} for k, v in totals.items()}


def heap_probe() -> Callable[[], dict[str, Any]]:
    """Trace allocations (started before the imports); returns what reads the figures."""
    tracemalloc.start()
    import xencr.cli.app  # noqa: F401  (the imports, measured apart from the command)

    after_imports = tracemalloc.take_snapshot()
    imported = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    largest: list[Any] = [0, None]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now = tracemalloc.get_traced_memory()[0]
            # A snapshot costs a few hundred ms: only past a new high by 1 MiB.
            if now > largest[0] + 1024 * 1024:
                largest[0], largest[1] = now, tracemalloc.take_snapshot()
            time.sleep(0.05)

    threading.Thread(target=sample, name="heap-probe", daemon=True).start()

    def read() -> dict[str, Any]:
        stop.set()
        _, peak = tracemalloc.get_traced_memory()
        grew = []
        if largest[1] is not None:
            for stat in largest[1].compare_to(after_imports, "filename")[:6]:
                where = stat.traceback[0].filename
                grew.append({"file": where, "kib": round(stat.size_diff / 1024)})
        return {"imported": imported, "peak": peak, "sampled": largest[0], "grew": grew}

    return read


def main() -> None:
    kind, args = sys.argv[1], sys.argv[2:]
    read = {"calls": calls_probe, "heap": heap_probe}[kind]()
    from xencr.cli.app import main as xencr_main

    sys.argv = ["xencr", *args]
    try:
        xencr_main()
    finally:
        print(f"probe-{kind} {json.dumps(read())}", file=sys.stderr)


if __name__ == "__main__":
    main()
