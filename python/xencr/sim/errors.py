"""XAPI failures as they travel on the wire: a code and a list of string parameters."""

from __future__ import annotations


class XapiError(Exception):
    """A failure returned as ``ErrorDescription = [code, *params]`` (all strings)."""

    def __init__(self, code: str, *params: object) -> None:
        self.code = code
        self.params = [str(p) for p in params]
        super().__init__(code, *self.params)

    @property
    def description(self) -> list[str]:
        return [self.code, *self.params]

    def __str__(self) -> str:
        return " ".join(self.description)


def handle_invalid(cls: str, ref: str) -> XapiError:
    return XapiError("HANDLE_INVALID", cls, ref)


def uuid_invalid(cls: str, uuid: str) -> XapiError:
    return XapiError("UUID_INVALID", cls, uuid)


def internal_error(message: str) -> XapiError:
    return XapiError("INTERNAL_ERROR", message)


def sr_backend_failure(code: int, description: str, errno: str = "", stderr: str = "") -> XapiError:
    """SM errors keep the form ``SR_BACKEND_FAILURE_<n> [errno, description, stderr]`` (xapi.md 3.9)."""
    return XapiError(f"SR_BACKEND_FAILURE_{code}", errno, description, stderr)


def sr_no_space() -> XapiError:
    # sm libs/sm/core/XE_SR_ERRORCODES.xml code 44 "SRNoSpace"
    return sr_backend_failure(44, "There is insufficient space")


class HttpFailure(Exception):
    """An HTTP handler failure answered with a status code (and maybe a failed task)."""

    def __init__(self, status: int, error: XapiError | None = None) -> None:
        self.status = status
        self.error = error
        super().__init__(status, error)
