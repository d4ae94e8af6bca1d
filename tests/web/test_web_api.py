"""The status page's server and JSON API (without a browser): the same data as `xencr status
--json` and `xencr history --json`, the plans with their last test failover, the access rule
(loopback, TLS + basic auth, 401, one-line refusal), no secret in any response, read-only."""

from __future__ import annotations

import base64
import json
import re
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner
from webtest import SECRETS, STATUS_PASSWORD, closed_port, fill, now_utc, serving, write_config

from xencr.cli.history import history_command
from xencr.cli.plan import status_command
from xencr.cli.web import serve_status_command
from xencr.config import ConfigError, load_config, parse_config
from xencr.sim.tls import ensure_certificate

app = typer.Typer()
app.command("status")(status_command)
app.command("history")(history_command)
app.command("serve-status")(serve_status_command)
runner = CliRunner()

AUTH = "Basic " + base64.b64encode(f"auditor:{STATUS_PASSWORD}".encode()).decode()


def get(
    url: str, auth: str | None = AUTH, method: str = "GET", tls: Path | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers={"Authorization": auth} if auth else {})
    ctx = None
    if tls is not None:
        ctx = ssl.create_default_context(cafile=str(tls))
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def cli_json(*args: str) -> Any:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def without_ages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("age_seconds",)} for r in rows]


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    path = write_config(tmp_path)
    fill(load_config(path), now_utc())
    return path


def test_api_is_status_and_history_json(filled: Path) -> None:
    expected = cli_json("status", "--config", str(filled), "--json")
    history = cli_json("history", "--config", str(filled), "--json", "--since", "1d")
    with serving(filled) as (url, _):
        code, headers, body = get(url + "api/status")
        assert code == 200 and headers["Content-Type"] == "application/json"
        rows = json.loads(body)
        assert without_ages(rows) == without_ages(expected)
        for got, want in zip(rows, expected, strict=True):
            assert got["age_seconds"] is None or abs(got["age_seconds"] - want["age_seconds"]) <= 5
        by_vm = {r["vm_name"]: r for r in rows}
        assert (by_vm["web-2"]["rpo_breach"], by_vm["web-2"]["last_outcome"]) == (True, "skipped")
        assert by_vm["web-3"]["last_error"].startswith("pool 'b': SR 'SR1' is full")
        assert by_vm["web-4"]["detached"] == 2
        code, _, body = get(url + "api/history?since=1d")
        assert code == 200 and json.loads(body) == history
        code, _, body = get(url + "api/history?since=yesterday")
        assert code == 400 and "neither a duration" in json.loads(body)["error"]


def test_api_plans_last_test(filled: Path) -> None:
    with serving(filled) as (url, _):
        code, _, body = get(url + "api/plans")
    assert code == 200
    [plan] = json.loads(body)
    assert (plan["name"], plan["jobs"], [g["vms"] for g in plan["groups"]]) == (
        "site-b",
        ["web", "db"],
        [["db-*"], ["web-*"]],
    )
    test = plan["last_test"]
    assert (test["outcome"], test["passed"], test["seconds"]) == ("success", True, 95.0)
    assert 27 * 3600 - 60 <= test["age_seconds"] <= 27 * 3600 + 60
    vms = {v["name"]: v for v in test["record"]["vms"]}
    assert (vms["db-1"]["group"], vms["web-3"]["group"], vms["web-3"]["boot_seconds"]) == (1, 2, 33.0)


def test_page_content_and_charts(filled: Path) -> None:
    with serving(filled) as (url, _):
        code, headers, body = get(url)
        static = {name: get(url + f"static/{name}") for name in ("status.css", "status.js")}
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    page = body.decode()
    # One <g class="run"> per run in each job's chart: 5 runs of web, 3 of db.
    charts = re.findall(r'<svg class="chart runs".*?</svg>', page)
    assert [c.count('<g class="run') for c in charts] == [5, 3]
    web2 = re.search(r'<tr class="breach" data-key="web/uuid-web-2/sr-b">.*?</tr>', page)
    assert (
        web2 is not None
        and "BREACH" in web2.group(0)
        and "skipped: previous run still running" in web2.group(0)
    )
    assert (
        "2 detached" in page and "SR_FULL" in page and "Last test failover: <strong>passed</strong>" in page
    )
    assert all(code == 200 for code, _, _ in static.values())
    # Nothing is loaded from elsewhere: every src/href is relative or a fragment.
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_access_rule(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    # Not loopback and no TLS: refused in one line, exit 1.
    r = runner.invoke(app, ["serve-status", "--config", str(path), "--listen", "0.0.0.0:0"])
    assert r.exit_code == 1
    # (The warning before it is pool a's password in its URL, kept there for the secrets test.)
    assert r.stderr.splitlines()[-1] == (
        "xencr: error: the status page on 0.0.0.0 (not a loopback address) needs TLS and basic auth:"
        " set [status] tls_cert and tls_key"
    )
    assert r.stderr.count("xencr: error:") == 1
    # With TLS and a user, off loopback: wrong or no credentials get 401, the right ones 200.
    path = write_config(tmp_path, tls=True)
    ca, _ = ensure_certificate(tmp_path)
    with serving(path, host="0.0.0.0") as (url, _):
        assert url.startswith("https://")
        url = url.replace("0.0.0.0", "127.0.0.1")
        wrong = "Basic " + base64.b64encode(b"auditor:nope").decode()
        for auth in (None, wrong, "Bearer x", "Basic !!!"):
            code, headers, _ = get(url + "api/status", auth=auth, tls=ca)
            assert code == 401 and headers["WWW-Authenticate"].startswith("Basic realm=")
        assert get(url + "api/status", tls=ca)[0] == 200
        assert get(url, method="POST", tls=ca)[0] == 405
        assert get(url + "nowhere", tls=ca)[0] == 404


def test_no_secret_in_any_response(filled: Path) -> None:
    with serving(filled) as (url, _):
        answers = [
            get(url + p)
            for p in (
                "",
                "api/status",
                "api/history",
                "api/history?since=30d",
                "api/plans",
                "static/status.js",
                "x",
            )
        ]
        answers.append(get(url, auth=None))
    for code, headers, body in answers:
        text = body.decode() + json.dumps(headers)
        assert code in (200, 401, 404)
        assert not any(s in text for s in SECRETS), code


def test_status_config_is_strict(tmp_path: Path) -> None:
    base = f'state = "{tmp_path / "s.sqlite"}"\n[status]\n'
    for extra, message in (
        ('password = "x"', "is not read from the file"),
        ('tls_cert = "c.pem"', "tls_cert and tls_key go together"),
        ('listen = "nowhere"', "invalid address"),
        ('refresh = "1s"', "must be at least 5"),
        ('colour = "red"', "unknown key"),
        ('password_file = "p"', "needs its 'username'"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config(base + extra + "\n", tmp_path / "x.toml")
    cfg = parse_config(base + 'listen = "[::1]:0"\nrefresh = "1m"\n', tmp_path / "x.toml")
    assert (cfg.status.listen, cfg.status.refresh, cfg.status.tls_cert) == ("[::1]:0", 60, None)


def test_serve_status_says_where_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`xencr serve-status` as a process: one line saying where and how it serves, the page
    answering there, exit 0 on SIGTERM."""
    path = tmp_path / "xencr.toml"
    path.write_text(
        f'state = "{tmp_path / "state.sqlite"}"\n[status]\nlisten = "127.0.0.1:{closed_port()}"\n'
    )
    code = "import typer; from xencr.cli.web import serve_status_command as c; typer.run(c)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.fullmatch(r"serving the status page at (http://127\.0\.0\.1:\d+/) \((.*)\)\n", line)
        assert m is not None, line + (proc.stderr.read() if proc.stderr else "")
        assert m.group(2) == "no TLS (loopback only), no authentication"
        code_, _, body = get(m.group(1) + "api/status", auth=None)
        assert (code_, json.loads(body)) == (200, [])
        assert get(m.group(1), auth=None)[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
