"""A XAPI session on top of the official SDK: login, logout, re-login on SESSION_INVALID (the
SDK does that), retries with backoff for connection errors and transient XAPI errors (never for
logic errors), async calls followed to completion, and typed errors.

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

from xencr.xapi.errors import AuthenticationFailed, FingerprintMismatch, PoolUnreachable, XapiError
from xencr.xapi.tls import PinnedTransport, TimeoutSafeTransport, TimeoutTransport, client_context

log = logging.getLogger("xencr.xapi")

ORIGINATOR = "xencr"
API_VERSION = "1.0"
# Connection errors worth another try: the pool may be restarting its toolstack.
_RETRYABLE_OS = (ConnectionError, socket.timeout, http.client.HTTPException)


@dataclass(frozen=True)
class Endpoint:
    """Where a pool answers, without credentials; ``name`` is the pool's name in the
    configuration (``""`` for a bare URL)."""

    url: str
    fingerprint: str | None = None
    verify_tls: bool = True
    name: str = ""

    @property
    def where(self) -> str:
        """How errors name the pool: ``pool 'dr' (https://10.0.0.2)``, or the URL alone."""
        return f"pool {self.name!r} ({self.url})" if self.name else self.url

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
        self.endpoint = endpoint
        self.username = username
        self.retries = retries
        self.backoff = backoff
        # The SDK's proxy keeps one HTTP connection: calls from several threads take turns.
        self._lock = threading.Lock()
        self._sdk = XenAPI.Session(endpoint.url, transport=self._transport(timeout))
        try:
            self._retrying(
                "session.login_with_password",
                lambda: self._sdk.xenapi.login_with_password(username, password, API_VERSION, ORIGINATOR),
            )
        except XapiError as err:
            if err.code == "SESSION_AUTHENTICATION_FAILED":
                raise AuthenticationFailed(endpoint.where, username, err.params) from None
            raise

    def _transport(self, timeout: float) -> xmlrpc.client.Transport:
        e = self.endpoint
        if e.scheme == "https":
            if e.fingerprint:
                return PinnedTransport(e.fingerprint, timeout)
            return TimeoutSafeTransport(timeout, client_context(None, e.verify_tls))
        return TimeoutTransport(timeout)

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

    def _retrying(self, method: str, thunk: Callable[[], Any], *, retries: int | None = None) -> Any:
        where = self.endpoint.where
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
                if last or client_error:
                    raise PoolUnreachable(f"{where}: {_describe(e)}") from None
                log.warning("%s: %s: %s, retrying in %.1fs", where, method, _describe(e), delay)
            except xmlrpc.client.Fault as e:
                # The SDK raises Faults when the answer is not XAPI's (no Status), on a login
                # timeout, and after 3 re-logins that gave no valid session.
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


def _describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve host ({e.strerror})"
    if isinstance(e, xmlrpc.client.ProtocolError):
        return f"HTTP {e.errcode} {e.errmsg} (is this a XAPI URL?)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower() if e.errno is not None else e.strerror
    return str(e) or type(e).__name__


def _strip_value(result: str) -> str:
    """A task result is an XML-RPC value fragment (``<value>OpaqueRef:…</value>``)."""
    r = result.strip()
    if r.startswith("<value>") and r.endswith("</value>"):
        r = r[len("<value>") : -len("</value>")]
    return r
