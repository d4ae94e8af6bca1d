#!/usr/bin/env python3
"""End-to-end fast-path bench (issue 15): the delta run of `xencr run` over the VHD stream and
over NBD + CBT with 1, 2, 4 and 8 connections, against `nbdcopy` (libnbd-bin, the reference
client), between two simulated pools on loopback, every data connection of the source pool
limited to the same rate (``sim.fault_connection_rate``, a slow dom0).

    .venv/bin/python benches/fastpath_bench.py [--size 2G] [--rate 100] [--conns 1,2,4,8]
        [--patterns blocks,scattered,database] [--fill 0.5] [--repeat 1] [--limit-target]
        [--no-check] [--no-empty] [--no-whole] [--out FILE]
    .venv/bin/python benches/fastpath_bench.py --quick      # 128 MiB smoke check (< 60 s)

Set-up: one simulator child (`xencr sim serve`, two pools), vm0's disk of ``--size`` on pool a
with ``--fill`` of its 2 MiB blocks written, pool a serving NBD (TLS, the `nbd` purpose on its
management network; the sim's nbdkit with its Python plugin), ``--rate`` MiB/s per connection on
pool a (the sim writes nbdkit's rate filter in bits/s: rate x 8). One configuration holds a job per
row (``stream``, ``nbd1``, ``nbd2``...: the same VM to the same SR of pool b, each its own chain),
so one guest write of a change pattern is the delta of every row: each job's base is its own
snapshot, taken before the pattern was written. Each job first runs a full, then a delta with
nothing changed (its fixed cost), then a delta per pattern:

- ``blocks``: 25% of the 2 MiB blocks rewritten whole;
- ``scattered``: 25% of the 64 KiB units, at random;
- ``database``: one 64 KiB unit in every 2 MiB block.

Each `xencr run JOB --json` is a child process reaped with `os.wait4` (its CPU and peak RSS are
its own); bytes read from the source (NBD payload, or the export stream's length), bytes sent to
the import and the disk's transfer seconds (the import task's end included) come from its JSON
report; the replica is hash-checked against the source unless ``--no-check``.

nbdcopy reads whole exports (data extents per `NBD_CMD_BLOCK_STATUS`; the sim reports VHD block
allocation, 2 MiB-granular); it cannot be given a CBT bitmap. Its row reads a scratch VDI on the
same SR of pool a, written with the very same pattern writes (same offsets, same data), from the
same nbdkit under the same limit: the changed data, as a whole-disk client can read it. For
``blocks`` that is exactly the bytes xencr reads; for ``scattered`` and ``database`` it is every
2 MiB block holding a change (xencr reads only the changed units: fewer bytes, smaller requests).
nbdcopy writes to ``null:``; xencr also builds, digests and sends the import stream, which pool b
(the same simulator process) parses and writes. `nbdcopy` runs one thread per connection
(``--threads=N``: its default is one per core) and splits the disk into large pieces per thread
(seen here: on a 256 MiB disk 4 connections went no faster than 2), so on the 128 MiB disk of
``--quick`` its connection count means little.
A last set of rows (``whole``) has nbdcopy read the newest source snapshot whole: what the server
gives a sequential client per connection count.

Where the time goes: the CPU seconds of xencr, of the simulator process (XAPI calls, pool b's
import, pool a's export for the stream) and of pool a's nbdkit (its Python plugin reads the VHD
chain through the engine) during each run; "cores" is their sum over the wall time. All of them
share this machine's cores with each other (and with whatever else runs on it).
Python sources are compiled once into a bytecode cache in the work directory, as an installed
package has them. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import random
import selectors
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from xencr.xapi import nbd  # noqa: E402
from xencr.xapi.session import Endpoint, XapiSession  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
GB = 1e9  # CPU per GB: decimal, as network figures are
UNIT = 64 * 1024  # one bit of a CBT bitmap
BLOCK = 2 * MIB  # a VHD block
SECTOR = 512
PASSWORD = "bench-password"
WRITERS = 4  # sessions writing a pattern at once (the simulator serves each call in a thread)
WRITE_MAX = 32 * MIB  # at most this much per sim.write call
PATTERNS = ("blocks", "scattered", "database")
PATTERN_TITLES = {
    "blocks": "25% of the 2 MiB blocks rewritten whole",
    "scattered": "25% of the 64 KiB units, scattered",
    "database": "one 64 KiB unit in every 2 MiB block",
}


class BenchError(Exception):
    """A step of the bench failed; the message names the step."""


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MIB, "G": GIB}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def mib(n: float) -> str:
    return f"{n / MIB:.1f}"


# ------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Proc:
    """A finished child process: wall seconds, its own user + system CPU seconds, peak RSS."""

    seconds: float
    cpu: float
    rss_mib: float
    out: str


def measured(argv: list[str], *, env: dict[str, str] | None = None, what: str = "") -> Proc:
    """Run ``argv``, reaping it with `os.wait4` so that its rusage is its own; fails on a
    non-zero exit with the end of its stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        o, e = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode != 0:
        tail = " | ".join((e or o).strip().splitlines()[-3:])
        raise BenchError(f"{what or argv[0]}: exit status {p.returncode}: {tail}")
    return Proc(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, o)


def xencr_argv() -> list[str]:
    script = Path(sys.executable).parent / "xencr"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from xencr.cli.app import main; sys.argv[0] = 'xencr'; main()"]


def child_env(work: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), PYTHONUNBUFFERED="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Simulator:
    """`xencr sim serve` in a child process; its nbdkit servers are its children."""

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
        fd = self._proc.stdout.fileno()  # raw reads: a buffered reader could hold a line back
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
        return proc_cpu(self.pid)

    def nbdkit_pids(self) -> list[int]:
        """The simulator's nbdkit children (one per host of a pool serving NBD)."""
        pids = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                pids += [int(p) for p in (task / "children").read_text().split()]
        out = []
        for pid in pids:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "nbdkit":
                    out.append(pid)
        return out

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


@dataclass
class CpuMeter:
    """CPU seconds the simulator and its nbdkit servers spend between ``start`` and ``stop``."""

    sim: Simulator
    sim_cpu: float = 0.0
    nbdkit_cpu: float = 0.0
    _sim0: float = 0.0
    _kit0: dict[int, float] = field(default_factory=dict)

    def start(self) -> CpuMeter:
        self._sim0 = self.sim.cpu()
        self._kit0 = {pid: proc_cpu(pid) for pid in self.sim.nbdkit_pids()}
        return self

    def stop(self) -> CpuMeter:
        self.sim_cpu = self.sim.cpu() - self._sim0
        # A server started meanwhile counts from 0 (the simulator restarts one that died).
        self.nbdkit_cpu = sum(proc_cpu(pid) - self._kit0.get(pid, 0.0) for pid in self.sim.nbdkit_pids())
        return self


# ------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Pattern:
    name: str
    units: list[int]  # changed 64 KiB units, sorted

    @property
    def changed(self) -> int:
        return len(self.units) * UNIT

    @property
    def blocks(self) -> int:
        """2 MiB blocks holding a change."""
        return len({u * UNIT // BLOCK for u in self.units})


def make_pattern(name: str, size: int, rng: random.Random) -> Pattern:
    n_blocks, n_units, per = size // BLOCK, size // UNIT, BLOCK // UNIT
    if name == "blocks":
        units = [b * per + i for b in rng.sample(range(n_blocks), n_blocks // 4) for i in range(per)]
    elif name == "scattered":
        units = rng.sample(range(n_units), n_units // 4)
    elif name == "database":
        units = [b * per + rng.randrange(per) for b in range(n_blocks)]
    else:
        raise BenchError(f"unknown pattern {name!r} (one of {', '.join(PATTERNS)})")
    return Pattern(name, sorted(units))


def runs(units: Sequence[int], unit: int = UNIT, limit: int = WRITE_MAX) -> list[tuple[int, int]]:
    """(offset, length) of the runs of consecutive ``units``, each at most ``limit`` bytes."""
    out: list[tuple[int, int]] = []
    for u in units:
        if out and out[-1][0] + out[-1][1] == u * unit and out[-1][1] + unit <= limit:
            out[-1] = (out[-1][0], out[-1][1] + unit)
        else:
            out.append((u * unit, unit))
    return out


def vhd_metadata(size: int, blocks: int) -> int:
    """The bytes of a dynamic VHD stream besides its data: footer copy, header, BAT, one sector
    bitmap per block present, footer."""
    bat = -(-(size // BLOCK) * 4 // SECTOR) * SECTOR
    return SECTOR + 1024 + bat + blocks * SECTOR + SECTOR


# ------------------------------------------------------------------------------ the bench


@dataclass(frozen=True)
class Options:
    size: int
    fill: float
    rate: int  # bytes/s per connection
    conns: list[int]
    patterns: list[str]
    limit_target: bool
    check: bool
    whole: bool
    empty: bool
    repeat: int
    workdir: Path | None
    keep: bool
    command: str


@dataclass
class Bench:
    """What one bench run works with."""

    opts: Options
    work: Path
    sim: Simulator
    a: XapiSession
    b: XapiSession
    cfg: Path
    env: dict[str, str]
    vdi: str  # vm0's disk on pool a
    sr_a: str  # its SR
    ca_dir: Path  # the pool's NBD certificate, for nbdcopy
    jobs: list[tuple[str, str, int]]  # (job name, transfer, connections)

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Row:
    """One measured transfer."""

    pattern: str
    client: str  # "stream", "nbd", "nbdcopy"
    conns: int
    changed: int  # bytes of the changed 64 KiB units
    read: int  # bytes read from the source (NBD payload, export stream; nbdcopy: data extents)
    sent: int | None  # bytes of the import stream (None: nbdcopy)
    written: int | None  # bytes the target wrote (its import statistics)
    wall: float
    seconds: float  # the disk's transfer (nbdcopy: its run)
    cpu: float
    rss_mib: float
    sim_cpu: float
    nbdkit_cpu: float
    kind: str = ""
    path_reason: str = ""
    snapshot: str = ""  # source snapshot VM UUID
    spread: str = ""  # min-max of the changed data per second over the runs (several runs)
    runs: int = 1

    @property
    def cores(self) -> float:
        return (self.cpu + self.sim_cpu + self.nbdkit_cpu) / self.wall if self.wall else 0.0

    @property
    def useful_mibs(self) -> float:
        return self.changed / self.seconds / MIB if self.seconds else 0.0

    @property
    def wire_mibs(self) -> float:
        return self.read / self.seconds / MIB if self.seconds else 0.0


def write_config(d: Path, urls: list[str], sr_uuid: str, jobs: Sequence[tuple[str, str, int]]) -> Path:
    """Pools ``a`` and ``b``, one job per (name, transfer, connections), all vm0 to ``sr_uuid``
    of b. verify_import off: the rows measure the transfer path, not the read-back."""
    d.mkdir(parents=True, exist_ok=True)
    pw = d / "pw"
    pw.write_text(PASSWORD)
    os.chmod(pw, 0o600)
    cfg = d / "xencr.toml"
    text = (
        f'state = "{d / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{urls[0]}"\npassword_file = "{pw}"\n'
        f'[pools.b]\nurl = "{urls[1]}"\npassword_file = "{pw}"\n'
    )
    for name, transfer, conns in jobs:
        text += (
            f'[jobs.{name}]\npool = "a"\nvms = ["vm0"]\nverify_import = false\n'
            f'transfer = "{transfer}"\nnbd_connections = {conns}\n'
            f'[[jobs.{name}.targets]]\npool = "b"\nsr = "{sr_uuid}"\n'
            f'[[jobs.{name}.schedules]]\nevery = "10m"\nretention = 1\n'
        )
    cfg.write_text(text)
    return cfg


def disk_of(s: XapiSession, vm: str) -> str:
    return str(next(s.api.VBD.get_VDI(x) for x in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(x) == "Disk"))


def write_runs(bx: Bench, vdi_uuid: str, spans: Sequence[tuple[int, int]], seed: str) -> None:
    """Guest writes of ``spans`` (offset, length), from a few sessions at once. A span's data
    depends on ``seed`` and its offset only: two VDIs written alike hold the same bytes."""
    sessions = [XapiSession(Endpoint(bx.sim.urls[0]), "root", PASSWORD) for _ in range(WRITERS)]
    failed: list[BaseException] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        s = sessions[i]
        try:
            for off, length in spans[i::WRITERS]:
                s.api.sim.write(vdi_uuid, str(off), str(length), f"{seed}-{off}")
        except BaseException as err:
            with lock:
                failed.append(err)

    try:
        with ThreadPoolExecutor(WRITERS) as ex:
            list(ex.map(work, range(WRITERS)))
    finally:
        for s in sessions:
            s.logout()
    if failed:
        raise BenchError(f"guest writes into VDI {vdi_uuid}: {failed[0]}")


def xencr_run(bx: Bench, job: str, transfer: str, pattern: Pattern | None) -> tuple[Row, str]:
    """`xencr run JOB --json` as a child: its row and the replica disk's UUID; fails unless the run
    succeeded by the expected path."""
    cmd = [*xencr_argv(), "run", job, "--config", str(bx.cfg), "--json"]
    wait_detached(bx)
    meter = CpuMeter(bx.sim).start()
    proc = measured(cmd, env=bx.env, what=f"xencr run {job}")
    meter.stop()
    report = json.loads(proc.out)
    vm = report["vms"][0]
    tr = vm["targets"][0]
    if report["outcome"] != "success" or tr["outcome"] != "success":
        raise BenchError(f"xencr run {job}: {report['outcome']}: {vm.get('error') or tr.get('error')}")
    (disk,) = tr["disks"]
    if disk["path"] != transfer:
        raise BenchError(f"xencr run {job}: the disk went by {disk['path']} ({disk['path_reason']})")
    if pattern is not None and disk["kind"] != "delta":
        raise BenchError(f"xencr run {job}: a {disk['kind']}, not a delta ({disk['reason']})")
    replica = bx.b.api.VDI.get_uuid(disk_of(bx.b, bx.b.api.VM.get_by_uuid(tr["restore_point"])))
    stats = bx.b.api.sim.import_stats(replica)
    written = int(stats["sectors_written"]) * SECTOR if stats else None
    return Row(
        pattern.name if pattern else "",
        transfer,
        next(c for name, _, c in bx.jobs if name == job),
        pattern.changed if pattern else 0,
        int(disk["bytes_read"]),
        int(disk["bytes"]),
        written,
        proc.seconds,
        float(disk["seconds"]),
        proc.cpu,
        proc.rss_mib,
        meter.sim_cpu,
        meter.nbdkit_cpu,
        str(disk["kind"]),
        str(disk["path_reason"]),
        str(vm["snapshot"]),
    ), replica


def check_replica(bx: Bench, replica: str, source_hash: str, job: str) -> None:
    if bx.b.api.sim.hash(replica) != source_hash:
        raise BenchError(f"job {job}: the replica disk {replica} does not hash as the source disk")


def nbd_uri(bx: Bench, vdi: str) -> str:
    """An NBD URI for ``vdi`` as the pool serves it (`VDI.get_nbd_info`), TLS trusting the pool's
    certificate when the pool's purpose is `nbd`. It carries a session: never printed."""
    (at, *_) = nbd.endpoints(bx.a, vdi)
    export = urllib.parse.quote(at.exportname, safe="")
    if at.secure:
        return f"nbds://{at.address}:{at.port}/{export}?tls-certificates={bx.ca_dir}"
    return f"nbd://{at.address}:{at.port}/{export}"


def data_extents(uri: str) -> int:
    """Bytes the server reports as data (not zero) in block status: what nbdcopy reads."""
    out = subprocess.run(["nbdinfo", "--map", uri], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BenchError(f"nbdinfo --map: {out.stderr.strip().splitlines()[-1:]}")
    total = 0
    for line in out.stdout.splitlines():
        words = line.split()
        if len(words) >= 3 and not int(words[2]) & 2:  # bit 1: reads as zeros
            total += int(words[1])
    return total


def nbdcopy_run(bx: Bench, vdi: str, conns: int, name: str, changed: int) -> Row:
    uri = nbd_uri(bx, vdi)
    read = data_extents(uri)
    wait_detached(bx)
    meter = CpuMeter(bx.sim).start()
    argv = ["nbdcopy", f"--connections={conns}", f"--threads={conns}", uri, "null:"]
    proc = measured(argv, what=f"nbdcopy --connections={conns}")
    meter.stop()
    return Row(
        name,
        "nbdcopy",
        conns,
        changed,
        read,
        None,
        None,
        proc.seconds,
        proc.seconds,
        proc.cpu,
        proc.rss_mib,
        meter.sim_cpu,
        meter.nbdkit_cpu,
    )


def wait_detached(bx: Bench, timeout: float = 30.0) -> None:
    """Until no NBD client holds a VDI of pool a attached: a client's VBD goes shortly after it
    disconnects, and a VDI still attached cannot be destroyed (VDI_IN_USE)."""
    deadline = time.monotonic() + timeout
    while bx.a.api.sim.nbd_attachments():
        if time.monotonic() > deadline:
            raise BenchError(f"NBD attachments left on pool a after {timeout:.0f} s")
        time.sleep(0.05)


def scratch_vdi(bx: Bench, label: str) -> str:
    return str(
        bx.a.api.VDI.create(
            {
                "SR": bx.sr_a,
                "virtual_size": str(bx.opts.size),
                "type": "user",
                "sharable": False,
                "read_only": False,
                "other_config": {},
                "name_label": label,
                "name_description": "fastpath_bench: the changed data alone, for nbdcopy",
            }
        )
    )


# ------------------------------------------------------------------------------ phases


@dataclass
class Results:
    fulls: list[Row] = field(default_factory=list)
    empty: dict[str, Row] = field(default_factory=dict)  # job -> a delta with nothing changed
    rows: list[Row] = field(default_factory=list)
    whole: list[Row] = field(default_factory=list)
    patterns: dict[str, Pattern] = field(default_factory=dict)
    write_s: dict[str, float] = field(default_factory=dict)
    load: list[tuple[float, float, float]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


def phase_fulls(bx: Bench, r: Results) -> None:
    source_hash = bx.a.api.sim.hash(bx.a.api.VDI.get_uuid(bx.vdi)) if bx.opts.check else ""
    for job, transfer, _ in bx.jobs:
        bx.log(f"full: {job}")
        row, replica = xencr_run(bx, job, transfer, None)
        if row.kind != "full":
            raise BenchError(f"job {job}: the first run was a {row.kind}")
        if bx.opts.check:
            check_replica(bx, replica, source_hash, job)
        r.fulls.append(row)
    empties: dict[str, list[Row]] = {}
    for _ in range(bx.opts.repeat if bx.opts.empty else 0):
        for job, transfer, _ in bx.jobs:
            bx.log(f"nothing changed: {job}")
            row, _ = xencr_run(bx, job, transfer, None)
            if row.kind != "delta":
                raise BenchError(f"job {job}: a run with nothing changed was a {row.kind}")
            empties.setdefault(job, []).append(row)
    r.empty = {job: median(rows, by_wall=True) for job, rows in empties.items()}


def median(rows: list[Row], *, by_wall: bool = False) -> Row:
    """The median run (by transfer seconds, or wall seconds), with the spread of the changed
    data per second over all the runs when there are several."""
    ranked = sorted(rows, key=lambda x: x.wall if by_wall else x.seconds)
    mid = ranked[(len(ranked) - 1) // 2]
    if len(rows) == 1:
        return mid
    speeds = [x.useful_mibs for x in rows]
    return dataclasses.replace(mid, spread=f"{min(speeds):.1f}-{max(speeds):.1f}", runs=len(rows))


def phase_pattern(bx: Bench, r: Results, p: Pattern) -> None:
    spans = runs(p.units)
    view = scratch_vdi(bx, f"fastpath_bench {p.name}")
    try:
        t = time.perf_counter()
        bx.log(f"{p.name}: {len(p.units)} units changed ({len(spans)} guest writes), also into a scratch VDI")
        write_runs(bx, bx.a.api.VDI.get_uuid(bx.vdi), spans, p.name)
        write_runs(bx, bx.a.api.VDI.get_uuid(view), spans, p.name)
        r.write_s[p.name] = time.perf_counter() - t
        measured_rows: dict[tuple[str, int], list[Row]] = {}
        snapshot = ""
        for i in range(bx.opts.repeat):
            if i:  # the same units again, other data: every job has them as its delta again
                bx.log(f"{p.name}: round {i + 1}: the same units rewritten")
                write_runs(bx, bx.a.api.VDI.get_uuid(bx.vdi), spans, f"{p.name}-{i}")
            source_hash = bx.a.api.sim.hash(bx.a.api.VDI.get_uuid(bx.vdi)) if bx.opts.check else ""
            for job, transfer, n in bx.jobs:
                bx.log(f"{p.name}: {job}")
                row, replica = xencr_run(bx, job, transfer, p)
                if bx.opts.check:
                    check_replica(bx, replica, source_hash, job)
                measured_rows.setdefault((transfer, n), []).append(row)
                snapshot = row.snapshot
            for n in bx.opts.conns:
                bx.log(f"{p.name}: nbdcopy --connections={n}")
                measured_rows.setdefault(("nbdcopy", n), []).append(
                    nbdcopy_run(bx, view, n, p.name, p.changed)
                )
        r.rows += [median(rows) for rows in measured_rows.values()]
        if bx.opts.whole and not r.whole:
            snapshot = disk_of(bx.a, bx.a.api.VM.get_by_uuid(snapshot))
            for n in bx.opts.conns:
                bx.log(f"whole snapshot: nbdcopy --connections={n}")
                r.whole.append(nbdcopy_run(bx, snapshot, n, "whole", 0))
    finally:
        wait_detached(bx)
        deadline = time.monotonic() + 30
        while bx.a.api.VDI.get_VBDs(view) and time.monotonic() < deadline:  # the VBD goes last
            time.sleep(0.05)
        bx.a.api.VDI.destroy(view)


# ------------------------------------------------------------------------------ report


def ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if y else "-"


def row_line(row: Row, empty: Row | None) -> str:
    read_ratio = ratio(row.read, row.changed) if row.changed else "-"
    sent = mib(row.sent) if row.sent is not None else "-"
    written = mib(row.written) if row.written is not None else "-"
    gb = row.read / GB
    per_gb = f"{row.cpu / gb:.2f}" if gb else "-"
    marginal = f"{(row.cpu - empty.cpu) / gb:.2f}" if empty is not None and gb else "-"
    client = row.client if row.client != "nbdcopy" else "**nbdcopy**"
    spread = f" ({row.spread})" if row.spread else ""
    return (
        f"| {row.pattern} | {client} | {row.conns} | {mib(row.changed)} | {mib(row.read)} | {read_ratio} "
        f"| {sent} | {written} | {row.wall:.2f} | {row.seconds:.2f} | {row.useful_mibs:.1f}{spread} "
        f"| {row.wire_mibs:.1f} | {row.cpu:.2f} | {per_gb} | {marginal} | {row.rss_mib:.0f} "
        f"| {row.sim_cpu:.2f} | {row.nbdkit_cpu:.2f} | {row.cores:.2f} |"
    )


HEADER = (
    "| pattern | client | conns | changed MiB | read MiB | read/changed | sent MiB | written MiB "
    "| wall s | transfer s | MiB/s changed | MiB/s read | CPU s | CPU s/GB | marginal CPU s/GB "
    "| peak RSS MiB | sim CPU s | nbdkit CPU s | cores |\n"
    "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
)


def job_of(bx: Bench, row: Row) -> str:
    return next(n for n, t, c in bx.jobs if t == row.client and (t == "stream" or c == row.conns))


def targets(bx: Bench, r: Results) -> list[str]:
    out = []
    size = bx.opts.size
    for name, p in r.patterns.items():
        rows = [x for x in r.rows if x.pattern == name]
        stream = next((x for x in rows if x.client == "stream"), None)
        out.append(f"- **{name}** ({PATTERN_TITLES[name]}: {len(p.units)} units, {p.blocks} blocks touched):")
        four = next((x for x in rows if x.client == "nbd" and x.conns == 4), None)
        if stream is not None and four is not None:
            ok = four.useful_mibs >= 3 * stream.useful_mibs
            out.append(
                f"  - NBD x4 vs stream: {ratio(four.useful_mibs, stream.useful_mibs)} the changed data per "
                f"second of transfer ({ratio(stream.wall, four.wall)} on the whole run's wall time); "
                f"target >= 3x: {'met' if ok else 'missed'}"
            )
        for x in rows:
            if x.client != "nbd":
                continue
            ref = next((y for y in rows if y.client == "nbdcopy" and y.conns == x.conns), None)
            if ref is None:
                continue
            ok = x.useful_mibs >= 0.9 * ref.useful_mibs
            out.append(
                f"  - NBD x{x.conns} vs nbdcopy x{x.conns}: {ratio(x.useful_mibs, ref.useful_mibs)} the"
                f" changed data per second, {ratio(x.wire_mibs, ref.wire_mibs)} the bytes read per second;"
                f" target >= 0.9x: {'met' if ok else 'missed'}"
            )
        nbds = [x for x in rows if x.client == "nbd"]
        if nbds:
            meta = vhd_metadata(size, p.blocks)
            worst_read = max(x.read for x in nbds)
            worst_sent = max(x.sent or 0 for x in nbds)
            written = max(x.written or 0 for x in nbds)
            read_ok = worst_read <= 1.05 * p.changed
            sent_ok = worst_sent <= 1.05 * (p.changed + meta)
            out.append(
                f"  - bytes on the wire, source link (NBD payload, worst row): {ratio(worst_read, p.changed)}"
                f" the changed units; target <= 1.05x: {'met' if read_ok else 'missed'}"
            )
            out.append(
                f"  - bytes on the wire, target link (the import stream, worst row):"
                f" {ratio(worst_sent, p.changed + meta)} the changed units plus VHD metadata"
                f" ({meta / 1024:.0f} KiB); target <= 1.05x: {'met' if sent_ok else 'missed'}"
                f" (pool b wrote {ratio(written, p.changed)} the changed units)"
            )
            if stream is not None:
                out.append(
                    f"  - the stream read {ratio(stream.read, worst_read)} and sent "
                    f"{ratio(stream.sent or 0, worst_sent)} what NBD did"
                )
    return out


def where_time_goes(bx: Bench, r: Results) -> list[str]:
    out = []
    for row in r.rows:
        if row.client == "nbdcopy":
            continue
        empty = r.empty.get(job_of(bx, row))
        fixed = f"{empty.wall:.2f}" if empty else "-"
        extra = f"{row.wall - empty.wall - row.seconds:.2f}" if empty else "-"
        out.append(
            f"| {row.pattern} | {row.client} | {row.conns} | {row.wall:.2f} | {fixed} | {row.seconds:.2f} "
            f"| {extra} | {row.cpu:.2f} | {row.sim_cpu:.2f} | {row.nbdkit_cpu:.2f} | {row.cores:.2f} |"
        )
    return out


def table(bx: Bench, r: Results) -> str:
    o = bx.opts
    out: list[str] = []
    add = out.append
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu_model = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    add(f"## Fast path, end to end ({stamp})")
    add("")
    add(f"Command: `{o.command}`")
    add("")
    add(
        f"Machine: {os.cpu_count()} cores ({cpu_model or platform.machine()}), shared: the simulator (both"
        f" pools, pool b's imports), pool a's nbdkit, xencr and nbdcopy all run on these cores, and other"
        f" work may have run meanwhile (load average {r.load[0][0]:.2f} at the start,"
        f" {r.load[-1][0]:.2f} at the end). Python {platform.python_version()}."
    )
    add(
        f"Disk {mib(o.size)} MiB, {o.fill:.0%} of its 2 MiB blocks written before the fulls; each connection"
        f" of pool a (NBD, export streams) limited to {o.rate / MIB:.0f} MiB/s"
        + ("; pool b's import streams too" if o.limit_target else "; pool b (imports) not limited")
        + "; TLS (`nbd` purpose); verify_import = false."
        + f" Bench wall time {time.monotonic() - r.started:.0f} s."
    )
    add("")
    add(
        "Columns: changed = the changed 64 KiB units; read = bytes read from the source (NBD payload; the"
        " stream's export length; nbdcopy: the data extents it reads); sent = the import stream xencr"
        " sent; written = what pool b wrote (its import statistics, sectors); transfer s = the disk's"
        " transfer in xencr's report (until the import task ended; nbdcopy: its run); MiB/s changed ="
        " changed / transfer s; CPU s, peak RSS = of the `xencr run` (or nbdcopy) process; CPU s/GB per GB"
        " read; marginal = minus a run of the same job with nothing changed; sim / nbdkit CPU = the"
        " simulator process and pool a's nbdkit meanwhile; cores = all three CPU figures over wall s."
        + (
            f" Each row is the median of {o.repeat} runs (by transfer s), the changed data per second of"
            " all of them in brackets (min-max)."
            if o.repeat > 1
            else " One run per row."
        )
    )
    add("")
    add("### Delta runs")
    add("")
    add(HEADER)
    for row in r.rows:
        empty = r.empty.get(job_of(bx, row)) if row.client != "nbdcopy" else None
        add(row_line(row, empty))
    if r.whole:
        add("")
        add("### nbdcopy reading the newest source snapshot whole (the server's pace per connection count)")
        add("")
        add(HEADER)
        for row in r.whole:
            add(row_line(row, None))
    add("")
    add("### Targets")
    add("")
    out += targets(bx, r)
    add("")
    add("### Where the time goes (xencr rows)")
    add("")
    add(
        "rest s = wall s - the same job's wall with nothing changed - transfer s: what the data adds"
        " outside the transfer (the block map read back from pool b, commit, expiry of the older restore"
        " point and of the source snapshot, the simulator's coalescing)."
    )
    add("")
    add(
        "| pattern | path | conns | wall s | wall s, nothing changed | transfer s | rest s | xencr CPU s"
        " | sim CPU s | nbdkit CPU s | cores |"
    )
    add("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    out += where_time_goes(bx, r)
    add("")
    add("### Fulls and fixed costs")
    add("")
    add(
        "| job | full: read MiB | sent MiB | wall s | transfer s | CPU s | peak RSS MiB"
        " | nothing changed: wall s | CPU s | peak RSS MiB |"
    )
    add("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for (job, _, _), full in zip(bx.jobs, r.fulls, strict=True):
        e = r.empty.get(job)
        fixed = f"{e.wall:.2f} | {e.cpu:.2f} | {e.rss_mib:.0f}" if e else "- | - | -"
        add(
            f"| {job} | {mib(full.read)} | {mib(full.sent or 0)} | {full.wall:.2f} | {full.seconds:.2f} "
            f"| {full.cpu:.2f} | {full.rss_mib:.0f} | {fixed} |"
        )
    add("")
    writes = ", ".join(f"{k} {v:.0f} s" for k, v in r.write_s.items())
    add(f"Guest writes of the patterns (both VDIs, not measured above): {writes}.")
    return "\n".join(out)


# ------------------------------------------------------------------------------ main


@contextlib.contextmanager
def bench(opts: Options) -> Iterator[Bench]:
    """Pools, configuration and child environment in a work directory (removed at the end
    unless ``keep``)."""
    work = Path(tempfile.mkdtemp(prefix="xencr-fastpath-bench-", dir=opts.workdir))
    env = child_env(work)
    sim: Simulator | None = None
    sessions: list[XapiSession] = []
    try:
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
        subprocess.run(
            [
                *xencr_argv(),
                *("sim", "init", "--state", str(state), "--pools", "2", "--vms", "1"),
                *("--disk-mib", str(opts.size // MIB), "--sr-gib", str(max(16, 16 * opts.size // GIB + 8))),
                *("--password-file", str(pw)),
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
        net = next(r for r, v in a.api.network.get_all_records().items() if v["bridge"] == "xenbr0")
        a.api.network.add_purpose(net, "nbd")
        a.api.sim.fault_connection_rate(str(opts.rate))
        if opts.limit_target:
            b.api.sim.fault_connection_rate(str(opts.rate))
        vdi = disk_of(a, a.api.VM.get_by_name_label("vm0")[0])
        (at, *_) = nbd.endpoints(a, vdi)
        ca_dir = work / "nbd-ca"
        ca_dir.mkdir()
        (ca_dir / "ca-cert.pem").write_text(at.cert)  # self-signed: its own CA
        sr_b = str(b.api.SR.get_uuid(b.api.pool.get_default_SR(b.api.pool.get_all()[0])))
        jobs = [("stream", "stream", 1), *((f"nbd{n}", "nbd", n) for n in opts.conns)]
        cfg = write_config(work / "cfg", sim.urls, sr_b, jobs)
        yield Bench(opts, work, sim, a, b, cfg, env, vdi, str(a.api.VDI.get_SR(vdi)), ca_dir, jobs)
    finally:
        for s in sessions:
            with contextlib.suppress(Exception):
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
    rng = random.Random(15)
    with bench(opts) as bx:
        bx.log(f"work directory {bx.work}; pools {' '.join(bx.sim.urls)}")
        blocks = [b for b in range(opts.size // BLOCK) if rng.random() < opts.fill]
        bx.log(f"fill: {len(blocks)} blocks of 2 MiB")
        per = BLOCK // UNIT
        write_runs(
            bx, bx.a.api.VDI.get_uuid(bx.vdi), runs([b * per + i for b in blocks for i in range(per)]), "fill"
        )
        phase_fulls(bx, r)
        for name in opts.patterns:
            p = make_pattern(name, opts.size, rng)
            r.patterns[name] = p
            phase_pattern(bx, r, p)
        r.load.append(os.getloadavg())
        return table(bx, r)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", default="2G", help="vm0's disk (default 2G)")
    ap.add_argument(
        "--fill", type=float, default=0.5, help="share of its 2 MiB blocks written before the fulls"
    )
    ap.add_argument("--rate", type=float, default=100, help="MiB/s per connection of pool a (default 100)")
    ap.add_argument("--conns", default="1,2,4,8", help="NBD connection counts (comma-separated)")
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="change patterns (comma-separated)")
    ap.add_argument("--limit-target", action="store_true", help="limit pool b's import streams too")
    ap.add_argument("--no-check", action="store_true", help="skip the replica hash checks")
    ap.add_argument("--no-whole", action="store_true", help="skip nbdcopy of the whole snapshot")
    ap.add_argument("--no-empty", action="store_true", help="skip the runs with nothing changed")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per row (the pattern's units rewritten between rounds); the median is shown",
    )
    ap.add_argument("--workdir", type=Path, help="parent of the work directory (default: TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", type=Path, help="also write the report to this file")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke check (< 60 s): a 128 MiB disk, stream and NBD x4 only, no runs with nothing"
        " changed, no whole-snapshot nbdcopy",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.conns, args.no_empty, args.no_whole = "128M", "4", True, True
    for tool in ("nbdcopy", "nbdinfo", "nbdkit"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"fastpath_bench: {tool} is required: apt-get install nbdkit nbdkit-plugin-python libnbd-bin"
            )
    opts = Options(
        size=parse_size(args.size),
        fill=args.fill,
        rate=int(args.rate * MIB),
        conns=[int(c) for c in args.conns.split(",")],
        patterns=[p.strip() for p in args.patterns.split(",") if p.strip()],
        limit_target=args.limit_target,
        check=not args.no_check,
        whole=not args.no_whole,
        empty=not args.no_empty,
        repeat=max(1, args.repeat),
        workdir=args.workdir,
        keep=args.keep,
        command=shlex.join(
            [".venv/bin/python", "benches/fastpath_bench.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    )
    if opts.size % BLOCK:
        raise SystemExit("fastpath_bench: --size must be a multiple of 2 MiB")
    try:
        text = run_all(opts)
    except BenchError as err:
        print(f"fastpath_bench: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
