#!/usr/bin/env python3
"""Seeding by files on loopback. The disk transfers of `xencr seed export` (a pool's export into
a VHD file, validated, digested, fsynced) against `curl` saving the same export to a file (then
fsynced), and of `xencr seed import` (the file into the other pool, validated and digested)
against `curl` PUTting the same file, measured in the same session; plus each whole command's
wall time (snapshot, manifest, read-back verification included) and peak RSS, for two sizes.

    .venv/bin/python benches/seed_bench.py [--size 2G] [--fill 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benches"))

from replication_bench import PASSWORD, dirty, disk_of, parse_size, write_config  # noqa: E402

from xencr.sim.harness import running_simulator  # noqa: E402
from xencr.xapi.files import download_vdi, upload_vdi  # noqa: E402
from xencr.xapi.session import Endpoint, XapiSession  # noqa: E402

MIB = 1 << 20


def child(args: list[str]) -> tuple[float, int]:
    """`xencr ARGS` in a child process: (seconds, peak RSS in KiB of the children so far)."""
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from xencr.cli.app import main; sys.argv[0] = 'xencr'; main()",
            *args,
        ],
        check=True,
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "python")),
    )
    return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def curl(args: list[str], fsync: Path | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(["curl", "-sf", *args], check=True, capture_output=True)
    if fsync is not None:
        fd = os.open(fsync, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t


def new_vdi(b: XapiSession, sr: str, size: int) -> str:
    return str(
        b.api.VDI.create(
            {
                "SR": b.api.SR.get_by_uuid(sr),
                "virtual_size": str(size),
                "type": "user",
                "sharable": False,
                "read_only": False,
                "other_config": {},
                "name_label": "bench",
                "name_description": "",
            }
        )
    )


def measure(size: int, fill: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="xencr-seed-bench-") as tmp:
        d = Path(tmp)
        with running_simulator(
            d / "sim", pools=2, vms=1, disk_size=size, sr_size=8 * size, password=PASSWORD
        ) as sim:
            a = XapiSession(Endpoint(sim.urls[0]), "root", PASSWORD)
            b = XapiSession(Endpoint(sim.urls[1]), "root", PASSWORD)
            sr = b.api.SR.get_uuid(b.api.pool.get_default_SR(b.api.pool.get_all()[0]))
            cfg = write_config(d, sim.urls, sr)
            dirty(a, fill, size, 1)
            seed = d / "seed"
            export_s, rss_export = child(
                ["seed", "export", "bench", "vm0", "--to", str(seed), "--config", str(cfg)]
            )
            m = json.loads((seed / "manifest.json").read_text())
            f = seed / m["disks"][0]["file"]
            vm = a.api.VM.get_by_name_label("vm0")[0]
            snap = a.call_async("VM.snapshot", vm, "bench")
            t = time.perf_counter()
            download_vdi(a, disk_of(a, snap), d / "ours.vhd")
            ours_get_s = time.perf_counter() - t
            q = f"session_id={a.ref}&vdi={disk_of(a, snap)}&format=vhd"
            curl_get_s = curl(
                ["-o", str(d / "curl.vhd"), f"{sim.urls[0]}/export_raw_vdi?{q}"], d / "curl.vhd"
            )
            import_s, rss_import = child(
                ["seed", "import", str(seed), "--pool", "b", "--sr", sr, "--config", str(cfg)]
            )
            t = time.perf_counter()
            upload_vdi(b, new_vdi(b, sr, size), f)
            ours_put_s = time.perf_counter() - t
            q = f"session_id={b.ref}&vdi={new_vdi(b, sr, size)}&format=vhd"
            curl_put_s = curl(["-H", "Expect:", "-T", str(f), f"{sim.urls[1]}/import_raw_vdi?{q}"])
            length = f.stat().st_size
            a.logout()
            b.logout()
    return {
        "length": length,
        "export_s": export_s,
        "import_s": import_s,
        "export_Bps": length / ours_get_s,
        "curl_get_Bps": length / curl_get_s,
        "import_Bps": length / ours_put_s,
        "curl_put_Bps": length / curl_put_s,
        "rss_export_mb": rss_export / 1024,
        "rss_import_mb": rss_import / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--fill", type=float, default=0.5, help="share of the disk's blocks written")
    args = ap.parse_args()
    size = parse_size(args.size)
    for sz in (size // 4, size):
        r = measure(sz, args.fill)
        print(
            f"disk {sz >> 20} MiB, file {r['length'] / MIB:.0f} MiB: "
            f"export {r['export_Bps'] / 1e9:.2f} GB/s vs curl to a file {r['curl_get_Bps'] / 1e9:.2f} GB/s "
            f"(ratio {r['export_Bps'] / r['curl_get_Bps']:.2f}); "
            f"import {r['import_Bps'] / 1e9:.2f} GB/s vs curl PUT {r['curl_put_Bps'] / 1e9:.2f} GB/s "
            f"(ratio {r['import_Bps'] / r['curl_put_Bps']:.2f}); "
            f"whole commands: export {r['export_s']:.1f}s, import with read-back {r['import_s']:.1f}s; "
            f"peak RSS export {r['rss_export_mb']:.0f} MB, import {r['rss_import_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
