"""Helpers of the XAPI client and replication tests: a two-pool simulator served in-process."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xencr.sim.harness import running_simulator
from xencr.sim.tls import fingerprint
from xencr.xapi.session import Endpoint, XapiSession

MIB = 1024 * 1024
PASSWORD = "pw:with@odd/chars%"


@dataclass
class Pools:
    state: Path
    urls: list[str]
    fingerprint: str | None = None
    sessions: list[XapiSession] = field(default_factory=list)

    def session(self, i: int, fingerprint: str | None = None) -> XapiSession:
        endpoint = Endpoint(self.urls[i], fingerprint=fingerprint or self.fingerprint)
        s = XapiSession(endpoint, "root", PASSWORD, retries=1, backoff=0.05)
        self.sessions.append(s)
        return s


def run_sim(state: Path, *, tls: bool = False) -> Iterator[Pools]:
    """Serve a fresh two-pool state until the generator is closed."""
    with running_simulator(
        state, pools=2, vms=2, disk_size=16 * MIB, sr_size=1024 * MIB, password=PASSWORD, tls=tls
    ) as sim:
        fp = None
        if tls:
            fp = fingerprint(state / "tls" / "cert.pem").replace(":", "").lower()
        p = Pools(state, sim.urls, fp)
        yield p
        for s in p.sessions:
            s.logout()


def password_file(tmp: Path, password: str = PASSWORD) -> Path:
    """The simulator's password in a mode-0600 file, as a configuration names it."""
    tmp.mkdir(parents=True, exist_ok=True)
    pw = tmp / "pw"
    pw.write_text(password)
    os.chmod(pw, 0o600)
    return pw


def default_sr(pools: Pools, i: int = 1) -> str:
    """The UUID of pool ``i``'s default SR."""
    t = pools.session(i)
    return str(t.api.SR.get_uuid(t.api.pool.get_default_SR(t.api.pool.get_all()[0])))


def job_config(
    tmp: Path,
    pools: Pools,
    job: str,
    vms: list[str],
    *,
    retention: int = 3,
    job_extra: str = "",
    url: str | None = None,
    sr: str | None = None,
    password: str = PASSWORD,
) -> Path:
    """A configuration: pool ``a`` (source, ``url`` or the first simulated pool) and ``b``
    (target), one job replicating ``vms`` to ``sr`` (default: b's default SR, by UUID)."""
    pw = password_file(tmp, password)
    cfg = tmp / "xencr.toml"
    cfg.write_text(
        f'state = "{tmp / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{url or pools.urls[0]}"\npassword_file = "{pw}"\n'
        f'[pools.b]\nurl = "{pools.urls[1]}"\npassword_file = "{pw}"\n'
        f'[jobs.{job}]\npool = "a"\nvms = {json.dumps(vms)}\n{job_extra}\n'
        f'[[jobs.{job}.targets]]\npool = "b"\nsr = "{sr or default_sr(pools)}"\n'
        f'[[jobs.{job}.schedules]]\nevery = "15m"\nretention = {retention}\n'
    )
    return cfg


def disk_uuid(pools: Pools, vm_name: str) -> str:
    """The UUID of the first disk of a source VM."""
    s = pools.session(0)
    vm = s.api.VM.get_by_name_label(vm_name)[0]
    vbd = next(v for v in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(v) == "Disk")
    return str(s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd)))


def change(pools: Pools, vm_name: str, blocks: int, seed: str) -> None:
    """Write into ``blocks`` distinct 2 MiB blocks of the VM's disk: a delta of that many blocks."""
    s = pools.session(0)
    for i in range(blocks):
        s.api.sim.write(disk_uuid(pools, vm_name), str(i * 2 * MIB + 512), "512", f"{seed}-{i}")


def disk_hashes(s: XapiSession, vm: str) -> dict[str, str]:
    """user device -> the simulator's sha256 of each disk of a VM or snapshot."""
    out = {}
    for vbd in s.api.VM.get_VBDs(vm):
        if s.api.VBD.get_type(vbd) == "Disk":
            out[str(s.api.VBD.get_userdevice(vbd))] = str(
                s.api.sim.hash(s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd)))
            )
    return out
