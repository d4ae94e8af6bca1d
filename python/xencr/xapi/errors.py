"""XAPI failures as typed exceptions, and which of them are worth retrying."""

from __future__ import annotations

import socket
import xmlrpc.client
from collections.abc import Sequence

# Errors that describe a passing condition of the pool, not a mistake in the request: retried
# with backoff. Everything else (HANDLE_INVALID, VM_BAD_POWER_STATE, OPERATION_BLOCKED...) is a
# logic error and surfaces at once.
TRANSIENT_CODES = frozenset(
    {
        "HOST_OFFLINE",
        "HOST_STILL_BOOTING",
        "HOST_NOT_ENOUGH_FREE_MEMORY",
        "TOO_MANY_PENDING_TASKS",
        "TOO_MANY_STORAGE_MIGRATES",
        "OTHER_OPERATION_IN_PROGRESS",
        "SR_BACKEND_FAILURE_46",  # VDIUnavailable: the SM layer is briefly busy
        "VDI_IN_USE",
        "CANNOT_CONTACT_HOST",
    }
)


class XapiError(Exception):
    """A XAPI failure: ``code`` and ``params`` exactly as the pool sent them."""

    def __init__(self, code: str, params: Sequence[object] = ()) -> None:
        self.code = code
        self.params = [str(p) for p in params]
        self.context = ""  # the object it is about, when a caller said (`about`)
        super().__init__(code, *self.params)

    def __str__(self) -> str:
        text = f"{self.code} [{', '.join(self.params)}]" if self.params else self.code
        return f"{self.context}: {text}" if self.context else text

    def about(self, what: str) -> XapiError:
        """The same error (code and params as XAPI sent them), its line starting with the object it
        is about: ``pool a: SR iSCSI: SR_OPERATION_NOT_SUPPORTED [OpaqueRef:...]``."""
        out = XapiError(self.code, self.params)
        out.context = what
        return out

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_CODES


class AuthenticationFailed(XapiError):
    """The pool refused the login (``SESSION_AUTHENTICATION_FAILED``). One line naming the pool
    and the user; the password is never part of it (XAPI's params are only user and message)."""

    def __init__(self, where: str, username: str, params: Sequence[object] = ()) -> None:
        super().__init__("SESSION_AUTHENTICATION_FAILED", params)
        self.where = where
        self.username = username

    def __str__(self) -> str:
        return f"{self.where}: authentication failed for user {self.username!r}"


class PoolUnreachable(Exception):
    """The pool could not be reached (connection refused, DNS, timeout, TLS failure), or what
    answered does not speak XAPI; ``str()`` names the pool and the reason in one line."""


class FingerprintMismatch(PoolUnreachable):
    """The pool's certificate is not the pinned one."""


class PoolDown(PoolUnreachable):
    """Nothing usable answered at an address: connection refused, reset or timed out, a name
    that does not resolve, a 5xx from a proxy in front of it. Worth another try later, or
    another host of the pool now (unlike a TLS failure or a 4xx, which say something answered)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


def describe(e: BaseException) -> str:
    """A connection failure as the few words an error line ends with: ``connection refused``."""
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
