"""The replication demo (`xencr demo`): two simulated pools of two hosts each, a job for two VMs
(one on each host's local SR) to an SR that only a member of the target pool sees, so that the
data handlers answer XAPI's 302 and xencr follows them; a full run, guest writes, a delta run,
and proof that the newest restore points hold exactly the source snapshots' content, that a
replica refuses to start, and that a clone of it boots on the host that sees its SR."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from xencr.cli.run import summary_lines
from xencr.config import Config, load_config
from xencr.replication import metadata as md
from xencr.replication.jobs import connect, run_configured
from xencr.replication.runner import RunReport
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


def _member_sr(s: XapiSession) -> str:
    """The name of the local SR of the pool's member (a host other than the master)."""
    master = s.api.pool.get_master(s.api.pool.get_all()[0])
    for rec in s.api.SR.get_all_records().values():
        hosts = {s.api.PBD.get_host(p) for p in rec["PBDs"]}
        if not rec["shared"] and len(hosts) == 1 and master not in hosts and rec["content_type"] != "iso":
            return str(rec["name_label"])
    raise RuntimeError("the simulated pool has no member with a local SR")


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
            d / "sim", pools=2, vms=2, disk_size=64 * MIB, sr_size=4096 * MIB, password=password, hosts=2
        ) as sim:
            urls = sim.urls
            for name, hosts in zip(("site-a", "site-b"), sim.host_urls, strict=True):
                say(f"simulator: pool {name}, master at {hosts[0]}, member at {hosts[1]}")
            with XapiSession(Endpoint(urls[1]), "root", password) as b:
                sr = _member_sr(b)
            cfg = load_config(_config(d, urls, password, sr))
            say(f"config: {cfg.path} (job {JOB!r}: vm0, vm1 from site-a to site-b {sr!r})")
            say(
                "  vm0's disk is on site-a's master, vm1's on its member; site-b's SR is plugged on its"
                " member only: the transfers are redirected (302) to the members, and xencr follows"
            )
            progress = lambda line: say(f"  {line}")  # noqa: E731
            say("== run 1 (first run: full copies)")
            r1 = run_configured(cfg, JOB, progress=progress)
            for line in summary_lines(r1):
                say(line)
            with connect(cfg.pool("site-a"), interactive=False, state_path=cfg.state.local_path) as src:
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


def _verify(cfg: Config, report: RunReport, say: Callable[[str], None]) -> bool:
    ok = True
    job_id = cfg.job(JOB).id
    with (
        connect(cfg.pool("site-a"), interactive=False, state_path=cfg.state.local_path) as src,
        connect(cfg.pool("site-b"), interactive=False, state_path=cfg.state.local_path) as dst,
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
        host = str(dst.api.host.get_name_label(dst.api.VM.get_resident_on(clone)))
        ok &= state == "Running"
        where = f"on {host}, the host that sees its SR"
        say(f"clone {dst.api.VM.get_uuid(clone)} of the replica: {state} {where}")
        dst.api.VM.hard_shutdown(clone)
    return ok
