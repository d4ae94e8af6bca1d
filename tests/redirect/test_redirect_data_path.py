"""Issue 19: a VM on a member's local SR is replicated to a member's local SR of another pool:
both data handlers answer XAPI's 302 and xencr follows each once, with TLS to the member verified
through the certificate the pool names for it. A redirect elsewhere than a host of the pool, or a
second one, is refused with one line and leaves nothing behind."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from xapitest import PASSWORD, Pools, disk_hashes, password_file

from xencr.config import load_config
from xencr.replication.jobs import run_configured
from xencr.replication.runner import RunReport
from xencr.sim.harness import RunningSimulator
from xencr.sim.tls import fingerprint
from xencr.xapi.session import Endpoint, XapiSession

JOB = "far"


def _sr_on_host(t: XapiSession, host_index: int) -> tuple[str, str]:
    """(uuid, name) of the local SR plugged only on the pool's host ``host_index``."""
    hosts = sorted(t.api.host.get_all_records().items(), key=lambda h: h[1]["name_label"])
    host = hosts[host_index][0]
    for rec in t.api.SR.get_all_records().values():
        plugged = {t.api.PBD.get_host(p) for p in rec["PBDs"]}
        if rec["shared"] is False and plugged == {host} and rec["type"] != "iso":
            return str(rec["uuid"]), str(rec["name_label"])
    raise AssertionError(f"no local SR on host {host_index}")


def _config(
    tmp: Path, a_url: str, b_url: str, sr: str, *, pins: tuple[str, str] | None = None, job: str = JOB
) -> Path:
    pw = password_file(tmp, PASSWORD)
    pin_a = f'fingerprint = "sha256:{pins[0]}"\n' if pins else ""
    pin_b = f'fingerprint = "sha256:{pins[1]}"\n' if pins else ""
    cfg = tmp / "xencr.toml"
    cfg.write_text(
        f'state = "{tmp / "state.sqlite"}"\n'
        f'[pools.a]\nurl = "{a_url}"\npassword_file = "{pw}"\n{pin_a}'
        f'[pools.b]\nurl = "{b_url}"\npassword_file = "{pw}"\n{pin_b}'
        f'[jobs.{job}]\npool = "a"\nvms = ["vm2"]\n'
        f'[[jobs.{job}.targets]]\npool = "b"\nsr = "{sr}"\n'
        f'[[jobs.{job}.schedules]]\nevery = "15m"\nretention = 2\n'
    )
    return cfg


def _check(pools: Pools, report: RunReport) -> str:
    s, t = pools.session(0), pools.session(1)
    vr = report.vms[0]
    assert report.outcome == "success", [x.error for x in vr.targets]
    tr = vr.targets[0]
    replica = t.api.VM.get_by_uuid(tr.restore_point)
    assert disk_hashes(t, replica) == disk_hashes(s, s.api.VM.get_by_uuid(vr.snapshot))
    return tr.kind


def _write(pools: Pools, seed: str) -> None:
    s = pools.session(0)
    vm = s.api.VM.get_by_name_label("vm2")[0]
    vbd = next(b for b in s.api.VM.get_VBDs(vm) if s.api.VBD.get_type(b) == "Disk")
    s.api.sim.write(s.api.VDI.get_uuid(s.api.VBD.get_VDI(vbd)), str(3 * 1024 * 1024), "4096", seed)


def test_member_to_member_full_then_delta(multi: tuple[Pools, RunningSimulator], tmp_path: Path) -> None:
    pools, sim = multi
    sr, name = _sr_on_host(pools.session(1), 2)
    assert name.endswith("-2"), name  # a member's local SR: the master cannot serve it
    cfg = _config(tmp_path, sim.urls[0], sim.urls[1], sr)
    assert _check(pools, run_configured(load_config(cfg), JOB)) == "full"
    _write(pools, "after-full")
    report = run_configured(load_config(cfg), JOB)
    assert _check(pools, report) == "delta"
    assert [d.blocks for d in report.vms[0].targets[0].disks] == [1]


def test_member_to_member_over_tls_with_pinned_masters(
    multi_tls: tuple[Pools, RunningSimulator], tmp_path: Path
) -> None:
    pools, sim = multi_tls
    pins = tuple(fingerprint(sim.certificate(i, 0)).replace(":", "").lower() for i in (0, 1))
    assert fingerprint(sim.certificate(1, 2)) != fingerprint(sim.certificate(1, 0)), "members have their own"
    sessions = [XapiSession(Endpoint(sim.urls[i], fingerprint=pins[i]), "root", PASSWORD) for i in (0, 1)]
    pools.sessions += sessions
    pools.fingerprint = None
    sr, _ = _sr_on_host(sessions[1], 2)
    cfg = _config(tmp_path, sim.urls[0], sim.urls[1], sr, pins=(pins[0], pins[1]))
    report = run_configured(load_config(cfg), JOB)
    assert report.outcome == "success", [t.error for t in report.vms[0].targets]
    s, t = sessions
    vr = report.vms[0]
    replica = t.api.VM.get_by_uuid(vr.targets[0].restore_point)
    assert disk_hashes(t, replica) == disk_hashes(s, s.api.VM.get_by_uuid(vr.snapshot))


@contextmanager
def _redirecting_proxy(master: str, location_for: str) -> Iterator[str]:
    """A pool address in front of ``master``: XML-RPC goes through, every import is answered
    ``302`` to ``location_for`` (its path and query appended): a pool misbehaving."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            u = urlsplit(master)
            conn = http.client.HTTPConnection(u.hostname, u.port)
            conn.request("POST", self.path, body, {"Content-Type": "text/xml"})
            r = conn.getresponse()
            data = r.read()
            self.send_response(r.status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            self.send_response(302)
            self.send_header("Location", location_for + self.path)
            self.send_header("Connection", "close")
            self.end_headers()

        def do_GET(self) -> None:
            u = urlsplit(master)
            self.send_response(302)
            self.send_header("Location", f"http://{u.netloc}{self.path}")
            self.send_header("Connection", "close")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _leftovers(t: XapiSession) -> list[str]:
    return [
        r["uuid"]
        for r in [*t.api.VM.get_all_records().values(), *t.api.VDI.get_all_records().values()]
        if r["other_config"].get("xencr:job") and r["other_config"].get("xencr:complete") != "true"
    ]


def test_redirect_off_pool_or_twice_is_refused(multi: tuple[Pools, RunningSimulator], tmp_path: Path) -> None:
    pools, sim = multi
    t = pools.session(1)
    sr, _ = _sr_on_host(t, 2)
    member_1 = sim.host_urls[1][1]  # a member that does not see host 2's local SR: it redirects again
    cases = {
        "off-pool": ("http://127.0.0.1:9", "not a host of this pool: refused"),
        "twice": (member_1, "redirected a second time: refused"),
    }
    for case, (location, said) in cases.items():
        with _redirecting_proxy(sim.urls[1], location) as proxy:
            # A job of its own: its first run is a full, whose import meets the redirect first.
            cfg = _config(tmp_path / case, sim.urls[0], proxy, sr, job=case)
            report = run_configured(load_config(cfg), case)
        tr = report.vms[0].targets[0]
        assert tr.outcome == "failure" and tr.error is not None, case
        assert said in tr.error and "\n" not in tr.error and "session_id" not in tr.error, tr.error
        assert tr.error.startswith(f"pool 'b' ({proxy}): the import of VDI"), tr.error
        assert not tr.warnings, "a refused redirect is not retried"
        assert _leftovers(t) == [], case
