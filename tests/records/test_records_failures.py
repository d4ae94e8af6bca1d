"""A run that fails before any transfer leaves a trace: a failed run in `history` with its one
line, counted in `xencr_runs_total`; errors name the pool and are never "internal error"."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from recordstest import JOB, history, metric, write_config, xencr
from xapitest import PASSWORD, Pools

from xencr.sim.tls import ensure_certificate, server_context
from xencr.xapi.session import XapiSession


def test_failures_before_any_transfer_are_recorded_and_counted(
    pools: Pools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same retries against a refused connection, without the seconds of backoff between them.
    kwdefaults = XapiSession.__init__.__kwdefaults__ or {}
    monkeypatch.setattr(XapiSession.__init__, "__kwdefaults__", kwdefaults | {"backoff": 0.001})
    t = pools.session(1)
    before = set(t.api.VM.get_all()), set(t.api.VDI.get_all())
    cases = [
        (
            {"password": "wrong-password"},
            [],
            f"pool 'a' ({pools.urls[0]}): authentication failed for user 'root'",
        ),
        ({"url": "http://127.0.0.1:9"}, [], "pool 'a' (http://127.0.0.1:9): connection refused"),
        ({"sr": "no-such-sr"}, [], "no SR 'no-such-sr' on pool 'b'"),
        ({}, ["--vm", "nope"], f"job '{JOB}' selects no VM nope"),
    ]
    cfg = write_config(tmp_path, pools)
    assert metric(cfg, "xencr_runs_total", job=JOB, outcome="failure") == 0
    for n, (kwargs, extra, expected) in enumerate(cases, start=1):
        cfg = write_config(tmp_path, pools, **kwargs)
        code, out, err = xencr("run", JOB, *extra, "--config", str(cfg))
        assert (code, out, err) == (1, "", f"xencr: error: {expected}\n")
        assert "wrong-password" not in err and PASSWORD not in err
        runs = history(cfg)
        assert len(runs) == n
        assert (runs[-1]["outcome"], runs[-1]["error"], runs[-1]["tasks"]) == ("failure", expected, [])
        assert runs[-1]["finished"] is not None and runs[-1]["trigger"] == "manual"
        assert metric(cfg, "xencr_runs_total", job=JOB, outcome="failure") == n
        assert metric(cfg, "xencr_runs_total", job=JOB, outcome="success") == 0
    code, out, _ = xencr("history", "--config", str(cfg))
    assert code == 0 and f"  error: pool 'a' ({pools.urls[0]}): authentication failed for user 'root'" in out
    assert (set(t.api.VM.get_all()), set(t.api.VDI.get_all())) == before, "nothing left behind"

    # A job that does not exist is no run of anything: answered, not recorded.
    code, _, err = xencr("run", "no-such-job", "--config", str(cfg))
    assert code == 1 and err.startswith("xencr: error: ") and len(history(cfg)) == len(cases)

    # A good run afterwards is counted as such, next to the failures.
    cfg = write_config(tmp_path, pools)
    assert xencr("run", JOB, "--config", str(cfg))[0] == 0
    assert metric(cfg, "xencr_runs_total", job=JOB, outcome="success") == 1
    assert metric(cfg, "xencr_runs_total", job=JOB, outcome="failure") == len(cases)


class _NotXapi(http.server.BaseHTTPRequestHandler):
    """A web server that is not a pool: 404 for everything."""

    def do_POST(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(http URL, https URL with a self-signed certificate) of two servers that are not XAPI."""
    servers = []
    for tls in (False, True):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotXapi)
        if tls:
            cert, key = ensure_certificate(tmp_path)
            server.socket = server_context(cert, key).wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield tuple(  # type: ignore[misc]
        f"{scheme}://127.0.0.1:{s.server_address[1]}"
        for scheme, s in zip(("http", "https"), servers, strict=True)
    )
    for s in servers:
        s.shutdown()


def test_a_pool_that_does_not_answer_as_xapi_is_named_never_internal(
    pools: Pools, tmp_path: Path, web: tuple[str, str]
) -> None:
    http_url, https_url = web
    pin = "sha256:" + ":".join(["AB"] * 32)
    cases = [
        (http_url, "", f"pool 'a' ({http_url}): HTTP 404 Not Found (is this a XAPI URL?)"),
        (https_url, "", f"pool 'a' ({https_url}): TLS: CERTIFICATE_VERIFY_FAILED"),
        (
            https_url,
            f'fingerprint = "{pin}"\n',
            f"pool 'a' ({https_url}): certificate fingerprint sha256:",
        ),
    ]
    for url, extra, expected in cases:
        cfg = write_config(tmp_path, pools, url=url)
        cfg.write_text(cfg.read_text().replace(f'url = "{url}"\n', f'url = "{url}"\n{extra}', 1))
        for args in (("run", JOB), ("pool", "test", "a")):
            code, _, err = xencr(*args, "--config", str(cfg))
            assert code == 1
            assert err.startswith(f"xencr: error: {expected}") and err.count("\n") == 1, err
            assert "internal error" not in err
        # The status of a job whose pool cannot be used falls back on the history, saying why.
        code, _, err = xencr("status", JOB, "--config", str(cfg))
        assert code == 0 and err.startswith(f"xencr: warning: job {JOB}: {expected}"), err
        assert "internal error" not in err
    assert err.rstrip().endswith(f"is not the pinned {pin}; showing the recorded history")
