#!/usr/bin/env python3
"""NBD reader benchmark (issue 15): the engine's `nbd_copy` with 1, 2, 4 and 8 connections
against `nbdcopy` (libnbd-bin, the reference client) with the same connection count, reading the
same units from the same nbdkit, each connection limited by nbdkit's rate filter.

    .venv/bin/python benches/nbd_engine_bench.py [--size 2G] [--rate 100] [--burst 0.2]
        [--conns 1,2,4,8] [--patterns full,blocks,scattered,database] [--block-size 2M]
        [--clients nbd_copy,nbdcopy] [--dir DIR] [--keep]

A 2 GiB sparse-ish disk (40% of its 2 MiB blocks allocated) and the issue's three change patterns:
``blocks`` (25% of the 2 MiB blocks rewritten whole), ``scattered`` (25% of the 64 KiB units,
at random), ``database`` (one 64 KiB unit in every 2 MiB block); ``full`` copies the allocated
disk. A delta is read by `nbd_copy` from the whole new disk with the CBT bitmap of the pattern;
`nbdcopy` cannot take a bitmap, so it reads a disk holding only the changed units (the same bytes,
found by block status, which both clients use for ``full``).

``--rate`` is per connection in MB/s (10^6 bytes); nbdkit's rate filter counts **bits**, so
100 MB/s is ``connection-rate=800M``. Each run gets a fresh nbdkit with the stats filter, whose
"read" bytes (what was asked, holes included) are the server-side figure; the engine's own
``bytes_in`` is the payload that crossed the wire (holes come back as hole chunks). The client
runs in its own process (this script with ``--op``, or nbdcopy): CPU seconds (user + sys) and peak
RSS come from ``wait4``; CPU s/GB divides by the bytes read. The engine writes its VHD stream to
/dev/null (the stream is built and digested, not sent).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

UNIT = 64 * 1024
BLOCK = 2 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.upper().rstrip("B").removesuffix("I")
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


# ----------------------------------------------------------------------------- child side


def run_op(spec: dict[str, Any]) -> dict[str, Any]:
    """One `nbd_copy` in this process: connect, copy, report."""
    from xencr import _engine as eng

    socks = [socket.create_connection(("127.0.0.1", spec["port"])) for _ in range(spec["conns"])]
    for s in socks:
        s.settimeout(None)
    changed = bytes.fromhex(spec["changed"]) if spec.get("changed") else None
    out = os.open(os.devnull, os.O_WRONLY)
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    r = eng.nbd_copy([s.fileno() for s in socks], "", out, changed=changed, block_size=spec["block_size"])
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    os.close(out)
    cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    keep = ("bytes_in", "bytes_out", "blocks", "units", "unit_bytes", "sectors_written")
    return {"seconds": seconds, "cpu": cpu, **{k: r[k] for k in keep}}  # type: ignore[literal-required]


# ---------------------------------------------------------------------------- parent side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nbdkit:
    """A fresh read-only nbdkit on one file, rate-limited per connection, counting reads."""

    def __init__(self, disk: Path, rate_mb: int, work: Path, burst: float) -> None:
        self.port = free_port()
        self.stats = work / f"stats-{self.port}.txt"
        pid = work / f"nbdkit-{self.port}.pid"
        argv = [
            "nbdkit", "-f", "-r", "-P", str(pid), "-i", "127.0.0.1", "-p", str(self.port),
            "--filter=stats", "--filter=rate", "file", str(disk),
            f"statsfile={self.stats}", f"connection-rate={rate_mb * 8}M", f"burstiness={burst}",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not pid.exists() or not pid.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.02)

    def stop(self) -> int:
        """Stop it; the bytes it was asked to read."""
        self.proc.terminate()
        self.proc.wait()
        text = self.stats.read_text() if self.stats.exists() else ""
        m = re.search(r"^read: \d+ ops, [\d.]+ s, ([\d.]+) (\w+)", text, re.M)
        if not m:
            return 0
        scale = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]
        return int(float(m.group(1)) * scale)


def run_child(argv: list[str], stdin: str | None = None) -> tuple[str, float, float, int]:
    """Run argv (``stdin`` fed to it), reaping it ourselves so that its rusage is its own: its
    stdout, wall seconds, CPU seconds (user + sys) and peak RSS (KiB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    if stdin is not None:
        p.stdin.write(stdin.encode())
    p.stdin.close()
    out = p.stdout.read().decode()
    err = p.stderr.read().decode()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{argv[0]} failed ({p.returncode}): {err.strip()[-500:]}")
    return out, wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss


@dataclass
class Dataset:
    name: str
    new: Path  # what nbd_copy reads (with the bitmap for a delta)
    view: Path  # what nbdcopy reads: only the units to copy
    changed: bytes | None
    units: list[int]


def write_units(f: Any, units: list[int], chunk: bytes) -> None:
    for u in units:
        f.seek(u * UNIT)
        f.write(chunk[(u * 7919) % 16 * 4096 :][:UNIT].ljust(UNIT, b"\x5a"))


def make_datasets(work: Path, size: int, patterns: list[str]) -> list[Dataset]:
    rnd = random.Random(15)
    chunk = rnd.randbytes(BLOCK)
    n_blocks, n_units = size // BLOCK, size // UNIT
    upb = BLOCK // UNIT
    allocated = sorted(rnd.sample(range(n_blocks), int(n_blocks * 0.4)))
    base_units = [b * upb + i for b in allocated for i in range(upb)]
    out = []
    for name in patterns:
        if name == "full":
            changed_units = base_units
        elif name == "blocks":
            blocks = sorted(rnd.sample(range(n_blocks), n_blocks // 4))
            changed_units = [b * upb + i for b in blocks for i in range(upb)]
        elif name == "scattered":
            changed_units = sorted(rnd.sample(range(n_units), n_units // 4))
        elif name == "database":
            changed_units = [b * upb + rnd.randrange(upb) for b in range(n_blocks)]
        else:
            raise SystemExit(f"unknown pattern {name}")
        new = work / f"{name}-new.raw"
        view = work / f"{name}-view.raw"
        with open(new, "wb") as f:
            f.truncate(size)
            write_units(f, base_units, chunk)
            if name != "full":
                write_units(f, changed_units, chunk[::-1])
        with open(view, "wb") as f:
            f.truncate(size)
            write_units(f, changed_units, chunk[::-1] if name != "full" else chunk)
        bm = None
        if name != "full":
            b = bytearray((n_units + 7) // 8)
            for u in changed_units:
                b[u // 8] |= 0x80 >> (u % 8)
            bm = bytes(b)
        out.append(Dataset(name, new, view, bm, changed_units))
    return out


def bench(
    ds: Dataset, client: str, conns: int, rate: int, burst: float, block_size: int, work: Path
) -> dict[str, Any]:
    srv = Nbdkit(ds.new if client == "nbd_copy" else ds.view, rate, work, burst)
    try:
        if client == "nbd_copy":
            changed = ds.changed.hex() if ds.changed else None
            spec = {"port": srv.port, "conns": conns, "changed": changed, "block_size": block_size}
            out, _, _, rss = run_child([sys.executable, __file__, "--op"], json.dumps(spec))
            r = json.loads(out)
            # The call's own CPU (all its threads), not the interpreter's start.
            seconds, payload, cpu = r["seconds"], r["bytes_in"], r["cpu"]
            stream = r["bytes_out"]
        else:
            # nbdcopy runs one connection per thread, its threads defaulting to the cores: ask for
            # as many threads as connections, or "4 connections" would be 2 here.
            argv = [
                "nbdcopy",
                f"--connections={conns}",
                f"--threads={conns}",
                f"nbd://127.0.0.1:{srv.port}",
                "null:",
            ]
            _, seconds, cpu, rss = run_child(argv)
            payload, stream = None, None
    finally:
        asked = srv.stop()
    read = payload if payload is not None else asked
    return {
        "pattern": ds.name,
        "client": client,
        "conns": conns,
        "asked": asked,
        "payload": payload,
        "stream": stream,
        "seconds": seconds,
        "mbps": read / seconds / 1e6 if seconds else 0.0,
        "cpu_per_gb": cpu / (read / 1e9) if read else 0.0,
        "rss_mib": rss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--rate", type=int, default=100, help="MB/s per connection (default 100)")
    ap.add_argument(
        "--burst",
        type=float,
        default=0.2,
        help="nbdkit's burstiness, seconds at the rate a connection may burst (its default 2.0 lets a"
        " fresh connection read 200 MB before the limit bites)",
    )
    ap.add_argument("--conns", default="1,2,4,8")
    ap.add_argument(
        "--block-size",
        default="2M",
        help="the engine's output VHD block size (XAPI's is 2M; with 64K a changed unit costs 64 KiB)",
    )
    ap.add_argument("--clients", default="nbd_copy,nbdcopy")
    ap.add_argument("--patterns", default="full,blocks,scattered,database")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.op:
        print(json.dumps(run_op(json.loads(sys.stdin.read()))))
        return
    for tool in ("nbdkit", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required: apt-get install nbdkit libnbd-bin")
    size = parse_size(args.size)
    work = Path(args.dir or tempfile.mkdtemp(prefix="xencr-nbd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    conns = [int(c) for c in args.conns.split(",")]
    try:
        t0 = time.perf_counter()
        datasets = make_datasets(work, size, args.patterns.split(","))
        made = time.perf_counter() - t0
        limit = f"{args.rate} MB/s per connection, burst {args.burst} s"
        print(f"# disk {size >> 20} MiB; {limit}; data made in {made:.0f} s")
        print(f"# the engine's output blocks: {args.block_size}")
        code = f"import sys; sys.path.insert(0, {str(ROOT / 'python')!r}); import xencr._engine"
        idle = run_child([sys.executable, "-c", code])[3]
        print(f"# an idle child with the engine loaded: {idle / 1024:.1f} MiB RSS (included below)")
        print(
            "# units: the changed (or allocated) 64 KiB units; XAPI stream: what the 2 MiB-granular"
            " export moves; read: bytes that crossed the NBD link; stream: the engine's VHD output;"
            " MB/s: units per second (useful bytes)"
        )
        print(
            f"{'pattern':<10} {'client':<9} {'conns':>5} {'units MiB':>9} {'XAPI stream':>11} "
            f"{'read MiB':>9} {'stream MiB':>10} {'time s':>7} {'MB/s':>7} {'CPU s/GB':>8} {'RSS MiB':>7}"
        )
        for ds in datasets:
            units = len(ds.units) * UNIT
            xapi = len({u * UNIT // BLOCK for u in ds.units}) * (BLOCK + 512)
            for client in args.clients.split(","):
                for n in conns:
                    r = bench(ds, client, n, args.rate, args.burst, parse_size(args.block_size), work)
                    read = r["payload"] if r["payload"] is not None else r["asked"]
                    stream = f"{r['stream'] / 2**20:10.1f}" if r["stream"] is not None else f"{'-':>10}"
                    print(
                        f"{ds.name:<10} {client:<9} {n:>5} {units / 2**20:9.1f} {xapi / 2**20:11.1f} "
                        f"{read / 2**20:9.1f} {stream} {r['seconds']:7.2f} {units / r['seconds'] / 1e6:7.1f} "
                        f"{r['cpu_per_gb']:8.2f} {r['rss_mib']:7.1f}",
                        flush=True,
                    )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
