#!/usr/bin/env python3
"""Engine benchmark (SPEC 12): throughput of allocated data against `dd` and `qemu-img`, and peak
RSS, on a seeded 2 GiB virtual disk with ~25% of its 2 MiB blocks allocated plus a differencing
child with ~10%.

    .venv/bin/python benches/engine_bench.py [--size 2G] [--reps 3] [--dir DIR] [--keep]

Every measured operation runs in its own child process (this script with ``--op``), so its peak
RSS (``ru_maxrss`` from ``wait4``) is its own; the time is measured inside the child around the
engine call only. Inputs are read once first, so every figure is page-cached; the best of
``--reps`` runs is kept. Outputs that are not inputs of a later step go to /dev/null, or to a
sparse file in a tmpfs when the operation needs a seekable file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

from xencr import _engine as eng  # noqa: E402
from xencr import pattern  # noqa: E402

BS = 2 << 20
TARGETS = {"transform": 5.0, "coalesce": 2.0}  # GB/s, SPEC 12
RSS_LIMIT_MB = 150


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.upper().rstrip("B").removesuffix("I")
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


# ----------------------------------------------------------------------------- child side


# Operations that leave their inputs unchanged repeat inside one child (the first call of a
# fresh process pays page-table and cache warm-up); the others get a fresh setup per run.
REPEATABLE = {"dd", "qemu-img", "transform", "export-full", "export-delta", "diff"}


def run_op(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one operation ``repeat`` times; return the fastest run and the data it moved."""
    runs = [run_once(spec) for _ in range(int(spec.get("repeat", 1)))]
    return min(runs, key=lambda r: float(r["seconds"]))


def run_once(spec: dict[str, Any]) -> dict[str, Any]:
    op, a = spec["op"], spec["args"]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        if op in ("dd", "qemu-img"):
            t0 = time.perf_counter()
            subprocess.run(a["argv"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return {"seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        if op == "transform":
            r = eng.transform(a["src"], devnull)
            moved = r["blocks"] * r["block_size"]
        elif op == "convert":
            c = eng.convert(a["src"], a["dst"], src_format="raw", dst_format="dynamic")
            moved = c["blocks_written"] * BS
        elif op in ("export-full", "export-delta"):
            r = eng.export_stream(a["src"], devnull, a.get("base"))
            moved = r["blocks"] * r["block_size"]
        elif op == "apply":
            r = eng.apply_stream(a["src"], a["dst"], target_format="raw")
            moved = r["sectors_written"] * 512
        elif op == "coalesce":
            m = eng.coalesce(a["child"], a["parent"])
            moved = m["bytes_merged"]
        elif op == "diff":
            d = eng.diff(a["a"], a["b"], granularity=64 << 10)
            moved = d["bytes_compared"]
        else:
            raise SystemExit(f"unknown op {op}")
        return {"seconds": time.perf_counter() - t0, "moved": moved}
    finally:
        os.close(devnull)


# ---------------------------------------------------------------------------- parent side


def in_child(op: str, args: dict[str, Any], repeat: int = 1) -> tuple[dict[str, Any], float]:
    """Run ``op`` in a fresh process; return its report and its peak RSS in MB."""
    p = subprocess.Popen(
        [sys.executable, __file__, "--op", json.dumps({"op": op, "args": args, "repeat": repeat})],
        stdout=subprocess.PIPE,
    )
    assert p.stdout is not None
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{op} failed with exit code {p.returncode}")
    return json.loads(out), usage.ru_maxrss / 1024


def warm(*paths: str) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass


def generate(d: str, size: int, seed: int, frac: float, child_frac: float) -> dict[str, Any]:
    """base.raw (pattern.py `random`), base.vhd (from it, timed later too), child.vhd."""
    nblocks = -(-size // BS)
    base_blocks = pattern.random_allocation(seed, nblocks, frac)
    raw = os.path.join(d, "base.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
        for i in base_blocks:
            f.seek(i * BS)
            f.write(pattern.random_block(seed, i, min(BS, size - i * BS)))
    base, child = os.path.join(d, "base.vhd"), os.path.join(d, "child.vhd")
    eng.convert(raw, base, src_format="raw", dst_format="dynamic")
    eng.create(child, size, parent=base)
    child_seed = seed + 1
    child_blocks = pattern.random_allocation(child_seed, nblocks, child_frac)
    for i in child_blocks:
        eng.write(child, i * BS, pattern.random_block(child_seed, i, min(BS, size - i * BS)))
    return {
        "raw": raw,
        "base": base,
        "child": child,
        "nblocks": nblocks,
        "base_blocks": len(base_blocks),
        "child_blocks": len(child_blocks),
    }


def best(op: str, args_for_rep: Any, reps: int) -> dict[str, Any]:
    if op in REPEATABLE:
        # Cheap to repeat, and the fastest of many runs filters out a busy shared machine.
        report, rss = in_child(op, args_for_rep, repeat=max(10, 2 * reps))
        report["rss_mb"] = rss
        return report
    runs = []
    for rep in range(reps):
        args = args_for_rep(rep) if callable(args_for_rep) else args_for_rep
        report, rss = in_child(op, args)
        report["rss_mb"] = rss
        runs.append(report)
    top = min(runs, key=lambda r: r["seconds"])
    top["rss_mb"] = max(r["rss_mb"] for r in runs)
    return top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="2G", help="virtual size (default 2G)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fraction", type=float, default=0.25, help="blocks allocated in the base")
    ap.add_argument("--child-fraction", type=float, default=0.10, help="blocks written in the child")
    ap.add_argument("--reps", type=int, default=3, help="runs per operation; the fastest counts")
    ap.add_argument("--dir", default=None, help="work directory on disk (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    opts = ap.parse_args()
    if opts.op:
        print(json.dumps(run_op(json.loads(opts.op))))
        return

    size = parse_size(opts.size)
    d = tempfile.mkdtemp(prefix="xencr-bench-", dir=opts.dir)
    shm = tempfile.mkdtemp(prefix="xencr-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else d)
    try:
        bench(opts, size, d, shm)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        if opts.keep:
            print(f"files kept in {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def bench(opts: argparse.Namespace, size: int, d: str, shm: str) -> None:
    print(f"generating a {size >> 20} MiB disk (seed {opts.seed}) in {d} ...", flush=True)
    t0 = time.perf_counter()
    g = generate(d, size, opts.seed, opts.fraction, opts.child_fraction)
    base_alloc = g["base_blocks"] * BS
    print(
        f"  base: {g['base_blocks']} of {g['nblocks']} blocks allocated "
        f"({100 * g['base_blocks'] / g['nblocks']:.1f}%), child: {g['child_blocks']} blocks "
        f"({100 * g['child_blocks'] / g['nblocks']:.1f}%), {time.perf_counter() - t0:.1f}s"
    )
    full, delta = os.path.join(d, "full.vhd"), os.path.join(d, "delta.vhd")
    eng.export_stream(g["base"], full)
    eng.export_stream(g["child"], delta, g["base"])
    warm(g["raw"], g["base"], g["child"], full, delta)

    results: list[tuple[str, dict[str, Any], int]] = []

    def record(name: str, op: str, args: Any, moved: int | None = None) -> None:
        r = best(op, args, opts.reps)
        results.append((name, r, moved if moved is not None else int(r.get("moved", 0))))
        print(f"  measured {name}: {r['seconds']:.3f}s", flush=True)

    record(
        "dd base.vhd > /dev/null",
        "dd",
        {"argv": ["dd", f"if={g['base']}", "of=/dev/null", "bs=4M"]},
        base_alloc,
    )
    qemu = shutil.which("qemu-img")
    if qemu:
        qraw = os.path.join(shm, "qemu.raw")
        record(
            "qemu-img convert vpc->raw",
            "qemu-img",
            {"argv": [qemu, "convert", "-f", "vpc", "-O", "raw", g["base"], qraw]},
            base_alloc,
        )
        os.unlink(qraw)

    record("transform (validate+digest)", "transform", {"src": full})

    def convert_args(rep: int) -> dict[str, Any]:
        dst = os.path.join(d, "conv.vhd")
        if os.path.exists(dst):
            os.unlink(dst)
        return {"src": g["raw"], "dst": dst}

    record("convert raw->dynamic", "convert", convert_args)
    record("export full stream", "export-full", {"src": g["child"]})
    record("export delta stream", "export-delta", {"src": g["child"], "base": g["base"]})

    def apply_args(rep: int) -> dict[str, Any]:
        dst = os.path.join(shm, "target.raw")
        with open(dst, "wb") as f:
            f.truncate(size)
        return {"src": delta, "dst": dst}

    record("apply delta stream", "apply", apply_args)
    os.unlink(os.path.join(shm, "target.raw"))

    def coalesce_args(where: str) -> Any:
        def args(rep: int) -> dict[str, Any]:
            m = os.path.join(where, f"merge{rep}")
            os.makedirs(m)
            for name in ("base.vhd", "child.vhd"):
                shutil.copyfile(os.path.join(d, name), os.path.join(m, name))
            # Flush the copies now, or the merge's own fsync would pay for writing them.
            os.sync()
            warm(os.path.join(m, "base.vhd"), os.path.join(m, "child.vhd"))
            return {"child": os.path.join(m, "child.vhd"), "parent": os.path.join(m, "base.vhd")}

        return args

    # On disk the merge's fsyncs (crash safety) wait for the device; on tmpfs they are free,
    # which shows the engine's own speed.
    record("coalesce child->base (disk)", "coalesce", coalesce_args(d))
    record("coalesce child->base (tmpfs)", "coalesce", coalesce_args(shm))
    for rep in range(opts.reps):
        shutil.rmtree(os.path.join(shm, f"merge{rep}"), ignore_errors=True)
    record("diff base child (64K)", "diff", {"a": g["base"], "b": g["child"]})

    report(results)


def report(results: list[tuple[str, dict[str, Any], int]]) -> None:
    by = {name: r for name, r, _ in results}
    dd_s = by["dd base.vhd > /dev/null"]["seconds"]
    dd_rate = next(m for n, _, m in results if n.startswith("dd")) / dd_s / 1e9
    q = [(r, m) for n, r, m in results if n.startswith("qemu")]
    q_rate = q[0][1] / q[0][0]["seconds"] / 1e9 if q else None
    print()
    head = f"{'operation':30} {'alloc data':>11} {'seconds':>8} {'GB/s':>7} {'x dd':>6} {'x qemu':>7}"
    print(f"{head} {'RSS MB':>7}  target")
    for name, r, moved in results:
        gbs = moved / r["seconds"] / 1e9 if r["seconds"] > 0 else float("inf")
        key = next((k for k in TARGETS if name.startswith(k)), None)
        verdict = ""
        if key:
            verdict = f">= {TARGETS[key]} GB/s: {'met' if gbs >= TARGETS[key] else 'MISSED'}"
        engine_op = not name.startswith(("dd", "qemu"))
        if engine_op and r["rss_mb"] >= RSS_LIMIT_MB:
            verdict += f" RSS >= {RSS_LIMIT_MB} MB: MISSED"
        qx = f"{gbs / q_rate:6.2f}x" if q_rate else "     -"
        # A baseline tool runs as a grandchild; its RSS is not the wrapper's, so none is shown.
        rss = f"{r['rss_mb']:7.1f}" if engine_op else f"{'-':>7}"
        print(
            f"{name:30} {moved / 1e9:9.3f}GB {r['seconds']:8.3f} {gbs:7.2f} {gbs / dd_rate:5.2f}x {qx} "
            f"{rss}  {verdict}"
        )
    peak = max(r["rss_mb"] for n, r, _ in results if not n.startswith(("dd", "qemu")))
    print(f"\npeak RSS of engine operations: {peak:.1f} MB (limit {RSS_LIMIT_MB} MB)")


if __name__ == "__main__":
    main()
