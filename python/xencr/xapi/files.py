"""A disk between a pool and a local file (seeding by removable media): XAPI's VHD export
written to a file, and a VHD file streamed into XAPI's import. As in `transfer`, the engine does
TLS, HTTP and the stream on TCP connections opened here, and digests every block on the way."""

from __future__ import annotations

import contextlib
import socket
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
    start = time.monotonic()
    task = str(session.call("task.create", "xencr seed export", f"export of {vdi}"))
    sock: socket.socket | None = None
    done = False
    try:
        sock = _tcp(session)
        query = "/export_raw_vdi?" + _query(session, task, vdi=vdi, format="vhd")
        try:
            r = _engine.download(
                sock.fileno(),
                session.endpoint.host,
                query,
                str(path),
                src_tls=_tls_spec(session),
                rate_limit=rate_limit,
                progress=progress,
            )
        except _engine.VhdError as err:
            if err.kind == "http_status":
                raise _task_failure(session, task) or TransferError(f"export of {vdi}: {err}") from None
            raise
        _wait(session, task, None)
        done = True
        return _report(path, r, start)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            if not done:
                path.unlink()
        raise
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        if not done:
            session.cancel_task(task)
        session.destroy_task(task)


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
    task = str(session.call("task.create", "xencr seed import", f"import into {vdi}"))
    sock: socket.socket | None = None
    done = False
    try:
        sock = _tcp(session)
        query = "/import_raw_vdi?" + _query(session, task, vdi=vdi, format="vhd")
        try:
            r = _engine.upload(
                str(path),
                sock.fileno(),
                session.endpoint.host,
                query,
                dst_tls=_tls_spec(session),
                rate_limit=rate_limit,
                progress=progress,
            )
        except (_engine.VhdError, OSError) as err:
            # The file is checked while it is sent: its damage is its own error; a pool's
            # refusal is in the pool's task.
            if isinstance(err, _engine.VhdError) and err.kind != "http_status" and err.kind != "io":
                raise
            raise _task_failure(session, task, wait=2.0) or TransferError(
                f"import into {vdi}: {err}"
            ) from None
        if r.get("import_status", 200) != 200:
            raise _task_failure(session, task) or TransferError(
                f"import into {vdi}: HTTP {r.get('import_status')}"
            )
        _wait(session, task, timeout)
        done = True
        return _report(path, r, start)
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        if not done:
            session.cancel_task(task)
        session.destroy_task(task)
