"""Resumable transfers (`replication.resume`): a dropped connection resumes inside the disk, a
killed run is resumed by the next one, and any change to what the attempt was made of cleans it up
and starts over, saying why. Every replica's disks hash equal to the source snapshot's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from xapitest import MIB, PASSWORD, Pools

from xencr.config import Config, load_config
from xencr.replication import metadata as md
from xencr.replication import preview
from xencr.replication.jobs import connected, run_configured
from xencr.replication.resume import WINDOW
from xencr.replication.runner import DiskResult, RunReport
from xencr.replication.verify import verify_replica
from xencr.state import ResumeRow, StateDB
from xencr.xapi.session import XapiSession

JOB = "res"
BLOCK = 2 * MIB
SIZE = 512 * MIB
DATA = [2 * i for i in range(128)]  # 128 whole blocks written: a full's stream carries 256 MiB
SLOW = 96 * MIB  # bytes/s while a run is to be killed mid-stream


@dataclass
class Env:
    pools: Pools
    cfg: Path
    state: Path
    job_id: str
    vm_uuid: str
    sr_uuid: str

    @property
    def config(self) -> Config:
        return load_config(self.cfg)

    def row(self) -> ResumeRow | None:
        with StateDB(self.state) as db:
            return db.resume_of(self.job_id, self.vm_uuid, self.sr_uuid)


def _disk(s: XapiSession, vm: str) -> str:
    return str(next(s.api.VBD.get_VDI(b) for b in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(b) == "Disk"))


def _write(pools: Pools, seed: str, blocks: list[int]) -> None:
    s = pools.session(0)
    uuid = s.api.VDI.get_uuid(_disk(s, s.api.VM.get_by_name_label("vm0")[0]))
    for b in blocks:
        s.api.sim.write(uuid, str(b * BLOCK), str(BLOCK), f"{seed}-{b}")


@pytest.fixture(scope="module")
def env(pools: Pools, tmp_path_factory: pytest.TempPathFactory) -> Env:
    tmp = tmp_path_factory.mktemp("resume")
    pw = tmp / "pw"
    pw.write_text(PASSWORD)
    os.chmod(pw, 0o600)
    s, t = pools.session(0), pools.session(1)
    sr = t.api.SR.get_uuid(t.api.pool.get_default_SR(t.api.pool.get_all()[0]))
    cfg = tmp / "xencr.toml"
    cfg.write_text(
        f'state = "{tmp / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{pools.urls[0]}"\npassword_file = "{pw}"\n'
        f'[pools.b]\nurl = "{pools.urls[1]}"\npassword_file = "{pw}"\n'
        f'[jobs.{JOB}]\npool = "a"\nvms = ["vm0"]\n'
        f'[[jobs.{JOB}.targets]]\npool = "b"\nsr = "{sr}"\n'
        f'[[jobs.{JOB}.schedules]]\nevery = "15m"\nretention = 3\n'
    )
    vm = s.api.VM.get_by_name_label("vm0")[0]
    s.api.VDI.resize(_disk(s, vm), str(SIZE))
    _write(pools, "first", DATA)
    e = Env(pools, cfg, tmp / "state.sqlite", load_config(cfg).job(JOB).id, s.api.VM.get_uuid(vm), sr)
    assert run_configured(e.config, JOB).outcome == "success"
    return e


def _run(e: Env, *, full: bool = False) -> tuple[RunReport, list[str]]:
    lines: list[str] = []
    report = run_configured(e.config, JOB, full=full, progress=lines.append)
    return report, lines


def _only_disk(report: RunReport) -> DiskResult:
    tr = report.vms[0].targets[0]
    assert tr.outcome == "success", (tr.error, tr.warnings)
    (d,) = tr.disks
    return d


def _hashes_equal(e: Env, report: RunReport) -> None:
    s, t = e.pools.session(0), e.pools.session(1)
    vr = report.vms[0]
    snap = s.api.VM.get_by_uuid(vr.snapshot)
    rp = t.api.VM.get_by_uuid(vr.targets[0].restore_point)
    assert t.api.sim.hash(t.api.VDI.get_uuid(_disk(t, rp))) == s.api.sim.hash(
        s.api.VDI.get_uuid(_disk(s, snap))
    )


def _verified(e: Env, report: RunReport) -> None:
    t = e.pools.session(1)
    with StateDB(e.state) as db:
        checks = verify_replica(t, t.api.VM.get_by_uuid(report.vms[0].targets[0].restore_point), db)
    assert checks and all(c.ok for c in checks), [c.detail for c in checks]


def _no_orphans(e: Env) -> None:
    """Every replica VM and disk of the job on the target is complete: nothing of an attempt stays."""
    t = e.pools.session(1)
    for r in t.api.VM.get_all_records().values():
        if r["other_config"].get(md.JOB) == e.job_id and not r["is_a_snapshot"]:
            assert r["other_config"].get(md.COMPLETE) == "true" or md.DETACHED in r["other_config"], r["uuid"]
    for r in t.api.VDI.get_all_records().values():
        oc = r["other_config"]
        if r["managed"] and oc.get(md.JOB) == e.job_id and oc.get(md.ROLE) == "replica-disk":
            assert oc.get(md.COMPLETE) == "true" or md.DETACHED in oc, r["uuid"]
    assert e.row() is None, "no attempt is left recorded"


def _stream_length() -> int:
    """A full of vm0's disk: footer, header, BAT (one entry per 2 MiB), each block with its
    one-sector bitmap, footer."""
    bat = -(-(SIZE // BLOCK) * 4 // 512) * 512
    return 512 + 1024 + bat + len(DATA) * (BLOCK + 512) + 512


@pytest.mark.parametrize(("side", "fractions"), [("export", (0.3, 0.8)), ("import", (0.6,))])
def test_a_dropped_connection_resumes_inside_the_disk(
    env: Env, side: str, fractions: tuple[float, ...]
) -> None:
    length = _stream_length()
    for fraction in fractions:
        env.pools.session(0 if side == "export" else 1).api.sim.fault_drop_after(
            side, str(int(length * fraction))
        )
        report, lines = _run(env, full=True)
        d = _only_disk(report)
        assert d.drops == 1 and "resumed after 1 dropped connection" in d.reason, (d.reason, lines)
        assert not report.vms[0].targets[0].warnings, "resumed, not retried from zero"
        # What was sent in all: the stream once, plus at most the window again.
        assert length <= d.bytes_sent <= length + WINDOW, (d.bytes_sent, length)
        _hashes_equal(env, report)
        _no_orphans(env)


def _killed(e: Env, until: Callable[[ResumeRow], bool], *, full: bool = True) -> ResumeRow:
    """Start a run (slowed) in another process, SIGKILL it once the recorded attempt satisfies
    ``until``, and return the record it left."""
    s = e.pools.session(0)
    s.api.sim.fault_rate(str(SLOW))
    code = (
        "from xencr.config import load_config; from xencr.replication.jobs import run_configured; "
        f"run_configured(load_config({str(e.cfg)!r}), {JOB!r}, full={full})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            row = e.row()
            if row is not None and row.disks and until(row):
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the run never got there"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        s.api.sim.fault_clear()
        if proc.stderr:
            proc.stderr.close()
    row = e.row()
    assert row is not None
    return row


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_the_next_run_resumes_a_killed_one(env: Env, fraction: float) -> None:
    _write(env.pools, f"kill-{fraction}", DATA[::3])
    row = _killed(
        env, lambda r: r.disks[0].blocks > 0 and r.disks[0].position >= fraction * r.disks[0].blocks
    )
    (rd,) = row.disks
    left = rd.stream_bytes * (rd.blocks - rd.position) // rd.blocks
    if fraction == 0.6:
        # `xencr plan` says what the run will do, and counts only what is left.
        with connected(env.config, env.config.job(JOB), interactive=False) as c, StateDB(env.state) as db:
            (tp,) = preview.plan(c, full=True, resumes=db)
        assert tp.resume.startswith(f"resumes incomplete attempt {row.attempt}"), tp.resume
        assert tp.estimated_bytes <= left + WINDOW
    report, lines = _run(env, full=True)
    d = _only_disk(report)
    assert d.resumed.startswith(f"resumed at {int(d.resumed_from / rd.blocks * 100)}%"), (d.resumed, lines)
    assert d.resumed in d.reason and any(d.resumed in line for line in lines), lines
    assert d.resumed_from >= rd.position - WINDOW // BLOCK
    assert d.bytes_sent <= left + WINDOW, (d.bytes_sent, left)
    assert report.vms[0].snapshot == row.snapshot, "the killed run's snapshot was sent"
    _hashes_equal(env, report)
    _verified(env, report)
    _no_orphans(env)


def _destroy_snapshot(e: Env, row: ResumeRow) -> None:
    s = e.pools.session(0)
    snap = s.api.VM.get_by_uuid(row.snapshot)
    disks = [s.api.VBD.get_VDI(b) for b in s.api.VM.get_VBDs(snap) if s.api.VBD.get_type(b) == "Disk"]
    s.api.VM.destroy(snap)
    for v in disks:
        s.api.VDI.destroy(v)


def _write_staging(e: Env, row: ResumeRow) -> None:
    t = e.pools.session(1)
    t.api.sim.write(row.disks[0].vdi, "0", "512", "someone else")  # inside block 0, already sent


def _unprotect_base(e: Env, row: ResumeRow) -> None:
    """The user unprotects the newest restore point (the delta's base): no longer a base."""
    t = e.pools.session(1)
    points = [
        (r["other_config"][md.SNAPSHOT_TIME], ref)
        for ref, r in t.api.VM.get_all_records().items()
        if r["other_config"].get(md.JOB) == e.job_id
        and r["other_config"].get(md.COMPLETE) == "true"
        and not r["is_a_snapshot"]
        and md.DETACHED not in r["other_config"]
    ]
    t.api.VM.remove_from_blocked_operations(max(points)[1], "start")


def _add_disk(e: Env, row: ResumeRow) -> None:
    s = e.pools.session(0)
    vm = s.api.VM.get_by_name_label("vm0")[0]
    sr = s.api.pool.get_default_SR(s.api.pool.get_all()[0])
    vdi = s.api.VDI.create(
        {
            "SR": sr,
            "virtual_size": str(4 * MIB),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
            "name_label": "added",
            "name_description": "",
        }
    )
    s.api.VBD.create(
        {
            "VM": vm,
            "VDI": vdi,
            "userdevice": "1",
            "bootable": False,
            "mode": "RW",
            "type": "Disk",
            "empty": False,
            "other_config": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
        }
    )


CASES: dict[str, tuple[Callable[[Env, ResumeRow], None], str]] = {
    "snapshot deleted": (_destroy_snapshot, "the source snapshot {snapshot} was deleted"),
    "staging disk written": (_write_staging, "read back differs"),
    "base changed": (_unprotect_base, "the base of disk 0 changed"),
    "disk set changed": (_add_disk, "the disk set changed (was 0, now 0, 1)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_changed_input_restarts_cleanly_saying_why(env: Env, case: str) -> None:
    change, why = CASES[case]
    delta = case == "base changed"
    _write(env.pools, f"case-{case}", DATA[::4])  # a quarter: enough to be cut mid-stream
    row = _killed(
        env, lambda r: r.disks[0].blocks > 0 and r.disks[0].position >= r.disks[0].blocks // 2, full=not delta
    )
    change(env, row)
    report, lines = _run(env, full=not delta)
    vr = report.vms[0]
    tr = vr.targets[0]
    assert tr.outcome == "success", (tr.error, lines)
    said = why.format(snapshot=row.snapshot)
    assert any(said in x for x in lines + tr.warnings + tr.cleaned), (said, lines, tr.warnings, tr.cleaned)
    if case in ("snapshot deleted", "disk set changed"):
        assert vr.snapshot != row.snapshot, "a new snapshot was taken"
    assert not any(d.resumed for d in tr.disks), "sent from zero"
    if len(tr.disks) == 1:
        _hashes_equal(env, report)
    _no_orphans(env)
