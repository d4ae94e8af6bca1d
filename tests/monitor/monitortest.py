"""Helpers of the monitoring tests: a configuration, a fake clock, history written into a StateDB."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from xencr.config import Config, parse_config
from xencr.sim.tls import ensure_certificate, server_context

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)

CONFIG = """\
[pools.a]
url = "https://a.example"

[pools.b]
url = "https://b.example"

[jobs.web]
pool = "a"
vms = ["web-*"]
{job_extra}

[[jobs.web.targets]]
pool = "b"
sr = "SR1"

[[jobs.web.schedules]]
every = "10m"

[jobs.db]
pool = "a"
vms = ["db-*"]
rpo = "1h"

[[jobs.db.targets]]
pool = "b"
sr = "SR1"

[[jobs.db.schedules]]
every = "15m"
{tail}
"""


def config(tmp: Path, job_extra: str = "", tail: str = "") -> Config:
    path = tmp / "xencr.toml"
    path.write_text(f'state = "{tmp / "state.sqlite"}"\n' + CONFIG.format(job_extra=job_extra, tail=tail))
    return parse_config(path.read_text(), path)


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> (labels, value) as Prometheus's own parser reads the exposition."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(fams: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float | None:
    matches = [v for lab, v in fams.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(matches) <= 1, (name, labels, matches)
    return matches[0] if matches else None


@dataclass
class Receiver:
    url: str
    posts: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # answers to give, in order (then 200)


@contextlib.contextmanager
def receiving(tls: Path | None = None) -> Iterator[Receiver]:
    """A local HTTP(S) server recording each POST (path, headers, body)."""
    rec = Receiver("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rec.posts.append((self.path, dict(self.headers), body))
            status = rec.statuses.pop(0) if rec.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if tls is not None:
        cert, key = ensure_certificate(tls)
        server.socket = server_context(cert, key).wrap_socket(server.socket, server_side=True)
        scheme = "https"
    rec.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
