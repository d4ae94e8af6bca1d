"""``--tls``: HTTPS with a self-signed certificate kept in the state directory."""

from __future__ import annotations

import hashlib
import http.client
import ssl
import threading
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import XenAPI
from simtest import MIB, first_vm, vm_disk

from xencr.sim.control import serve
from xencr.sim.guest import pattern_bytes
from xencr.sim.layout import init_state


@pytest.fixture(scope="module")
def tls_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str], str]]:
    state = tmp_path_factory.mktemp("tls")
    init_state(state, 1, vms=1, disk_size=4 * MIB, sr_size=256 * MIB, password="tls-pw")
    lines: list[str] = []
    ready, stop = threading.Event(), threading.Event()

    def announce(line: str) -> None:
        lines.append(line)
        if line.startswith("pool0"):
            ready.set()

    # the announce lines (certificate path and fingerprint) are part of what is tested
    t = threading.Thread(
        target=serve,
        args=(state,),
        daemon=True,
        kwargs={
            "pools": None,
            "host": "127.0.0.1",
            "port": 0,
            "password_file": None,
            "auth_delay": 0.0,
            "announce": announce,
            "stop": stop,
            "tls": True,
        },
    )
    t.start()
    assert ready.wait(30)
    yield state, lines, "tls-pw"
    stop.set()
    t.join(30)


def test_https_verified_and_pinned(tls_sim: tuple[Path, list[str], str]) -> None:
    state, lines, password = tls_sim
    cert = state / "tls" / "cert.pem"
    assert lines[0].startswith(f"tls {cert} sha256 ")
    url = lines[1].split()[1]
    assert url.startswith("https://127.0.0.1:")
    verified = ssl.create_default_context(cafile=str(cert))  # verifies chain and the IP SAN
    reply = xmlrpc.client.ServerProxy(url, context=verified).session.login_with_password("root", password)
    assert reply["Status"] == "Success"
    s = XenAPI.Session(url, ignore_ssl=True)  # the SDK's way with a self-signed certificate
    s.xenapi.login_with_password("root", password, "1.0", "tls")
    assert s.xenapi.pool.get_all()
    # pinning: the fingerprint the server announced is the one of the certificate it presents
    u = urlsplit(url)
    raw = ssl.get_server_certificate((u.hostname or "", u.port or 443))
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(raw)).hexdigest().upper()
    assert lines[0].split()[-1].replace(":", "") == digest
    # an unverifying client can still connect; a verifying one without the CA cannot
    with pytest.raises(ssl.SSLError):
        http.client.HTTPSConnection(u.hostname or "", u.port, context=ssl.create_default_context()).request(
            "POST", "/", b""
        )
    s.xenapi.session.logout()


def test_data_over_tls(tls_sim: tuple[Path, list[str], str]) -> None:
    state, lines, password = tls_sim
    url = lines[1].split()[1]
    s = XenAPI.Session(url, ignore_ssl=True)
    s.xenapi.login_with_password("root", password, "1.0", "tls")
    x: Any = s.xenapi
    vdi = vm_disk(x, first_vm(x))
    x.sim.write(x.VDI.get_uuid(vdi), "0", str(MIB), "over-tls")
    u = urlsplit(url)
    context = ssl.create_default_context(cafile=str(state / "tls" / "cert.pem"))
    conn = http.client.HTTPSConnection(u.hostname or "", u.port, context=context)
    conn.request("GET", f"/export_raw_vdi?session_id={s._session}&vdi={vdi}&format=raw")
    body = conn.getresponse().read()
    conn.close()
    assert len(body) == 4 * MIB and body[:MIB] == pattern_bytes("over-tls", 0, MIB)
    conn = http.client.HTTPSConnection(u.hostname or "", u.port, context=context)
    conn.request("GET", f"/export_raw_vdi?session_id={s._session}&vdi={vdi}&format=vhd")
    stream = conn.getresponse().read()
    conn.close()
    target = x.VDI.clone(vdi)
    x.sim.write(x.VDI.get_uuid(target), "0", str(MIB), "overwritten")
    conn = http.client.HTTPSConnection(u.hostname or "", u.port, context=context)
    conn.request("PUT", f"/import_raw_vdi?session_id={s._session}&vdi={target}&format=vhd", stream)
    task = conn.getresponse().getheader("task-id")
    conn.close()
    while x.task.get_status(task) == "pending":
        x.event_from([f"task/{task}"], "", 1.0)
    assert x.task.get_status(task) == "success"
    assert x.sim.hash(x.VDI.get_uuid(target)) == x.sim.hash(x.VDI.get_uuid(vdi))
    s.xenapi.session.logout()
