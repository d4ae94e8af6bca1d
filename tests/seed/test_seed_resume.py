"""Seeding resumes inside a disk: a `seed export` killed mid-disk is resumed by the next one from
the block it had reached (less the window), writing only the rest, and its files verify against
the manifest; a `seed import` whose connection is cut mid-file resumes into the same VDI. The
replica equals the source snapshot."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from seedtest import config, default_sr, disk_vdis, hashes, invoke, vm
from xapitest import MIB, Pools

from xencr import _engine
from xencr.config import job_id_for
from xencr.replication.target import restore_points
from xencr.seed.manifest import PROGRESS

BLOCK = 2 * MIB
SIZE = 128 * MIB
SLOW = 48 * MIB  # bytes/s of the export to be killed
KILL_AT = 40  # of 64 blocks: past the 32-block window, so the next export resumes inside the disk


def _fill(pools: Pools) -> None:
    """vm1's disk: 128 MiB, every block written (the stream carries 64 blocks)."""
    s = pools.session(0)
    vdi = disk_vdis(s, vm(s, "vm1"))["0"]
    s.api.VDI.resize(vdi, str(SIZE))
    uuid = s.api.VDI.get_uuid(vdi)
    for b in range(SIZE // BLOCK):
        s.api.sim.write(uuid, str(b * BLOCK), str(BLOCK), f"seed-{b}")


def _position(seed: Path) -> int:
    try:
        state = json.loads((seed / PROGRESS).read_text())
    except (OSError, ValueError):
        return 0
    return int(state.get("partial", {}).get("0", {}).get("position", 0))


def _kill_mid_disk(args: list[str], seed: Path) -> int:
    """Run `xencr ARGS` in another process, SIGKILL it once the progress file records the disk
    past `KILL_AT` blocks; the position recorded."""
    code = f"import sys; from xencr.cli.app import main; sys.argv = ['xencr', *{args!r}]; main()"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 90
        while _position(seed) < KILL_AT:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the export never got that far"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.stderr:
            proc.stderr.close()
    return _position(seed)


def _file_digests(path: Path) -> list[list[object]]:
    with open(os.devnull, "wb") as sink:
        r = _engine.transform(str(path), sink.fileno())
    return [[b, h] for b, h in r["digests"]]


def test_killed_export_resumes_inside_the_disk_and_a_cut_import_resumes(pools: Pools, tmp_path: Path) -> None:
    src, ts = pools.session(0), pools.session(1)
    _fill(pools)
    cfg = config(tmp_path, pools, job="inside", vms='["vm1"]')
    seed = tmp_path / "seed"
    args = ["seed", "export", "inside", "vm1", "--to", str(seed), "--config", str(cfg)]
    src.api.sim.fault_rate(str(SLOW))
    try:
        recorded = _kill_mid_disk(args, seed)
    finally:
        src.api.sim.fault_rate("0")
    assert (seed / "disk-0.vhd.partial").is_file() and not (seed / "manifest.json").exists()

    code, _, err = invoke(*args)
    assert code == 0, err
    assert re.search(r"resumed disk 0 at \d+%: [\d.]+ MiB left", err), err
    m = json.loads((seed / "manifest.json").read_text())
    (d,) = m["disks"]
    again = re.search(r"resumed at block (\d+): (\d+) bytes written by this run", err)
    assert again, err
    start, written = int(again[1]), int(again[2])
    assert start == recorded - 32, (start, recorded)
    # Only the blocks from the resume point on were written again.
    blocks = SIZE // BLOCK
    data_start = d["length"] - blocks * (BLOCK + 512) - 512
    assert written == d["length"] - data_start - start * (BLOCK + 512), (written, d["length"])
    assert written < d["length"]
    # The file is the snapshot's disk, block for block as the manifest says.
    f = seed / d["file"]
    assert _file_digests(f) == d["digests"] and len(d["digests"]) == blocks
    snap = src.api.VM.get_by_uuid(m["snapshot_uuid"])
    assert _engine.sha256(str(f)) == hashes(src, snap)["0"]
    assert not (seed / PROGRESS).exists()

    # The import's connection is cut at 3/4: it resumes into the same VDI, inside the disk.
    ts.api.sim.fault_drop_after("import", str(d["length"] * 3 // 4))
    sr = ts.api.SR.get_uuid(default_sr(ts))
    code, _, err = invoke("seed", "import", str(seed), "--pool", "b", "--sr", sr, "--config", str(cfg))
    assert code == 0, err
    cut = re.search(r"connection cut.*resumed disk 0 at (\d+)%: [\d.]+ MiB left", err)
    assert cut and int(cut[1]) > 0, err
    # Sent again: the window, and the block that was being read when the connection went.
    sent = re.search(r"disk 0: ([\d.]+) MiB sent", err)
    assert sent and float(sent[1]) * MIB <= d["length"] + 64 * MIB + BLOCK + MIB / 10, err
    assert "every block equals the export" in err
    (rp,) = restore_points(ts, job_id_for("inside"), m["vm_uuid"], sr)
    assert hashes(ts, ts.api.VM.get_by_uuid(rp.uuid)) == hashes(src, snap)
