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
- Resume figures: a placeholder until resume exists.

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
from xencr.replication.target import restore_points  # noqa: E402
from xencr.xapi.handlers import query, wait_task  # noqa: E402
from xencr.xapi.session import Endpoint, XapiSession  # noqa: E402
from xencr.xapi.transfer import zero_digest  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
GB = 1e9  # throughput and CPU per GB: decimal, as network figures are
BLOCK = 2 * MIB
PASSWORD = "bench-password"
RSS_TARGET_MIB = 64
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
    return {"bench": "vm0", "rss": "vm1"}[job]


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
    replica = disk_of(bx.b, bx.b.api.VM.get_by_uuid(run.restore_point))
    if bx.b.api.sim.hash(bx.b.api.VDI.get_uuid(replica)) != bx.a.api.sim.hash(
        bx.a.api.VDI.get_uuid(snapshot_disk(bx, run.snapshot))
    ):
        raise BenchError(f"restore point {run.restore_point} does not hash as its source snapshot")


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
    fixed = med([e.proc.cpu for e in r.empty])
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
        f"load. Tree {head or '?'}{' with uncommitted changes' if dirty_tree else ''}. Median (min-max) of "
        f"{o.repeat} runs ({o.slow_repeat} for slow hardware). Stream path; the simulator in a process of "
        "its own."
    )
    if len(set(r.engine)) > 1:
        add("")
        add(
            f"**Warning: the engine (`_engine.abi3.so`) was rebuilt during this run** ("
            f"{' -> '.join(stamp(t) for t in r.engine)}): figures before and after may differ by build."
        )
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
    add("")
    add("### Resume figures")
    add("")
    add("not measured: resume not implemented yet")
    return "\n".join(out)


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
        biggest = opts.size + max(opts.rss_sizes)
        subprocess.run(
            [
                *xencr_argv(),
                *("sim", "init", "--state", str(state), "--pools", "2", "--vms", "2"),
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
        jobs = (("bench", "vm0"), ("rss", "vm1"))
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
        vdi = source_disk(bx, "vm0")
        grow(bx.a, vdi, opts.size)
        write_blocks(bx.a, vdi, pick(opts.size, opts.fill, 1), "fill")
        phase_fulls(bx, r)
        last = phase_deltas(bx, r)
        last = phase_slow(bx, r, last)
        phase_profile(bx, r, last)
        phase_rss(bx, r)
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
    ap.add_argument("--no-profile", action="store_true", help="skip the perf profile")
    ap.add_argument("--no-pin", action="store_true", help="skip the slow-hardware (pinned) runs")
    ap.add_argument("--workdir", type=Path, help="parent of the work directory (default: TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke check")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.rss_sizes, args.repeat, args.slow_repeat = "32M", "16M,64M", 1, 1
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
