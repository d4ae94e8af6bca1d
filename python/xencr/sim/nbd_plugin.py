"""nbdkit Python plugin serving a simulated host's VDIs read-only, as xapi-nbd does.

Loaded by ``nbdkit python nbd_plugin.py`` (nbdkit's embedded Python, Debian's python3), never
imported by xencr. Parameters: ``syspath`` (the directory holding the ``xencr`` package, for the
engine), ``control`` (the simulator's unix socket), ``pool``, ``host`` (ref) and ``server`` (this
process's id). On open it asks the simulator to check the export name's session and attach the
VDI (a read-only VBD on the host's control domain); on close it asks it to detach. Reads go
through the engine; ``base:allocation`` reports blocks that no file of the chain allocates as
holes. Only the error code of a refusal is logged: export names carry session refs.
"""

from __future__ import annotations

import base64
import errno
import json
import socket
import sys
import threading
from collections import OrderedDict
from typing import Any

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's embedded Python

API_VERSION = 2

_config: dict[str, str] = {}
_engine: Any = None


# Each engine read opens and checks the whole chain, a cost that grows with the disk: reads of
# at least CACHE_MIN bytes fetch their whole VHD block once for the requests that follow (a
# sequential reader's), at most CACHE_BLOCKS blocks per connection.
CACHE_MIN = 128 * 1024
CACHE_BLOCKS = 8


class Handle:
    """One client connection: the VBD the simulator made, the chain it serves, recent blocks."""

    def __init__(self, reply: dict[str, Any]) -> None:
        self.vbd = str(reply["vbd"])
        self.path = str(reply["path"])
        self.parents = [str(p) for p in reply["parents"]]
        self.size = int(reply["size"])
        self.block_size = int(reply["block_size"])
        self.allocated = base64.b64decode(reply["allocated"])
        self.lock = threading.Lock()
        self.blocks: OrderedDict[int, bytes] = OrderedDict()
        self.pending: dict[int, threading.Event] = {}

    def is_allocated(self, block: int) -> bool:
        index = block >> 3
        return index < len(self.allocated) and bool(self.allocated[index] & (0x80 >> (block & 7)))

    def read(self, offset: int, length: int) -> bytes:
        data: bytes = _engine.read(self.path, offset, length, parents=self.parents)
        return data

    def block(self, index: int, *, fetch: bool) -> bytes | None:
        """Block ``index`` from the cache, waiting for a fetch in progress; read it when
        ``fetch`` and nobody has (None: not cached and not fetched)."""
        with self.lock:
            data = self.blocks.get(index)
            if data is not None:
                self.blocks.move_to_end(index)
                return data
            event = self.pending.get(index)
            if event is None and not fetch:
                return None
            mine = event is None
            if event is None:
                event = self.pending[index] = threading.Event()
        if not mine:
            event.wait()
            with self.lock:
                return self.blocks.get(index)
        start = index * self.block_size
        data = None
        try:
            data = self.read(start, min(self.block_size, self.size - start))
        finally:
            with self.lock:
                if data is not None:
                    self.blocks[index] = data
                    while len(self.blocks) > CACHE_BLOCKS:
                        self.blocks.popitem(last=False)
                self.pending.pop(index).set()
        return data


def config(key: str, value: str) -> None:
    if key == "syspath":
        sys.path.insert(0, value)
    else:
        _config[key] = value


def config_complete() -> None:
    global _engine
    for key in ("control", "pool", "host", "server"):
        if key not in _config:
            raise RuntimeError(f"missing parameter {key}")
    import xencr._engine as engine

    _engine = engine


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def _ask(request: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(_config["control"])
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


def open(readonly: bool) -> Handle:
    reply = _ask(
        {
            "op": "open",
            "pool": _config["pool"],
            "host": _config["host"],
            "server": _config["server"],
            "export": nbdkit.export_name(),
        }
    )
    if not reply.get("ok"):
        nbdkit.set_error(errno.EACCES)
        raise RuntimeError(f"export refused: {reply.get('error', ['?'])[0]}")
    return Handle(reply)


def close(h: Handle) -> None:
    _ask({"op": "close", "pool": _config["pool"], "vbd": h.vbd})


def get_size(h: Handle) -> int:
    return h.size


def can_write(h: Handle) -> bool:
    return False


def can_multi_conn(h: Handle) -> bool:
    return True  # read-only: every connection sees the same data


def can_extents(h: Handle) -> bool:
    return True


def is_rotational(h: Handle) -> bool:
    return False


def pread(h: Handle, buf: Any, offset: int, flags: int) -> None:
    length = len(buf)
    first, last = offset // h.block_size, (offset + length - 1) // h.block_size
    if first == last:
        data = h.block(first, fetch=length >= CACHE_MIN)
        if data is not None:
            start = offset - first * h.block_size
            buf[:] = memoryview(data)[start : start + length]
            return
    buf[:] = h.read(offset, length)


def extents(h: Handle, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    """Data where a block is allocated somewhere in the chain, a hole reading as zeros elsewhere."""
    hole = int(nbdkit.EXTENT_HOLE) | int(nbdkit.EXTENT_ZERO)
    end = min(offset + count, h.size)
    out: list[tuple[int, int, int]] = []
    pos = offset
    while pos < end:
        block = pos // h.block_size
        kind = 0 if h.is_allocated(block) else hole
        stop = min(end, (block + 1) * h.block_size)
        if out and out[-1][2] == kind:
            start, length, _ = out[-1]
            out[-1] = (start, length + stop - pos, kind)
        else:
            out.append((pos, stop - pos, kind))
        pos = stop
    return out  # nbdkit itself trims the answer to one extent for NBD_CMD_FLAG_REQ_ONE
