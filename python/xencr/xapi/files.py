"""A disk between a pool and a local file (seeding by removable media): XAPI's VHD export
written to a file, and a VHD file streamed into XAPI's import. As in `transfer`, the engine does
TLS, HTTP and the stream on TCP connections opened here, and digests every block on the way.

Both resume at a block (``resume_from``, the engine's stream position): a download into the
partial file an earlier, cut one left (the export is read again from its start, only the rest is
written), an upload into the VDI a cut one was writing (only the blocks from there are sent:
XAPI's import keeps what the VDI holds, vhd.md 1.5). A cut connection is `ConnectionCut`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xencr import _engine
from xencr.xapi.handlers import (
    ConnectionCut,
    DataHost,
    RedirectRefused,
    TransferError,
    data_host,
    follow,
    is_cut,
    query,
    task_failure,
    tcp,
    wait_task,
)
from xencr.xapi.session import XapiSession


@dataclass
class FileReport:
    path: Path
    length: int  # bytes of the stream read (a download: the file's size; an upload: what was sent)
    blocks: int
    virtual_size: int
    seconds: float
    digest_algorithm: str
    digests: list[tuple[int, str]] = field(default_factory=list)  # an upload resumed: blocks sent
    resumed_from: int = 0  # the stream's first block written or sent (0: all)
    bytes_out: int = 0  # bytes written to the file, or sent to the pool


def _report(path: Path, r: Mapping[str, Any], start: float) -> FileReport:
    return FileReport(
        path,
        int(r["bytes_in"]),
        int(r["blocks"]),
        int(r["virtual_size"]),
        time.monotonic() - start,
        str(r["digest_algorithm"]),
        [(int(b), str(h)) for b, h in r["digests"]],
        int(r.get("resumed_from", 0)),
        int(r["bytes_out"]),
    )


class _HandlerCall:
    """One call of a pool's HTTP handler: its task and TCP connection. The task is cancelled
    unless the call is marked ``done``, and destroyed either way. `redirected` moves the call to
    the member a redirect names (once: XAPI redirects before binding the task, which stays)."""

    def __init__(self, session: XapiSession, label: str, description: str, handler: str, vdi: str) -> None:
        self.session = session
        self.task = str(session.call("task.create", label, description))
        self.done = False
        self.at: DataHost = data_host(session)
        self.path = f"/{handler}?" + query(session, self.task, vdi=vdi, format="vhd")
        self.what = f"{handler.split('_')[0]} of VDI {vdi}"
        self.hops = 0
        try:
            self.sock = tcp(self.at)
        except BaseException:
            session.destroy_task(self.task)
            raise

    def redirected(self, err: _engine.VhdError) -> None:
        if self.hops:
            raise RedirectRefused(
                f"{self.session.endpoint.where}: the {self.what} was redirected a second time: refused"
            )
        self.hops += 1
        self.at, self.path = follow(self.session, str(err.location), self.what)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.sock = tcp(self.at)

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
    resume_from: int = 0,
    keep: bool = False,
) -> FileReport:
    """The full content of ``vdi`` as a dynamic VHD file at ``path``, which must not exist; or,
    with ``resume_from`` = K > 0, the partial file of an earlier, cut download of the same
    export (`_engine.download`: its start must be this export's, else ``resume_mismatch``; the
    blocks before K are not re-read from the file, only digested from the export). A failed
    download removes what it wrote unless ``keep`` (it can then be resumed)."""
    if resume_from == 0 and path.exists():
        raise FileExistsError(17, "a download never replaces a file", str(path))
    start = time.monotonic()
    try:
        with _HandlerCall(session, "xencr seed export", f"export of {vdi}", "export_raw_vdi", vdi) as call:
            while True:
                try:
                    r = _engine.download(
                        call.sock.fileno(),
                        call.at.host,
                        call.path,
                        str(path),
                        src_tls=call.at.tls,
                        rate_limit=rate_limit,
                        progress=progress,
                        resume_from=resume_from,
                    )
                    break
                except _engine.VhdError as err:
                    if err.kind == "redirect":  # answered before the file is opened
                        call.redirected(err)
                        continue
                    if err.kind == "http_status":
                        raise task_failure(session, call.task) or TransferError(
                            f"export of {vdi}: {err}"
                        ) from None
                    raise
                except OSError as err:
                    if is_cut(err):
                        raise ConnectionCut(f"export of {vdi}: connection cut: {err}") from None
                    raise
            wait_task(session, call.task, None)
            call.done = True
            return _report(path, r, start)
    except BaseException:
        if not keep:
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
    resume_from: int = 0,
) -> FileReport:
    """Stream the VHD file at ``path`` into ``vdi`` (an empty VDI of the disk's size). The file
    is validated as it goes: a damaged one fails the import, whose task the pool then fails.

    ``resume_from`` = K > 0: only the blocks from K on are sent, into a VDI an earlier upload of
    the same file was cut writing (`_engine.upload`); the report's digests are those of the
    blocks sent. A connection cut mid-upload raises `ConnectionCut` (with the pool's reason
    when its task has one in time); ``progress.position`` then says how far it got."""
    start = time.monotonic()
    with _HandlerCall(session, "xencr seed import", f"import into {vdi}", "import_raw_vdi", vdi) as call:
        while True:
            try:
                r = _engine.upload(
                    str(path),
                    call.sock.fileno(),
                    call.at.host,
                    call.path,
                    dst_tls=call.at.tls,
                    rate_limit=rate_limit,
                    progress=progress,
                    resume_from=resume_from,
                )
                break
            except (_engine.VhdError, OSError) as err:
                if isinstance(err, _engine.VhdError) and err.kind == "redirect":
                    call.redirected(err)  # answered before the body: nothing was sent
                    continue
                # The file is checked while it is sent: its damage is its own error; a pool's
                # refusal is in the pool's task.
                if isinstance(err, _engine.VhdError) and err.kind not in ("http_status", "io"):
                    raise
                why = task_failure(session, call.task, wait=2.0)
                if is_cut(err):
                    reason = str(why) if why else str(err)
                    raise ConnectionCut(f"import into {vdi}: connection cut: {reason}") from None
                raise why or TransferError(f"import into {vdi}: {err}") from None
        if r.get("import_status", 200) != 200:
            raise task_failure(session, call.task) or TransferError(
                f"import into {vdi}: HTTP {r.get('import_status')}"
            )
        wait_task(session, call.task, timeout)
        call.done = True
        return _report(path, r, start)
