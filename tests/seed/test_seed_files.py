"""The two-command seed: `xencr seed export` writes VHD files and a manifest, `xencr seed import`
makes the restore point from them on the other side; the next run is a delta. Damaged files
are refused, interrupted commands resume or restart, and nothing is left half-linked."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from seedtest import config, default_sr, disk_vdis, hashes, invoke, vm
from xapitest import MIB, Pools

from xencr import _engine
from xencr.config import job_id_for
from xencr.replication import metadata as md
from xencr.replication.target import restore_points
from xencr.xapi.session import XapiSession


def _target_objects(ts: XapiSession) -> tuple[set[str], set[str]]:
    vdis = {v for v, r in ts.api.VDI.get_all_records().items() if r["managed"]}
    return set(ts.api.VM.get_all()), vdis


def _seed_snapshots(src: XapiSession, name: str, job: str) -> list[str]:
    out = []
    for x in src.api.VM.get_snapshots(vm(src, name)):
        oc = src.api.VM.get_other_config(x)
        if md.SEED in oc and oc.get(md.JOB) == job_id_for(job):
            out.append(src.api.VM.get_uuid(x))
    return out


def _points(src: XapiSession, ts: XapiSession, job: str, name: str) -> list[str]:
    sr_uuid = ts.api.SR.get_uuid(default_sr(ts))
    vm_uuid = src.api.VM.get_uuid(vm(src, name))
    return [p.uuid for p in restore_points(ts, job_id_for(job), vm_uuid, sr_uuid)]


def test_export_import_then_delta(pools: Pools, tmp_path: Path) -> None:
    src, ts = pools.session(0), pools.session(1)
    cfg = config(tmp_path, pools, job="carry")
    seed = tmp_path / "usb" / "vm0"
    code, out, err = invoke("seed", "export", "carry", "vm0", "--to", str(seed), "--config", str(cfg))
    assert code == 0, err
    m = json.loads((seed / "manifest.json").read_text())
    [snap_uuid] = _seed_snapshots(src, "vm0", "carry")
    assert m["snapshot_uuid"] == snap_uuid and m["job_id"] == job_id_for("carry")
    snap = src.api.VM.get_by_uuid(snap_uuid)
    # Each file is a VHD that reads back as the snapshot's disk, with our reader and qemu-img's.
    for d in m["disks"]:
        f = seed / d["file"]
        assert _engine.check(str(f)) == []
        source_vdi = disk_vdis(src, snap)[d["userdevice"]]
        assert _engine.sha256(str(f)) == src.api.sim.hash(src.api.VDI.get_uuid(source_vdi))
        raw = tmp_path / "raw"
        subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(f), str(raw)], check=True)
        assert hashlib.sha256(raw.read_bytes()[: d["virtual_size"]]).hexdigest() == _engine.sha256(str(f))
    # Until the seed is imported, the job does not push the full copy over the network.
    code, out, err = invoke("run", "carry", "--config", str(cfg))
    assert code == 1 and "seed import" in out + err, (out, err)
    assert "retrying" not in out + err  # a refusal, not a data-path failure
    assert _points(src, ts, "carry", "vm0") == []
    # The other site: import, verified; the restore point equals the snapshot.
    sr_uuid = ts.api.SR.get_uuid(default_sr(ts))
    code, out, err = invoke("seed", "import", str(seed), "--pool", "b", "--sr", sr_uuid, "--config", str(cfg))
    assert code == 0, err
    assert "every block equals the export" in err
    [rp] = _points(src, ts, "carry", "vm0")
    replica = ts.api.VM.get_by_uuid(rp)
    assert hashes(ts, replica) == hashes(src, snap)
    assert ts.api.VM.get_blocked_operations(replica)["start"] == md.START_BLOCKED
    # Importing again changes nothing.
    code, out, err = invoke(
        "seed", "import", str(seed), "--pool", "b", "--sr", default_sr_name(ts), "--config", str(cfg)
    )
    assert code == 0 and "already imported" in err and _points(src, ts, "carry", "vm0") == [rp]
    # The next run is a delta of the one block the guest wrote.
    src.api.sim.write(src.api.VDI.get_uuid(disk_vdis(src, vm(src, "vm0"))["0"]), str(7 * MIB), "512", "post")
    code, out, err = invoke("run", "carry", "--config", str(cfg), "--json")
    assert code == 0, err
    t = json.loads(out)["vms"][0]["targets"][0]
    assert t["kind"] == "delta" and [d["blocks"] for d in t["disks"]] == [1]
    new_snap = src.api.VM.get_by_uuid(json.loads(out)["vms"][0]["snapshot"])
    assert hashes(ts, ts.api.VM.get_by_uuid(t["restore_point"])) == hashes(src, new_snap)
    assert _seed_snapshots(src, "vm0", "carry") == []  # the chain moved past the seed: pruned


def default_sr_name(ts: XapiSession) -> str:
    return str(ts.api.SR.get_name_label(default_sr(ts)))


@pytest.mark.parametrize("where", ["data", "header"])
def test_damaged_file_is_refused(pools: Pools, tmp_path: Path, where: str) -> None:
    src, ts = pools.session(0), pools.session(1)
    cfg = config(tmp_path, pools, job=f"damaged-{where}", vms='["vm1"]')
    seed = tmp_path / "seed"
    src.api.sim.write(src.api.VDI.get_uuid(disk_vdis(src, vm(src, "vm1"))["0"]), str(MIB), "4096", "x")
    code, _, err = invoke(
        "seed", "export", f"damaged-{where}", "vm1", "--to", str(seed), "--config", str(cfg)
    )
    assert code == 0, err
    m = json.loads((seed / "manifest.json").read_text())
    f = seed / m["disks"][0]["file"]
    data = bytearray(f.read_bytes())
    at = len(data) - 512 - 100 if where == "data" else 512 + 20  # last block's data / the header
    data[at] ^= 0xFF
    f.write_bytes(bytes(data))
    before = _target_objects(ts)
    code, _, err = invoke(
        "seed", "import", str(seed), "--pool", "b", "--sr", default_sr_name(ts), "--config", str(cfg)
    )
    assert code == 1
    line = err.strip().splitlines()[-1]
    expected = "differ from the manifest" if where == "data" else "checksum"
    assert line.startswith("xencr: error:") and expected in line, err
    assert _points(src, ts, f"damaged-{where}", "vm1") == []
    assert _target_objects(ts) == before, "nothing left behind"


def _spawn(args: list[str], hold: str, tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    marker = tmp / f"held-{hold}"
    env = dict(os.environ) | {"XENCR_TEST_HOLD": hold, "XENCR_TEST_HOLD_FILE": str(marker)}
    code = f"import sys; from xencr.cli.app import main; sys.argv = ['xencr', *{args!r}]; main()"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE), marker


def _kill_at(proc: subprocess.Popen[bytes], marker: Path) -> None:
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the command never reached its hold point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def test_interrupted_export_resumes_on_the_same_snapshot(pools: Pools, tmp_path: Path) -> None:
    src = pools.session(0)
    cfg = config(tmp_path, pools, job="resume-export", vms='["vm1"]')
    seed = tmp_path / "seed"
    proc, marker = _spawn(["seed", "export", "resume-export", "vm1", "--to", str(seed), "--config", str(cfg)],
                          "seed-export-disk", tmp_path)  # fmt: skip
    _kill_at(proc, marker)
    assert not (seed / "manifest.json").exists()
    [snap] = _seed_snapshots(src, "vm1", "resume-export")
    code, _, err = invoke("seed", "import", str(seed), "--pool", "b", "--sr", "x", "--config", str(cfg))
    assert code == 1 and "did not finish" in err
    code, _, err = invoke("seed", "export", "resume-export", "vm1", "--to", str(seed), "--config", str(cfg))
    assert code == 0, err
    assert "resuming" in err
    assert json.loads((seed / "manifest.json").read_text())["snapshot_uuid"] == snap
    assert _seed_snapshots(src, "vm1", "resume-export") == [snap]


@pytest.mark.parametrize("point", ["seed-import-transfer", "seed-import-commit"])
def test_interrupted_import_restarts_cleanly(pools: Pools, tmp_path: Path, point: str) -> None:
    src, ts = pools.session(0), pools.session(1)
    job = f"resume-{point[-6:]}"
    cfg = config(tmp_path, pools, job=job, vms='["vm1"]')
    seed = tmp_path / "seed"
    code, _, err = invoke("seed", "export", job, "vm1", "--to", str(seed), "--config", str(cfg))
    assert code == 0, err
    before = _target_objects(ts)
    args = ["seed", "import", str(seed), "--pool", "b", "--sr", default_sr_name(ts), "--config", str(cfg)]
    proc, marker = _spawn(args, point, tmp_path)
    _kill_at(proc, marker)
    assert _points(src, ts, job, "vm1") == [], "a killed import is no restore point"
    code, _, err = invoke(*args)
    assert code == 0, err
    assert "cleaned up: incomplete replica" in err
    [rp] = _points(src, ts, job, "vm1")
    vms, vdis = _target_objects(ts)
    replica = ts.api.VM.get_by_uuid(rp)
    own = set(disk_vdis(ts, replica).values())
    own |= {s for v in own for s in ts.api.VDI.get_snapshots(v)}
    assert vms == before[0] | {replica} and vdis == before[1] | own, "nothing but the restore point was added"
    snap = src.api.VM.get_by_uuid(json.loads((seed / "manifest.json").read_text())["snapshot_uuid"])
    assert hashes(ts, replica) == hashes(src, snap)
