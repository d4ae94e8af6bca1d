"""A disk between a pool and a local file (seeding by removable media): XAPI's VHD export
written to a file, and a VHD file streamed into XAPI's import. As in `transfer`, the engine does
TLS, HTTP and the stream on TCP connections opened here, and digests every block on the way."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xencr import _engine
from xencr.xapi.session import XapiSession
from xencr.xapi.transfer import TransferError, _query, _task_failure, _tcp, _tls_spec, _wait


@dataclass
class FileReport:
    path: Path
    length: int  # bytes of the VHD stream (= the file's size)
    blocks: int
    virtual_size: int
    seconds: float
    digest_algorithm: str
    digests: list[tuple[int, str]] = field(default_factory=list)


def _report(path: Path, r: Mapping[str, Any], start: float) -> FileReport:
    return FileReport(
        path,
        int(r["bytes_in"]),
        int(r["blocks"]),
        int(r["virtual_size"]),
        time.monotonic() - start,
        str(r["digest_algorithm"]),
        [(int(b), str(h)) for b, h in r["digests"]],
    )


class _HandlerCall:
    """One call of a pool's HTTP handler: its task and TCP connection. The task is cancelled
    unless the call is marked ``done``, and destroyed either way."""

    def __init__(self, session: XapiSession, label: str, description: str) -> None:
        self.session = session
        self.task = str(session.call("task.create", label, description))
        self.done = False
        try:
            self.sock = _tcp(session)
        except BaseException:
            session.destroy_task(self.task)
            raise

    def path(self, handler: str, vdi: str) -> str:
        return f"/{handler}?" + _query(self.session, self.task, vdi=vdi, format="vhd")

    def __enter__(self) -> _HandlerCall:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if not self.done:
            self.session.cancel_task(self.task)
        self.session.destroy_task(self.task)


def download_vdi(
    session: XapiSession,
    vdi: str,
    path: Path,
    *,
    rate_limit: int | None = None,
    progress: _engine.Progress | None = None,
) -> FileReport:
    """The full content of ``vdi`` as a dynamic VHD file at ``path`` (which must not exist; a
    failed download removes what it wrote)."""
    if path.exists():
        raise FileExistsError(17, "a download never replaces a file", str(path))
    start = time.monotonic()
    try:
        with _HandlerCall(session, "xencr seed export", f"export of {vdi}") as call:
            try:
                r = _engine.download(
                    call.sock.fileno(),
                    session.endpoint.host,
                    call.path("export_raw_vdi", vdi),
                    str(path),
                    src_tls=_tls_spec(session),
                    rate_limit=rate_limit,
                    progress=progress,
                )
            except _engine.VhdError as err:
                if err.kind == "http_status":
                    raise _task_failure(session, call.task) or TransferError(
                        f"export of {vdi}: {err}"
                    ) from None
                raise
            _wait(session, call.task, None)
            call.done = True
            return _report(path, r, start)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def upload_vdi(
    session: XapiSession,
    vdi: str,
    path: Path,
    *,
    rate_limit: int | None = None,
    progress: _engine.Progress | None = None,
    timeout: float | None = None,
) -> FileReport:
    """Stream the VHD file at ``path`` into ``vdi`` (an empty VDI of the disk's size). The file
    is validated as it goes: a damaged one fails the import, whose task the pool then fails."""
    start = time.monotonic()
    with _HandlerCall(session, "xencr seed import", f"import into {vdi}") as call:
        try:
            r = _engine.upload(
                str(path),
                call.sock.fileno(),
                session.endpoint.host,
                call.path("import_raw_vdi", vdi),
                dst_tls=_tls_spec(session),
                rate_limit=rate_limit,
                progress=progress,
            )
        except (_engine.VhdError, OSError) as err:
            # The file is checked while it is sent: its damage is its own error; a pool's
            # refusal is in the pool's task.
            if isinstance(err, _engine.VhdError) and err.kind not in ("http_status", "io"):
                raise
            raise _task_failure(session, call.task, wait=2.0) or TransferError(
                f"import into {vdi}: {err}"
            ) from None
        if r.get("import_status", 200) != 200:
            raise _task_failure(session, call.task) or TransferError(
                f"import into {vdi}: HTTP {r.get('import_status')}"
            )
        _wait(session, call.task, timeout)
        call.done = True
        return _report(path, r, start)
