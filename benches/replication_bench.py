#!/usr/bin/env python3
"""End-to-end bench of xencr's stream path between two simulated pools on loopback (SPEC 12,
issue 16): what xencr costs, measured against the same work done without it, in one run on the
same pools.

    .venv/bin/python benches/replication_bench.py [--size 2G] [--changed 0.25] [--repeat 3]
    .venv/bin/python benches/replication_bench.py --quick        # tiny sizes, smoke check (< 60 s)

Measured (each xencr figure is a real `xencr run JOB --json` child process, stream path):
- Baseline: the pipeline without xencr. `curl` GETs the very export xencr just relayed
  (`/export_raw_vdi?...&format=vhd[&base=]`, with a session and a task, as xencr asks it) to a
  file on tmpfs, then `curl -T` PUTs that file into the same kind of import (`/import_raw_vdi?
  format=vhd` into a fresh VDI for a full, into a clone of the base restore point's commit
  snapshot for a delta). The two legs are timed apart (each until its pool's task has ended, as
  xencr's disk time also waits for them) and compared with xencr's disk transfer time: targets
  xencr >= 0.9x the slower leg, and faster than their sum.
- CPU seconds per GB moved (user + system of the process, `os.wait4`) of `xencr run` and of the
  two curls; target <= 1.5x. The fixed part of a run (start-up, snapshot, API calls, commit) is
  measured by a run with nothing changed, and the marginal CPU per GB shown apart; `perf`, where
  installed, says which code (interpreter, engine, kernel) takes the CPU.
- "Slow hardware": the same delta with xencr (and the curls) pinned to one core while the
  simulator has the other.
- Peak RSS of `xencr run` for fulls of sparse disks of growing size (target flat, <= 64 MiB), and
  what the Python heap holds (tracemalloc).
- Resume: a full of a disk whose blocks are all written, uninterrupted, then cut at 80% of its
  stream by a dropped export connection (resumed within the run), then SIGKILLed at ~80% and
  completed by the next run: total bytes sent / the stream's length (target <= 1.05) and the
  time to completion against the uninterrupted full (`--only resume` runs this part alone).

Python sources are compiled once into a bytecode cache in the work directory (as an installed
package has them): the environment may forbid writing bytecode, which would otherwise add the
compilation of every module to each run's fixed CPU. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import selectors
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from xencr import _engine  # noqa: E402
from xencr.config import load_config  # noqa: E402
from xencr.replication.blockmap import combine  # noqa: E402
from xencr.replication.metadata import digest_of_list  # noqa: E402
from xencr.replication.resume import WINDOW  # noqa: E402
from xencr.replication.target import restore_points  # noqa: E402
from xencr.state import ResumeRow, StateDB  # noqa: E402
from xencr.xapi.handlers import query, wait_task  # noqa: E402
from xencr.xapi.session import Endpoint, XapiSession  # noqa: E402
from xencr.xapi.transfer import zero_digest  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
GB = 1e9  # throughput and CPU per GB: decimal, as network figures are
BLOCK = 2 * MIB
PASSWORD = "bench-password"
RSS_TARGET_MIB = 64
RESUME_TARGET = 1.05  # total bytes sent / stream length, for an interrupted and resumed full
PHASES = ("transfer", "rss", "resume")
TASK_TIMEOUT = 600.0


class BenchError(Exception):
    """A step of the bench failed; the message names the step."""


# ------------------------------------------------------------------ shared with seed_bench.py


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MIB, "G": GIB}
    unit = text[-1].upper()
    return int(float(text[:-1]) * units[unit]) if unit in units else int(text)


def write_config(
    d: Path,
    urls: list[str],
    sr: str,
    *,
    verify_import: bool = True,
    state: Path | None = None,
    transfer: str | None = None,
    jobs: Sequence[tuple[str, str]] = (("bench", "vm0"),),
) -> Path:
    """A configuration with pools ``a`` and ``b`` (``urls``) and one job per (name, VM) of
    ``jobs`` from ``a`` to SR ``sr`` of ``b``; ``transfer`` is written only when given."""
    d.mkdir(parents=True, exist_ok=True)
    pw = d / "pw"
    pw.write_text(PASSWORD)
    os.chmod(pw, 0o600)
    cfg = d / "xencr.toml"
    text = (
        f'state = "{state or d / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{urls[0]}"\npassword_file = "{pw}"\n'
        f'[pools.b]\nurl = "{urls[1]}"\npassword_file = "{pw}"\n'
    )
    for name, vm in jobs:
        text += (
            f'[jobs.{name}]\npool = "a"\nvms = ["{vm}"]\nverify_import = {str(verify_import).lower()}\n'
            + (f'transfer = "{transfer}"\n' if transfer else "")
            + f'[[jobs.{name}.targets]]\npool = "b"\nsr = "{sr}"\n'
            f'[[jobs.{name}.schedules]]\nevery = "10m"\nretention = 2\n'
        )
    cfg.write_text(text)
    return cfg


def dirty(s: XapiSession, fraction: float, size: int, seed: int) -> int:
    """Rewrite ``fraction`` of vm0's blocks (one sector each is enough to change a block)."""
    uuid = s.api.VDI.get_uuid(disk_of(s, s.api.VM.get_by_name_label("vm0")[0]))
    rng = random.Random(seed)
    blocks = [b for b in range(size // BLOCK) if rng.random() < fraction]
    for b in blocks:
        s.api.sim.write(uuid, str(b * BLOCK), "512", f"bench-{seed}-{b}")
    return len(blocks)


def disk_of(s: XapiSession, vm: str) -> str:
    """The VDI of the VM's first disk."""
    return str(next(s.api.VBD.get_VDI(x) for x in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(x) == "Disk"))


# ------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Proc:
    """A finished child process: wall seconds, its own user + system CPU seconds and peak RSS."""

    seconds: float
    cpu: float
    maxrss_mib: float
    out: str
    err: str


def measured(
    argv: list[str], *, env: dict[str, str] | None = None, cpus: str | None = None, what: str = ""
) -> Proc:
    """Run ``argv`` (on CPUs ``cpus`` when given) and read its own rusage with `os.wait4`:
    nothing else the bench runs is counted."""
    full = ["taskset", "-c", cpus, *argv] if cpus else argv  # taskset execs: same process
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(full, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        o, e = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode != 0:
        tail = " | ".join(e.strip().splitlines()[-3:])
        raise BenchError(f"{what or argv[0]}: exit status {p.returncode}: {tail}")
    return Proc(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, o, e)


def xencr_argv() -> list[str]:
    script = Path(sys.executable).parent / "xencr"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from xencr.cli.app import main; sys.argv[0] = 'xencr'; main()"]


class Simulator:
    """`xencr sim serve` in a child process, so that it can be given its own core."""

    def __init__(self, state: Path, password_file: Path, env: dict[str, str], log: Path) -> None:
        self.state = state
        self.urls: list[str] = []
        self._argv = [
            *xencr_argv(),
            *("sim", "serve", "--state", str(state), "--port", "0"),
            *("--password-file", str(password_file), "--auth-delay", "0"),
        ]
        self._env = env
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, pools: int, timeout: float = 60.0) -> None:
        with self._log.open("a") as log:
            self._proc = subprocess.Popen(self._argv, stdout=subprocess.PIPE, stderr=log, env=self._env)
        assert self._proc.stdout is not None
        # Raw reads: a buffered reader could hold the second line while select() waits on the fd.
        fd = self._proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        end = time.monotonic() + timeout
        buf = b""
        while len(self.urls) < pools:
            if self._proc.poll() is not None or not sel.select(max(0.0, end - time.monotonic())):
                raise BenchError(f"simulator in {self.state} did not start (log: {self._log})")
            buf += os.read(fd, 4096)
            *lines, buf = buf.split(b"\n")
            for line in lines:
                words = line.decode().split()
                if len(words) == 2 and words[0].startswith("pool"):
                    self.urls.append(words[1])
        sel.close()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def cpu(self) -> float:
        """User + system CPU seconds of the simulator so far (all its threads)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def pin(self, cpus: str) -> None:
        """Every thread of the simulator on ``cpus`` (threads it starts later inherit it)."""
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(self.pid)], check=True, capture_output=True)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None


# ------------------------------------------------------------------------------ the bench


@dataclass
class Options:
    size: int
    fill: float
    changed: float
    repeat: int
    slow_repeat: int
    rss_sizes: list[int]
    rss_fill: float
    profile: bool
    pin: bool
    workdir: Path | None
    keep: bool
    command: str
    only: tuple[str, ...] = PHASES
    resume_repeat: int = 2
    drop_at: float = 0.8
    kill_at: float = 0.8
    kill_rate: int = 0  # bytes/s of the source pool's transfers during the run to be killed (0: none)


@dataclass
class Bench:
    """Everything one bench run works with: the pools, the configurations, the child
    environment, where the curl file goes."""

    opts: Options
    work: Path
    sim: Simulator
    a: XapiSession
    b: XapiSession
    sr: str  # target SR ref on pool b
    sr_uuid: str
    cfg: Path  # verify_import = false: the same work as the curl pipeline
    cfg_checked: Path  # the shipped default, verify_import = true (same state and jobs)
    env: dict[str, str]
    shm_file: Path
    job_ids: dict[str, str] = field(default_factory=dict)

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Run:
    """One `xencr run` child: its process figures and what its JSON report says."""

    proc: Proc
    kind: str
    bytes: int
    bytes_read: int
    blocks: int
    disk_s: float  # the disk's transfer (copy_vdi: tasks, stream, tasks ended)
    snapshot: str  # source snapshot VM UUID
    restore_point: str  # target replica VM UUID
    sim_cpu: float


@dataclass(frozen=True)
class Pipeline:
    """The curl baseline for one export: GET to tmpfs, then PUT of the file."""

    bytes: int
    get_s: float
    put_s: float
    get_cpu: float
    put_cpu: float
    sim_cpu: float

    @property
    def sum_s(self) -> float:
        return self.get_s + self.put_s

    @property
    def slower_s(self) -> float:
        return max(self.get_s, self.put_s)

    @property
    def cpu(self) -> float:
        return self.get_cpu + self.put_cpu


def child_env(work: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), PYTHONUNBUFFERED="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def xencr_run(
    bx: Bench,
    job: str,
    *,
    full: bool = False,
    checked: bool = False,
    cpus: str | None = None,
    wrap: Sequence[str] = (),
    argv: Sequence[str] | None = None,
) -> Run:
    """`xencr run JOB --json` as a child process (``wrap``: a profiler before it; ``argv``: another
    way to start xencr); fails unless the run succeeded."""
    cfg = bx.cfg_checked if checked else bx.cfg
    cmd = [*wrap, *(argv or xencr_argv()), "run", job, "--config", str(cfg), "--json"]
    if full:
        cmd.append("--full")
    sim_before = bx.sim.cpu()
    proc = measured(cmd, env=bx.env, cpus=cpus, what=f"xencr run {job}")
    sim_cpu = bx.sim.cpu() - sim_before
    report = json.loads(proc.out)
    vm = report["vms"][0]
    tr = vm["targets"][0]
    if report["outcome"] != "success" or tr["outcome"] != "success":
        raise BenchError(f"xencr run {job}: {report['outcome']}: {vm.get('error') or tr.get('error')}")
    (disk,) = tr["disks"]
    if disk["path"] != "stream":
        raise BenchError(f"xencr run {job}: disk went by {disk['path']}, not the stream path")
    return Run(
        proc,
        str(disk["kind"]),
        int(disk["bytes"]),
        int(disk["bytes_read"]),
        int(disk["blocks"]),
        float(disk["seconds"]),
        str(vm["snapshot"]),
        str(tr["restore_point"]),
        sim_cpu,
    )


def source_disk(bx: Bench, vm: str) -> str:
    return disk_of(bx.a, bx.a.api.VM.get_by_name_label(vm)[0])


def snapshot_disk(bx: Bench, snapshot_uuid: str) -> str:
    return disk_of(bx.a, bx.a.api.VM.get_by_uuid(snapshot_uuid))


def commit_snapshot(bx: Bench, job: str, restore_point: str) -> str:
    """The commit snapshot of a restore point's disk: what xencr clones for the next delta."""
    vm_uuid = bx.a.api.VM.get_uuid(bx.a.api.VM.get_by_name_label(job_vm(job))[0])
    for rp in restore_points(bx.b, bx.job_ids[job], vm_uuid, bx.sr_uuid):
        if rp.uuid == restore_point:
            (_, snap, _) = rp.disks["0"]
            if snap is None:
                raise BenchError(f"restore point {restore_point} has no commit snapshot")
            return snap
    raise BenchError(f"restore point {restore_point} is not among job {job}'s restore points")


def job_vm(job: str) -> str:
    return {"bench": "vm0", "rss": "vm1", "resume": "vm2"}[job]


def grow(s: XapiSession, vdi: str, size: int) -> None:
    if int(s.api.VDI.get_virtual_size(vdi)) < size:
        s.api.VDI.resize(vdi, str(size))


def write_blocks(s: XapiSession, vdi: str, blocks: list[int], seed: str, length: int = BLOCK) -> None:
    """Guest writes of ``length`` bytes at the start of each block (runs of whole blocks in one
    call of at most 64 MiB)."""
    uuid = s.api.VDI.get_uuid(vdi)
    i = 0
    while i < len(blocks):
        j = i + 1
        if length == BLOCK:
            while j < len(blocks) and blocks[j] == blocks[j - 1] + 1 and j - i < 32:
                j += 1
        s.api.sim.write(uuid, str(blocks[i] * BLOCK), str((j - i) * length), f"{seed}-{blocks[i]}")
        i = j


def pick(size: int, fraction: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [b for b in range(size // BLOCK) if rng.random() < fraction]


def curl_pipeline(
    bx: Bench,
    src_vdi: str,
    *,
    base_vdi: str | None,
    clone_of: str | None,
    size: int,
    cpus: str | None = None,
    check: bool = False,
) -> Pipeline:
    """curl GET of ``src_vdi``'s export (delta against ``base_vdi`` when given) to tmpfs, then
    curl PUT of the file into a clone of ``clone_of`` (a delta) or a fresh VDI of ``size``
    bytes on the target SR; ``check``: the imported VDI must hash as the source does."""
    a, b, urls = bx.a, bx.b, bx.sim.urls
    params = {"vdi": src_vdi, "format": "vhd"} | ({"base": base_vdi} if base_vdi else {})
    sim0 = bx.sim.cpu()
    get_task = str(a.call("task.create", "xencr-bench export", f"curl export of {src_vdi}"))
    into = ""
    put_task = ""
    try:
        url = f"{urls[0]}/export_raw_vdi?" + query(a, get_task, **params)
        t = time.perf_counter()
        get = measured(["curl", "-sS", "--fail", "-o", str(bx.shm_file), url], cpus=cpus, what="curl GET")
        wait_task(a, get_task, TASK_TIMEOUT)
        get_s = time.perf_counter() - t
        length = bx.shm_file.stat().st_size
        if clone_of is not None:
            into = str(b.api.VDI.clone(clone_of, {}))
        else:
            into = str(
                b.api.VDI.create(
                    {
                        "SR": bx.sr,
                        "virtual_size": str(size),
                        "type": "user",
                        "sharable": False,
                        "read_only": False,
                        "other_config": {},
                        "name_label": "xencr-bench curl import",
                        "name_description": "",
                    }
                )
            )
        put_task = str(b.call("task.create", "xencr-bench import", f"curl import into {into}"))
        url = f"{urls[1]}/import_raw_vdi?" + query(b, put_task, vdi=into, format="vhd")
        t = time.perf_counter()
        # "Expect:": curl would otherwise wait a second for a 100 Continue the pool never sends.
        put = measured(
            ["curl", "-sS", "--fail", "-H", "Expect:", "-T", str(bx.shm_file), "-o", "/dev/null", url],
            cpus=cpus,
            what="curl PUT",
        )
        wait_task(b, put_task, TASK_TIMEOUT)
        put_s = time.perf_counter() - t
        sim_cpu = bx.sim.cpu() - sim0
        if check and b.api.sim.hash(b.api.VDI.get_uuid(into)) != a.api.sim.hash(a.api.VDI.get_uuid(src_vdi)):
            raise BenchError(f"curl's import into {into} does not hash as the source {src_vdi}")
    finally:
        bx.shm_file.unlink(missing_ok=True)
        a.destroy_task(get_task)
        if put_task:
            b.destroy_task(put_task)
        if into:
            b.api.VDI.destroy(into)
    return Pipeline(length, get_s, put_s, get.cpu, put.cpu, sim_cpu)


def check_replica(bx: Bench, run: Run) -> None:
    """The restore point's disk holds what the source snapshot holds."""
    same_content(bx, run.snapshot, run.restore_point)


def same_content(bx: Bench, snapshot: str, restore_point: str) -> None:
    replica = disk_of(bx.b, bx.b.api.VM.get_by_uuid(restore_point))
    if bx.b.api.sim.hash(bx.b.api.VDI.get_uuid(replica)) != bx.a.api.sim.hash(
        bx.a.api.VDI.get_uuid(snapshot_disk(bx, snapshot))
    ):
        raise BenchError(f"restore point {restore_point} does not hash as its source snapshot {snapshot}")


# ------------------------------------------------------------------------------ phases


@dataclass
class Results:
    fulls: list[tuple[Run, Pipeline]] = field(default_factory=list)
    deltas: list[tuple[Run, Pipeline]] = field(default_factory=list)
    slow: list[tuple[Run, Pipeline]] = field(default_factory=list)
    empty: list[Run] = field(default_factory=list)
    checked: Run | None = None
    slow_note: str = ""
    profile: dict[str, dict[str, float]] = field(default_factory=dict)  # run -> dso -> CPU s
    profile_gb: float = 0.0
    profile_syms: str = ""
    profile_note: str = ""
    rss: list[tuple[int, Run]] = field(default_factory=list)
    calls: dict[str, tuple[Run, dict[str, Any]]] = field(default_factory=dict)  # probe runs
    heap: dict[str, tuple[Run, dict[str, Any]]] = field(default_factory=dict)  # disk -> probe run
    imports: Proc | None = None
    per_block: dict[str, float] = field(default_factory=dict)
    engine: list[float] = field(default_factory=list)  # the engine's mtime at start and end
    load: list[tuple[float, float, float]] = field(default_factory=list)
    resume: Resumes | None = None


def phase_fulls(bx: Bench, r: Results) -> None:
    """Fulls: xencr first (the first run, then `--full`), curl on the snapshot xencr made."""
    o = bx.opts
    for i in range(o.repeat):
        run = xencr_run(bx, "bench", full=i > 0)
        if run.kind != "full":
            raise BenchError(f"run {i} of the fulls was a {run.kind}")
        pipe = curl_pipeline(
            bx, snapshot_disk(bx, run.snapshot), base_vdi=None, clone_of=None, size=o.size, check=i == 0
        )
        if i == 0:
            check_replica(bx, run)
        same_export(run, pipe)
        r.fulls.append((run, pipe))
        bx.log(
            f"full {i + 1}/{o.repeat}: xencr {run.disk_s:.2f}s, curl {pipe.get_s:.2f}s + {pipe.put_s:.2f}s"
        )


def same_export(run: Run, pipe: Pipeline) -> None:
    if pipe.bytes != run.bytes_read:
        raise BenchError(
            f"curl's export has {pipe.bytes} bytes, xencr read {run.bytes_read}: not the same export"
        )


def one_delta(
    bx: Bench, seed: int, last: Run, *, cpus: str | None = None, check: bool = False
) -> tuple[Run, Pipeline]:
    """One delta both ways. curl goes first, from a snapshot of its own taken after the same
    writes: a run removes its base snapshot once it has a newer one, so the export xencr relayed
    cannot be asked again afterwards. Both exports carry the same blocks against the same base
    (their lengths are compared)."""
    o = bx.opts
    a = bx.a
    vm = a.api.VM.get_by_name_label("vm0")[0]
    write_blocks(a, source_disk(bx, "vm0"), pick(o.size, o.changed, seed), f"delta-{seed}")
    snap = str(a.call_async("VM.snapshot", vm, f"xencr-bench curl {seed}"))
    try:
        pipe = curl_pipeline(
            bx,
            disk_of(a, snap),
            base_vdi=snapshot_disk(bx, last.snapshot),
            clone_of=commit_snapshot(bx, "bench", last.restore_point),
            size=o.size,
            cpus=cpus,
            check=check,
        )
        run = xencr_run(bx, "bench", cpus=cpus)
    finally:
        disks = [a.api.VBD.get_VDI(x) for x in a.api.VM.get_VBDs(snap) if a.api.VBD.get_type(x) == "Disk"]
        a.api.VM.destroy(snap)
        for vdi in disks:
            a.api.VDI.destroy(vdi)
    if run.kind != "delta":
        raise BenchError(f"a delta run was a {run.kind}")
    if check:
        check_replica(bx, run)
    same_export(run, pipe)
    return run, pipe


def phase_deltas(bx: Bench, r: Results) -> Run:
    """An empty run (the fixed cost), the measured deltas, one delta with the shipped default
    (read-back) and a second empty run."""
    o = bx.opts
    last = xencr_run(bx, "bench")
    r.empty.append(last)
    bx.log(f"empty delta: {last.proc.cpu:.2f} CPU s, {last.proc.seconds:.2f}s wall")
    for i in range(o.repeat):
        last, pipe = one_delta(bx, 100 + i, last, check=i == 0)
        r.deltas.append((last, pipe))
        bx.log(
            f"delta {i + 1}/{o.repeat}: xencr {last.disk_s:.2f}s, curl {pipe.get_s:.2f}s + {pipe.put_s:.2f}s"
        )
    write_blocks(bx.a, source_disk(bx, "vm0"), pick(o.size, o.changed, 200), "delta-200")
    r.checked = xencr_run(bx, "bench", checked=True)
    bx.log(f"delta with read-back: {r.checked.proc.seconds:.2f}s wall")
    last = xencr_run(bx, "bench")
    r.empty.append(last)
    return last


def phase_slow(bx: Bench, r: Results, last: Run) -> Run:
    cores = sorted(os.sched_getaffinity(0))
    if not bx.opts.pin or not bx.opts.slow_repeat or len(cores) < 2 or shutil.which("taskset") is None:
        why = (
            "--no-pin"
            if not bx.opts.pin
            else "--slow-repeat 0"
            if not bx.opts.slow_repeat
            else "needs two cores and taskset"
        )
        r.slow_note = f"not measured: {why}"
        return last
    sim_core, our_core = str(cores[0]), str(cores[1])
    bx.sim.pin(sim_core)
    try:
        for i in range(bx.opts.slow_repeat):
            run, pipe = one_delta(bx, 300 + i, last, cpus=our_core)
            r.slow.append((run, pipe))
            last = run
            bx.log(
                f"slow delta {i + 1}/{bx.opts.slow_repeat}: xencr {run.disk_s:.2f}s, "
                f"curl {pipe.get_s:.2f}s + {pipe.put_s:.2f}s"
            )
    finally:
        bx.sim.pin(",".join(str(c) for c in cores))
    r.slow_note = f"xencr and the curls on core {our_core}, the simulator (every thread) on core {sim_core}"
    return last


def perf_dsos(data: Path) -> tuple[dict[str, float], str]:
    """CPU seconds per shared object of a `perf record` file, and its top symbols as text."""

    def report(*args: str) -> str:
        return subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--stdio", *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    text = report("--sort", "dso")
    total_ns = 0.0
    shares: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# Event count (approx.):"):
            total_ns = float(line.split(":")[1])
        elif line.strip() and not line.startswith("#") and "%" in line:
            pct, _, dso = line.strip().partition("%")
            shares[group_dso(dso.strip())] = shares.get(group_dso(dso.strip()), 0.0) + float(pct) / 100
    syms = [
        line.rstrip()
        for line in report("--sort", "dso,sym").splitlines()
        if line.strip() and not line.startswith("#") and "%" in line
    ][:12]
    return {k: v * total_ns / 1e9 for k, v in shares.items()}, "\n".join(syms)


def group_dso(dso: str) -> str:
    if dso.startswith("libpython"):
        return "Python interpreter (libpython)"
    if dso.startswith("_engine"):
        return "xencr engine (Rust)"
    if dso.startswith("[kernel"):
        return "kernel (sockets, copies, page faults)"
    if dso.startswith("libc"):
        return "libc (memcpy, malloc)"
    if dso.startswith("pyexpat"):
        return "XML-RPC parsing (pyexpat)"
    return "other"


def probe_argv(kind: str) -> list[str]:
    return [sys.executable, str(ROOT / "benches" / "bench_probes.py"), kind]


def probe_output(proc: Proc, kind: str) -> dict[str, Any]:
    for line in reversed(proc.err.splitlines()):
        if line.startswith(f"probe-{kind} "):
            return dict(json.loads(line.split(" ", 1)[1]))
    raise BenchError(f"the {kind} probe printed nothing")


def phase_profile(bx: Bench, r: Results, last: Run) -> Run:
    """An empty run and a delta, each with its XAPI calls timed, under `perf record` when it is
    there: the difference is what moving the data costs, by shared object."""
    use_perf = bx.opts.profile and shutil.which("perf") is not None
    if not use_perf:
        r.profile_note = "not profiled: " + (
            "--no-profile" if not bx.opts.profile else "perf is not installed"
        )
    for name, seed in (("empty run", 0), ("delta", 400)):
        if seed:
            write_blocks(
                bx.a, source_disk(bx, "vm0"), pick(bx.opts.size, bx.opts.changed, seed), f"delta-{seed}"
            )
        data = bx.work / f"perf-{seed}.data"
        wrap = ["perf", "record", "-q", "-F", "999", "-o", str(data), "--"] if use_perf else []
        last = xencr_run(bx, "bench", wrap=wrap, argv=probe_argv("calls"))
        r.calls[name] = (last, probe_output(last.proc, "calls"))
        if use_perf:
            r.profile[name], syms = perf_dsos(data)
            if seed:
                r.profile_gb = last.bytes / GB
                r.profile_syms = syms
    return last


def phase_rss(bx: Bench, r: Results) -> None:
    o = bx.opts
    vdi = source_disk(bx, "vm1")
    done = 0
    for n, size in enumerate(sorted(o.rss_sizes)):
        grow(bx.a, vdi, size)
        stride = max(1, round(1 / o.rss_fill))
        blocks = [b for b in range(size // BLOCK) if b % stride == 0 and b >= done]
        write_blocks(bx.a, vdi, blocks, f"rss-{n}", length=4096)
        done = size // BLOCK
        run = xencr_run(bx, "rss", full=True)
        r.rss.append((size, run))
        bx.log(f"RSS {size >> 20} MiB: {run.blocks} blocks, {run.proc.maxrss_mib:.1f} MiB")
        if n == 0:  # the data's share is modelled below (per_block_bytes); the smallest is quickest
            heap = xencr_run(bx, "rss", full=True, argv=probe_argv("heap"))
            r.heap[f"{size >> 20} MiB"] = (heap, probe_output(heap.proc, "heap"))
    r.imports = measured(
        [sys.executable, "-c", "import xencr.cli.app"], env=bx.env, what="import xencr.cli.app"
    )
    r.per_block = per_block_bytes()


def per_block_bytes(n: int = 65536) -> dict[str, float]:
    """Python heap per allocated block after a stream transfer, from the runner's own functions
    run here on ``n`` synthetic digests (tracemalloc), kept alive as the runner keeps them: the
    engine's (index, hex digest) list, the report's copy, the disk's block indices and the block
    map (``held``); then the peak (``peak``) while the digest of the list, the stored map and the
    read-back comparison (a second export's list, two dicts) are computed. The other keys are
    each step's own share (held, or transient for the three computed ones)."""
    algorithm = _engine.DIGEST_ALGORITHM
    hex_len = len(zero_digest(algorithm, BLOCK))
    part: dict[str, float] = {}

    def digest_list() -> list[tuple[int, str]]:
        return [(i, f"{i:0{hex_len}x}") for i in range(1_000_000, 1_000_000 + n)]

    tracemalloc.start()
    base = mark = tracemalloc.get_traced_memory()[0]

    def step(name: str) -> None:
        nonlocal mark
        now, peak = tracemalloc.get_traced_memory()
        part[name] = (max(now, peak) - mark) / n
        mark = now
        tracemalloc.reset_peak()

    digests = digest_list()
    step("engine digest list")
    sent = list(digests)
    indices = [b for b, _ in sent]
    step("copy + block indices")
    block_map = combine(None, sent, algorithm=algorithm, block_size=BLOCK)
    step("block map")
    held = tracemalloc.get_traced_memory()[0] - base
    digest_of_list(algorithm, sent)
    step("digest of the list")
    block_map.to_bytes()
    step("stored map")
    got = digest_list()
    expected, found = dict(sent), dict(got)
    step("read-back")
    tracemalloc.stop()
    del digests, sent, indices, block_map, got, expected, found
    # The two computed values are freed before the read-back, which is kept to the end.
    transient = max(part["digest of the list"], part["stored map"], part["read-back"])
    return {"held": held / n, "peak": held / n + transient} | part


# ------------------------------------------------------------------------------ resume


@dataclass(frozen=True)
class Full:
    """One full of the ``resume`` job (`bench_run.py` in a child process): its process figures,
    what its report says of the disk (`DiskResult`'s fields), and what the target pool itself
    counted of the last import into the replica disk (`sim.import_stats`; -1: not counted)."""

    proc: Proc
    disk: dict[str, Any]
    snapshot: str
    restore_point: str
    imported: int

    @property
    def sent(self) -> int:
        """Bytes sent to the target, every try of the disk included."""
        return int(self.disk["bytes_sent"])

    @property
    def stream(self) -> int:
        return int(self.disk["bytes_read"])


@dataclass(frozen=True)
class Killed:
    """A full SIGKILLed mid-stream: its wall and CPU seconds from its start to the kill, the
    position its attempt had recorded (blocks of the stream passed) when it was killed, and how
    much the target pool had written of its import."""

    seconds: float
    cpu: float
    position: int
    blocks: int
    stream_bytes: int
    written: int  # the staging disk's VHD file on the target once its import had ended (bytes)

    @property
    def recorded(self) -> float:
        """The share of the stream its last record says it had passed."""
        return self.position / self.blocks

    @property
    def sent(self) -> int:
        """Its bytes sent, as the target pool wrote them: the staging disk's file (a full's stream
        is that file's layout); the pool's import count is kept only for imports that complete,
        and the killed process cannot say. Bytes still in the sockets' buffers are not in it."""
        return self.written

    @property
    def fraction(self) -> float:
        return self.written / self.stream_bytes


@dataclass
class Resumes:
    size: int
    plain: list[Full] = field(default_factory=list)
    unchecked: list[Full] = field(default_factory=list)  # uninterrupted, verify_import = false
    dropped: list[tuple[int, Full]] = field(default_factory=list)  # (export cut after n bytes, run)
    # (killed run, the run resuming it): killed right after a record of its position / by the clock
    killed: list[tuple[Killed, Full]] = field(default_factory=list)
    clock_killed: list[tuple[Killed, Full]] = field(default_factory=list)

    @property
    def wall(self) -> float:
        """The uninterrupted full's wall seconds (median)."""
        return med([f.proc.seconds for f in self.plain])


def resume_argv(bx: Bench, *, checked: bool = True) -> list[str]:
    cfg = bx.cfg_checked if checked else bx.cfg
    return [sys.executable, str(ROOT / "benches" / "bench_run.py"), str(cfg), "resume", "--full"]


def resume_full(bx: Bench, what: str, *, checked: bool = True) -> Full:
    """A full of the ``resume`` job to its end (``checked``: with the shipped default,
    ``verify_import = true``); its restore point must hash as its snapshot."""
    proc = measured(resume_argv(bx, checked=checked), env=bx.env, what=what)
    report = json.loads(proc.out.strip().splitlines()[-1])
    vm = report["vms"][0]
    tr = vm["targets"][0]
    (disk,) = tr["disks"]
    if disk["path"] != "stream":
        raise BenchError(f"{what}: disk went by {disk['path']}, not the stream path")
    same_content(bx, vm["snapshot"], tr["restore_point"])
    replica = bx.b.api.VDI.get_uuid(disk_of(bx.b, bx.b.api.VM.get_by_uuid(tr["restore_point"])))
    stats = bx.b.api.sim.import_stats(replica)
    return Full(proc, disk, str(vm["snapshot"]), str(tr["restore_point"]), int(stats.get("bytes_in", -1)))


def resume_row(bx: Bench, db: StateDB) -> ResumeRow | None:
    """The attempt of the ``resume`` job the state database keeps for a resume, if any."""
    vm_uuid = bx.a.api.VM.get_uuid(bx.a.api.VM.get_by_name_label("vm2")[0])
    return db.resume_of(bx.job_ids["resume"], vm_uuid, bx.sr_uuid)


def killed_full(bx: Bench, *, by_clock: bool) -> Killed:
    """Start a full of the ``resume`` job and SIGKILL it once its stream has passed ``kill_at``:
    as soon as its recorded position says so (the record is then fresh), or ``by_clock``, at the
    moment the rate between its last two records says it gets there (between two records, as a
    kill at any moment would be). The source pool's transfers are limited to ``kill_rate``
    meanwhile, when given. The attempt it leaves is what the next run resumes."""
    o = bx.opts
    if o.kill_rate:
        bx.a.api.sim.fault_rate(str(o.kill_rate))
    try:
        with StateDB(bx.work / "state.sqlite") as db, tempfile.TemporaryFile() as err:
            t = time.perf_counter()
            p = subprocess.Popen(resume_argv(bx), stdout=subprocess.DEVNULL, stderr=err, env=bx.env)
            try:
                seen: list[tuple[float, int]] = []  # (when first seen, recorded position)
                while True:
                    now = time.perf_counter()
                    row = resume_row(bx, db)
                    d = row.disks[0] if row is not None and row.disks else None
                    if d is not None and d.blocks:
                        goal = o.kill_at * d.blocks
                        if d.position >= goal:
                            break
                        if not seen or d.position != seen[-1][1]:
                            seen.append((now, d.position))
                        if by_clock and len(seen) >= 2:
                            (t0, p0), (t1, p1) = seen[-2:]
                            eta = t1 + (goal - p1) * (t1 - t0) / (p1 - p0)
                            if eta < now + 1.0:  # before the next record: go by the clock
                                time.sleep(max(0.0, eta - now))
                                break
                    if p.poll() is not None:
                        err.seek(0)
                        tail = " | ".join(err.read().decode(errors="replace").strip().splitlines()[-3:])
                        raise BenchError(
                            f"the full to be killed ended (exit status {p.returncode}) before "
                            f"{o.kill_at:.0%} of its stream: {tail or 'nothing said'}"
                        )
                    if now - t > TASK_TIMEOUT:
                        raise BenchError(f"the full to be killed never got to {o.kill_at:.0%} of its stream")
                    time.sleep(0.05)
                os.kill(p.pid, signal.SIGKILL)
                seconds = time.perf_counter() - t
                _, status, usage = os.wait4(p.pid, 0)
                p.returncode = os.waitstatus_to_exitcode(status)
                if p.returncode != -signal.SIGKILL:
                    raise BenchError(f"the full to be killed ended by itself (exit status {p.returncode})")
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            left = resume_row(bx, db)  # what the next run reads: recorded no later than the kill
    finally:
        if o.kill_rate:
            bx.a.api.sim.fault_clear()
    if left is None or not left.disks:
        raise BenchError("the killed full left no attempt recorded")
    (d,) = left.disks
    # The import ends (failed) once the pool sees the connection closed; then its file is measured.
    deadline = time.monotonic() + 60
    while any(t["status"] == "pending" for t in bx.b.api.task.get_all_records().values()):
        if time.monotonic() > deadline:
            raise BenchError("the killed full's import task never ended on the target pool")
        time.sleep(0.1)
    written = int(bx.b.api.VDI.get_physical_utilisation(bx.b.api.VDI.get_by_uuid(d.vdi)))
    return Killed(seconds, usage.ru_utime + usage.ru_stime, d.position, d.blocks, d.stream_bytes, written)


def phase_resume(bx: Bench, r: Results) -> None:
    """vm2's disk, every block written: uninterrupted fulls, fulls whose export is cut at
    ``drop_at`` of the stream (resumed within the run), and fulls SIGKILLed at ``kill_at``, each
    completed by the next run. Every restore point is hash-checked; no attempt may stay recorded."""
    o = bx.opts
    vdi = source_disk(bx, "vm2")
    grow(bx.a, vdi, o.size)
    write_blocks(bx.a, vdi, list(range(o.size // BLOCK)), "resume")
    res = Resumes(o.size)
    r.resume = res
    for i in range(o.resume_repeat):
        full = resume_full(bx, "uninterrupted full")
        if full.disk["drops"] or full.disk["resumed"]:
            raise BenchError(f"the uninterrupted full was resumed: {full.disk['reason']}")
        res.plain.append(full)
        bx.log(f"resume: uninterrupted full {i + 1}/{o.resume_repeat}: {full.proc.seconds:.2f}s wall")
        full = resume_full(bx, "uninterrupted full without read-back", checked=False)
        res.unchecked.append(full)
        bx.log(f"resume: the same without read-back: {full.proc.seconds:.2f}s wall")
    stream = res.plain[0].stream
    for i in range(o.resume_repeat):
        cut = int(stream * o.drop_at)
        bx.a.api.sim.fault_drop_after("export", str(cut))
        try:
            full = resume_full(bx, f"full with its export cut after {cut} bytes")
        finally:
            bx.a.api.sim.fault_clear()
        if full.disk["drops"] != 1:
            raise BenchError(
                f"the export cut after {cut} bytes: {full.disk['drops']} dropped connections resumed, "
                f"not 1 ({full.disk['reason']})"
            )
        res.dropped.append((cut, full))
        bx.log(f"resume: drop {i + 1}/{o.resume_repeat}: {full.proc.seconds:.2f}s wall, {full.sent} bytes")
    for by_clock, into in ((False, res.killed), (True, res.clock_killed)):
        for i in range(o.resume_repeat):
            killed = killed_full(bx, by_clock=by_clock)
            full = resume_full(bx, "the full after a killed one")
            if not str(full.disk["resumed"]).startswith("resumed at"):
                raise BenchError(f"the full after a killed one did not resume it: {full.disk['reason']}")
            with StateDB(bx.work / "state.sqlite") as db:
                if resume_row(bx, db) is not None:
                    raise BenchError("an attempt is still recorded after the resumed full")
            into.append((killed, full))
            bx.log(
                f"resume: kill {'by the clock' if by_clock else 'on a record'} {i + 1}/{o.resume_repeat} "
                f"at {killed.fraction:.0%} (recorded {killed.recorded:.0%}) after {killed.seconds:.2f}s, "
                f"resumed in {full.proc.seconds:.2f}s: {full.disk['resumed']}"
            )


# ------------------------------------------------------------------------------ the table


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    if len(values) < 2:
        return fmt.format(med(values))
    return f"{fmt.format(med(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def throughput_row(name: str, cases: list[tuple[Run, Pipeline]]) -> str:
    if not cases:
        return f"| {name} | not measured | | | | | | | | |"
    runs, pipes = [c[0] for c in cases], [c[1] for c in cases]
    moved = med([r.bytes for r in runs])
    x = [r.disk_s for r in runs]
    vs_slower = [p.slower_s / r.disk_s for r, p in cases]
    vs_sum = [p.sum_s / r.disk_s for r, p in cases]
    return (
        f"| {name} | {moved / MIB:.0f} MiB | {spread(x)} | {spread([p.get_s for p in pipes])} | "
        f"{spread([p.put_s for p in pipes])} | {med([p.sum_s for p in pipes]):.2f} | "
        f"{med([p.slower_s for p in pipes]):.2f} | **{spread(vs_slower)}** | **{spread(vs_sum)}** | "
        f"{med([r.proc.seconds for r in runs]):.2f} |"
    )


def cpu_row(name: str, cases: list[tuple[Run, Pipeline]], fixed: float) -> str:
    if not cases:
        return f"| {name} | not measured | | | | | | | |"
    ours = [r.proc.cpu / (r.bytes / GB) for r, _ in cases]
    marginal = [(r.proc.cpu - fixed) / (r.bytes / GB) for r, _ in cases]
    curls = [p.cpu / (p.bytes / GB) for _, p in cases]
    ratio = [o / c for o, c in zip(ours, curls, strict=True)]
    mratio = [m / c for m, c in zip(marginal, curls, strict=True)]
    sims = [r.sim_cpu / (r.bytes / GB) for r, _ in cases]
    sim_curl = [p.sim_cpu / (p.bytes / GB) for _, p in cases]
    return (
        f"| {name} | {med([r.proc.cpu for r, _ in cases]):.2f} | {spread(ours)} | {spread(marginal)} | "
        f"{med([p.get_cpu for _, p in cases]):.2f} + {med([p.put_cpu for _, p in cases]):.2f} | "
        f"{spread(curls)} | **{spread(ratio)}** | **{spread(mratio)}** | "
        f"{med(sims):.2f} / {med(sim_curl):.2f} |"
    )


def engine_mtime() -> float:
    path = Path(_engine.__file__ or "")
    return path.stat().st_mtime if path.exists() else 0.0


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S UTC")


def table(bx: Bench, r: Results) -> str:
    o = bx.opts
    out: list[str] = []
    add = out.append
    load = " -> ".join(f"{la[0]:.2f}" for la in r.load)
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty_tree = subprocess.run(
        [*git, "status", "--porcelain"], capture_output=True, text=True
    ).stdout.strip()
    add(f"## xencr replication bench ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)")
    add("")
    add(f"Reproduce: `{o.command}`")
    add("")
    add(
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; 1-minute "
        f"load average {load} (start -> end): the machine is shared, every figure was taken under that "
        f"load. Tree {head or '?'}{' with uncommitted changes' if dirty_tree else ''}. "
        + (
            f"Median (min-max) of {o.repeat} runs ({o.slow_repeat} for slow hardware). "
            if "transfer" in o.only
            else f"Parts run: {', '.join(o.only)}. "
        )
        + "Stream path; the simulator in a process of its own."
    )
    if len(set(r.engine)) > 1:
        add("")
        add(
            f"**Warning: the engine (`_engine.abi3.so`) was rebuilt during this run** ("
            f"{' -> '.join(stamp(t) for t in r.engine)}): figures before and after may differ by build."
        )
    if "transfer" in o.only:
        out.extend(transfer_tables(o, r))
    if "rss" in o.only:
        out.extend(rss_tables(o, r))
    if "resume" in o.only:
        add("")
        add("### Resume figures")
        add("")
        out.extend(resume_table(o, r.resume))
    return "\n".join(out)


def transfer_tables(o: Options, r: Results) -> list[str]:
    """Time against curl, CPU per GB, where the CPU and the wall time go."""
    fixed = med([e.proc.cpu for e in r.empty])
    out: list[str] = []
    add = out.append
    add("")
    add("### Time: xencr's disk transfer against curl GET (to tmpfs) then curl PUT of the same export")
    add("")
    add(
        f"Disk {o.size / MIB:.0f} MiB: {o.fill:.0%} of its blocks written before the first full, "
        f"{o.changed:.0%} rewritten before each delta. `xencr s` is the disk's transfer as the run report "
        "gives it (both tasks made, the stream, both tasks ended); each curl leg likewise runs until its "
        "task has ended. Targets: `slower / xencr` >= 0.9 and `sum / xencr` > 1. `run wall s` is the whole "
        "`xencr run` process (see the calls below)."
    )
    add("")
    add(
        "| case | stream | xencr s | curl GET s | curl PUT s | sum s | slower s | slower / xencr | "
        "sum / xencr | run wall s |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|")
    add(throughput_row("full", r.fulls))
    add(throughput_row("delta", r.deltas))
    add(throughput_row("delta, slow hardware", r.slow))
    add("")
    add(f"Slow hardware: {r.slow_note}.")
    add("")
    add("### CPU seconds per GB moved (user + system, each process's own rusage)")
    add("")
    imports = f"{r.imports.cpu:.2f}" if r.imports else "?"
    add(
        f"A run with nothing changed costs {fixed:.2f} CPU s "
        f"({', '.join(f'{e.proc.cpu:.2f}' for e in r.empty)}), "
        f"of which {imports} s is importing xencr: `marginal` subtracts that fixed cost. Target: "
        "xencr / curl <= 1.5. Last column: the simulator's CPU s/GB during xencr's run / during the curls."
    )
    add("")
    add(
        "| case | xencr CPU s | xencr s/GB | marginal s/GB | curl GET + PUT CPU s | curl s/GB | "
        "xencr / curl | marginal / curl | simulator s/GB |"
    )
    add("|---|---|---|---|---|---|---|---|---|")
    add(cpu_row("full", r.fulls, fixed))
    add(cpu_row("delta", r.deltas, fixed))
    add(cpu_row("delta, slow hardware", r.slow, fixed))
    if r.checked is not None:
        c = r.checked
        add("")
        add(
            "The shipped default (`verify_import = true`: the run reads back what it wrote before the "
            f"commit), one delta of {c.bytes / MIB:.0f} MiB: disk {c.disk_s:.2f} s, "
            f"run {c.proc.seconds:.2f} s wall, {c.proc.cpu:.2f} CPU s "
            f"({c.proc.cpu / (c.bytes / GB):.2f} s/GB, marginal "
            f"{(c.proc.cpu - fixed) / (c.bytes / GB):.2f}), peak RSS {c.proc.maxrss_mib:.1f} MiB."
        )
    add("")
    add("### Where xencr's CPU goes (perf record: CPU s per shared object)")
    add("")
    if r.profile:
        empty, delta = r.profile.get("empty run", {}), r.profile.get("delta", {})
        gb = r.profile_gb or float("nan")
        add(f"| code | empty run | delta ({r.profile_gb:.3f} GB) | difference | difference s/GB |")
        add("|---|---|---|---|---|")
        for k in sorted({*empty, *delta}, key=lambda k: -delta.get(k, 0.0)):
            diff = delta.get(k, 0.0) - empty.get(k, 0.0)
            add(
                f"| {k} | {empty.get(k, 0.0):.2f} | {delta.get(k, 0.0):.2f} | {diff:+.2f} | "
                f"{diff / gb:+.2f} |"
            )
        te, td = sum(empty.values()), sum(delta.values())
        add(f"| total | {te:.2f} | {td:.2f} | {td - te:+.2f} | {(td - te) / gb:+.2f} |")
        add("")
        add("Top symbols of the delta run:")
        add("")
        add("```")
        add(r.profile_syms)
        add("```")
    else:
        add(r.profile_note)
    add("")
    add("### Where a run's wall time goes (its XAPI calls timed in the process, seconds)")
    add("")
    if r.calls:
        names = list(r.calls)
        runs = {n: r.calls[n][0] for n in names}
        totals = {n: r.calls[n][1] for n in names}
        keys = sorted(
            {k for t in totals.values() for k in t}, key=lambda k: -totals[names[-1]].get(k, {}).get("s", 0)
        )
        add("| call | " + " | ".join(f"{n} (n, s)" for n in names) + " |")
        add("|---|" + "---|" * len(names))
        for k in keys[:10]:
            cells = [f"{t[k]['n']}, {t[k]['s']:.2f}" if k in t else "" for t in totals.values()]
            add(f"| {k} | " + " | ".join(cells) + " |")
        add("| whole process (wall) | " + " | ".join(f"{runs[n].proc.seconds:.2f}" for n in names) + " |")
        add("")
        add(
            "`Async.*` and task waits include the pool's work (snapshots; the simulator coalesces a "
            "chain when a snapshot is destroyed); nested calls are counted in both rows."
        )
    return out


def rss_tables(o: Options, r: Results) -> list[str]:
    """Peak RSS, and what it is made of."""
    out: list[str] = []
    add = out.append
    add("")
    add(
        f"### Peak RSS of `xencr run --full` (stream path): sparse disks, "
        f"{o.rss_fill:.1%} of their blocks allocated"
    )
    add("")
    add("| disk | blocks sent | stream | peak RSS MiB | target |")
    add("|---|---|---|---|---|")
    for size, run in r.rss:
        ok = "ok" if run.proc.maxrss_mib <= RSS_TARGET_MIB else "OVER"
        add(
            f"| {size / MIB:.0f} MiB | {run.blocks} | {run.bytes / MIB:.0f} MiB | "
            f"{run.proc.maxrss_mib:.1f} | <= {RSS_TARGET_MIB} ({ok}) |"
        )
    add("")
    floor = med([e.proc.maxrss_mib for e in r.empty])
    imports_rss = f"{r.imports.maxrss_mib:.1f}" if r.imports else "?"
    add(
        f"What the RSS is made of: `import xencr.cli.app` alone peaks at {imports_rss} MiB (interpreter, "
        f"libraries, the engine, xencr's modules); a run with nothing changed at {floor:.1f} MiB."
    )
    for name, (run, heap) in r.heap.items():
        grew = ", ".join(f"{Path(g['file']).name} +{g['kib']} KiB" for g in heap["grew"][:4])
        add(
            f"Python heap (tracemalloc) of the {name} full: {heap['imported'] / MIB:.1f} MiB after "
            f"the imports, peak {heap['peak'] / MIB:.1f} MiB during the run "
            f"(RSS {run.proc.maxrss_mib:.1f} MiB with "
            f"tracemalloc on); grown most at the largest heap sampled: {grew or 'nothing sampled'}."
        )
    if r.per_block:
        held, peak = r.per_block["held"], r.per_block["peak"]
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r.per_block.items() if k not in ("held", "peak"))
        headroom = (RSS_TARGET_MIB - floor) * MIB
        limit = headroom / peak if peak > 0 else float("inf")
        add(
            f"Per allocated block, the runner's own functions on synthetic digests hold {held:.0f} bytes of "
            f"Python objects after a transfer and peak at {peak:.0f} bytes (each step, bytes per block: "
            f"{parts}): {peak * (8 * GIB // BLOCK) / MIB:.1f} MiB for a fully allocated 8 GiB disk, "
            f"{peak * (2048 * GIB // BLOCK) / MIB:.0f} MiB for a fully allocated 2 TiB one. Above the "
            f"{floor:.0f} MiB floor, {RSS_TARGET_MIB} MiB is passed at about {limit:,.0f} allocated blocks "
            f"({limit * BLOCK / GIB:.0f} GiB allocated in one disk): flat only below that."
        )
    return out


def resume_table(o: Options, res: Resumes | None) -> list[str]:
    if res is None or not res.plain:
        return ["not measured"]
    stream, wall = res.plain[0].stream, res.wall
    out = [
        f"Disk {res.size / MIB:.0f} MiB, every block written: a full's stream is {stream / MIB:.0f} MiB. "
        "Each run is a full (`run_configured(..., full=True)`, `benches/bench_run.py` in a child process), "
        "stream path, `verify_import = true` unless said: a resumed disk is read back whatever that says, "
        "so the uninterrupted fulls read back too. `sent` is what xencr sent to the target, every try of "
        f"the disk included; a resume sends again at most a window of {WINDOW / MIB:.0f} MiB. `wall`: each "
        "whole process, against the uninterrupted full with read-back. Target: sent / stream <= "
        f"{RESUME_TARGET}. Median (min-max) of {len(res.plain)} runs each.",
        "",
        "| case | interrupted at | sent MiB | sent / stream | wall s | wall / uninterrupted | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(
        case: str,
        at: str,
        sent: Sequence[int],
        seconds: Sequence[float],
        cpu: Sequence[float],
        *,
        bold: bool = False,
    ) -> None:
        """One row: ``sent`` bytes, wall and CPU seconds, one of each per repeat."""
        b = "**" if bold else ""
        out.append(
            f"| {case} | {at} | {spread([x / MIB for x in sent], '{:.0f}')} | "
            f"{b}{spread([x / stream for x in sent], '{:.3f}')}{b} | "
            f"{spread(seconds)} | {b}{spread([x / wall for x in seconds])}{b} | {spread(cpu)} |"
        )

    def runs_row(case: str, at: str, runs: Sequence[Full], *, bold: bool = False) -> None:
        row(
            case,
            at,
            [f.sent for f in runs],
            [f.proc.seconds for f in runs],
            [f.proc.cpu for f in runs],
            bold=bold,
        )

    runs_row("uninterrupted full", "", res.plain)
    if res.unchecked:
        runs_row("uninterrupted full, no read-back (`verify_import = false`)", "", res.unchecked)
    if res.dropped:
        at = spread([c / stream * 100 for c, _ in res.dropped], "{:.0f}") + "% of the stream"
        runs_row(
            "export connection dropped, resumed in the same run", at, [f for _, f in res.dropped], bold=True
        )
    for how, pairs in (("on a record", res.killed), ("by the clock", res.clock_killed)):
        if not pairs:
            continue
        ks = [k for k, _ in pairs]
        at = (
            spread([k.fraction * 100 for k in ks], "{:.0f}")
            + "% (recorded "
            + spread([k.recorded * 100 for k in ks], "{:.0f}")
            + "%)"
        )
        row(
            f"SIGKILL {how}: the killed run, until the kill",
            at,
            [k.sent for k in ks],
            [k.seconds for k in ks],
            [k.cpu for k in ks],
        )
        runs_row(f"SIGKILL {how}: the next run, resuming", "", [f for _, f in pairs])
        row(
            f"SIGKILL {how}: both runs",
            "",
            [k.sent + f.sent for k, f in pairs],
            [k.seconds + f.proc.seconds for k, f in pairs],
            [k.cpu + f.proc.cpu for k, f in pairs],
            bold=True,
        )
    out.append("")
    if res.dropped:
        cut, f = res.dropped[0]
        out.append(
            f"Drop: the source pool cut the export after {cut} bytes (`sim.fault_drop_after`, "
            f"{o.drop_at:.0%} of the stream); the run resumed the disk from the window before the position "
            f"it had passed ({f.disk['reason']}). The target pool counted {f.imported} bytes in the second "
            f"import (`sim.import_stats`), xencr {f.sent - f.imported} in the first, which failed (the pool "
            "counts only imports that complete)."
        )
    if res.killed or res.clock_killed:
        k, f = (res.killed or res.clock_killed)[0]
        if res.dropped:
            out.append("")
        rate = (
            f"the source pool's transfers limited to {o.kill_rate / MIB:.0f} MiB/s until the kill, so the "
            "killed run's time is not what it would take unlimited"
            if o.kill_rate
            else "no rate limit"
        )
        out.append(
            f"SIGKILL ({rate}): a run records its position (blocks written in full to the import's "
            "connection) every 4 MiB it moves (`resume.RECORD_STEP`, looked at every 50 ms); "
            "the bench reads the record every 50 ms. `on a record`: "
            f"killed as soon as a record said {o.kill_at:.0%} was passed, so the record is fresh (the case "
            f"the resume point is built for); `by the clock`: killed when the rate between the last two "
            f"records says {o.kill_at:.0%} is reached, between two records as a kill at any moment is, so "
            "what passed since the last record is sent again as well. `interrupted at`: what the target "
            "pool had written of the killed import (its staging disk's file, whose layout is the stream's) "
            "over the stream, and the last record. The killed run's `sent` is that file: the pool keeps "
            "its import count only for imports that complete; bytes that were still in the sockets' "
            "buffers are not in it. The next run (`--full` again, no limit) said e.g. "
            f'"{f.disk["resumed"]}" (killed at {k.fraction:.0%}, recorded block {k.position} of '
            f"{k.blocks}); the pool counted {f.imported} bytes in its import, xencr {f.sent}. `wall` of both "
            "runs: the killed process from its start to the kill plus the resuming process, against one "
            "uninterrupted full; starting over from zero would cost about one uninterrupted full after the "
            "kill instead of the resuming run."
        )
    return out


# ------------------------------------------------------------------------------ main


@contextlib.contextmanager
def bench(opts: Options) -> Iterator[Bench]:
    """Pools, configuration and child environment in a work directory (removed at the end unless
    ``keep``)."""
    work = Path(tempfile.mkdtemp(prefix="xencr-bench-", dir=opts.workdir))
    env = child_env(work)
    sim: Simulator | None = None
    sessions: list[XapiSession] = []
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    try:
        # Bytecode once, as an installed package has it (see the module docstring).
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(ROOT / "python" / "xencr")],
            env=env,
            check=True,
            capture_output=True,
        )
        pw = work / "pw"
        pw.write_text(PASSWORD)
        os.chmod(pw, 0o600)
        state = work / "sim"
        biggest = 2 * opts.size + max(opts.rss_sizes)  # vm0, vm2 (resume), vm1 (RSS)
        subprocess.run(
            [
                *xencr_argv(),
                *("sim", "init", "--state", str(state), "--pools", "2", "--vms", "3"),
                *("--disk-mib", str(min([opts.size, *opts.rss_sizes]) // MIB)),
                *("--sr-gib", str(max(16, 6 * biggest // GIB + 8)), "--password-file", str(pw)),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        sim = Simulator(state, pw, env, work / "sim.log")
        sim.start(pools=2)
        a = XapiSession(Endpoint(sim.urls[0]), "root", PASSWORD)
        sessions.append(a)
        b = XapiSession(Endpoint(sim.urls[1]), "root", PASSWORD)
        sessions.append(b)
        sr = str(b.api.pool.get_default_SR(b.api.pool.get_all()[0]))
        sr_uuid = str(b.api.SR.get_uuid(sr))
        jobs = (("bench", "vm0"), ("rss", "vm1"), ("resume", "vm2"))
        cfg = write_config(
            work / "plain",
            sim.urls,
            sr_uuid,
            verify_import=False,
            state=work / "state.sqlite",
            transfer="stream",
            jobs=jobs,
        )
        checked = write_config(
            work / "checked",
            sim.urls,
            sr_uuid,
            verify_import=True,
            state=work / "state.sqlite",
            transfer="stream",
            jobs=jobs,
        )
        loaded = load_config(cfg)
        bx = Bench(
            opts,
            work,
            sim,
            a,
            b,
            sr,
            sr_uuid,
            cfg,
            checked,
            env,
            shm / f"xencr-bench-{os.getpid()}.vhd",
            {name: loaded.jobs[name].id for name, _ in jobs},
        )
        yield bx
    finally:
        for s in sessions:
            s.logout()
        if sim is not None:
            sim.stop()
        if opts.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_all(opts: Options) -> str:
    r = Results()
    r.load.append(os.getloadavg())
    r.engine.append(engine_mtime())
    with bench(opts) as bx:
        bx.log(f"work directory {bx.work}; pools {' '.join(bx.sim.urls)}")
        if "transfer" in opts.only:
            vdi = source_disk(bx, "vm0")
            grow(bx.a, vdi, opts.size)
            write_blocks(bx.a, vdi, pick(opts.size, opts.fill, 1), "fill")
            phase_fulls(bx, r)
            last = phase_deltas(bx, r)
            last = phase_slow(bx, r, last)
            phase_profile(bx, r, last)
        if "rss" in opts.only:
            phase_rss(bx, r)
        if "resume" in opts.only:
            phase_resume(bx, r)
        r.load.append(os.getloadavg())
        r.engine.append(engine_mtime())
        return table(bx, r)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", default="2G", help="vm0's disk (default 2G)")
    ap.add_argument("--fill", type=float, default=0.5, help="share of blocks written before the fulls")
    ap.add_argument("--changed", type=float, default=0.25, help="share of blocks rewritten before each delta")
    ap.add_argument("--repeat", type=int, default=3, help="measured fulls and deltas each")
    ap.add_argument("--slow-repeat", type=int, default=2, help="measured slow-hardware deltas")
    ap.add_argument("--rss-sizes", default="512M,2G,8G", help="disks of the RSS fulls (comma-separated)")
    ap.add_argument(
        "--rss-fill", type=float, default=0.125, help="share of their blocks allocated (evenly spread)"
    )
    ap.add_argument(
        "--only",
        default=",".join(PHASES),
        help=f"parts to run, comma-separated among {', '.join(PHASES)} (default: all)",
    )
    ap.add_argument("--resume-repeat", type=int, default=2, help="runs of each resume case (default 2)")
    ap.add_argument(
        "--drop-at", type=float, default=0.8, help="share of the stream after which the export is cut"
    )
    ap.add_argument(
        "--kill-at", type=float, default=0.8, help="share of the stream's blocks recorded before the kill"
    )
    ap.add_argument(
        "--kill-rate",
        default="0",
        help="limit the source pool's transfers to this many bytes/s (e.g. 100M) until the kill (0: none)",
    )
    ap.add_argument("--no-profile", action="store_true", help="skip the perf profile")
    ap.add_argument("--no-pin", action="store_true", help="skip the slow-hardware (pinned) runs")
    ap.add_argument("--workdir", type=Path, help="parent of the work directory (default: TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke check")
    args = ap.parse_args(argv)
    only = tuple(p for p in PHASES if p in args.only.split(","))
    if not only or set(args.only.split(",")) - set(PHASES):
        ap.error(f"--only: comma-separated among {', '.join(PHASES)}")
    if args.quick:
        args.size, args.rss_sizes, args.repeat, args.slow_repeat = "32M", "16M,64M", 1, 1
        args.resume_repeat = 1
        # A 32 MiB stream passes in well under the second between two records of its position.
        args.kill_rate = args.kill_rate if parse_size(args.kill_rate) else "8M"
    opts = Options(
        size=parse_size(args.size),
        fill=args.fill,
        changed=args.changed,
        repeat=max(1, args.repeat),
        slow_repeat=max(0, args.slow_repeat),
        rss_sizes=[parse_size(x) for x in args.rss_sizes.split(",")],
        rss_fill=args.rss_fill,
        profile=not args.no_profile,
        pin=not args.no_pin,
        workdir=args.workdir,
        keep=args.keep,
        only=only,
        resume_repeat=max(1, args.resume_repeat),
        drop_at=args.drop_at,
        kill_at=args.kill_at,
        kill_rate=parse_size(args.kill_rate),
        command=shlex.join(
            [".venv/bin/python", "benches/replication_bench.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    )
    try:
        text = run_all(opts)
    except BenchError as err:
        print(f"replication_bench: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
