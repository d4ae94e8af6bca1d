"""A restore point disk's block map: the digest of every block of the *whole* disk, so that
`xencr verify` can check all of a restore point, not only the blocks its own transfer carried.

Rules:
- Zero blocks: a block that reads as all zeros is the same as an unallocated one, and neither is
  in a map. A pool may or may not allocate a block the stream wrote with zeros (and a full
  export of the source may or may not carry one), while the guest sees zeros either way; one
  treatment on every side keeps maps comparable.
- A full's map is what was sent; a delta's is its base restore point's map with the blocks the
  delta carried replaced (a block the delta sent as zeros leaves the map).
- A map is named by its content digest, ``<algorithm>-map:<sha256 hex>`` of its canonical
  serialisation: two restore points with the same content have the same map digest.

Stored size (zlib; 16-byte digests do not compress, the index gaps nearly vanish): 16,784,656
bytes (16.0 MiB) measured for a fully allocated 2 TiB disk (1,048,576 blocks of 2 MiB), about
16 bytes per allocated block in general, a few dozen for an empty disk; restore points with the
same content share one map. Building or reading such a map takes a second or two of CPU.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from xencr.xapi.transfer import zero_digest

# On a replica disk (and so on its commit snapshot, which the commit copies it to).
KEY = "xencr:map"
_MAGIC = b"xencr-blockmap 1\n"


class MapError(Exception):
    """Stored map data that cannot be read back."""


@dataclass(frozen=True)
class BlockMap:
    algorithm: str
    block_size: int
    blocks: Mapping[int, str] = field(default_factory=dict)  # index -> hex digest, zero blocks left out

    @classmethod
    def of_blocks(cls, algorithm: str, block_size: int, digests: Iterable[tuple[int, str]]) -> BlockMap:
        """The map of a disk whose every block was read (zero blocks dropped)."""
        zero = zero_digest(algorithm, block_size)
        return cls(algorithm, block_size, {i: h for i, h in digests if h != zero})

    def canonical(self) -> bytes:
        """Header; the blocks' index gaps (ascending) as varints; then their raw digests in the
        same order. Gaps and digests apart: the gaps of a well-filled disk (mostly 0) compress
        to almost nothing, which they do not between digests."""
        out = bytearray(_MAGIC)
        out += f"{self.algorithm} {self.block_size} {len(self.blocks)}\n".encode()
        order = sorted(self.blocks)
        previous = -1
        for i in order:
            out += _varint(i - previous - 1)
            previous = i
        out += b"".join(bytes.fromhex(self.blocks[i]) for i in order)
        return bytes(out)

    @property
    def digest(self) -> str:
        return f"{self.algorithm}-map:{hashlib.sha256(self.canonical()).hexdigest()}"

    def to_bytes(self) -> bytes:
        """The compact stored form."""
        return zlib.compress(self.canonical(), 6)

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockMap:
        try:
            raw = zlib.decompress(data)
            if not raw.startswith(_MAGIC):
                raise ValueError("not a block map")
            head, _, body = raw[len(_MAGIC) :].partition(b"\n")
            algorithm, size, count = head.decode().split(" ")
            width = len(zero_digest(algorithm, int(size))) // 2
            indices: list[int] = []
            at, index = 0, -1
            for _ in range(int(count)):
                gap, at = _read_varint(body, at)
                index += gap + 1
                indices.append(index)
            if len(body) - at != width * len(indices):
                raise ValueError("digests do not match the block count")
            blocks = {i: body[at + n * width : at + (n + 1) * width].hex() for n, i in enumerate(indices)}
        except (zlib.error, ValueError, UnicodeDecodeError) as err:
            raise MapError(f"unreadable block map: {err}") from None
        return cls(algorithm, int(size), blocks)


def combine(
    base: BlockMap | None, sent: Iterable[tuple[int, str]], *, algorithm: str, block_size: int
) -> BlockMap:
    """The map after a transfer: ``base`` (the previous restore point's; ``None`` for a full)
    with the blocks ``sent`` replaced."""
    if base is not None and (base.algorithm, base.block_size) != (algorithm, block_size):
        raise MapError(
            f"the base map is {base.algorithm} over {base.block_size}-byte blocks,"
            f" the transfer {algorithm} over {block_size}"
        )
    zero = zero_digest(algorithm, block_size)
    blocks = dict(base.blocks) if base is not None else {}
    for i, h in sent:
        if h == zero:
            blocks.pop(i, None)
        else:
            blocks[i] = h
    return BlockMap(algorithm, block_size, blocks)


def differing(
    expected: BlockMap, found: Mapping[int, str], indices: Iterable[int] | None = None
) -> list[int]:
    """Blocks whose content ``found`` (index -> digest as read, zero blocks dropped) differs
    from ``expected``: among ``indices`` when given, else over both."""
    where = indices if indices is not None else set(expected.blocks) | set(found)
    return sorted(i for i in where if expected.blocks.get(i) != found.get(i))


class MapStore(Protocol):
    """Where block maps are kept by content digest (the state database)."""

    def get_map(self, digest: str) -> BlockMap | None: ...
    def put_map(self, block_map: BlockMap) -> str: ...


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    n, shift = 0, 0
    while True:
        if at >= len(data):
            raise ValueError("truncated")
        byte = data[at]
        at += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n, at
        shift += 7
