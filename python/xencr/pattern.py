"""Deterministic test content shared with the VHD test vectors (`vhd-vectors/pattern.py`).

The 512-byte sector at virtual LBA ``lba`` written by layer ``tag`` is 32 records of
``tag:u32be | lba:u64be | i:u32be``. Every sector is distinct and names its writer, so a wrong
sector in a chain read points at the layer and the LBA that went astray.
"""

from __future__ import annotations

import random
import struct

SECTOR = 512

_RECORD = struct.Struct(">IQI")


def sector(tag: int, lba: int) -> bytes:
    """One 512-byte sector of layer ``tag`` at ``lba``."""
    return b"".join(_RECORD.pack(tag, lba, i) for i in range(32))


def sectors(tag: int, start: int, count: int) -> bytes:
    """``count`` consecutive pattern sectors starting at LBA ``start``."""
    return b"".join(sector(tag, lba) for lba in range(start, start + count))


def random_block(seed: int, index: int, length: int) -> bytes:
    """The benchmark block ``index``: same bytes as ``pattern.py random`` produces."""
    return random.Random(seed * 1000003 + index).randbytes(length)


def random_allocation(seed: int, nblocks: int, fraction: float) -> list[int]:
    """Indices of the blocks ``pattern.py random`` allocates (same RNG draw order)."""
    rng = random.Random(seed)
    return [i for i in range(nblocks) if rng.random() < fraction]
