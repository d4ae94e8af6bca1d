"""Random chains for property tests: a Hypothesis strategy, and a builder that writes the same
operations into real VHDs (through the engine) and into an in-memory model (bytearrays)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from hypothesis import strategies as st

SECTOR = 512
KiB, MiB = 1 << 10, 1 << 20
BLOCK_SIZES = [2 * MiB, 1 * MiB, 256 * KiB, 64 * KiB, 4 * KiB]


@dataclass(frozen=True)
class Write:
    offset: int
    length: int
    kind: str  # "random", "zeros" or "ones"
    seed: int

    def data(self) -> bytes:
        if self.kind == "zeros":
            return bytes(self.length)
        if self.kind == "ones":
            return b"\xff" * self.length
        return random.Random(self.seed).randbytes(self.length)


@dataclass(frozen=True)
class Scenario:
    size: int
    block_size: int
    layers: list[list[Write]]
    """Writes of each layer, base first; every layer after the first is a snapshot child."""

    def __repr__(self) -> str:  # short, for Hypothesis' falsifying-example report
        shape = [[(w.offset, w.length, w.kind) for w in layer] for layer in self.layers]
        return f"Scenario(size={self.size}, block_size={self.block_size}, layers={shape})"


@st.composite
def writes(draw: st.DrawFn, size: int, block_size: int) -> Write:
    # Mix any-alignment offsets with block-boundary ones, where off-by-one errors live.
    if draw(st.booleans()):
        offset = draw(st.integers(0, size - 1))
    else:
        edge = draw(st.integers(0, (size - 1) // block_size)) * block_size
        offset = min(size - 1, max(0, edge + draw(st.integers(-SECTOR - 3, SECTOR + 3))))
    length = draw(
        st.integers(1, min(size - offset, draw(st.sampled_from([64, 4 * KiB, 300 * KiB, 3 * MiB]))))
    )
    kind = draw(st.sampled_from(["random", "random", "random", "zeros", "ones"]))
    return Write(offset, length, kind, draw(st.integers(0, 2**32)))


@st.composite
def scenarios(draw: st.DrawFn, max_layers: int = 4, min_layers: int = 1) -> Scenario:
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    # 4-16 MiB, not always a whole number of blocks (nor of anything but sectors).
    size = draw(st.integers(4 * MiB // SECTOR, 16 * MiB // SECTOR)) * SECTOR
    n = draw(st.integers(min_layers, max_layers))
    layers = [draw(st.lists(writes(size, block_size), max_size=6)) for _ in range(n)]
    return Scenario(size, block_size, layers)


@dataclass
class Built:
    paths: list[str]
    """VHD files, base first."""
    models: list[bytearray] = field(default_factory=list)
    """Expected virtual content of each node, base first."""

    @property
    def leaf(self) -> str:
        return self.paths[-1]


def build(s: Scenario, d: str) -> Built:
    from xencr import _engine as eng

    built = Built([])
    model = bytearray(s.size)
    for i, layer in enumerate(s.layers):
        path = os.path.join(d, f"layer{i}.vhd")
        eng.create(path, s.size, parent=built.paths[-1] if built.paths else None, block_size=s.block_size)
        for w in layer:
            data = w.data()
            eng.write(path, w.offset, data)
            model[w.offset : w.offset + w.length] = data
        built.paths.append(path)
        built.models.append(bytearray(model))
    return built
