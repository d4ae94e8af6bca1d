"""The daemon serves the status page beside /metrics on its listener: behind the page's access
rule (here a user and password: /metrics asks for them too), and not at all on an address the
rule refuses (a non-loopback one without TLS), where /metrics stays as it was."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from test_web_api import get
from webtest import fill, now_utc, write_config

from xencr.config import load_config
from xencr.service.daemon import Daemon


def no_run(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("no runs in these tests")


@contextmanager
def daemon_on(path: Path, listen: str) -> Iterator[tuple[Daemon, io.StringIO]]:
    log = io.StringIO()
    d = Daemon(lambda: load_config(path), stream=log, run=no_run, metrics_listen=listen)
    thread = threading.Thread(target=d.run_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while d.metrics_address is None:
        assert time.monotonic() < deadline and thread.is_alive(), log.getvalue()
        time.sleep(0.02)
    try:
        yield d, log
    finally:
        d.request_stop()
        thread.join(30)


def test_daemon_serves_the_page_beside_metrics(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    fill(load_config(path), now_utc())
    with daemon_on(path, "127.0.0.1:0") as (d, log):
        assert d.metrics_address is not None
        url = f"http://127.0.0.1:{d.metrics_address[1]}/"
        assert get(url + "metrics", auth=None)[0] == 401
        code, _, body = get(url + "metrics")
        assert code == 200 and b"xencr_rpo_breached" in body
        code, _, body = get(url)
        assert code == 200 and b"<h1>xencr status</h1>" in body
        code, _, body = get(url + "api/status")
        rows = {r["vm_name"]: r for r in json.loads(body)}
        assert code == 200 and rows["web-2"]["rpo_breach"] is True
    started = next(line for line in log.getvalue().splitlines() if "event=started" in line)
    assert "status_page=\"no TLS (loopback only), basic auth as user 'auditor'\"" in started


def test_daemon_without_tls_off_loopback_keeps_metrics_only(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with daemon_on(path, "0.0.0.0:0") as (d, log):
        assert d.metrics_address is not None
        url = f"http://127.0.0.1:{d.metrics_address[1]}/"
        assert get(url + "metrics", auth=None)[0] == 200
        assert get(url, auth=None)[0] == 404
        assert get(url + "api/status")[0] == 404
    [off] = [line for line in log.getvalue().splitlines() if "event=status_page_off" in line]
    assert "needs TLS and basic auth: set [status] tls_cert and tls_key" in off
