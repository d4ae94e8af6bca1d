"""Pools of several hosts: layout, 302 redirects of the data handlers, HOST_IS_SLAVE, moving the
master, per-host certificates, a host going down, and VM placement by SR visibility."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import XenAPI
from simtest import DISK, MIB, Sim, failure, first_vm, vm_disk, wait_task
from typer.testing import CliRunner

from xencr.cli.app import app
from xencr.sim.harness import RunningSimulator, running_simulator
from xencr.sim.http_data import redirect_location
from xencr.sim.layout import init_state

PASSWORD = "multi-pw"


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSimulator]:
    """One pool of two hosts: vm0's disk on host 0's local SR, vm1's on host 1's."""
    with running_simulator(
        tmp_path_factory.mktemp("multi"),
        pools=1,
        vms=2,
        disk_size=DISK,
        sr_size=256 * MIB,
        password=PASSWORD,
        hosts=2,
    ) as sim:
        yield sim


def login(url: str, **kwargs: Any) -> Any:
    s = XenAPI.Session(url, **kwargs)
    s.xenapi.login_with_password("root", PASSWORD, "1.0", "multihost-tests")
    return s


def hosts(x: Any) -> list[str]:
    """Host refs in host order (by name: sim-host-0-0, sim-host-0-1)."""
    return sorted(x.host.get_all(), key=lambda h: x.host.get_name_label(h))


def address(url: str) -> str:
    return urlsplit(url).netloc


def get(
    url: str, path: str, context: ssl.SSLContext | None = None
) -> tuple[int, list[tuple[str, str]], bytes]:
    u = urlsplit(url)
    conn: http.client.HTTPConnection = (
        http.client.HTTPSConnection(u.hostname or "", u.port, context=context, timeout=30)
        if context
        else http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
    )
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.getheaders(), r.read()
    finally:
        conn.close()


def put(url: str, path: str, body: bytes) -> tuple[int, dict[str, str]]:
    """Headers and the whole body sent, then the answer read (what a naive client does)."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname or "", u.port or 80), timeout=30) as sock:
        sock.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        sock.sendall(body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    return int(lines[0].split()[1]), {
        k.strip(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
    }


def test_two_host_layout(two: RunningSimulator) -> None:
    x = login(two.urls[0]).xenapi
    h0, h1 = hosts(x)
    assert two.host_urls[0][0] == two.urls[0] and len(two.host_urls[0]) == 2
    # each host records where it listens; distinct ports on 127.0.0.1
    assert [x.host.get_address(h) for h in (h0, h1)] == [address(u) for u in two.host_urls[0]]
    assert x.pool.get_master(x.pool.get_all()[0]) == h0
    assert [x.host.get_enabled(h) for h in (h0, h1)] == [True, True]
    assert x.host.get_metrics(h0) != x.host.get_metrics(h1)
    assert x.host_metrics.get_memory_total(x.host.get_metrics(h1)) == str(64 * 1024 * MIB)
    dom0s = {
        r["resident_on"] for r in x.VM.get_all_records_where('field "is_control_domain"="true"').values()
    }
    assert dom0s == {h0, h1}
    seen = {}
    for r in x.SR.get_all_records().values():
        seen[r["name_label"]] = (r["type"], r["shared"], sorted(x.PBD.get_host(p) for p in r["PBDs"]))
        assert all(x.PBD.get_currently_attached(p) for p in r["PBDs"])
    assert seen == {
        "Local storage on sim-host-0-0": ("ext", False, [h0]),
        "Local storage on sim-host-0-1": ("ext", False, [h1]),
        "Second storage": ("nfs", True, sorted([h0, h1])),
        "iSCSI storage": ("lvmoiscsi", True, sorted([h0, h1])),
    }
    local1 = x.VDI.get_SR(vm_disk(x, first_vm(x, "vm1")))
    assert x.SR.get_name_label(local1) == "Local storage on sim-host-0-1"
    assert x.SR.get_name_label(x.pool.get_default_SR(x.pool.get_all()[0])) == "Local storage on sim-host-0-0"


def test_one_host_layout_unchanged(sim: Sim) -> None:
    """``hosts=1`` (the default): the historical single-host pool, no redirect, no HOST_IS_SLAVE."""
    x = sim.session().xenapi
    (host,) = x.host.get_all()
    assert sim.host_urls == [[sim.urls[0]], [sim.urls[1]]]
    assert x.host.get_name_label(host) == "sim-host-0" and x.host.get_address(host) == "127.0.0.1"
    layout = sorted(
        (r["name_label"], r["type"], r["shared"], [x.PBD.get_host(p) for p in r["PBDs"]])
        for r in x.SR.get_all_records().values()
    )
    assert layout == [
        ("Local storage on sim-host-0", "ext", False, [host]),
        ("Second storage", "ext", False, [host]),
        ("iSCSI storage", "lvmoiscsi", True, [host]),
    ]
    vdi = vm_disk(x, first_vm(x))
    session = sim.session()
    status, _, body = get(sim.urls[0], f"/export_raw_vdi?session_id={session._session}&vdi={vdi}&format=raw")
    assert status == 200 and hashlib.sha256(body).hexdigest() == x.sim.hash(x.VDI.get_uuid(vdi))


def test_export_redirected_to_the_member(two: RunningSimulator) -> None:
    s = login(two.urls[0])
    x = s.xenapi
    vdi = vm_disk(x, first_vm(x, "vm1"))  # on host 1's local SR
    path = f"/export_raw_vdi?session_id={s._session}&vdi={vdi}&format=raw"
    status, headers, body = get(two.urls[0], path)
    member = two.host_urls[0][1]
    assert (status, headers, body) == (
        302,
        [("Connection", "close"), ("Cache-Control", "no-cache, no-store"), ("Location", member + path)],
        b"",
    )
    status, _, body = get(member, path)  # the member serves it, with the master's session
    assert status == 200 and len(body) == DISK
    assert hashlib.sha256(body).hexdigest() == x.sim.hash(x.VDI.get_uuid(vdi))
    # the other way round: host 0's disk asked of the member goes to host 0
    local0 = vm_disk(x, first_vm(x, "vm0"))
    status, headers, _ = get(member, f"/export_raw_vdi?session_id={s._session}&vdi={local0}&format=vhd")
    assert status == 302 and dict(headers)["Location"].startswith(two.urls[0] + "/export_raw_vdi?")
    # a shared SR is served by whichever host is asked
    shared = x.SR.get_by_name_label("Second storage")[0]
    copy = x.VDI.copy(vdi, shared)
    status, _, body = get(member, f"/export_raw_vdi?session_id={s._session}&vdi={copy}&format=raw")
    assert status == 200 and hashlib.sha256(body).hexdigest() == x.sim.hash(x.VDI.get_uuid(vdi))
    x.VDI.destroy(copy)


def test_import_redirected_to_the_member(two: RunningSimulator) -> None:
    s = login(two.urls[0])
    x = s.xenapi
    source = vm_disk(x, first_vm(x, "vm1"))
    x.sim.write(x.VDI.get_uuid(source), str(3 * MIB), str(MIB), "member-import")
    _, _, stream = get(
        two.host_urls[0][1], f"/export_raw_vdi?session_id={s._session}&vdi={source}&format=vhd"
    )
    target = x.VDI.create(
        {
            "name_label": "import target",
            "SR": x.VDI.get_SR(source),
            "virtual_size": str(DISK),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
    )
    task = x.task.create("import", "")
    path = f"/import_raw_vdi?session_id={s._session}&vdi={target}&format=vhd&task_id={task}"
    status, headers = put(two.urls[0], path, stream)
    assert status == 302 and headers["Location"] == two.host_urls[0][1] + path
    assert x.task.get_status(task) == "pending"  # the redirect leaves the client's task alone
    status, headers = put(two.host_urls[0][1], path, stream)
    assert status == 200 and wait_task(x, task)["status"] == "success"
    assert x.sim.hash(x.VDI.get_uuid(target)) == x.sim.hash(x.VDI.get_uuid(source))
    x.task.destroy(task)
    x.VDI.destroy(target)


def test_redirect_location_reencodes_the_query() -> None:
    """xapi rebuilds the query from its parsed pairs with ocaml-uri: ``+`` was a space, a bare key
    gets ``=``, a comma in a value is encoded, ``:`` and ``/`` are not."""
    got = redirect_location(
        "https", "10.0.0.2", "/import_raw_vdi?session_id=OpaqueRef:a-1&chunked&n=a+b,c%2Fd"
    )
    assert got == "https://10.0.0.2/import_raw_vdi?session_id=OpaqueRef:a-1&chunked=&n=a%20b%2Cc/d"


def test_login_on_a_member_is_host_is_slave(two: RunningSimulator) -> None:
    master, member = two.host_urls[0]
    with pytest.raises(XenAPI.Failure) as exc:
        login(member)
    assert failure(exc) == ["HOST_IS_SLAVE", address(master)]
    # a wrong password gets the same answer at once: the member does not check it
    with pytest.raises(XenAPI.Failure) as exc:
        XenAPI.Session(member).xenapi.login_with_password("root", "wrong", "1.0", "t")
    assert failure(exc) == ["HOST_IS_SLAVE", address(master)]
    s = login(master)
    raw = xmlrpc.client.ServerProxy(member)
    assert raw.pool.get_all(s._session)["ErrorDescription"] == ["HOST_IS_SLAVE", address(master)]
    assert raw.pool.get_all("OpaqueRef:nope")["ErrorDescription"] == ["SESSION_INVALID", "OpaqueRef:nope"]


def test_designate_new_master(two: RunningSimulator) -> None:
    old_url, new_url = two.host_urls[0]
    x = login(old_url).xenapi
    h0, h1 = hosts(x)
    x.pool.designate_new_master(h0)  # the master already: nothing happens, the session lives on
    assert x.pool.get_master(x.pool.get_all()[0]) == h0
    x.pool.designate_new_master(h1)
    with pytest.raises(XenAPI.Failure) as exc:
        login(old_url)
    assert failure(exc) == ["HOST_IS_SLAVE", address(new_url)]
    y = login(new_url).xenapi
    assert y.pool.get_master(y.pool.get_all()[0]) == h1
    two.restart()  # which host is master, and where each listens, survive a restart
    assert two.host_urls[0] == [old_url, new_url]
    with pytest.raises(XenAPI.Failure) as exc:
        login(old_url)
    assert failure(exc) == ["HOST_IS_SLAVE", address(new_url)]
    y = login(new_url).xenapi
    y.pool.designate_new_master(h0)
    z = login(old_url).xenapi
    assert z.pool.get_master(z.pool.get_all()[0]) == h0


def test_vm_placement_by_sr(two: RunningSimulator) -> None:
    x = login(two.urls[0]).xenapi
    h0, h1 = hosts(x)
    vm0, vm1 = first_vm(x, "vm0"), first_vm(x, "vm1")
    local1 = x.VDI.get_SR(vm_disk(x, vm1))
    assert x.VM.get_possible_hosts(vm1) == [h1]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.start_on(vm1, h0, False, False)
    assert failure(exc) == ["VM_REQUIRES_SR", vm1, local1]
    x.VM.start(vm1, False, False)
    x.VM.start(vm0, False, False)
    try:
        assert x.VM.get_resident_on(vm1) == h1 and x.VM.get_resident_on(vm0) == h0
        assert vm1 in x.host.get_resident_VMs(h1)
    finally:
        x.VM.hard_shutdown(vm1)
        x.VM.hard_shutdown(vm0)
    x.host.disable(h1)
    try:
        with pytest.raises(XenAPI.Failure) as exc:
            x.VM.start(vm1, False, False)
        assert failure(exc) == ["NO_HOSTS_AVAILABLE"]
        with pytest.raises(XenAPI.Failure) as exc:
            x.VM.start_on(vm1, h1, False, False)
        assert failure(exc) == ["HOST_DISABLED", h1]
    finally:
        x.host.enable(h1)
    # memory: 64 GiB hosts whose control domain holds 4 GiB
    x.VM.set_memory_limits(
        vm0, str(70 * 1024 * MIB), str(70 * 1024 * MIB), str(70 * 1024 * MIB), str(70 * 1024 * MIB)
    )
    try:
        with pytest.raises(XenAPI.Failure) as exc:
            x.VM.start_on(vm0, h0, False, False)
        assert failure(exc) == ["HOST_NOT_ENOUGH_FREE_MEMORY", str(70 * 1024 * MIB), str(60 * 1024 * MIB)]
    finally:
        x.VM.set_memory_limits(vm0, str(512 * MIB), str(1024 * MIB), str(1024 * MIB), str(1024 * MIB))
    assert x.host.compute_free_memory(h0) == str(60 * 1024 * MIB)


def test_host_down_and_back(two: RunningSimulator) -> None:
    s = login(two.urls[0])
    x = s.xenapi
    h1 = hosts(x)[1]
    member = urlsplit(two.host_urls[0][1])
    idle = http.client.HTTPConnection(member.hostname or "", member.port, timeout=10)
    idle.request("POST", "/", b"<methodCall><methodName>pool.get_all</methodName><params/></methodCall>")
    idle.getresponse().read()  # a keep-alive connection to the member, open
    x.sim.fault_host_down(h1, True)
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((member.hostname or "", member.port or 80), timeout=5)
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            idle.request(
                "POST", "/", b"<methodCall><methodName>pool.get_all</methodName><params/></methodCall>"
            )
            idle.getresponse().read()
        assert x.host_metrics.get_live(x.host.get_metrics(h1)) is False
        assert x.sim.faults()["down_hosts"] == ["sim-host-0-1"]
        with pytest.raises(XenAPI.Failure) as exc:
            x.host.get_server_certificate(h1)
        assert failure(exc) == ["HOST_OFFLINE", h1]
        vm1 = first_vm(x, "vm1")
        with pytest.raises(XenAPI.Failure) as exc:
            x.VM.start_on(vm1, h1, False, False)
        assert failure(exc) == ["HOST_NOT_LIVE"]
        # the master still names the only host that sees the SR
        vdi = vm_disk(x, vm1)
        status, headers, _ = get(two.urls[0], f"/export_raw_vdi?session_id={s._session}&vdi={vdi}&format=raw")
        assert status == 302 and dict(headers)["Location"].startswith(two.host_urls[0][1] + "/")
    finally:
        idle.close()
        x.sim.fault_host_down(h1, False)
    assert x.host_metrics.get_live(x.host.get_metrics(h1)) is True
    with pytest.raises(XenAPI.Failure) as exc:
        login(two.host_urls[0][1])
    assert failure(exc)[0] == "HOST_IS_SLAVE"


def test_host_down_through_the_cli(two: RunningSimulator) -> None:
    """The CLI reaches the pool through another host when host 0 itself is down."""
    runner = CliRunner()
    result = runner.invoke(app, ["sim", "fault", "host-down", "--state", str(two.state), "0"])
    assert result.exit_code == 0, result.output
    try:
        with pytest.raises(ConnectionRefusedError):
            login(two.urls[0])
        shown = runner.invoke(app, ["sim", "fault", "show", "--state", str(two.state)])
        assert '"down_hosts": [\n    "sim-host-0-0"\n  ]' in shown.output
    finally:
        result = runner.invoke(app, ["sim", "fault", "host-down", "--state", str(two.state), "0", "--no-on"])
    assert result.exit_code == 0, result.output
    assert login(two.urls[0]).xenapi.pool.get_all()


def test_certificates_per_host(tmp_path: Path) -> None:
    with running_simulator(
        tmp_path / "tls",
        pools=1,
        vms=2,
        disk_size=2 * MIB,
        sr_size=64 * MIB,
        password=PASSWORD,
        hosts=2,
        tls=True,
    ) as sim:
        s = login(sim.urls[0], ignore_ssl=True)
        x = s.xenapi
        pems = [x.host.get_server_certificate(h) for h in hosts(x)]
        assert pems[0] != pems[1]
        for j, url in enumerate(sim.host_urls[0]):
            u = urlsplit(url)
            presented = ssl.get_server_certificate((u.hostname or "", u.port or 443))
            assert ssl.PEM_cert_to_DER_cert(presented) == ssl.PEM_cert_to_DER_cert(pems[j])
            assert sim.certificate(0, j).read_text() == pems[j]
        # a client trusting only the member's certificate (read from the master) reaches it after
        # the redirect, which names https
        vdi = vm_disk(x, first_vm(x, "vm1"))
        path = f"/export_raw_vdi?session_id={s._session}&vdi={vdi}&format=raw"
        master_ctx = ssl.create_default_context(cadata=pems[0])
        status, headers, _ = get(sim.urls[0], path, master_ctx)
        assert status == 302 and dict(headers)["Location"] == sim.host_urls[0][1] + path
        assert sim.host_urls[0][1].startswith("https://")
        status, _, body = get(sim.host_urls[0][1], path, ssl.create_default_context(cadata=pems[1]))
        assert status == 200 and hashlib.sha256(body).hexdigest() == x.sim.hash(x.VDI.get_uuid(vdi))
        with pytest.raises(ssl.SSLError):
            get(sim.host_urls[0][1], path, master_ctx)  # the master's certificate does not vouch for it


def test_init_rejects_zero_hosts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one host"):
        init_state(tmp_path / "s", 1, hosts=0)


def test_cli_init_and_ls_with_hosts(two: RunningSimulator, tmp_path: Path) -> None:
    runner = CliRunner()
    state = tmp_path / "cli"
    result = runner.invoke(
        app, ["sim", "init", "--state", str(state), "--pools", "1", "--hosts", "3", "--vms", "0"]
    )
    assert result.exit_code == 0 and result.output.startswith("initialised 1 pools of 3 hosts in ")
    offline = runner.invoke(app, ["sim", "ls", "--state", str(state), "--json"])
    assert [h["name"] for h in json.loads(offline.output)[0]["hosts"]] == [
        "sim-host-0-0",
        "sim-host-0-1",
        "sim-host-0-2",
    ]
    listing = runner.invoke(app, ["sim", "ls", "--state", str(two.state)]).output
    x = login(two.urls[0]).xenapi
    for j, h in enumerate(hosts(x)):
        role = " (master)" if j == 0 else ""
        line = f"  host {x.host.get_uuid(h)}  {address(two.host_urls[0][j]):<15} sim-host-0-{j}{role}"
        assert line in listing.splitlines()
