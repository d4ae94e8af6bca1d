#!/usr/bin/env python3
"""End-to-end delta replication between two simulated pools on loopback (SPEC 12), against
`curl` downloading the same export to /dev/null in the same session; plus peak RSS of the
replicating process for two disk sizes (memory must stay flat as the disk grows).

    .venv/bin/python benches/replication_bench.py [--size 2G] [--changed 0.25]

Each measured run replicates one VM whose disk had ``--changed`` of its 2 MiB blocks rewritten
since the previous restore point. Throughput counts the bytes of the delta stream.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from xencr.sim.harness import running_simulator  # noqa: E402
from xencr.xapi.session import Endpoint, XapiSession  # noqa: E402

MIB = 1 << 20
BLOCK = 2 * MIB
PASSWORD = "bench-password"


def parse_size(text: str) -> int:
    units = {"M": MIB, "G": 1024 * MIB}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def write_config(
    d: Path, urls: list[str], sr: str, *, verify_import: bool = True, state: Path | None = None
) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    pw = d / "pw"
    pw.write_text(PASSWORD)
    os.chmod(pw, 0o600)
    cfg = d / "xencr.toml"
    cfg.write_text(
        f'state = "{state or d / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{urls[0]}"\npassword_file = "{pw}"\n'
        f'[pools.b]\nurl = "{urls[1]}"\npassword_file = "{pw}"\n'
        f'[jobs.bench]\npool = "a"\nvms = ["vm0"]\nverify_import = {str(verify_import).lower()}\n'
        f'[[jobs.bench.targets]]\npool = "b"\nsr = "{sr}"\n'
        '[[jobs.bench.schedules]]\nevery = "10m"\nretention = 2\n'
    )
    return cfg


def dirty(s: XapiSession, fraction: float, size: int, seed: int) -> int:
    """Rewrite ``fraction`` of the disk's blocks (one sector each is enough to change a block)."""
    vm = s.api.VM.get_by_name_label("vm0")[0]
    vdi = next(s.api.VBD.get_VDI(b) for b in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(b) == "Disk")
    uuid = s.api.VDI.get_uuid(vdi)
    rng = random.Random(seed)
    blocks = [b for b in range(size // BLOCK) if rng.random() < fraction]
    for b in blocks:
        s.api.sim.write(uuid, str(b * BLOCK), "512", f"bench-{seed}-{b}")
    return len(blocks)


def disk_of(s: XapiSession, vm: str) -> str:
    return str(next(s.api.VBD.get_VDI(x) for x in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(x) == "Disk"))


def run_child(cfg: Path) -> tuple[float, int, dict[str, object]]:
    """One `run` in a child process: (seconds, peak RSS in KiB, report)."""
    code = (
        "import json,sys,time; from xencr.config import load_config; "
        "from xencr.replication.jobs import run_configured; t=time.perf_counter(); "
        f"r=run_configured(load_config({str(cfg)!r}), 'bench'); "
        "tr=r.vms[0].targets[0]; "
        "print(json.dumps({'s': time.perf_counter()-t, 'outcome': r.outcome, 'kind': tr.kind, "
        "'bytes': tr.bytes_sent, 'disk_s': sum(d.seconds for d in tr.disks)}))"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "python")),
    ).stdout
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    import json

    report = json.loads(out.strip().splitlines()[-1])
    return float(report["s"]), max(rss, before), report


def curl_export(s: XapiSession, url: str, snap_vdi: str, base_vdi: str) -> tuple[float, int]:
    q = f"session_id={s.ref}&vdi={snap_vdi}&base={base_vdi}&format=vhd"
    t = time.perf_counter()
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", f"{url}/export_raw_vdi?{q}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return time.perf_counter() - t, int(float(out))


def measure(size: int, changed: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="xencr-bench-") as tmp:
        d = Path(tmp)
        with running_simulator(
            d / "sim", pools=2, vms=1, disk_size=size, sr_size=8 * size, password=PASSWORD
        ) as sim:
            urls = sim.urls
            a = XapiSession(Endpoint(urls[0]), "root", PASSWORD)
            b = XapiSession(Endpoint(urls[1]), "root", PASSWORD)
            sr = b.api.SR.get_uuid(b.api.pool.get_default_SR(b.api.pool.get_all()[0]))
            cfg = write_config(d, urls, sr)
            dirty(a, 0.5, size, 1)
            run_child(cfg)  # first run: full
            n = dirty(a, changed, size, 2)
            seconds, rss, report = run_child(cfg)
            assert report["outcome"] == "success" and report["kind"] == "delta", report
            # curl: the same kind of export (a new snapshot against the previous one, with the same
            # share of changed blocks), straight to /dev/null.
            vm = a.api.VM.get_by_name_label("vm0")[0]
            base = max(a.api.VM.get_snapshots(vm), key=lambda r: a.api.VM.get_snapshot_time(r))
            n2 = dirty(a, changed, size, 3)
            new = a.call_async("VM.snapshot", vm, "curl")
            curl_s, curl_bytes = curl_export(a, urls[0], disk_of(a, new), disk_of(a, base))
            # The same delta without the read-back before the commit (verify_import = false): what
            # reading the attempt's blocks back from the target costs the whole run.
            # Same state and chain; each measured run sends a delta of its own `changed` share.
            plain = write_config(d / "plain", urls, sr, verify_import=False, state=d / "state.sqlite")
            run_child(plain)  # takes in the changes curl's snapshot made
            dirty(a, changed, size, 4)
            plain_s, _, plain_report = run_child(plain)
            checked = write_config(d / "checked", urls, sr, state=d / "state.sqlite")
            dirty(a, changed, size, 5)
            checked_s, _, checked_report = run_child(checked)
            assert plain_report["kind"] == checked_report["kind"] == "delta", (plain_report, checked_report)
            a.logout()
            b.logout()
    ours = float(report["bytes"]) / float(report["disk_s"])
    theirs = curl_bytes / curl_s
    return {
        "size": size,
        "blocks": n,
        "blocks_curl": n2,
        "bytes": float(report["bytes"]),
        "ours_Bps": ours,
        "curl_Bps": theirs,
        "ratio": ours / theirs,
        "run_s": seconds,
        "rss_mb": rss / 1024,
        "run_plain_s": plain_s,
        "run_checked_s": checked_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--changed", type=float, default=0.25)
    args = ap.parse_args()
    size = parse_size(args.size)
    for sz in (size // 4, size):
        r = measure(sz, args.changed)
        print(
            f"disk {sz >> 20} MiB, {int(r['blocks'])} changed blocks, delta {r['bytes'] / MIB:.0f} MiB: "
            f"xencr {r['ours_Bps'] / 1e9:.2f} GB/s, curl {r['curl_Bps'] / 1e9:.2f} GB/s, "
            f"ratio {r['ratio']:.2f} (target >= 0.70); whole run {r['run_s']:.1f}s; another delta "
            f"{r['run_checked_s']:.1f}s with the read-back, {r['run_plain_s']:.1f}s without; "
            f"peak RSS of the run {r['rss_mb']:.0f} MB (target < 150)"
        )


if __name__ == "__main__":
    main()
