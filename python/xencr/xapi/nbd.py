"""The NBD data path (xapi.md §4.6): where a pool serves a VDI over NBD (`VDI.get_nbd_info`), and
a disk read from there by the engine (several connections, TLS pinned to the certificate the pool
names for that host) straight into the target's import, as `transfer.copy_vdi` does for the VHD
stream. Python opens the connections (so a watchdog can cut them); no byte of the disk passes
through Python. The export name embeds the session: it is a secret, never logged or shown."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from xencr import _engine
from xencr.xapi.handlers import (
    ConnectionCut,
    DataHost,
    RedirectRefused,
    TransferCancelled,
    TransferError,
    Watchdog,
    data_host,
    follow,
    is_cut,
    query,
    task_failure,
    tcp,
    wait_task,
)
from xencr.xapi.session import XapiSession
from xencr.xapi.tls import pem_fingerprint
from xencr.xapi.transfer import TransferReport

NBD_PURPOSES = ("nbd", "insecure_nbd")
CBT_UNIT = 64 * 1024  # one bit of a CBT bitmap (VDI.list_changed_blocks)


@dataclass(frozen=True, repr=False)
class NbdEndpoint:
    """One record of `VDI.get_nbd_info`: a host serving the VDI."""

    address: str
    port: int
    exportname: str  # "/<vdi uuid>?session_id=<ref>": a secret
    cert: str  # the host's certificate (PEM), named for insecure_nbd too
    subject: str
    secure: bool = True  # the pool's NBD purpose is "nbd" (TLS), not "insecure_nbd"

    @property
    def tls(self) -> str | None:
        """How the engine trusts the server: exactly the certificate the pool named, or plain."""
        return f"sha256:{pem_fingerprint(self.cert)}" if self.secure else None

    @property
    def label(self) -> str:
        return f"NBD server {self.address}:{self.port}"

    def __repr__(self) -> str:  # the export name carries the session
        return f"NbdEndpoint({self.address}:{self.port}, tls={self.tls is not None})"


def nbd_networks(session: XapiSession) -> list[tuple[str, str]]:
    """(network name, purpose) of the pool's networks with an NBD purpose."""
    out = []
    for rec in session.api.network.get_all_records().values():
        for purpose in rec.get("purpose", []):
            if purpose in NBD_PURPOSES:
                out.append((str(rec["name_label"]), str(purpose)))
    return sorted(out)


def endpoints(session: XapiSession, vdi: str) -> list[NbdEndpoint]:
    """Where the pool serves ``vdi`` over NBD (empty: nowhere). TLS unless the pool's NBD purpose
    is ``insecure_nbd``: XAPI names the certificate either way, and allows only one of the two
    purposes in a pool (`NETWORK_INCOMPATIBLE_PURPOSES`)."""
    secure = any(purpose == "nbd" for _, purpose in nbd_networks(session))
    return [
        NbdEndpoint(
            str(r["address"]),
            int(r["port"]),
            str(r["exportname"]),
            str(r["cert"]),
            str(r["subject"]),
            secure,
        )
        for r in session.call("VDI.get_nbd_info", vdi)
    ]


def _connections(at: NbdEndpoint, n: int) -> list[socket.socket]:
    label = DataHost(at.address, at.port, at.tls, at.label)
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(tcp(label))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


@dataclass
class NbdTransfer(TransferReport):
    """A transfer read over NBD: what `TransferReport` says, plus the NBD side."""

    bytes_read: int = 0  # disk data read over NBD (the source link's payload)
    connections: int = 0
    unit_digests: Sequence[tuple[int, str]] = ()  # per 64 KiB unit carried


def nbd_copy_vdi(
    src: XapiSession,
    src_vdi: str,
    dst: XapiSession,
    dst_vdi: str,
    *,
    changed: bytes | None,
    connections: int,
    rate_limit: int | None = None,
    timeout: float | None = None,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
    progress: Callable[[int], _engine.Progress | None] | None = None,
    resume_from: int = 0,
) -> NbdTransfer:
    """Read ``src_vdi`` over NBD (its ``changed`` 64 KiB units, a CBT bitmap; None: the whole
    allocated disk) into ``dst_vdi``'s import. The first host `VDI.get_nbd_info` names that
    accepts the connections serves them all. The import follows one redirect, as `copy_vdi`.
    With ``resume_from`` K, the import is sent only the blocks from the K-th of the stream on
    (the earlier ones are still read and digested: `replication.resume`)."""
    hosts = endpoints(src, src_vdi)
    if not hosts:
        raise TransferError(f"{src.endpoint.where}: VDI {src_vdi} is not served over NBD (no NBD network)")
    at_import = (data_host(dst), "")
    redirected = False
    while True:
        try:
            return _copy_once(
                hosts,
                src_vdi,
                dst,
                dst_vdi,
                at_import,
                changed,
                connections,
                rate_limit,
                timeout,
                deadline,
                cancel,
                progress,
                resume_from,
            )
        except _ImportRedirected as r:
            if redirected:
                raise RedirectRefused(
                    f"{dst.endpoint.where}: the import into VDI {dst_vdi} was redirected a second time:"
                    " refused"
                ) from None
            redirected = True
            at_import = follow(dst, r.location, f"import into VDI {dst_vdi}")


class _ImportRedirected(Exception):
    def __init__(self, location: str) -> None:
        super().__init__("import")
        self.location = location


def _copy_once(
    hosts: Sequence[NbdEndpoint],
    src_vdi: str,
    dst: XapiSession,
    dst_vdi: str,
    at_import: tuple[DataHost, str],
    changed: bytes | None,
    connections: int,
    rate_limit: int | None,
    timeout: float | None,
    deadline: float | None,
    cancel: threading.Event | None,
    progress: Callable[[int], _engine.Progress | None] | None,
    resume_from: int,
) -> NbdTransfer:
    if cancel is not None and cancel.is_set():
        raise TransferCancelled(f"transfer of {src_vdi} cancelled before it started")
    start = time.monotonic()
    dst_task = str(dst.call("task.create", "xencr import", f"import into {dst_vdi}"))
    socks: list[socket.socket] = []
    done = False
    try:
        problems = []
        for at in hosts:
            try:
                nbd = _connections(at, connections)
                break
            except (OSError, TransferError) as err:
                problems.append(f"{at.label}: {err}")
        else:
            raise TransferError(f"VDI {src_vdi}: no NBD server answered ({'; '.join(problems)})")
        socks += nbd
        dst_at = at_import[0]
        import_path = "/import_raw_vdi?" + query(dst, dst_task, vdi=dst_vdi, format="vhd")
        d = tcp(dst_at)
        socks.append(d)
        watchdog = Watchdog(socks, deadline, cancel)
        counter = progress(0) if progress else None
        try:
            report = _engine.nbd_copy(
                [s.fileno() for s in nbd],
                at.exportname,
                d.fileno(),
                dst_at.host,
                import_path,
                src_tls=at.tls,
                src_server_name=at.subject or at.address,
                dst_tls=dst_at.tls,
                changed=changed,
                unit=CBT_UNIT,
                rate_limit=rate_limit,
                progress=counter,
                resume_from=resume_from,
            )
        except (_engine.VhdError, OSError) as err:
            watchdog.check(f"transfer of {src_vdi}")
            kind, side = getattr(err, "kind", ""), getattr(err, "side", None)
            if kind == "redirect" and side == "import":
                raise _ImportRedirected(str(getattr(err, "location", ""))) from None
            if kind == "http_status":
                raise task_failure(dst, dst_task) or TransferError(f"import into {dst_vdi}: {err}") from None
            if kind == "nbd" and "dropped the connection" in str(err):  # the engine's words for a cut
                raise ConnectionCut(f"{at.label}: VDI {src_vdi}: {err}") from None
            if kind == "nbd":
                raise TransferError(f"{at.label}: VDI {src_vdi}: {err}") from None
            reason = task_failure(dst, dst_task, wait=2.0)
            if is_cut(err):  # resumable (`replication.resume`): the pool's reason, when it has one
                raise ConnectionCut(f"transfer of {src_vdi}: connection cut: {reason or err}") from None
            raise reason or TransferError(f"transfer of {src_vdi}: {err}") from None
        finally:
            watchdog.cancel()
        imported = wait_task(dst, dst_task, timeout, deadline, cancel)
        done = True
        return NbdTransfer(
            stream_length=int(report["bytes_out"]),
            bytes_sent=int(report["bytes_out"]),
            blocks=int(report["blocks"]),
            kind="delta" if changed is not None else "full",
            seconds=time.monotonic() - start,
            digests=list(report["digests"]),
            imported_vdi=imported,
            block_size=int(report["block_size"]),
            bytes_read=int(report["bytes_in"]),
            connections=int(report["connections"]),
            unit_digests=list(report["unit_digests"]),
        )
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        if not done:
            dst.cancel_task(dst_task)
        dst.destroy_task(dst_task)
