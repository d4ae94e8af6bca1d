"""Helpers of the multi-host session tests: a two-pool simulator of three hosts per pool, a VM
on pool 0's shared SR, a configuration replicating it, and `xencr` run in-process."""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from typer.testing import CliRunner

from xencr.cli.app import app
from xencr.replication import metadata as md
from xencr.sim.control import sim_call
from xencr.sim.harness import RunningSimulator, running_simulator
from xencr.xapi.members import PoolHost, PoolHosts
from xencr.xapi.session import Endpoint, XapiSession
from xencr.xapi.tls import display_fingerprint

MIB = 1024 * 1024
PASSWORD = "multi-host-pw"
VM = "shared-vm"  # pool 0's vm0 copied to the shared SR: no data redirect needed
SHARED = "Second storage"  # nfs, plugged on every host
JOB = "mh"


@dataclass
class Pools:
    sim: RunningSimulator
    pool_uuids: list[str] = field(default_factory=list)

    def url(self, pool: int, host: int) -> str:
        return self.sim.host_urls[pool][host]

    def address(self, pool: int, host: int) -> str:
        return urlsplit(self.url(pool, host)).netloc

    def fingerprint(self, pool: int, host: int) -> str:
        """The sha256 (hex) of the certificate host ``host`` presents (generated without TLS too)."""
        der = ssl.PEM_cert_to_DER_cert(self.sim.certificate(pool, host).read_text())
        return hashlib.sha256(der).hexdigest()

    def shown(self, pool: int, host: int) -> str:
        return display_fingerprint(self.fingerprint(pool, host))

    def known(self, pool: int) -> PoolHosts:
        """The pool's hosts and certificates as the test knows them (the simulator's files)."""
        hosts = tuple(
            PoolHost(
                "", f"sim-host-{pool}-{j}", self.address(pool, j), j == 0, True, self.fingerprint(pool, j)
            )
            for j in range(len(self.sim.host_urls[pool]))
        )
        return PoolHosts(self.pool_uuids[pool] if pool < len(self.pool_uuids) else "", hosts, verified=True)

    def session(self, pool: int) -> XapiSession:
        """A session on the pool's master, wherever it is now and whichever host is down."""
        pin = self.fingerprint(pool, 0) if self.sim.tls else None
        endpoint = Endpoint(self.url(pool, 0), fingerprint=pin, known=self.known(pool))
        return XapiSession(endpoint, "root", PASSWORD, retries=0)

    def host_ref(self, s: XapiSession, host: int) -> str:
        (ref,) = [
            r for r, rec in s.api.host.get_all_records().items() if rec["name_label"].endswith(f"-{host}")
        ]
        return str(ref)

    def move_master(self, pool: int, host: int) -> None:
        with self.session(pool) as s:
            s.api.pool.designate_new_master(self.host_ref(s, host))

    def host_down(self, pool: int, host: int, down: bool = True) -> None:
        sim_call(self.sim.state, "sim.fault_host_down", str(host), down, pool_index=pool)

    def reset(self) -> None:
        """Every host up, host 0 the master, as the tests start."""
        for pool in range(len(self.sim.urls)):
            sim_call(self.sim.state, "sim.fault_clear", pool_index=pool)
            with self.session(pool) as s:
                for ref in s.api.host.get_all():
                    s.api.host.enable(ref)
                s.api.pool.designate_new_master(self.host_ref(s, 0))  # the session ends here


@contextmanager
def served(state: Path, *, tls: bool) -> Iterator[Pools]:
    with running_simulator(
        state, pools=2, hosts=3, vms=1, disk_size=4 * MIB, sr_size=256 * MIB, password=PASSWORD, tls=tls
    ) as sim:
        pools = Pools(sim)
        for i in range(len(sim.urls)):
            with pools.session(i) as s:
                pools.pool_uuids.append(str(s.api.pool.get_uuid(s.api.pool.get_all()[0])))
        with pools.session(0) as s:
            vm = s.api.VM.get_by_name_label("vm0")[0]
            s.api.VM.copy(vm, VM, s.api.SR.get_by_name_label(SHARED)[0])
        yield pools


def write_config(tmp: Path, pools: Pools, *, pinned: bool = False) -> Path:
    """Pools ``a`` (source) and ``b`` (target) by their host 0, pinned by host 0's certificate
    when ``pinned``; job ``mh`` replicates the shared VM to b's shared SR."""
    tmp.mkdir(parents=True, exist_ok=True)
    pw = tmp / "pw"
    pw.write_text(PASSWORD)
    os.chmod(pw, 0o600)
    pin = [f'fingerprint = "{pools.shown(i, 0)}"\n' if pinned else "" for i in (0, 1)]
    cfg = tmp / "xencr.toml"
    cfg.write_text(
        f'state = "{tmp / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{pools.url(0, 0)}"\npassword_file = "{pw}"\n{pin[0]}'
        f'[pools.b]\nurl = "{pools.url(1, 0)}"\npassword_file = "{pw}"\n{pin[1]}'
        f'[jobs.{JOB}]\npool = "a"\nvms = ["{VM}"]\n'
        f'[[jobs.{JOB}.targets]]\npool = "b"\nsr = "{SHARED}"\n'
        f'[[jobs.{JOB}.schedules]]\nevery = "15m"\nretention = 2\n'
    )
    return cfg


def xencr(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def disk_hashes(s: XapiSession, vm_uuid: str) -> dict[str, str]:
    """userdevice -> sha256 of each disk of a VM (a snapshot or a replica)."""
    vm = s.api.VM.get_by_uuid(vm_uuid)
    return {
        s.api.VBD.get_userdevice(b): s.api.sim.hash(s.api.VDI.get_uuid(s.api.VBD.get_VDI(b)))
        for b in s.api.VM.get_VBDs(vm)
        if s.api.VBD.get_type(b) == "Disk"
    }


def newest_snapshot(s: XapiSession) -> str:
    """The UUID of the shared VM's newest snapshot by the job (the one its last run sent)."""
    vm = s.api.VM.get_by_name_label(VM)[0]
    snaps = [x for x in s.api.VM.get_snapshots(vm) if md.JOB in s.api.VM.get_other_config(x)]
    return str(s.api.VM.get_uuid(max(snaps, key=lambda x: str(s.api.VM.get_snapshot_time(x)))))


def guest_write(pools: Pools, seed: str) -> None:
    """Change one 2 MiB block of the shared VM's disk: the next run is a delta."""
    with pools.session(0) as s:
        vm = s.api.VM.get_by_name_label(VM)[0]
        vbd = next(v for v in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(v) == "Disk")
        s.api.sim.write(s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd)), str(MIB + 512), "4096", seed)


def replica_equals_snapshot(pools: Pools, restore_point: str) -> None:
    with pools.session(0) as s, pools.session(1) as t:
        source = disk_hashes(s, newest_snapshot(s))
        assert source and disk_hashes(t, restore_point) == source
