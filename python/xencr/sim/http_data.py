"""``GET /export_raw_vdi`` and ``PUT /import_raw_vdi`` (``ocaml/xapi/export_raw_vdi.ml``,
``import_raw_vdi.ml``, ``xapi_http.ml``, ``vhd_tool_wrapper.ml``; xapi.md 4.1-4.4).

Any host of the pool serves them, for the SRs it sees; a request for a VDI (or, for an import,
an SR) that the receiving host cannot see is answered ``302 Found`` with the location of a host
that can (``importexport.ml`` ``return_302_redirect``).

Data moves between the socket and the VHD files inside the engine (bounded memory, GIL released).
When a transfer fault is armed (drop after N bytes, flipped byte, rate limit) the stream goes
through a pipe and a bounded Python copy loop that applies the fault.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from xencr.sim import wire_xmlrpc
from xencr.sim.api.placement import hosts_seeing
from xencr.sim.api.vdi import written_ranges
from xencr.sim.errors import HttpFailure, XapiError
from xencr.sim.storage import engine

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler

    from xencr.sim.pool_state import PoolState

COPY_CHUNK = 64 * 1024
RAW_CHUNK = 2 * 1024 * 1024  # raw imports are written a VHD block at a time
IO_ERROR = XapiError("VDI_IO_ERROR", "Device I/O errors")
CONTENT_TYPES = {"raw": "application/octet-stream", "vhd": "application/vhd"}
KNOWN_FORMATS = ("raw", "vhd", "tar", "qcow2")
# ocaml-uri's characters left unencoded in a query key / value (lib/uri.ml safe_chars_for_query_*)
_QUERY_SAFE = "!$'()*,=:@/?-._~"
_KEY_SAFE = _QUERY_SAFE.replace("=", "")
_VALUE_SAFE = _QUERY_SAFE.replace(",", "")
REDIRECT_DRAIN_SECONDS = 2.0


class Transfer:
    """One request's parsed query, auth and task binding."""

    def __init__(self, pool: PoolState, host: str, req: BaseHTTPRequestHandler, task_label: str) -> None:
        self.pool = pool
        self.host = host  # the host that received the request
        self.req = req
        self.query = {k: v[-1] for k, v in parse_qs(urlsplit(req.path).query, keep_blank_values=True).items()}
        self.temp_session: str | None = None
        self.session = self._authenticate()
        self.task_label = task_label
        self.task: str | None = None

    def _authenticate(self) -> str:
        """Session from the query or a cookie, else HTTP Basic (temporary session); else 401."""
        pool = self.pool
        session = self.query.get("session_id") or self._cookie("session_id")
        if session:
            if pool.db.exists("session", session):
                return session
            raise HttpFailure(401)
        auth = self.req.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                user, _, pwd = base64.b64decode(auth[6:]).decode().partition(":")
                self.temp_session = pool.login(user, pwd, "http")
                return self.temp_session
            except (XapiError, ValueError):
                raise HttpFailure(401) from None
        raise HttpFailure(401)

    def _cookie(self, name: str) -> str | None:
        for part in self.req.headers.get("Cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return None

    def bind_task(self) -> str:
        """The client's ``task_id`` when given (and valid), else a new task of ours."""
        task = self.query.get("task_id") or self._cookie("task_id")
        with self.pool.db.lock:
            if task and self.pool.db.exists("task", task):
                self.task = task
            else:
                self.task = self.pool.tasks.create(self.session, self.task_label, host=self.host)
        return self.task

    def redirected(self, sr: str) -> bool:
        """When the receiving host cannot see ``sr``, answer 302 to one that can and return True
        (``importexport.ml``: ``check_sr_availability``, ``find_host_for_sr``,
        ``return_302_redirect``). No host seeing it: ``NO_HOSTS_AVAILABLE``, HTML 500."""
        pool = self.pool
        with pool.db.lock:
            seeing = hosts_seeing(pool.db, sr)
            if self.host in seeing:
                return False
            if not seeing:
                raise HttpFailure(500, XapiError("NO_HOSTS_AVAILABLE"))
            # xapi picks at random among them; the simulator takes the master, else the first
            target = (
                pool.master_ref if pool.master_ref in seeing else next(h for h in pool.hosts() if h in seeing)
            )
            address = pool.db.get("host", target)["address"]
        location = redirect_location("https" if pool.tls else "http", address, self.req.path)
        pool.log.info("HTTP 302 redirect to %s", urlsplit(location).netloc)  # the query holds the session
        head = (
            "HTTP/1.1 302 Found\r\nConnection: close\r\nCache-Control: no-cache, no-store\r\n"
            f"Location: {location}\r\n\r\n"
        )
        self.req.wfile.write(head.encode("latin-1"))
        self.req.wfile.flush()
        self.req.close_connection = True
        _drain(self.req)
        return True

    def fail_client_task(self, err: XapiError) -> None:
        """Fail the client's task when one was passed (handlers that fail before binding)."""
        task = self.query.get("task_id")
        if task and self.pool.db.exists("task", task):
            self.pool.tasks.fail(task, err)

    def finish(self) -> None:
        if self.temp_session:
            self.pool.logout(self.temp_session)
        self.pool.save()


def redirect_location(scheme: str, address: str, target: str) -> str:
    """``<scheme>://<address><path>?<query>`` as xapi rebuilds it: the request's query decoded
    (``+`` as space) and re-encoded by ocaml-uri, a bare key gaining ``=``."""
    parts = urlsplit(target)
    pairs = []
    for element in parts.query.split("&") if parts.query else []:
        key, _, value = element.partition("=")
        pairs.append(
            quote(unquote(key.replace("+", " ")), safe=_KEY_SAFE)
            + "="
            + quote(unquote(value.replace("+", " ")), safe=_VALUE_SAFE)
        )
    path = quote(unquote(parts.path), safe="!$&'()*+,;=:@/-._~")
    return f"{scheme}://{address}{path}" + (f"?{'&'.join(pairs)}" if pairs else "")


def _drain(req: BaseHTTPRequestHandler) -> None:
    """Read what the client is still sending (an import's body) for a short while, so that closing
    does not reset the connection before the client has read the 302."""
    length = req.headers.get("Content-Length")
    if req.command != "PUT" or length is None:
        return
    remaining = int(length)
    deadline = time.monotonic() + REDIRECT_DRAIN_SECONDS
    rfile: Any = req.rfile
    try:
        req.connection.settimeout(REDIRECT_DRAIN_SECONDS)
        while remaining > 0 and time.monotonic() < deadline:
            chunk = rfile.read1(min(remaining, COPY_CHUNK))
            if not chunk:
                break
            remaining -= len(chunk)
    except OSError:  # includes the timeout
        pass


def _send_headers(req: BaseHTTPRequestHandler, status: int, headers: dict[str, str]) -> None:
    req.send_response(status)
    for k, v in headers.items():
        req.send_header(k, v)
    req.end_headers()
    req.wfile.flush()


def _dom0_attach(pool: PoolState, host: str, vdi: str) -> str:
    """An RO VBD of ``vdi`` plugged into the serving host's control domain for the transfer
    (xapi.md 4.2 step 5)."""
    db = pool.db
    with db.lock:
        dom0s = [r for r, rec in db.items("VM") if rec["is_control_domain"]]
        dom0 = next((r for r in dom0s if db.get("VM", r)["resident_on"] == host), dom0s[0])
        used = {db.get("VBD", v)["userdevice"] for v in db.reverse("VM", "VBDs", dom0)}
        slot = next(str(n) for n in range(256) if str(n) not in used)
        return db.create(
            "VBD",
            {
                "VM": dom0,
                "VDI": vdi,
                "userdevice": slot,
                "mode": "RO",
                "type": "Disk",
                "currently_attached": True,
                "device": f"xvd{chr(ord('a') + int(slot) % 26)}",
            },
        )


def _dom0_detach(pool: PoolState, vbd: str) -> None:
    with pool.db.lock:
        if pool.db.exists("VBD", vbd):
            pool.db.delete("VBD", vbd)


def _fault_before(pool: PoolState, task: str, handler_name: str) -> None:
    """Injected failure before the 200 (``sim.fault_fail_next_call("<handler>", ...)``): the bound
    task fails with the error and the client gets XAPI's HTML 500."""
    try:
        pool.faults.raise_call_fault(handler_name)
    except XapiError as err:
        pool.tasks.fail(task, err)
        raise HttpFailure(500, err) from None


def _complete_or_fault_after(pool: PoolState, task: str, handler_name: str, result: str) -> None:
    """Injected failure after the data (``"<handler>:after"``), as an SM error reported once the
    body was consumed: the task fails, the client saw a complete transfer."""
    try:
        pool.faults.raise_call_fault(f"{handler_name}:after")
    except XapiError as err:
        pool.tasks.fail(task, err)
        return
    pool.tasks.complete(task, result)


def _cancelled(pool: PoolState, task: str) -> bool:
    """vhd-tool's progress callback polls the task for cancellation (checked before the data)."""
    with pool.db.lock:
        return (
            pool.db.exists("task", task)
            and "cancel" in pool.db.get("task", task)["current_operations"].values()
        )


def _fault_copy(
    read: Callable[[int], bytes],
    write: Callable[[bytes], None],
    drop: int | None,
    flip: int | None,
    rate: int | None,
    limit: int | None = None,
) -> int:
    """Copy ``read`` → ``write`` in bounded chunks, applying faults; returns bytes copied.

    Raises ``ConnectionAbortedError`` when the drop point is reached."""
    copied = 0
    started = time.monotonic()
    while limit is None or copied < limit:
        want = COPY_CHUNK if limit is None else min(COPY_CHUNK, limit - copied)
        if drop is not None:
            want = min(want, drop - copied)
            if want <= 0:
                raise ConnectionAbortedError(f"fault: connection dropped after {copied} bytes")
        chunk = read(want)
        if not chunk:
            break
        if flip is not None and copied <= flip < copied + len(chunk):
            b = bytearray(chunk)
            b[flip - copied] ^= 0xFF
            chunk = bytes(b)
        write(chunk)
        copied += len(chunk)
        if rate:
            ahead = copied / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    if drop is not None and copied >= drop:
        raise ConnectionAbortedError(f"fault: connection dropped after {copied} bytes")
    return copied


def _fd_writer(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


def _through_pipe(produce: Callable[[int], Any], consume: Callable[[int], Any]) -> Any:
    """Run ``produce(write_fd)`` in a thread while ``consume(read_fd)`` runs here."""
    rfd, wfd = os.pipe()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            produce(wfd)
        except BaseException as err:
            errors.append(err)
        finally:
            os.close(wfd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        result = consume(rfd)
    finally:
        os.close(rfd)
        t.join()
    if errors:
        raise errors[0]
    return result


# ------------------------------------------------------------------------------------------ export


def export_raw_vdi(pool: PoolState, host: str, req: BaseHTTPRequestHandler) -> None:
    t = Transfer(pool, host, req, "Exporting raw VDI")  # Xapi_http.with_context label
    try:
        _export(t)
    finally:
        t.finish()


def _export(t: Transfer) -> None:
    pool, req, q = t.pool, t.req, t.query
    if "vdi" not in q:
        raise HttpFailure(500)
    with pool.db.lock:
        try:
            vdi = pool.db.ref_of("VDI", q["vdi"])
        except XapiError as err:  # unknown UUID: before the task is bound, HTML 500
            raise HttpFailure(500, err) from None
        sr = pool.db.get("VDI", vdi)["SR"]
    if t.redirected(sr):
        return
    with pool.db.lock:
        try:
            base = pool.db.ref_of("VDI", q["base"]) if q.get("base") else None
        except XapiError as err:
            raise HttpFailure(500, err) from None
    task = t.bind_task()
    _fault_before(pool, task, "export_raw_vdi")
    fmt = q.get("format", "raw")
    if fmt not in ("raw", "vhd"):
        message = f"Unknown format {fmt}" if fmt not in KNOWN_FORMATS else f"Format {fmt} is not simulated"
        pool.tasks.fail(task, XapiError("INTERNAL_ERROR", message))
        raise HttpFailure(404)
    with pool.db.lock:
        row = pool.db.get("VDI", vdi)
        if row["type"] == "cbt_metadata":  # cannot be attached to dom0: no data to send
            pool.tasks.fail(task, XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata"))
            raise HttpFailure(500)
        path, parents = str(pool.storage.path(vdi)), pool.storage.parents(vdi)
        base_path = str(pool.storage.path(base)) if base else None
        base_parents = pool.storage.parents(base) if base else None
        sr = row["SR"]
        pool.gc.transfer(sr, +1)  # the chains just resolved must not be coalesced meanwhile
    vbds: list[str] = []
    pool.transfers.begin("export")
    try:
        # The VDI (and base) are attached read-only to dom0 before the headers go out.
        vbds = [_dom0_attach(pool, t.host, vdi)] + ([_dom0_attach(pool, t.host, base)] if base else [])
        _send_headers(
            req,
            200,
            {
                "task-id": task,
                "Content-Type": CONTENT_TYPES[fmt],
                "Content-Disposition": f'attachment; filename="{row["uuid"]}.{fmt}"',
                "Cache-Control": "no-cache, no-store",
                "Connection": "close",
            },
        )
        req.close_connection = True
        drop, flip, rate = pool.faults.take_transfer("export")
        if _cancelled(pool, task):
            pool.tasks.fail(task, XapiError("TASK_CANCELLED", task))
            return
        _send_export(
            pool, req, task, row["uuid"], fmt, path, parents, base_path, base_parents, drop, flip, rate
        )
    finally:
        pool.transfers.end("export")
        pool.gc.transfer(sr, -1)
        for vbd in vbds:
            _dom0_detach(pool, vbd)


def _send_export(
    pool: PoolState,
    req: BaseHTTPRequestHandler,
    task: str,
    uuid: str,
    fmt: str,
    path: str,
    parents: list[str],
    base_path: str | None,
    base_parents: list[str] | None,
    drop: int | None,
    flip: int | None,
    rate: int | None,
) -> None:
    sock_fd = req.connection.fileno()
    eng = engine()

    def produce(fd: int) -> Any:
        if fmt == "vhd":
            return eng.export_stream(path, fd, base=base_path, parents=parents, base_parents=base_parents)
        if base_path is not None:
            return _raw_delta(eng, fd, path, parents, base_path, base_parents)
        return eng.cat(path, fd, parents=parents)

    try:
        if drop is None and flip is None and rate is None and not pool.tls:
            produce(sock_fd)
        else:  # faults or TLS: bounded Python copy from a pipe to the (possibly TLS) socket
            sock = req.connection
            _through_pipe(
                produce, lambda rfd: _fault_copy(lambda n: os.read(rfd, n), sock.sendall, drop, flip, rate)
            )
    except Exception as err:  # vhd-tool failing mid-stream: VDI_IO_ERROR, connection cut
        pool.log.warning("export of %s failed: %s", uuid, err)
        pool.tasks.fail(task, IO_ERROR)
    else:
        _complete_or_fault_after(pool, task, "export_raw_vdi", "")


def _raw_delta(
    eng: Any, fd: int, path: str, parents: list[str], base_path: str, base_parents: list[str] | None
) -> None:
    """``format=raw`` with ``base``: vhd-tool writes the whole virtual size, the blocks a VHD delta
    would carry with their data and everything else as zeros (xapi.md 4.2 step 6)."""
    with open(os.devnull, "wb") as sink:
        report = eng.export_stream(
            path, sink.fileno(), base=base_path, parents=parents, base_parents=base_parents
        )
    block, size = int(report["block_size"]), int(report["virtual_size"])
    changed = {index for index, _ in report["digests"]}
    write = _fd_writer(fd)
    for index in range((size + block - 1) // block):
        start = index * block
        length = min(block, size - start)
        write(eng.read(path, start, length, parents=parents) if index in changed else bytes(length))


# ------------------------------------------------------------------------------------------ import


def import_raw_vdi(pool: PoolState, host: str, req: BaseHTTPRequestHandler) -> None:
    t = Transfer(pool, host, req, "Importing raw VDI")  # Xapi_http.with_context label
    try:
        _import(t)
    finally:
        t.finish()


def _import(t: Transfer) -> None:
    pool, req, q = t.pool, t.req, t.query
    fmt = q.get("format", "raw")
    length_header = req.headers.get("Content-Length")
    length = int(length_header) if length_header is not None else None
    with pool.db.lock:
        try:
            vdi = pool.db.ref_of("VDI", q["vdi"]) if q.get("vdi") else None
            sr = None
            if q.get("sr_id"):
                sr = q["sr_id"] if pool.db.exists("SR", q["sr_id"]) else None
            elif q.get("sr_uuid"):
                sr = pool.db.by_uuid("SR", q["sr_uuid"])
        except XapiError as err:
            raise HttpFailure(500, err) from None
        if vdi is None and sr is None:
            t.fail_client_task(XapiError("VDI_MISSING"))
            raise HttpFailure(400)
        target_sr = pool.db.get("VDI", vdi)["SR"] if vdi is not None else sr
    assert target_sr is not None
    if t.redirected(target_sr):
        return
    task = t.bind_task()
    _fault_before(pool, task, "import_raw_vdi")

    def refuse(status: int, message: str) -> None:
        pool.tasks.fail(task, XapiError("INTERNAL_ERROR", message))
        raise HttpFailure(status)

    if fmt not in KNOWN_FORMATS:
        refuse(404, f"Unknown format {fmt}")
    if fmt not in ("raw", "vhd"):
        refuse(404, f"Format {fmt} is not simulated")
    if "chunked" in q and fmt != "raw":
        refuse(404, "Cannot handle chunked VHD")
    te = req.headers.get("Transfer-Encoding")
    if te is not None:
        refuse(404, f"Cannot handle encoding: {te}")
    if vdi is None:
        if fmt == "vhd":
            refuse(400, "Importing a VHD directly into an SR not yet supported")
        if length is None or sr is None:
            refuse(400, "Not enough info supplied to import")
        from xencr.sim.api.vdi import new_vdi
        from xencr.sim.dispatch import Ctx
        from xencr.sim.storage import round_vhd_size

        assert sr is not None and length is not None
        with pool.db.lock:
            size = round_vhd_size(length)
            vdi = new_vdi(
                Ctx(pool, t.session, "VDI.create"),
                sr,
                {
                    "name_label": "Imported VDI",
                    "virtual_size": size,
                    "type": "user",
                    "sm_config": {},
                },
                file_size=size,
            )
    with pool.db.lock:
        row = pool.db.get("VDI", vdi)
        path, parents = str(pool.storage.path(vdi)), pool.storage.parents(vdi)
        sr_ref = row["SR"]
        cbt_dir = pool.storage.sr_dir(sr_ref)
        virtual_size = int(row["virtual_size"])
        pool.gc.transfer(sr_ref, +1)
    pool.transfers.begin("import")
    try:
        # xapi answers 200 before reading the body; the outcome is only in the task.
        _send_headers(
            req, 200, {"task-id": task, "Content-Type": "application/octet-stream", "Connection": "close"}
        )
        req.close_connection = True
        if _cancelled(pool, task):
            pool.tasks.fail(task, XapiError("TASK_CANCELLED", task))
            return
        drop, flip, rate = pool.faults.take_transfer("import")
        written: list[tuple[int, int]] = []
        try:
            with pool.storage.file_lock(row["uuid"]):
                # CBT: every block counts as written until the import says which were
                cbt_before = pool.storage.cbt.begin_bulk(cbt_dir, row["uuid"])
                report = _receive(
                    pool,
                    req,
                    fmt,
                    "chunked" in q,
                    path,
                    parents,
                    length,
                    virtual_size,
                    sr_ref,
                    drop,
                    flip,
                    rate,
                    written,
                )
                if cbt_before is not None:
                    ranges = written_ranges(report) if report is not None else written
                    pool.storage.cbt.end_bulk(cbt_dir, row["uuid"], cbt_before, ranges)
        except Exception as err:  # any failure after the 200 is VDI_IO_ERROR in the task
            pool.log.warning("import into %s failed: %s", row["uuid"], err)
            pool.tasks.fail(task, IO_ERROR)
        else:
            if report is not None:
                # What the pool itself received: tests compare it with what xencr says it sent.
                stats = {k: int(report[k]) for k in ("bytes_in", "blocks", "sectors_written")}
                pool.imports[row["uuid"]] = stats
                pool.log.info("import into %s: %s", row["uuid"], stats)
            _complete_or_fault_after(pool, task, "import_raw_vdi", wire_xmlrpc.value(vdi))
    finally:
        pool.transfers.end("import")
        pool.gc.transfer(sr_ref, -1)
        with pool.db.lock:
            if pool.db.exists("SR", sr_ref):
                pool.storage.refresh(sr_ref)


def _buffered_prefix(req: BaseHTTPRequestHandler, length: int | None) -> bytes:
    """Body bytes the HTTP server already read into its buffer (handed to the engine first)."""
    if length == 0:
        return b""
    rfile: Any = req.rfile
    peeked: bytes = rfile.peek(1) if hasattr(rfile, "peek") else b""
    n = len(peeked) if length is None else min(len(peeked), length)
    data: bytes = rfile.read(n) if n else b""
    return data


def _receive(
    pool: PoolState,
    req: BaseHTTPRequestHandler,
    fmt: str,
    chunked: bool,
    path: str,
    parents: list[str],
    length: int | None,
    virtual_size: int,
    sr_ref: str,
    drop: int | None,
    flip: int | None,
    rate: int | None,
    written: list[tuple[int, int]],
) -> Any:
    """Receive the body; a VHD import returns the engine's report of what it applied, a raw one
    None and the ``(offset, length)`` ranges it wrote in ``written``."""
    eng = engine()
    prefix = _buffered_prefix(req, length)
    sock_fd = req.connection.fileno()
    faulty = drop is not None or flip is not None or rate is not None or pool.tls
    if fmt == "vhd" and length is None:
        # vhd-tool reads the trailing footer at (Content-Length - 1) & ~511 (xapi.md 4.3): no length,
        # no import.
        raise OSError("a VHD import needs a Content-Length")
    if length is not None:
        # A full SR fails the write: room for the incoming data is checked up front.
        with pool.db.lock:
            if pool.storage.free(sr_ref) < length:
                raise OSError("no space left on the SR")
    if fmt == "vhd" and not faulty:
        return eng.apply_stream(
            sock_fd, path, target_format="vhd", length=length, prefix=prefix, parents=parents, durable=False
        )
    if fmt == "vhd":
        remaining = None if length is None else length - len(prefix)
        head = bytearray(prefix)
        if flip is not None and flip < len(head):
            head[flip] ^= 0xFF
        if drop is not None and drop < len(head):
            del head[drop:]

        def feed(wfd: int) -> None:
            if head:
                _fd_writer(wfd)(bytes(head))
            if drop is not None and drop <= len(prefix):
                raise ConnectionAbortedError("fault: connection dropped")
            _fault_copy(
                _body_reader(req),
                _fd_writer(wfd),
                None if drop is None else drop - len(prefix),
                None if flip is None or flip < len(prefix) else flip - len(prefix),
                rate,
                remaining,
            )

        return _through_pipe(
            feed, lambda rfd: eng.apply_stream(rfd, path, target_format="vhd", parents=parents)
        )
    if chunked:
        _receive_chunked(req, eng, path, parents, prefix, virtual_size, written)
        return None
    written.append((0, _receive_raw(req, eng, path, parents, prefix, length, virtual_size, drop, flip, rate)))
    return None


def _body_reader(req: BaseHTTPRequestHandler) -> Callable[[int], bytes]:
    """Reads of at most n bytes from the request body (plain or TLS socket)."""
    rfile: Any = req.rfile

    def read(n: int) -> bytes:
        data: bytes = rfile.read1(n)
        return data

    return read


def _read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = read(n - len(data))
        if not chunk:
            raise ConnectionError("body ended early")
        data += chunk
    return bytes(data)


def _receive_chunked(
    req: BaseHTTPRequestHandler,
    eng: Any,
    path: str,
    parents: list[str],
    prefix: bytes,
    virtual_size: int,
    written: list[tuple[int, int]],
) -> None:
    """``chunked=true`` raw upload (vhd-tool ``chunked.ml``): ``{offset u64 LE, len u32 LE}`` headers
    each followed by ``len`` bytes written at ``offset``, until a ``{0, 0}`` header."""
    pending = bytearray(prefix)
    body = _body_reader(req)

    def read(n: int) -> bytes:
        if pending:
            out = bytes(pending[:n])
            del pending[:n]
            return out
        return body(n)

    while True:
        header = _read_exact(read, 12)
        offset, length = int.from_bytes(header[:8], "little"), int.from_bytes(header[8:], "little")
        if offset == 0 and length == 0:
            return
        if offset + length > virtual_size:
            raise OSError("chunk beyond the end of the VDI")
        written.append((offset, length))
        done = 0
        while done < length:
            data = _read_exact(read, min(COPY_CHUNK, length - done))
            eng.write(path, offset + done, data, parents=parents)
            done += len(data)


def _receive_raw(
    req: BaseHTTPRequestHandler,
    eng: Any,
    path: str,
    parents: list[str],
    prefix: bytes,
    length: int | None,
    virtual_size: int,
    drop: int | None,
    flip: int | None,
    rate: int | None,
) -> int:
    """Raw body written from offset 0 through the VHD leaf, one 2 MiB block at a time; returns
    the bytes written."""
    read = _body_reader(req)
    offset = 0
    started = time.monotonic()
    pending = bytearray(prefix)
    ended = False
    while not ended or pending:
        # fill up to one block (or the end of the body)
        while not ended and len(pending) < RAW_CHUNK:
            want = RAW_CHUNK - len(pending)
            if length is not None:
                want = min(want, length - offset - len(pending))
            chunk = read(want) if want > 0 else b""
            if not chunk:
                ended = True
            pending += chunk
        if drop is not None and offset + len(pending) >= drop:
            raise ConnectionAbortedError("fault: connection dropped")
        if flip is not None and offset <= flip < offset + len(pending):
            pending[flip - offset] ^= 0xFF
        if not pending:
            break
        if offset + len(pending) > virtual_size:
            raise OSError("write beyond the end of the VDI")
        eng.write(path, offset, bytes(pending), parents=parents)
        offset += len(pending)
        pending.clear()
        if rate:
            ahead = offset / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    if length is not None and offset < length:
        raise ConnectionError("body ended early")
    return offset
