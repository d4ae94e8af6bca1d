"""Simulated guest writes: deterministic pattern data, so tests can predict a disk's content."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

CHUNK = 1024 * 1024


def pattern(seed: str, offset: int, length: int) -> Iterator[tuple[int, bytes]]:
    """(absolute offset, bytes) chunks of the pattern for ``[offset, offset+length)``.

    Each chunk is SHAKE-256 of ``"<seed>:<absolute offset>"``, so a write's content depends only on
    the seed and where it starts; memory stays bounded for any length.
    """
    pos = offset
    end = offset + length
    while pos < end:
        n = min(CHUNK, end - pos)
        yield pos, hashlib.shake_256(f"{seed}:{pos}".encode()).digest(n)
        pos += n


def pattern_bytes(seed: str, offset: int, length: int) -> bytes:
    """The whole pattern in memory (tests, small lengths)."""
    return b"".join(chunk for _, chunk in pattern(seed, offset, length))
