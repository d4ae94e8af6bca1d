"""The simulated hosts' NBD service: network purposes, VDI.get_nbd_info, real nbdkit exports read
by libnbd's nbdinfo/nbdcopy, TLS, the dom0 attachment while a client is connected, the
per-connection rate limit (xapi.md 4.6; FIDELITY.md)."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import XenAPI
from simtest import MIB, Sim, export_path, failure, first_vm, http_request, vm_disk

from xencr.sim.harness import running_simulator
from xencr.sim.layout import init_state
from xencr.sim.nbd import nbdkit_available
from xencr.sim.pool_state import PoolState

pytestmark = pytest.mark.skipif(
    not nbdkit_available() or not Path("/usr/bin/nbdcopy").exists(),
    reason="nbdkit, nbdkit-plugin-python and libnbd-bin are installed by scripts/_setup.sh",
)

NBD_DISK = 16 * MIB


@pytest.fixture(scope="module")
def nsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    state = tmp_path_factory.mktemp("nbdsim")
    init_state(state, 1, vms=2, disk_size=NBD_DISK, sr_size=1024 * MIB, password="s3cret-pw")
    s = Sim(state)
    s.start()
    yield s
    s.shutdown()


def network(x: Any, bridge: str = "xenbr0") -> str:
    return str(next(r for r, n in x.network.get_all_records().items() if n["bridge"] == bridge))


def set_purpose(x: Any, purpose: str | None) -> None:
    """The pool's only NBD purpose becomes ``purpose`` (on the management network)."""
    for net, rec in x.network.get_all_records().items():
        for p in rec["purpose"]:
            if p != purpose:
                x.network.remove_purpose(net, p)
    if purpose:
        x.network.add_purpose(network(x), purpose)


def uri(info: dict[str, Any], *, tls_dir: Path | None = None) -> str:
    scheme = "nbds" if tls_dir else "nbd"
    base = f"{scheme}://{info['address']}:{info['port']}/" + quote(info["exportname"], safe="/")
    return base + (f"?tls-certificates={tls_dir}" if tls_dir else "")


def raw_sha256(sim: Sim, session: Any, vdi: str) -> str:
    status, _, body = http_request(sim, "GET", export_path(session, vdi, "raw"))
    assert status == 200
    return hashlib.sha256(body).hexdigest()


def nbdcopy_sha256(target: str, tmp: Path, *extra: str) -> str:
    out = tmp / "copy.raw"
    out.unlink(missing_ok=True)
    subprocess.run(["nbdcopy", *extra, target, str(out)], check=True, capture_output=True, timeout=120)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def dom0_vbds(x: Any, vdi: str) -> list[dict[str, Any]]:
    dom0s = {r for r, vm in x.VM.get_all_records().items() if vm["is_control_domain"]}
    return [r for r in x.VBD.get_all_records().values() if r["VDI"] == vdi and r["VM"] in dom0s]


# A client that negotiates NBD_OPT_GO and then holds the connection until killed (fixed
# newstyle handshake, no TLS): prints "ready" once the export is open.
HOLDER = r"""
import socket, struct, sys, time
host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.create_connection((host, port))
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("closed")
        b += c
    return b
assert recv(16) == b"NBDMAGICIHAVEOPT"
recv(2)
s.sendall(struct.pack(">I", 3))
data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)
while True:
    _, _, kind, length = struct.unpack(">QIII", recv(20))
    recv(length)
    if kind == 1:
        break
    if kind & 0x80000000:
        raise SystemExit("refused")
print("ready", flush=True)
time.sleep(600)
"""


def hold(info: dict[str, Any]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, info["address"], str(info["port"]), info["exportname"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


def wait_until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------


def test_network_purposes(nsim: Sim) -> None:
    x = nsim.session().xenapi
    set_purpose(x, None)
    net, second = network(x), network(x, "xenbr1")
    vdi = vm_disk(x, first_vm(x))
    assert x.VDI.get_nbd_info(vdi) == []  # no network with an NBD purpose
    x.network.add_purpose(net, "nbd")
    x.network.add_purpose(net, "nbd")  # already there: nothing to do
    assert x.network.get_purpose(net) == ["nbd"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.network.add_purpose(second, "insecure_nbd")  # any network of the pool conflicts
    assert failure(exc) == ["NETWORK_INCOMPATIBLE_PURPOSES", "insecure_nbd", "nbd"]
    x.network.remove_purpose(second, "nbd")  # absent: silent
    x.network.remove_purpose(net, "nbd")
    assert x.network.get_purpose(net) == []
    x.network.add_purpose(second, "insecure_nbd")
    assert x.VDI.get_nbd_info(vdi) == []  # eth1 has no IP: no record
    x.network.remove_purpose(second, "insecure_nbd")
    with pytest.raises(XenAPI.Failure) as exc:
        x.network.add_purpose(net, "bogus")
    assert exc.value.details[0] == "INTERNAL_ERROR"


def test_get_nbd_info_records(nsim: Sim) -> None:
    s = nsim.session()
    x = s.xenapi
    set_purpose(x, "nbd")
    vdi = vm_disk(x, first_vm(x))
    host = x.host.get_all()[0]
    [info] = x.VDI.get_nbd_info(vdi)
    assert set(info) == {"exportname", "address", "port", "cert", "subject"}
    assert info["exportname"] == f"/{x.VDI.get_uuid(vdi)}?session_id={s._session}"
    assert info["address"] == "127.0.0.1"
    assert int(info["port"]) > 0 and isinstance(info["port"], str)  # an int travels as a string
    assert info["cert"] == x.host.get_server_certificate(host)
    assert info["subject"] == "localhost"  # the certificate's DNS name
    set_purpose(x, "insecure_nbd")
    [plain] = x.VDI.get_nbd_info(vdi)
    assert plain["cert"] == info["cert"] and plain["subject"] == "localhost"  # returned all the same


def test_insecure_exports_read_the_raw_export(nsim: Sim, tmp_path: Path) -> None:
    s = nsim.session()
    x = s.xenapi
    set_purpose(x, "insecure_nbd")
    vdi = vm_disk(x, first_vm(x))
    uuid = x.VDI.get_uuid(vdi)
    snap = x.VDI.snapshot(vdi)
    x.sim.write(uuid, str(5 * MIB + 3), str(70000), "after-snapshot")  # a chain of two files
    for disk in (vdi, snap):
        [info] = x.VDI.get_nbd_info(disk)
        assert nbdcopy_sha256(uri(info), tmp_path) == raw_sha256(nsim, s, disk)
    [info] = x.VDI.get_nbd_info(vdi)
    mapping = subprocess.run(["nbdinfo", "--map", uri(info)], check=True, capture_output=True, text=True)
    extents = [line.split() for line in mapping.stdout.splitlines()]
    data = [(int(e[0]), int(e[1])) for e in extents if e[2] == "0"]
    holes = [(int(e[0]), int(e[1])) for e in extents if e[2] == "3"]
    # allocated 2 MiB blocks: the first MiB and the middle one (layout) plus the write at 5 MiB
    assert data == [(0, 2 * MIB), (4 * MIB, 2 * MIB), (8 * MIB, 2 * MIB)]
    assert sum(length for _, length in holes) == NBD_DISK - 6 * MIB
    wait_until(lambda: x.sim.nbd_attachments() == [], "an attachment outlived its client")
    x.VDI.destroy(snap)


def test_tls_required_for_nbd(nsim: Sim, tmp_path: Path) -> None:
    s = nsim.session()
    x = s.xenapi
    set_purpose(x, "nbd")
    vdi = vm_disk(x, first_vm(x))
    [info] = x.VDI.get_nbd_info(vdi)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "ca-cert.pem").write_text(info["cert"])
    assert nbdcopy_sha256(uri(info, tls_dir=trusted), tmp_path) == raw_sha256(nsim, s, vdi)
    plain = subprocess.run(["nbdinfo", uri(info)], capture_output=True, text=True)
    assert plain.returncode != 0  # --tls=require: no export without TLS
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    key, ca = str(wrong / "key.pem"), str(wrong / "ca-cert.pem")
    make = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    subprocess.run(
        [*make, "-keyout", key, "-out", ca, "-days", "1", "-subj", "/CN=x"],
        check=True,
        capture_output=True,
    )
    refused = subprocess.run(["nbdinfo", uri(info, tls_dir=wrong)], capture_output=True, text=True)
    assert refused.returncode != 0 and "certificate" in refused.stderr
    wait_until(lambda: x.sim.nbd_attachments() == [], "an attachment outlived its client")


def test_insecure_server_refuses_tls_clients(nsim: Sim, tmp_path: Path) -> None:
    x = nsim.session().xenapi
    set_purpose(x, "insecure_nbd")
    [info] = x.VDI.get_nbd_info(vm_disk(x, first_vm(x)))
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "ca-cert.pem").write_text(info["cert"])
    refused = subprocess.run(["nbdinfo", uri(info, tls_dir=trusted)], capture_output=True, text=True)
    assert refused.returncode != 0


def test_bad_session_and_destroyed_data_refused(nsim: Sim) -> None:
    s = nsim.session()
    x = s.xenapi
    set_purpose(x, "insecure_nbd")
    vdi = vm_disk(x, first_vm(x))
    [info] = x.VDI.get_nbd_info(vdi)
    forged = {**info, "exportname": info["exportname"].rsplit("=", 1)[0] + "=OpaqueRef:not-a-session"}
    assert subprocess.run(["nbdinfo", uri(forged)], capture_output=True).returncode != 0
    unknown = {**info, "exportname": "/00000000-0000-0000-0000-000000000001" + info["exportname"][37:]}
    assert subprocess.run(["nbdinfo", uri(unknown)], capture_output=True).returncode != 0
    x.VDI.enable_cbt(vdi)
    snap = x.VDI.snapshot(vdi)
    [snap_info] = x.VDI.get_nbd_info(snap)
    x.VDI.data_destroy(snap)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.get_nbd_info(snap)
    assert failure(exc) == ["VDI_INCOMPATIBLE_TYPE", snap, "cbt_metadata"]
    # a client holding the old export name: VBD.create refuses the cbt_metadata VDI
    assert subprocess.run(["nbdinfo", uri(snap_info)], capture_output=True).returncode != 0
    wait_until(lambda: x.sim.nbd_attachments() == [], "an attachment outlived its client")
    assert not dom0_vbds(x, snap)
    x.VDI.destroy(snap)
    x.VDI.disable_cbt(vdi)


def test_attachment_while_connected(nsim: Sim) -> None:
    x = nsim.session().xenapi
    set_purpose(x, "insecure_nbd")
    vdi = vm_disk(x, first_vm(x, "vm1"))
    x.VDI.enable_cbt(vdi)
    snap = x.VDI.snapshot(vdi)
    [info] = x.VDI.get_nbd_info(vdi)
    holder = hold(info)
    try:
        [vbd] = dom0_vbds(x, vdi)
        assert vbd["mode"] == "RO" and vbd["currently_attached"] and vbd["type"] == "Disk"
        [attachment] = x.sim.nbd_attachments()
        assert attachment["vdi"] == x.VDI.get_uuid(vdi)
        assert attachment["host"] == x.host.get_uuid(x.host.get_all()[0])
        assert x.VBD.get_by_uuid(vbd["uuid"]) == attachment["vbd"]
        with pytest.raises(XenAPI.Failure) as exc:
            x.VDI.destroy(vdi)
        assert failure(exc) == ["VDI_IN_USE", vdi, "destroy"]
        with pytest.raises(XenAPI.Failure) as exc:
            x.VDI.list_changed_blocks(snap, vdi)
        assert failure(exc) == ["VDI_IN_USE", vdi, "list_changed_blocks"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    wait_until(lambda: not dom0_vbds(x, vdi), "the VBD outlived its client")
    wait_until(lambda: x.sim.nbd_attachments() == [], "an attachment outlived its client")
    assert x.VDI.list_changed_blocks(snap, vdi)  # no longer in use
    x.VDI.destroy(snap)
    x.VDI.disable_cbt(vdi)


def test_killed_copy_leaves_no_attachment(nsim: Sim, tmp_path: Path) -> None:
    x = nsim.session().xenapi
    set_purpose(x, "insecure_nbd")
    vdi = vm_disk(x, first_vm(x))
    [info] = x.VDI.get_nbd_info(vdi)
    x.sim.fault_connection_rate(str(256 * 1024))  # slow enough to kill it mid-copy
    try:
        copy = subprocess.Popen(["nbdcopy", "-C", "2", uri(info), str(tmp_path / "c.raw")])
        wait_until(lambda: len(dom0_vbds(x, vdi)) == 2, "nbdcopy did not connect twice")
        copy.send_signal(signal.SIGKILL)
        copy.wait()
    finally:
        x.sim.fault_connection_rate("0")
    wait_until(lambda: not dom0_vbds(x, vdi), "VBDs outlived a killed client")
    wait_until(lambda: x.sim.nbd_attachments() == [], "an attachment outlived its client")


def test_connection_rate_limits_each_connection(nsim: Sim, tmp_path: Path) -> None:
    s = nsim.session()
    x = s.xenapi
    set_purpose(x, "insecure_nbd")
    vdi = vm_disk(x, first_vm(x))
    [info] = x.VDI.get_nbd_info(vdi)
    rate = 4 * MIB
    x.sim.fault_connection_rate(str(rate))
    try:
        assert int(x.sim.faults()["connection_rate"]) == rate
        started = time.monotonic()
        digest = nbdcopy_sha256(uri(info), tmp_path, "-C", "1")
        elapsed = time.monotonic() - started
        # 4 MiB allocated (holes are not read), 0.1 s of burst allowed
        assert elapsed >= (4 * MIB - 0.1 * rate) / rate
        assert digest == x.sim.hash(x.VDI.get_uuid(vdi))
        started = time.monotonic()
        status, _, body = http_request(nsim, "GET", export_path(s, vdi, "vhd"))  # the stream path
        assert status == 200 and len(body) > 4 * MIB
        assert time.monotonic() - started >= len(body) / rate * 0.9
    finally:
        x.sim.fault_connection_rate("0")
    assert int(x.sim.faults()["connection_rate"]) == 0


def test_purpose_removed_stops_the_service(nsim: Sim) -> None:
    x = nsim.session().xenapi
    set_purpose(x, "insecure_nbd")
    [info] = x.VDI.get_nbd_info(vm_disk(x, first_vm(x)))
    set_purpose(x, None)
    with pytest.raises(OSError), socket.create_connection((info["address"], int(info["port"])), timeout=5):
        pass  # the firewall closes the NBD port


def test_restart_keeps_port_and_cleans_leaked_vbds(tmp_path: Path) -> None:
    with running_simulator(tmp_path / "sim", pools=1, vms=1, disk_size=4 * MIB) as sim:
        s = XenAPI.Session(sim.urls[0])
        s.xenapi.login_with_password("root", sim.password, "1.0", "t")
        x = s.xenapi
        set_purpose(x, "insecure_nbd")
        vdi = vm_disk(x, first_vm(x))
        [info] = x.VDI.get_nbd_info(vdi)
        holder = hold(info)
        sim.stop()  # the server goes away with a client connected
        holder.kill()
        holder.wait()
        sim.start()
        s = XenAPI.Session(sim.urls[0])
        s.xenapi.login_with_password("root", sim.password, "1.0", "t")
        x = s.xenapi
        assert not dom0_vbds(x, vdi)
        [again] = x.VDI.get_nbd_info(vdi)
        assert again["port"] == info["port"]
        vdi_uuid = x.VDI.get_uuid(vdi)
        sim.stop()
        # a simulator killed with a client connected leaves its VBD: xapi-nbd's cleanup at start
        pool = PoolState(tmp_path / "sim", 0, sim.password)
        with pool.db.lock:
            dom0 = next(r for r, vm in pool.db.items("VM") if vm["is_control_domain"])
            ref = pool.db.by_uuid("VDI", vdi_uuid)
            leaked = pool.db.create(
                "VBD",
                {"VM": dom0, "VDI": ref, "mode": "RO", "type": "Disk", "userdevice": "9"}
                | {"currently_attached": True, "unpluggable": True, "_nbd": "pool0-0-0"},
            )
        pool.save()
        sim.start()
        s = XenAPI.Session(sim.urls[0])
        s.xenapi.login_with_password("root", sim.password, "1.0", "t")
        with pytest.raises(XenAPI.Failure):
            s.xenapi.VBD.get_record(leaked)


def test_multi_host_pool_lists_hosts_seeing_the_sr(tmp_path: Path) -> None:
    with running_simulator(tmp_path / "sim", pools=1, hosts=2, vms=2, disk_size=4 * MIB) as sim:
        s = XenAPI.Session(sim.urls[0])
        s.xenapi.login_with_password("root", sim.password, "1.0", "t")
        x = s.xenapi
        set_purpose(x, "nbd")
        hosts = [x.host.get_by_name_label(f"sim-host-0-{j}")[0] for j in range(2)]
        local = vm_disk(x, first_vm(x, "vm1"))  # on host 1's local SR
        [info] = x.VDI.get_nbd_info(local)
        assert info["cert"] == x.host.get_server_certificate(hosts[1])
        shared_sr = x.SR.get_by_name_label("Second storage")[0]
        shared = x.VDI.copy(local, shared_sr)
        both = x.VDI.get_nbd_info(shared)
        assert [r["cert"] for r in both] == [x.host.get_server_certificate(h) for h in hosts]
        assert len({r["port"] for r in both}) == 2  # each host its own port on 127.0.0.1
        for record in both:
            trusted = tmp_path / record["port"]
            trusted.mkdir()
            (trusted / "ca-cert.pem").write_text(record["cert"])
            assert nbdcopy_sha256(uri(record, tls_dir=trusted), tmp_path) == x.sim.hash(
                x.VDI.get_uuid(shared)
            )
        x.sim.fault_host_down("1", True)
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(both[1]["port"])), timeout=5):
            pass
        x.sim.fault_host_down("1", False)
        assert len(x.VDI.get_nbd_info(shared)) == 2
