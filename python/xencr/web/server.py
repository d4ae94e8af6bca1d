"""Serving the status page: `/` (the page), `/api/status` (the rows of `xencr status --json`),
`/api/history?since=` (the runs of `xencr history --json`), `/api/plans` (the DR plans and their
last test failover), and `/static/` (the page's stylesheet and script, shipped in the package).
Read-only: only GET and HEAD are answered.

Access rule: on a loopback address the page may be served plainly; anywhere else it needs TLS (a
certificate and key) and HTTP basic auth (``[status] username``, the password from
``password_env`` or a 0600 ``password_file``), or it is refused (`AccessError`, one line). When
they are configured they hold for the whole listener (the daemon's ``/metrics`` too). Wrong or
missing credentials get 401. No response carries a secret: the page is built from the state
database and the pools' records, never from the configuration's credentials.

The pools are asked at most once per ``[status] refresh`` (the answer is shared by every request
until then); the ages are recomputed at each request from the restore points' snapshot times."""

from __future__ import annotations

import base64
import binascii
import hmac
import http.server
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from xencr import credentials
from xencr.config import Config, ConfigError, JobConfig, StatusConfig
from xencr.credentials import CredentialError, Secret
from xencr.monitor.history import parse_since, run_json, runs_with_tasks
from xencr.monitor.status import UNREACHABLE, StatusReport, gather
from xencr.state import open_state
from xencr.web import data
from xencr.web.plans import plan_json, plan_view
from xencr.web.render import page_html

STATIC = {"status.css": "text/css; charset=utf-8", "status.js": "text/javascript; charset=utf-8"}
HEADERS = {
    # Everything the page uses comes from here; nothing may be loaded from anywhere else.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# A page has no one to ask for a password nor to show a traceback to: a job whose pools cannot be
# used for any of these reasons is shown from its history, with the reason above it.
FALL_BACK_ON: tuple[type[Exception], ...] = (*UNREACHABLE, CredentialError, ConfigError)


class AccessError(Exception):
    """The page cannot be served as configured (one line saying what is missing)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


@dataclass(frozen=True, repr=False)
class Access:
    """How the listener is protected: a TLS context and the basic-auth user, or neither."""

    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: Secret | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def describe(self) -> str:
        tls = "TLS" if self.tls is not None else "no TLS (loopback only)"
        auth = "no authentication" if self.username is None else f"basic auth as user {self.username!r}"
        return f"{tls}, {auth}"

    def allows(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the user and password (compared in
        constant time); always true without authentication."""
        if self.username is None or self.password is None:
            return True
        if header is None or not header.startswith("Basic "):
            return False
        try:
            user, sep, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        ok_user = hmac.compare_digest(user.encode(), self.username.encode())
        ok_password = hmac.compare_digest(password.encode(), self.password.reveal().encode())
        return bool(sep) and ok_user and ok_password


_NOBODY = "\0status"  # a pool name no pool has, stripped from credential messages


def _password(s: StatusConfig) -> Secret | None:
    value = os.environ.get(s.password_env) or None
    if value is None and s.password_file is not None:
        try:
            value = credentials.read_password_file(s.password_file, _NOBODY)
        except credentials.CredentialError as err:
            raise AccessError(str(err).replace(f" of pool '{_NOBODY}'", "")) from None
    return Secret(value) if value is not None else None


def access_for(s: StatusConfig, host: str) -> Access:
    """The protection of a listener on ``host`` (see the module's rule); `AccessError` when a
    non-loopback address lacks TLS or authentication, or they cannot be loaded."""
    password = _password(s) if s.username is not None else None
    if not is_loopback(host):
        missing = [
            what
            for what, ok in (
                ("[status] tls_cert and tls_key", s.tls_cert is not None),
                ("[status] username", s.username is not None),
                (f"a password (${s.password_env} or [status] password_file)", password is not None),
            )
            if not ok
        ]
        if missing:
            raise AccessError(
                f"the status page on {host} (not a loopback address) needs TLS and basic auth: "
                f"set {', '.join(missing)}"
            )
    if s.username is not None and password is None:
        raise AccessError(
            f"[status] username is set but no password (set ${s.password_env} or password_file)"
        )
    tls = None
    if s.tls_cert is not None and s.tls_key is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls.load_cert_chain(s.tls_cert, s.tls_key)
        except (OSError, ssl.SSLError) as err:
            reason = getattr(err, "strerror", None) or getattr(err, "reason", None) or type(err).__name__
            raise AccessError(f"[status] tls_cert {s.tls_cert} / tls_key {s.tls_key}: {reason}") from None
    return Access(tls, s.username, password)


def fresh(report: StatusReport, now: datetime) -> StatusReport:
    """The rows with their ages as of ``now`` (the restore points are the gathered ones)."""
    rows = []
    for name, r in report.rows:
        if r.snapshot_time is not None:
            r = replace(r, age_seconds=max(0, int((now - r.snapshot_time).total_seconds())))
        rows.append((name, r))
    return replace(report, now=now, rows=rows)


@dataclass(frozen=True)
class _Snapshot:
    config: Config
    report: StatusReport
    html: str
    at: float  # time.monotonic() when gathered


class Source:
    """What the page shows, gathered at most once per ``refresh`` seconds and shared by every
    request. Once there is a page, a stale one is still served while the next is gathered in
    the background (asking the pools and reading a long history take seconds); only the very
    first request waits."""

    def __init__(
        self,
        load: Callable[[], Config],
        *,
        job: str | None = None,
        on_error: Callable[[str], None] = lambda line: None,
    ) -> None:
        self._load = load
        self._job = job
        self._on_error = on_error
        self._lock = threading.Lock()  # guards the fields below
        self._gathering = threading.Lock()  # one gathering at a time
        self._snapshot: _Snapshot | None = None
        self._refreshing = False

    def _jobs(self, config: Config) -> list[JobConfig]:
        return [config.job(self._job)] if self._job else [j for j in config.jobs.values() if j.enabled]

    def _gather(self) -> _Snapshot:
        with self._gathering:
            config = self._load()
            jobs = self._jobs(config)
            report = gather(config, jobs, fall_back_on=FALL_BACK_ON)
            html = page_html(data.page(config, jobs, report), config.status.refresh)
            snap = _Snapshot(config, report, html, time.monotonic())
            with self._lock:
                self._snapshot = snap
                self._refreshing = False
            return snap

    def _refresh_in_background(self) -> None:
        try:
            self._gather()
        except Exception as err:  # the next request tries again; the page stays as it was
            self._on_error(
                f"status page not refreshed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            )
            with self._lock:
                self._refreshing = False

    def _current(self) -> _Snapshot:
        config = self._load()
        with self._lock:
            snap = self._snapshot
            stale = snap is not None and (
                time.monotonic() - snap.at >= config.status.refresh or snap.config is not config
            )
            start = stale and not self._refreshing
            if start:
                self._refreshing = True
        if snap is None:
            return self._gather()
        if start:
            threading.Thread(target=self._refresh_in_background, name="status-gather", daemon=True).start()
        return snap

    def html(self) -> str:
        return self._current().html

    def status_json(self) -> list[dict[str, Any]]:
        return fresh(self._current().report, datetime.now(UTC)).json()

    def history_json(self, since: datetime, job: str | None) -> list[dict[str, Any]]:
        config = self._load()
        if not config.state.exists():
            return []
        ref = config.job(job).id if job is not None and job in config.jobs else job
        with open_state(config) as db:
            return [run_json(r, tasks) for r, tasks in runs_with_tasks(db, ref, since)]

    def plans_json(self) -> list[dict[str, Any]]:
        config = self._load()
        now = datetime.now(UTC)
        db = open_state(config) if config.state.exists() else None
        try:
            return [plan_json(plan_view(db, config, p), now) for p in config.plans.values()]
        finally:
            if db is not None:
                db.close()


class Site:
    """The page's routes behind its access rule, for any `BaseHTTPRequestHandler`."""

    def __init__(self, source: Source, access: Access) -> None:
        self.source = source
        self.access = access

    def authorized(self, h: http.server.BaseHTTPRequestHandler) -> bool:
        """True when the request may go on; else a 401 was sent."""
        if self.access.allows(h.headers.get("Authorization")):
            return True
        body = b"authentication required\n"
        h.send_response(401)
        h.send_header("WWW-Authenticate", 'Basic realm="xencr status", charset="UTF-8"')
        h.send_header("Content-Type", "text/plain; charset=utf-8")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        return False

    def handle(self, h: http.server.BaseHTTPRequestHandler, *, head: bool = False) -> bool:
        """Answer a GET (or HEAD) of one of the page's paths; False for any other path."""
        url = urlsplit(h.path)
        path = url.path
        query = parse_qs(url.query)
        if path in ("/", "/index.html"):
            self._send(h, 200, "text/html; charset=utf-8", self.source.html().encode(), head)
        elif path == "/api/status":
            self._json(h, 200, self.source.status_json(), head)
        elif path == "/api/history":
            since_text = query.get("since", [None])[0]
            job = query.get("job", [None])[0]
            try:
                # Without one, the page's period: a whole history can be hundreds of megabytes.
                since = (
                    parse_since(since_text, datetime.now(UTC))
                    if since_text
                    else datetime.now(UTC) - data.PERIOD
                )
            except ValueError as err:
                self._json(h, 400, {"error": str(err).replace("--since", "since")}, head)
                return True
            self._json(h, 200, self.source.history_json(since, job), head)
        elif path == "/api/plans":
            self._json(h, 200, self.source.plans_json(), head)
        elif path.startswith("/static/") and path[len("/static/") :] in STATIC:
            name = path[len("/static/") :]
            body = resources.files("xencr.web").joinpath("static", name).read_bytes()
            self._send(h, 200, STATIC[name], body, head)
        else:
            return False
        return True

    def _json(self, h: http.server.BaseHTTPRequestHandler, code: int, doc: Any, head: bool) -> None:
        self._send(h, code, "application/json", (json.dumps(doc, indent=2) + "\n").encode(), head)

    def _send(
        self, h: http.server.BaseHTTPRequestHandler, code: int, kind: str, body: bytes, head: bool
    ) -> None:
        h.send_response(code)
        h.send_header("Content-Type", kind)
        h.send_header("Content-Length", str(len(body)))
        for k, v in HEADERS.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)


def _error(h: http.server.BaseHTTPRequestHandler, code: int, text: str, allow: str | None = None) -> None:
    body = (text + "\n").encode()
    h.send_response(code)
    h.send_header("Content-Type", "text/plain; charset=utf-8")
    h.send_header("Content-Length", str(len(body)))
    if allow:
        h.send_header("Allow", allow)
    h.end_headers()
    h.wfile.write(body)


def handler_class(
    site: Site | None,
    *,
    extra: Callable[[http.server.BaseHTTPRequestHandler], bool] = lambda h: False,
    on_error: Callable[[str], None] = lambda line: None,
) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler serving ``site`` (and ``extra``'s paths, e.g. the daemon's /metrics),
    every path behind the site's access rule; without a site, ``extra``'s paths alone."""

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "xencr"
        sys_version = ""
        timeout = 30  # seconds a connection may stay silent

        def _get(self, head: bool) -> None:
            if site is not None and not site.authorized(self):
                return
            try:
                if extra(self) or (site is not None and site.handle(self, head=head)):
                    return
            except Exception as err:  # one request's failure must not take the server down
                on_error(
                    f"{self.path.split('?')[0]}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
                )
                _error(self, 500, "internal error (see the log)")
                return
            if site is None:
                _error(self, 404, "not found")
            else:
                _error(self, 404, "not found: the page is /, its data /api/status, /api/history, /api/plans")

        def do_GET(self) -> None:
            self._get(head=False)

        def do_HEAD(self) -> None:
            self._get(head=True)

        def _refuse(self) -> None:
            _error(self, 405, "read-only: GET and HEAD only", allow="GET, HEAD")

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a page polling every few seconds would drown the log

    return Handler


class Server:
    """A threaded HTTP(S) server of a handler class, in a background thread (IPv6 for an
    address with a colon)."""

    def __init__(
        self,
        host: str,
        port: int,
        handler: type[http.server.BaseHTTPRequestHandler],
        tls: ssl.SSLContext | None,
    ) -> None:
        cls = _V6Server if ":" in host else _Quiet
        self.httpd = cls((host, port), handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            # The handshake happens in each request's thread, not in the one accepting: a client
            # that connects and stays silent holds only its own thread (until `Handler.timeout`).
            self.httpd.socket = tls.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.address = (host, int(self.httpd.server_address[1]))
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="status-page", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Quiet(http.server.ThreadingHTTPServer):
    """A client that fails its TLS handshake or drops the connection is not a traceback on
    stderr (a port scan would write hundreds)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class _V6Server(_Quiet):
    address_family = socket.AF_INET6


def url_of(scheme: str, address: tuple[str, int]) -> str:
    host, port = address
    return f"{scheme}://[{host}]:{port}/" if ":" in host else f"{scheme}://{host}:{port}/"


@dataclass(frozen=True)
class Listener:
    """The daemon's listener: its handler, its TLS context (None: plain HTTP), and either the
    page's access (``page``) or why the page is not served there (``refused``)."""

    handler: type[http.server.BaseHTTPRequestHandler]
    tls: ssl.SSLContext | None
    page: str | None = None
    refused: str | None = None


def listener(
    load: Callable[[], Config],
    host: str,
    extra: Callable[[http.server.BaseHTTPRequestHandler], bool],
    on_error: Callable[[str], None] = lambda line: None,
) -> Listener:
    """The daemon's listener on ``host``: ``extra``'s paths (its /metrics) and the status page,
    all behind the access rule; where the rule refuses the page (a non-loopback address without
    TLS and auth), ``extra``'s paths alone, as before the page existed, and the reason."""
    try:
        access = access_for(load().status, host)
    except AccessError as err:
        return Listener(handler_class(None, extra=extra), None, refused=str(err))
    site = Site(Source(load, on_error=on_error), access)
    return Listener(handler_class(site, extra=extra, on_error=on_error), access.tls, page=access.describe())
