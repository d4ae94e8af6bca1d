"""Helpers shared by the simulator tests: the in-process simulator and SDK conveniences."""

from __future__ import annotations

import contextlib
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
import XenAPI

from xencr.sim.harness import RunningSimulator

MIB = 1024 * 1024
DISK = 8 * MIB


class Sim(RunningSimulator):
    """The in-process simulator plus SDK conveniences for the tests."""

    def __init__(self, state: Path) -> None:
        super().__init__(state)
        self.sessions: list[Any] = []

    def session(self, pool: int = 0) -> Any:
        """A logged-in official SDK session on pool ``pool`` (logged out at teardown)."""
        s = XenAPI.Session(self.urls[pool])
        s.xenapi.login_with_password("root", self.password, "1.0", "xencr-tests")
        self.sessions.append(s)
        return s

    def raw(self, pool: int = 0, path: str = "/") -> xmlrpc.client.ServerProxy:
        """A plain XML-RPC proxy: sees the Status structs the SDK hides."""
        return xmlrpc.client.ServerProxy(self.urls[pool] + path)

    def shutdown(self) -> None:
        for s in self.sessions:
            with contextlib.suppress(Exception):
                s.xenapi.session.logout()
        self.sessions.clear()
        self.stop()


def user_vms(x: Any) -> dict[str, dict[str, Any]]:
    return {
        r: v
        for r, v in x.VM.get_all_records().items()
        if not v["is_control_domain"] and not v["is_a_snapshot"] and not v["is_a_template"]
    }


def first_vm(x: Any, name: str = "vm0") -> str:
    refs = x.VM.get_by_name_label(name)
    assert refs, name
    return str(refs[0])


def vm_disk(x: Any, vm: str) -> str:
    for vbd in x.VM.get_VBDs(vm):
        if x.VBD.get_type(vbd) == "Disk":
            return str(x.VBD.get_VDI(vbd))
    raise AssertionError("no disk")


def failure(exc: pytest.ExceptionInfo[Any]) -> list[str]:
    details: list[str] = exc.value.details
    return details


def wait_task(x: Any, task: str) -> dict[str, Any]:
    """Wait for a task with event.from (no sleeps), return its record."""
    token = ""
    while True:
        record: dict[str, Any] = x.task.get_record(task)
        if record["status"] not in ("pending", "cancelling"):
            return record
        token = x.event_from([f"task/{task}"], token, 5.0)["token"]


def http_request(
    sim: Sim,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    pool: int = 0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on a fresh connection; returns status, headers and the whole body."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(sim.urls[pool])
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=60)
    try:
        conn.request(method, path, body, headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def put_stream(sim: Sim, path: str, body: bytes, pool: int = 0) -> tuple[int, dict[str, str]]:
    """PUT the way a streaming client does: read the 200 (sent before the body is consumed), then
    send the body, tolerating a server that cuts the connection mid-body."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(sim.urls[pool])
    with socket.create_connection((u.hostname or "", u.port or 80), timeout=60) as sock:
        request = f"PUT {path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        try:
            sock.sendall(body)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass
    return status, headers


def export_path(session: Any, vdi: str, fmt: str = "vhd", extra: str = "") -> str:
    return f"/export_raw_vdi?session_id={session._session}&vdi={vdi}&format={fmt}{extra}"


def import_path(session: Any, vdi: str, fmt: str = "vhd", extra: str = "") -> str:
    return f"/import_raw_vdi?session_id={session._session}&vdi={vdi}&format={fmt}{extra}"
