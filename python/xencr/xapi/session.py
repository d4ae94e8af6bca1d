"""A XAPI session on top of the official SDK: login, logout, re-login on SESSION_INVALID (the
SDK does that), retries with backoff for connection errors and transient XAPI errors (never for
logic errors), async calls followed to completion, and typed errors.

A pool of several hosts takes API calls on its master only: a login on another host answers
``HOST_IS_SLAVE [master address]`` (`xapi_session.ml`), and the session follows it to the master
(at most ``MAX_HOPS`` times, a loop refused). When nothing answers at the configured address, the
hosts an earlier login recorded (``Endpoint.known``, `members.py`) are tried, each a member that
names the master or the master itself. Each such host is trusted as the configured address is: the
system CAs verify it the same way; a pool pinned by a certificate is trusted there only with the
certificate the pool itself named for that host over a verified session (else the configured pin):
verification is never turned off. What the session did is one line each in ``followed`` (and a
warning on the ``xencr.xapi`` logger); ``endpoint`` is then where the session is.

Every failure to reach or use the pool itself (login refused, connection refused, DNS, TLS, a
certificate that is not the pinned one, an answer that is not XAPI's) is one line starting with
the pool: ``pool 'dr' (https://10.0.0.2): authentication failed for user 'root'``. Errors XAPI
returns for a call (``VDI_IN_USE [...]``) stay as XAPI sent them."""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
import xml.parsers.expat
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import XenAPI

from xencr.xapi.errors import (
    AuthenticationFailed,
    FingerprintMismatch,
    PoolDown,
    PoolUnreachable,
    XapiError,
    describe,
)
from xencr.xapi.members import PoolHost, PoolHosts, host_url, same_place
from xencr.xapi.tls import (
    PinnedTransport,
    TimeoutSafeTransport,
    TimeoutTransport,
    client_context,
    pem_fingerprint,
)

log = logging.getLogger("xencr.xapi")

ORIGINATOR = "xencr"
API_VERSION = "1.0"
# Connection errors worth another try: the pool may be restarting its toolstack.
_RETRYABLE_OS = (ConnectionError, socket.timeout, http.client.HTTPException)
# HOST_IS_SLAVE answers followed in one login: the master named by a member is the master, so a
# second hop only happens when it moved meanwhile.
MAX_HOPS = 3


@dataclass(frozen=True)
class Endpoint:
    """Where a pool answers, without credentials; ``name`` is the pool's name in the
    configuration (``""`` for a bare URL); ``known``: its hosts as an earlier login recorded them
    (where to look when the configured address is down)."""

    url: str
    fingerprint: str | None = None
    verify_tls: bool = True
    name: str = ""
    known: PoolHosts | None = None

    @property
    def where(self) -> str:
        """How errors name the pool: ``pool 'dr' (https://10.0.0.2)``, or the URL alone."""
        return f"pool {self.name!r} ({self.url})" if self.name else self.url

    @property
    def prefix(self) -> str:
        """How lines about the pool as a whole start: ``pool 'dr': `` (nothing for a bare URL)."""
        return f"pool {self.name!r}: " if self.name else ""

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)


class XapiSession:
    """One logged-in session. ``api`` mirrors ``session.xenapi`` with retries and typed errors::

    with XapiSession(endpoint, "root", password) as s:
        vms = s.api.VM.get_all_records()

    ``configured`` is the endpoint given, ``endpoint`` the master the login reached (the same
    unless it followed HOST_IS_SLAVE or went through a recorded host: the data handlers are
    called there), ``followed`` one line per such step.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        username: str,
        password: str,
        *,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 0.5,
    ) -> None:
        self.configured = endpoint
        self.endpoint = endpoint
        self.username = username
        self.retries = retries
        self.backoff = backoff
        self.followed: list[str] = []
        self._timeout = timeout
        # The SDK's proxy keeps one HTTP connection: calls from several threads take turns.
        self._lock = threading.Lock()
        self._sdk: Any = None
        self._login(password)
        for line in self.followed:
            log.warning("%s", line)

    # -- login --------------------------------------------------------------------------------

    def _login(self, password: str) -> None:
        """Log in at the configured address, following HOST_IS_SLAVE; when nothing answers there,
        through the recorded hosts (the last master first), all of them tried before waiting."""
        c = self.configured
        others = sorted(
            (h for h in (c.known.hosts if c.known else ()) if not same_place(h.url(c.scheme), c.url)),
            key=lambda h: not h.master,
        )
        if not others:
            self._follow(c, password, self.retries, c.where)
            return
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                self._follow(c, password, 0, c.where)
                return
            except PoolDown as err:
                down = err
            failures: list[PoolUnreachable] = []
            for host in others:
                try:
                    self._through(host, down, password)
                    return
                except PoolUnreachable as err:
                    failures.append(err)
            reason = "; ".join([down.reason, *map(str, failures)])
            if not all(isinstance(f, PoolDown) for f in failures):
                raise PoolUnreachable(f"{down.where}: {reason}")
            if attempt == self.retries:
                raise PoolDown(down.where, reason)
            log.warning("%s: %s, retrying in %.1fs", down.where, reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _through(self, host: PoolHost, down: PoolDown, password: str) -> None:
        """Log in through a recorded host, which must still be a host of the same pool."""
        c = self.configured
        assert c.known is not None
        url = host.url(c.scheme)
        mark = len(self.followed)
        self._follow(self._at(url), password, 0, f"recorded member {url}", "recorded member ")
        pool = self.call_once("pool.get_all")[0]
        uuid = str(self.call_once("pool.get_uuid", pool))
        if uuid != c.known.pool_uuid:
            # An address handed to another pool since: its data is not this pool's.
            self.logout()
            del self.followed[mark:]
            self.endpoint = c
            raise PoolUnreachable(
                f"recorded member {url}: now a host of pool {uuid}, not of this pool ({c.known.pool_uuid})"
            )
        # "pool 'a': https://A unreachable (...)", or the master A named: "https://A is not the
        # master; the master it names, https://B: connection refused"
        what = f"{c.prefix}{c.url} unreachable ({down.reason})" if down.where == c.where else str(down)
        self.followed.insert(mark, f"{what}; reached the pool through recorded member {url}")

    def _follow(self, first: Endpoint, password: str, retries: int, where: str, hop: str = "") -> None:
        """Log in at ``first``; when it answers HOST_IS_SLAVE, at the master it names (at most
        ``MAX_HOPS`` times). ``where`` names ``first`` in errors; ``hop`` starts the name of a host
        it led to (``pool 'a': https://A is not the master; the master it names, https://B``)."""
        at, path, lines = first, [first.url], []
        hop = hop or self.configured.prefix
        while True:
            try:
                self._sdk = self._login_at(at, password, retries, where)
            except FingerprintMismatch as err:
                if at is first or at.fingerprint != self.configured.fingerprint:
                    raise
                name = self.configured.name or "NAME"
                raise FingerprintMismatch(
                    f"{err}: no certificate recorded for that host by a verified session; check it, "
                    f"then pin it with `xencr pool add {name} {at.url} --replace`"
                ) from None
            except XapiError as err:
                if err.code != "HOST_IS_SLAVE" or not err.params:
                    raise
                url = host_url(at.scheme, err.params[0])
                chain = " -> ".join([*path, url])
                if any(same_place(url, seen) for seen in path):
                    raise PoolUnreachable(f"{self.configured.prefix}HOST_IS_SLAVE loop: {chain}") from None
                if len(path) > MAX_HOPS:
                    raise PoolUnreachable(
                        f"{self.configured.prefix}no master after {MAX_HOPS} HOST_IS_SLAVE answers: {chain}"
                    ) from None
                lines.append(f"{self.configured.prefix}{at.url} is not the master; followed to {url}")
                where = f"{hop}{at.url} is not the master; the master it names, {url}"
                at = self._at(url)
                path.append(url)
                continue
            self.endpoint = at
            self.followed += lines
            return

    def _at(self, url: str) -> Endpoint:
        """The pool at another of its hosts, trusted as the configured address is. Pinned: the
        certificate the pool named for that host (recorded over a verified session), else the
        configured pin (hosts sharing one certificate); system CAs or none: the same there."""
        c = self.configured
        pin = None
        if c.fingerprint and urlsplit(url).scheme == "https":
            pin = (c.known.fingerprint_at(url) if c.known else None) or c.fingerprint
        return Endpoint(url, pin, c.verify_tls, c.name)

    def _login_at(self, at: Endpoint, password: str, retries: int, where: str) -> Any:
        """An SDK session logged in at ``at`` (one address: HOST_IS_SLAVE is raised)."""
        sdk = XenAPI.Session(at.url, transport=self._transport(at))
        try:
            self._retrying(
                "session.login_with_password",
                lambda: sdk.xenapi.login_with_password(self.username, password, API_VERSION, ORIGINATOR),
                retries=retries,
                where=where,
            )
        except XapiError as err:
            sdk("close")()  # its connection: a member answered, the next hop opens another
            if err.code == "SESSION_AUTHENTICATION_FAILED":
                raise AuthenticationFailed(where, self.username, err.params) from None
            raise
        return sdk

    def _transport(self, e: Endpoint) -> xmlrpc.client.Transport:
        if e.scheme == "https":
            if e.fingerprint:
                return PinnedTransport(e.fingerprint, self._timeout)
            return TimeoutSafeTransport(self._timeout, client_context(None, e.verify_tls))
        return TimeoutTransport(self._timeout)

    def pool_hosts(self) -> PoolHosts:
        """The pool's hosts now, master first, each with the certificate the pool names for it.
        ``verified``: this session verified its peer (a pinned certificate or the system CAs)."""
        pool = self.call("pool.get_all")[0]
        master = self.call("pool.get_master", pool)
        hosts = [
            PoolHost(
                uuid=str(rec["uuid"]),
                name=str(rec["name_label"]),
                address=str(rec["address"]),
                master=ref == master,
                enabled=bool(rec["enabled"]),
                fingerprint=self.certificate_of(str(ref)),
            )
            for ref, rec in self.call("host.get_all_records").items()
        ]
        hosts.sort(key=lambda h: (not h.master, h.name))
        e = self.endpoint
        verified = e.scheme == "https" and (e.fingerprint is not None or e.verify_tls)
        return PoolHosts(str(self.call("pool.get_uuid", pool)), tuple(hosts), verified)

    def certificate_of(self, host: str) -> str | None:
        """The sha256 fingerprint of the certificate the pool names for ``host``
        (``host.get_server_certificate``), or None when it cannot say (the host is offline)."""
        try:
            # Once: HOST_OFFLINE is "transient", but an offline host will not come back in seconds.
            return pem_fingerprint(str(self.call_once("host.get_server_certificate", host)))
        except (XapiError, ValueError) as err:
            log.debug("host.get_server_certificate %s: %s", host, err)
            return None

    # -- calls --------------------------------------------------------------------------------

    @property
    def ref(self) -> str:
        """The session reference (for the HTTP handlers' ``session_id``)."""
        return str(self._sdk._session)

    @property
    def api(self) -> _Api:
        return _Api(self, "")

    def call(self, method: str, *args: Any) -> Any:
        """``call("VM.get_record", ref)``: one XAPI call with retries and typed errors."""
        fn: Any = self._sdk.xenapi
        for part in method.split("."):
            fn = getattr(fn, part)
        return self._retrying(method, lambda: fn(*args))

    def call_once(self, method: str, *args: Any) -> Any:
        """One call whose failure is an answer, not a passing condition: no retries, even on a
        "transient" code (a destroy refused with VDI_IN_USE means the object is in use)."""
        fn: Any = self._sdk.xenapi
        for part in method.split("."):
            fn = getattr(fn, part)
        return self._retrying(method, lambda: fn(*args), retries=0)

    def _retrying(
        self, method: str, thunk: Callable[[], Any], *, retries: int | None = None, where: str | None = None
    ) -> Any:
        where = where or self.endpoint.where
        delay = self.backoff
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            last = attempt == retries
            try:
                with self._lock:
                    return thunk()
            except XenAPI.Failure as f:
                err = XapiError(str(f.details[0]), f.details[1:])
                if not err.transient or last:
                    raise err from None
                log.warning("%s: %s, retrying in %.1fs", method, err, delay)
            except FingerprintMismatch as e:
                # Its text starts with host:port; the pool's name and URL say more.
                raise FingerprintMismatch(f"{where}: {str(e).split(': ', 1)[-1]}") from None
            except ssl.SSLError as e:
                raise PoolUnreachable(f"{where}: TLS: {e.reason or e}") from None
            except (OSError, xmlrpc.client.ProtocolError, *_RETRYABLE_OS) as e:
                # A 5xx may come from a proxy in front of a restarting pool; a 4xx will not pass.
                client_error = isinstance(e, xmlrpc.client.ProtocolError) and e.errcode < 500
                if client_error:
                    raise PoolUnreachable(f"{where}: {describe(e)}") from None
                if last:
                    raise PoolDown(where, describe(e)) from None
                log.warning("%s: %s: %s, retrying in %.1fs", where, method, describe(e), delay)
            except xmlrpc.client.Fault as e:
                # The SDK raises Faults when the answer is not XAPI's (no Status), on a login
                # timeout (504), and after 3 re-logins that gave no valid session.
                if e.faultCode == 504:
                    raise PoolDown(where, e.faultString) from None
                raise PoolUnreachable(f"{where}: {e.faultString}") from None
            except (xml.parsers.expat.ExpatError, xmlrpc.client.ResponseError):
                raise PoolUnreachable(f"{where}: the answer is not XML-RPC (is this a XAPI URL?)") from None
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def wait_task(self, task: str, *, timeout: float | None = None, poll: float = 0.005) -> str:
        """Wait for a task; return its result (XML-RPC value tags stripped) or raise its error.
        On timeout the task is cancelled. The task is destroyed either way."""
        start = time.monotonic()
        try:
            while True:
                status = self.call("task.get_status", task)
                if status == "success":
                    return _strip_value(str(self.call("task.get_result", task)))
                if status in ("failure", "cancelled"):
                    info = self.call("task.get_error_info", task)
                    raise XapiError(str(info[0]) if info else "TASK_CANCELLED", info[1:] if info else [task])
                if timeout is not None and time.monotonic() - start > timeout:
                    self.cancel_task(task)
                    raise XapiError("TASK_CANCELLED", [task, f"timed out after {timeout:.0f}s"])
                time.sleep(poll)
                poll = min(poll * 2, 0.5)  # most tasks end quickly: poll fast first, then back off
        finally:
            self.destroy_task(task)

    def call_async(self, method: str, *args: Any, timeout: float | None = None) -> str:
        """Run ``Async.<method>`` and wait for its result."""
        task = self.call("Async." + method, *args)
        return self.wait_task(str(task), timeout=timeout)

    def cancel_task(self, task: str) -> None:
        try:
            self.call("task.cancel", task)
        except (XapiError, PoolUnreachable) as err:
            log.debug("task.cancel %s: %s", task, err)

    def destroy_task(self, task: str) -> None:
        try:
            self.call("task.destroy", task)
        except (XapiError, PoolUnreachable) as err:
            log.debug("task.destroy %s: %s", task, err)

    def foreign(self, session_ref: str) -> XapiSession:
        """A session on the same pool bound to another session reference: the read-only session
        ``VDI.open_database`` returns, whose calls read the *foreign* pool database in the VDI
        (xapi.md §5.2). It never logs in again: a re-login would silently read this pool instead,
        so an expired database session is an error. ``logout`` ends the database session."""
        other = object.__new__(XapiSession)
        other.configured = self.configured
        other.endpoint = self.endpoint
        other.username = "disaster-recovery"
        other.retries = self.retries
        other.backoff = self.backoff
        other.followed = []
        other._timeout = self._timeout
        other._lock = threading.Lock()
        sdk = XenAPI.Session(self.endpoint.url, transport=self._transport(self.endpoint))
        sdk._session = session_ref
        sdk.last_login_method = ""  # logout works, SESSION_INVALID never re-logs in
        other._sdk = sdk
        return other

    # -- lifetime -----------------------------------------------------------------------------

    def logout(self) -> None:
        try:
            self._sdk.xenapi.session.logout()
        except Exception as err:  # logging out of a dead pool must not mask the real error
            log.debug("logout: %s", err)

    def __enter__(self) -> XapiSession:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.logout()

    def __repr__(self) -> str:
        return f"XapiSession({self.endpoint.url!r}, user={self.username!r})"


class _Api:
    """``session.api.VM.get_record(ref)`` → ``session.call("VM.get_record", ref)``."""

    def __init__(self, session: XapiSession, prefix: str) -> None:
        self._session = session
        self._prefix = prefix

    def __getattr__(self, name: str) -> _Api:
        return _Api(self._session, f"{self._prefix}.{name}" if self._prefix else name)

    def __call__(self, *args: Any) -> Any:
        return self._session.call(self._prefix, *args)


def _strip_value(result: str) -> str:
    """A task result is an XML-RPC value fragment (``<value>OpaqueRef:…</value>``)."""
    r = result.strip()
    if r.startswith("<value>") and r.endswith("</value>"):
        r = r[len("<value>") : -len("</value>")]
    return r
