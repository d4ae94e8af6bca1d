"""The replication demo (`xencr demo`): two simulated pools, a job for two VMs, a full run, guest
writes, a delta run, and proof that the newest restore points hold exactly the source snapshots'
content, that a replica refuses to start, and that a clone of it boots."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from xencr.cli.run import summary_lines
from xencr.config import load_config
from xencr.replication import metadata as md
from xencr.replication.jobs import connect, run_configured
from xencr.replication.target import restore_points
from xencr.sim.harness import running_simulator
from xencr.xapi.errors import XapiError
from xencr.xapi.session import Endpoint, XapiSession

MIB = 1024 * 1024
JOB = "demo"


def _config(d: Path, urls: list[str], password: str, sr: str) -> Path:
    pw = d / "pool.password"
    fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    cfg = d / "xencr.toml"
    cfg.write_text(
        f'state = "{d / "state.sqlite"}"\n\n'
        f'[pools.site-a]\nurl = "{urls[0]}"\npassword_file = "{pw}"\n\n'
        f'[pools.site-b]\nurl = "{urls[1]}"\npassword_file = "{pw}"\n\n'
        f'[jobs.{JOB}]\npool = "site-a"\nvms = ["vm0", "vm1"]\n\n'
        f'[[jobs.{JOB}.targets]]\npool = "site-b"\nsr = "{sr}"\n\n'
        f'[[jobs.{JOB}.schedules]]\nevery = "10m"\nretention = 3\n'
    )
    return cfg


def _disk_hashes(s: XapiSession, vm: str) -> dict[str, str]:
    out = {}
    for vbd in s.api.VM.get_VBDs(vm):
        if s.api.VBD.get_type(vbd) == "Disk":
            out[str(s.api.VBD.get_userdevice(vbd))] = str(
                s.api.sim.hash(s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd)))
            )
    return out


def run(keep: str | None = None, say: Callable[[str], None] = print) -> bool:
    """Run the demo; True when every check held."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xencr-demo-") as tmp:
        d = Path(keep) if keep else Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        password = os.urandom(12).hex()
        with running_simulator(
            d / "sim", pools=2, vms=2, disk_size=64 * MIB, sr_size=4096 * MIB, password=password
        ) as sim:
            urls = sim.urls
            say(f"simulator: pool site-a at {urls[0]}, pool site-b at {urls[1]}")
            with XapiSession(Endpoint(urls[1]), "root", password) as b:
                sr = b.api.SR.get_name_label(b.api.pool.get_default_SR(b.api.pool.get_all()[0]))
            cfg = load_config(_config(d, urls, password, sr))
            say(f"config: {cfg.path} (job {JOB!r}: vm0, vm1 from site-a to site-b {sr!r})")
            progress = lambda line: say(f"  {line}")  # noqa: E731
            say("== run 1 (first run: full copies)")
            r1 = run_configured(cfg, JOB, progress=progress)
            for line in summary_lines(r1):
                say(line)
            with connect(cfg.pool("site-a"), interactive=False) as src:
                for name in ("vm0", "vm1"):
                    vm = src.api.VM.get_by_name_label(name)[0]
                    vbd = next(v for v in src.api.VM.get_VBDs(vm) if src.api.VBD.get_type(v) == "Disk")
                    vdi_uuid = src.api.VDI.get_uuid(src.api.VBD.get_VDI(vbd))
                    src.api.sim.write(vdi_uuid, str(7 * MIB + 4096), str(300 * 1024), f"guest-{name}")
                    say(f"guest write: {name} wrote 300 KiB at 7 MiB")
            say("== run 2 (delta: only the changed 2 MiB blocks)")
            r2 = run_configured(cfg, JOB, progress=progress)
            for line in summary_lines(r2):
                say(line)
            ok = r1.outcome == r2.outcome == "success"
            ok &= all(t.kind == "delta" for v in r2.vms for t in v.targets)
            ok &= _verify(cfg, r2, say)
        say(f"demo {'succeeded' if ok else 'FAILED'} in {time.monotonic() - started:.1f}s")
        return ok


def _verify(cfg: object, report: object, say: Callable[[str], None]) -> bool:
    from xencr.config import Config
    from xencr.replication.runner import RunReport

    assert isinstance(cfg, Config) and isinstance(report, RunReport)
    ok = True
    job_id = cfg.job(JOB).id
    with (
        connect(cfg.pool("site-a"), interactive=False) as src,
        connect(cfg.pool("site-b"), interactive=False) as dst,
    ):
        sr_uuid = next(t.sr_uuid for v in report.vms for t in v.targets)
        say("== restore points on site-b")
        newest = {}
        for v in report.vms:
            points = restore_points(dst, job_id, v.vm_uuid, sr_uuid)
            for p in points:
                say(f"  {p.name}  {p.uuid}  {'protected' if p.protected else 'UNPROTECTED'}")
            newest[v.vm_name] = (v, points[-1])
        for name, (v, rp) in newest.items():
            snap = src.api.VM.get_by_uuid(v.snapshot)
            same = _disk_hashes(dst, rp.ref) == _disk_hashes(src, str(snap))
            ok &= same
            say(
                f"verify {name}: newest restore point {'==' if same else '!='} source snapshot {v.snapshot} "
                f"(sha256 of every disk)"
            )
        v, rp = newest["vm0"]
        try:
            dst.api.VM.start(rp.ref, False, False)
            say("start replica: NOT refused")
            ok = False
        except XapiError as err:
            ok &= err.code == "OPERATION_BLOCKED" and err.params[1:] == [md.START_BLOCKED]
            say(f"start replica: refused with {err}")
        clone = dst.api.VM.clone(rp.ref, "vm0 (clone for use)")
        dst.api.VM.set_is_a_template(clone, False)
        dst.api.VM.start(clone, False, False)
        state = str(dst.api.VM.get_power_state(clone))
        ok &= state == "Running"
        say(f"clone {dst.api.VM.get_uuid(clone)} of the replica: {state}")
        dst.api.VM.hard_shutdown(clone)
    return ok
