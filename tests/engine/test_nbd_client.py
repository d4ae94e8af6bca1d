"""The engine's NBD reader (`_engine.nbd_copy`) against a real NBD server, Debian's nbdkit: full
copies from block status and deltas from a CBT bitmap, applied as XAPI's import applies them and
hash-checked against the served disk; several connections; TLS pinned to the certificate; the
import's PUT; a server that drops the connection."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vhdtest import file_sha256

from xencr import _engine as eng

MiB = 1 << 20
UNIT = 64 * 1024
BLOCK = 2 * MiB


@pytest.fixture(scope="module")
def nbdkit() -> str:
    path = shutil.which("nbdkit")
    if path is None:
        pytest.fail("nbdkit is required (apt-get install nbdkit); scripts/_setup.sh installs it")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """An nbdkit serving on 127.0.0.1 (read-only), stopped on exit."""

    def __init__(self, nbdkit: str, tmp: Path, *args: str) -> None:
        self.port = free_port()
        pid = tmp / f"nbdkit-{self.port}.pid"
        self.proc = subprocess.Popen(
            [nbdkit, "-f", "-r", "-P", str(pid), "-i", "127.0.0.1", "-p", str(self.port), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not pid.exists() or not pid.read_text().strip():  # written once it listens
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit {' '.join(args)} did not start")
            time.sleep(0.02)

    def connect(self, n: int = 1) -> list[socket.socket]:
        socks = [socket.create_connection(("127.0.0.1", self.port)) for _ in range(n)]
        for s in socks:
            s.settimeout(None)  # the engine reads blocking descriptors
        return socks

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def serving(nbdkit: str, tmp: Path, *args: str) -> Iterator[Server]:
    srv = Server(nbdkit, tmp, *args)
    try:
        yield srv
    finally:
        srv.stop()


def copy(srv: Server, n: int = 1, **kw: object) -> eng.NbdReport:
    socks = srv.connect(n)
    try:
        return eng.nbd_copy([s.fileno() for s in socks], str(kw.pop("export", "")), **kw)  # type: ignore[arg-type]
    finally:
        for s in socks:
            s.close()


def write_units(path: Path, units: list[int], seed: int) -> None:
    """Random data into the given 64 KiB units of a (sparse) file."""
    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        for u in units:
            f.seek(u * UNIT)
            f.write(rnd.randbytes(UNIT))


def sparse_disk(path: Path, size: int, units: list[int], seed: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    write_units(path, units, seed)
    return path


def cbt_bitmap(size: int, units: list[int]) -> bytes:
    """A CBT bitmap as `VDI.list_changed_blocks` gives it (base64-decoded): MSB first."""
    bm = bytearray((-(-size // UNIT) + 7) // 8)
    for u in units:
        bm[u // 8] |= 0x80 >> (u % 8)
    return bytes(bm)


def applied_sha(stream: Path, size: int, tmp: Path, base_raw: Path | None = None) -> str:
    """Apply ``stream`` as XAPI's import does onto a VHD holding ``base_raw`` (or zeros); the
    sha256 of the result."""
    target = tmp / f"target-{stream.stem}.vhd"
    if base_raw is None:
        eng.create(str(target), size)
    else:
        eng.convert(str(base_raw), str(target), src_format="raw", dst_format="dynamic")
    eng.apply_stream(str(stream), str(target))
    return eng.sha256(str(target))


def to_file(srv: Server, path: Path, n: int = 1, **kw: object) -> eng.NbdReport:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return copy(srv, n, dst_fd=fd, **kw)
    finally:
        os.close(fd)


SIZE = 48 * MiB
# Data in block 0 (units 2, 3), block 3 (whole), block 7 (one unit), block 23 (the last unit).
DATA_UNITS = [2, 3, *range(96, 128), 7 * 32 + 5, SIZE // UNIT - 1]


def test_full_reads_only_the_data_and_lands_as_the_disk(nbdkit: str, tmp_path: Path) -> None:
    disk = sparse_disk(tmp_path / "disk.raw", SIZE, DATA_UNITS, 1)
    with serving(nbdkit, tmp_path, "file", str(disk)) as srv:
        progress = eng.Progress()
        r = to_file(srv, tmp_path / "full.vhd", 2, progress=progress)
    assert r["disk_type"] == "dynamic" and r["block_status"] and r["structured_replies"]
    assert r["units"] == len(DATA_UNITS)
    assert r["extents"] == r["bytes_in"] == len(DATA_UNITS) * UNIT  # holes never read
    assert progress.bytes == r["bytes_in"] and progress.total == r["unit_bytes"]
    assert r["blocks"] == 4
    assert r["sectors_written"] == len(DATA_UNITS) * UNIT // 512
    assert [b for b, _ in r["digests"]] == [3]  # the only block carried whole
    assert [u for u, _ in r["unit_digests"]] == DATA_UNITS
    assert r["bytes_out"] == (tmp_path / "full.vhd").stat().st_size
    assert applied_sha(tmp_path / "full.vhd", SIZE, tmp_path) == file_sha256(disk)


def test_an_empty_disk_makes_a_stream_without_blocks(nbdkit: str, tmp_path: Path) -> None:
    with serving(nbdkit, tmp_path, "memory", "size=8M") as srv:
        r = to_file(srv, tmp_path / "empty.vhd")
    assert (r["blocks"], r["bytes_in"], r["extents"]) == (0, 0, 0)
    assert applied_sha(tmp_path / "empty.vhd", 8 * MiB, tmp_path) == eng.sha256(
        str(tmp_path / "target-empty.vhd")
    )


@pytest.mark.parametrize(
    ("changed", "block_size"),
    [
        pytest.param([*range(64, 96), 200, 201, 202], BLOCK, id="whole-and-scattered"),
        pytest.param([b * 32 + 7 for b in range(SIZE // BLOCK)], BLOCK, id="one-unit-per-block"),
        pytest.param([b * 32 + 7 for b in range(SIZE // BLOCK)], UNIT, id="one-unit-per-block-64k"),
    ],
)
def test_delta_reads_exactly_the_changed_units_onto_the_base(
    nbdkit: str, tmp_path: Path, changed: list[int], block_size: int
) -> None:
    base = sparse_disk(tmp_path / "base.raw", SIZE, list(range(0, SIZE // UNIT, 3)), 2)
    new = tmp_path / "new.raw"
    shutil.copy(base, new)
    write_units(new, changed, 3)
    with serving(nbdkit, tmp_path, "file", str(new)) as srv:
        r = to_file(srv, tmp_path / "delta.vhd", 3, changed=cbt_bitmap(SIZE, changed), block_size=block_size)
    assert r["disk_type"] == "differencing" and r["extents"] is None
    assert r["units"] == len(changed) and r["bytes_in"] == len(changed) * UNIT
    assert r["sectors_written"] == len(changed) * UNIT // 512  # partial bitmaps
    assert r["blocks"] == len({u * UNIT // block_size for u in changed})
    if block_size == UNIT:  # a changed unit costs its bytes and a bitmap sector, no more
        head = 2048 + (SIZE // UNIT) * 4
        assert r["bytes_out"] == head + len(changed) * (UNIT + 512) + 512
    assert [u for u, _ in r["unit_digests"]] == sorted(changed)
    assert applied_sha(tmp_path / "delta.vhd", SIZE, tmp_path, base) == file_sha256(new)


def test_a_bitmap_for_another_disk_size_is_refused(nbdkit: str, tmp_path: Path) -> None:
    with serving(nbdkit, tmp_path, "memory", "size=8M") as srv, pytest.raises(eng.VhdError) as err:
        copy(srv, changed=b"\xff")  # 8 MiB needs 16 bytes
    assert err.value.kind == "bad_range"


def test_connections_share_the_work_under_a_per_connection_rate(nbdkit: str, tmp_path: Path) -> None:
    units = [u for u in range(SIZE // UNIT) if u % 5 in (0, 1)]
    disk = sparse_disk(tmp_path / "disk.raw", SIZE, units, 4)
    args = ("--filter=rate", "file", str(disk), "connection-rate=400M")
    with serving(nbdkit, tmp_path, *args) as srv:
        one = copy(srv, 1)
        four = to_file(srv, tmp_path / "four.vhd", 4)
    assert four["connections"] == 4
    assert four["digests"] == one["digests"] and four["unit_digests"] == one["unit_digests"]
    assert four["bytes_in"] == one["bytes_in"] == len(units) * UNIT
    assert applied_sha(tmp_path / "four.vhd", SIZE, tmp_path) == file_sha256(disk)


def test_rate_limit_holds_the_total_read_rate(nbdkit: str, tmp_path: Path) -> None:
    disk = sparse_disk(tmp_path / "disk.raw", 8 * MiB, list(range(32)), 5)
    with serving(nbdkit, tmp_path, "file", str(disk)) as srv:
        start = time.monotonic()
        r = copy(srv, 2, rate_limit=8 * MiB)
        took = time.monotonic() - start
    assert r["bytes_in"] == 2 * MiB
    assert took >= 0.2  # 2 MiB at 8 MiB/s: at least ~0.25 s


# ------------------------------------------------------------------------------------- TLS


def make_pki(d: Path, name: str) -> Path:
    """A self-signed certificate laid out as nbdkit wants (ca-cert, server-cert, server-key)."""
    d.mkdir()
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(d / "server-key.pem"), "-out", str(d / "server-cert.pem"),
            "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    shutil.copy(d / "server-cert.pem", d / "ca-cert.pem")
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The server's certificates and another host's."""
    root = tmp_path_factory.mktemp("pki")
    return make_pki(root / "server", "nbd-host"), make_pki(root / "other", "nbd-host")


def test_tls_pinned_to_the_certificate_copies(nbdkit: str, tmp_path: Path, pki: tuple[Path, Path]) -> None:
    disk = sparse_disk(tmp_path / "disk.raw", 8 * MiB, [1, 40, 41], 6)
    pem = (pki[0] / "server-cert.pem").read_text()
    args = ("--tls=require", f"--tls-certificates={pki[0]}", "file", str(disk))
    with serving(nbdkit, tmp_path, *args) as srv:
        r = to_file(srv, tmp_path / "tls.vhd", 2, src_tls=pem, src_server_name="nbd-host")
    assert r["units"] == 3
    assert applied_sha(tmp_path / "tls.vhd", 8 * MiB, tmp_path) == file_sha256(disk)


def test_tls_refusals_are_one_line_without_the_session(
    nbdkit: str, tmp_path: Path, pki: tuple[Path, Path]
) -> None:
    export = "/0f6b1a6e?session_id=OpaqueRef:very-secret"
    other = (pki[1] / "server-cert.pem").read_text()
    args = ("--tls=require", f"--tls-certificates={pki[0]}", "memory", "size=1M")
    problems: list[str] = []
    with serving(nbdkit, tmp_path, *args) as srv:
        for tls in (other, None):
            with pytest.raises(eng.VhdError) as err:
                copy(srv, export=export, src_tls=tls)
            assert err.value.kind == "nbd"
            problems.append(str(err.value))
    with serving(nbdkit, tmp_path, "--tls=off", "memory", "size=1M") as srv:
        with pytest.raises(eng.VhdError) as err:  # TLS asked, the server has none: never plain
            copy(srv, export=export, src_tls=other)
        problems.append(str(err.value))
    wrong, plain, no_tls = problems
    assert "TLS handshake" in wrong and "not the pinned one" in wrong
    assert "requires TLS" in plain
    assert "NBD_OPT_STARTTLS" in no_tls
    for p in problems:
        assert p.startswith("NBD server 127.0.0.1:")
        assert "\n" not in p and "very-secret" not in p


# --------------------------------------------------------------------- the server goes away


def test_a_server_dropping_the_connection_is_a_typed_error(nbdkit: str, tmp_path: Path) -> None:
    disk = sparse_disk(tmp_path / "disk.raw", 16 * MiB, list(range(256)), 7)
    args = ("--filter=rate", "file", str(disk), "connection-rate=16M")
    with serving(nbdkit, tmp_path, *args) as srv:
        progress = eng.Progress()
        killer = threading.Thread(target=_kill_when_reading, args=(srv, progress))
        killer.start()
        with pytest.raises(eng.VhdError) as err:
            copy(srv, 2, progress=progress)
        killer.join()
    assert err.value.kind == "nbd"
    assert "NBD_CMD_READ" in str(err.value) and "\n" not in str(err.value)


def _kill_when_reading(srv: Server, progress: eng.Progress) -> None:
    deadline = time.monotonic() + 30
    while progress.bytes == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.proc.send_signal(signal.SIGKILL)


# --------------------------------------------------------------- the import's PUT and relay


class HttpPeer:
    """A one-request HTTP server on a thread: the import (answers ``status`` first, then, on
    200, applies the body onto ``target`` as XAPI's import does) or the export (sends
    ``body``)."""

    def __init__(self, status: int = 200, target: Path | None = None, body: bytes = b"") -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.status, self.target, self.body = status, target, body
        self.request = b""
        self.body_bytes = -1
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.request, rest = head.split(b"\r\n\r\n", 1)
            if self.status != 200:
                conn.sendall(
                    f"HTTP/1.1 {self.status} Found\r\nLocation: https://elsewhere/x\r\n\r\n".encode()
                )
                conn.shutdown(socket.SHUT_WR)
                got = len(rest)
                while chunk := conn.recv(65536):
                    got += len(chunk)
                self.body_bytes = got
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + self.body)
            if self.target is not None:
                length = int(self._header("content-length"))
                r = eng.apply_stream(conn.fileno(), str(self.target), length=length, prefix=rest)
                self.body_bytes = int(r["bytes_in"])

    def _header(self, name: str) -> str:
        for line in self.request.decode().split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name:
                return v.strip()
        raise KeyError(name)

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port))
        s.settimeout(None)
        return s

    def close(self) -> None:
        self.thread.join(timeout=30)
        self.listener.close()


def test_the_stream_is_put_to_the_import_with_its_length(nbdkit: str, tmp_path: Path) -> None:
    disk = sparse_disk(tmp_path / "disk.raw", 8 * MiB, [0, 33, 34, 127], 8)
    target = tmp_path / "imported.vhd"
    eng.create(str(target), 8 * MiB)
    imp = HttpPeer(200, target)
    with serving(nbdkit, tmp_path, "file", str(disk)) as srv, imp.connect() as d:
        r = copy(srv, 2, dst_fd=d.fileno(), dst_host="127.0.0.1", dst_path="/import_raw_vdi?vdi=X")
        d.close()
        imp.close()
    assert r["import_status"] == 200
    assert imp.request.startswith(b"PUT /import_raw_vdi?vdi=X HTTP/1.1")
    assert int(imp._header("content-length")) == r["bytes_out"] == imp.body_bytes
    assert eng.sha256(str(target)) == file_sha256(disk)


def test_a_redirected_import_is_known_before_any_read(nbdkit: str, tmp_path: Path) -> None:
    disk = sparse_disk(tmp_path / "disk.raw", 8 * MiB, [5], 9)
    imp = HttpPeer(302)
    with serving(nbdkit, tmp_path, "file", str(disk)) as srv, imp.connect() as d:
        progress = eng.Progress()
        with pytest.raises(eng.VhdError) as err:
            copy(srv, dst_fd=d.fileno(), dst_host="127.0.0.1", dst_path="/import", progress=progress)
        d.close()
        imp.close()
    assert (err.value.kind, err.value.side) == ("redirect", "import")
    assert err.value.location == "https://elsewhere/x"
    assert progress.bytes == 0 and imp.body_bytes == 0


def test_relay_digests_the_units_an_nbd_copy_carried(nbdkit: str, tmp_path: Path) -> None:
    """A read-back through `relay(unit_digests=True)` of a stream gives the unit digests that
    `nbd_copy` reported for it: the two compare at 64 KiB granularity."""
    disk = sparse_disk(tmp_path / "disk.raw", 16 * MiB, [3, *range(32, 64), 100], 10)
    with serving(nbdkit, tmp_path, "file", str(disk)) as srv:
        r = to_file(srv, tmp_path / "s.vhd")
    exp = HttpPeer(200, body=(tmp_path / "s.vhd").read_bytes())
    with exp.connect() as s:
        back = eng.relay(
            s.fileno(), "127.0.0.1", "/export_raw_vdi", require_full_bitmaps=False, unit_digests=True
        )
    exp.close()
    assert back["unit_digests"] == r["unit_digests"]
    assert back["digests"][1:2] == r["digests"]  # block 1 is carried whole
