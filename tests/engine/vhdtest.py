"""Helpers of the engine tests: vector metadata, content models and byte-level file surgery."""

from __future__ import annotations

import ast
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xencr import pattern

SECTOR = 512
MiB = 1 << 20

SPEC_BASE = "2564229a34868161e606d6795dec09925bb0379203415df88e676e76eb24c7ca"
SPEC_CHAIN = "9cc1ba5ff8b5023fcc793d667a2f0f41224cc0c16cc59d036c7e98d079e0426a"
XO_BLOCK_GRANULAR = "2df6da7e77ad14666101ba46c79d0df88f79bc0da0e4872f7514d4040f5e4081"
BASE_EXTENTS = [(0, 4096), (4096, 100), (20480, 4096), (126976, 4096)]
CHILD_EXTENTS = [(4100, 8), (12288, 4096), (20490, 20), (24576, 8), (131064, 8)]


@dataclass(frozen=True)
class VectorCase:
    chain: tuple[str, ...]
    """File names, leaf first."""
    spec_sha256: str
    bitmap_ignoring_sha256: str

    @property
    def leaf(self) -> str:
        return self.chain[0]

    @property
    def parents(self) -> list[str]:
        return list(self.chain[1:])

    def paths(self, d: Path) -> tuple[str, list[str]]:
        return str(d / self.leaf), [str(d / p) for p in self.parents]


def vector_cases(vectors_src: Path) -> list[VectorCase]:
    """The per-file lines of ``hashes.txt``: ``leaf [parent] | spec | bitmap-ignoring``."""
    cases = []
    for line in (vectors_src / "hashes.txt").read_text().splitlines():
        if line.startswith("#") or "|" not in line:
            continue
        names, spec, ignoring = (part.strip() for part in line.split("|"))
        cases.append(VectorCase(tuple(names.split()), spec, ignoring))
    return cases


def parse_inspect(path: Path) -> dict[str, Any]:
    """A ``*.inspect.txt`` dump as ``{"footer": {...}, "header": {...}, "locators": {i: {...}},
    "blocks": {...}, "bitmap_bytes_per_block": n, "footer_copy_identical": bool, "batmap": ...}``."""
    out: dict[str, Any] = {"footer": {}, "header": {}, "locators": {}}
    for raw in path.read_text().splitlines()[1:]:
        line = raw.strip()
        if line.startswith("footer copy @0 identical"):
            out["footer_copy_identical"] = line.rsplit(":", 1)[1].strip() == "True"
        elif line.startswith(("footer.", "header.")):
            key, _, value = line.partition(" ")
            section, field = key.split(".", 1)
            out[section][field] = value.strip()
        elif line.startswith("locator["):
            index = int(line[len("locator[") : line.index("]")])
            out["locators"][index] = ast.literal_eval(line[line.index("{") :])
        elif line.startswith("bitmap bytes per block"):
            out["bitmap_bytes_per_block"] = int(line.split()[-1])
        elif line.startswith("blocks "):
            out["blocks"] = ast.literal_eval(line.split(None, 1)[1].strip())
        elif line.startswith("batmap "):
            out["batmap"] = ast.literal_eval(line.split(None, 1)[1].strip())
    return out


def norm(value: Any) -> Any:
    """Bring a dump value and an engine value to one form: ints for numbers and hex strings,
    lists for tuples, bools, and the first word of "0x00000000 (None)"-style annotated codes."""
    if isinstance(value, bool | int):
        return value
    if isinstance(value, list | tuple):
        return [norm(v) for v in value]
    if isinstance(value, str):
        text = value.strip()
        if text in ("True", "False"):
            return text == "True"
        if text.startswith("("):
            return norm(ast.literal_eval(text))
        word = text.split(" ", 1)[0]
        try:
            return int(word, 0)
        except ValueError:
            return text
    return value


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def pattern_raw(
    size: int, tag: int, extents: list[tuple[int, int]], into: bytearray | None = None
) -> bytearray:
    """A raw image of ``size`` bytes with ``extents`` (start sector, count) filled by ``tag``."""
    buf = bytearray(size) if into is None else into
    for start, count in extents:
        buf[start * SECTOR : (start + count) * SECTOR] = pattern.sectors(tag, start, count)
    return buf


# ---- byte-level surgery on VHD files (to build corrupt inputs that pass the other checks) ----


def vhd_checksum(data: bytes | bytearray, checksum_at: int) -> int:
    total = sum(data) - sum(data[checksum_at : checksum_at + 4])
    return ~total & 0xFFFFFFFF


class VhdBytes:
    """A whole VHD file in memory, with field patches that keep the checksums right."""

    def __init__(self, data: bytes) -> None:
        self.b = bytearray(data)

    @classmethod
    def load(cls, path: str | Path) -> VhdBytes:
        return cls(Path(path).read_bytes())

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(bytes(self.b))

    @property
    def footer_at(self) -> int:
        return len(self.b) - SECTOR

    @property
    def header_at(self) -> int:
        return int(struct.unpack_from(">Q", self.b, 16)[0])

    @property
    def table_offset(self) -> int:
        return int(struct.unpack_from(">Q", self.b, self.header_at + 16)[0])

    @property
    def max_table_entries(self) -> int:
        return int(struct.unpack_from(">I", self.b, self.header_at + 28)[0])

    def bat(self, i: int) -> int:
        return int(struct.unpack_from(">I", self.b, self.table_offset + 4 * i)[0])

    def set_bat(self, i: int, sector: int) -> None:
        struct.pack_into(">I", self.b, self.table_offset + 4 * i, sector)

    def allocated(self) -> list[int]:
        return [i for i in range(self.max_table_entries) if self.bat(i) != 0xFFFFFFFF]

    def _fix_footer(self, at: int) -> None:
        struct.pack_into(">I", self.b, at + 64, vhd_checksum(self.b[at : at + 512], 64))

    def fix_header(self) -> None:
        h = self.header_at
        struct.pack_into(">I", self.b, h + 36, vhd_checksum(self.b[h : h + 1024], 36))

    def patch_footer(self, offset: int, value: bytes, *, both: bool = True, fix: bool = True) -> None:
        """Write ``value`` at ``offset`` inside the footer at EOF (and the copy at 0)."""
        places = [self.footer_at]
        if both and self.b[:8] == b"conectix" and self.footer_at != 0:
            places.append(0)
        for at in places:
            self.b[at + offset : at + offset + len(value)] = value
            if fix:
                self._fix_footer(at)

    def patch_header(self, offset: int, value: bytes, *, fix: bool = True) -> None:
        h = self.header_at
        self.b[h + offset : h + offset + len(value)] = value
        if fix:
            self.fix_header()


def batmap_consistency_errors(path: str | Path) -> list[str]:
    """For a blktap file with a batmap: every block marked "fully allocated" must be allocated
    with every bitmap bit set, since tapdisk then skips its bitmap. Empty list when consistent
    (or when there is no batmap)."""
    v = VhdBytes.load(path)
    if v.b[28:32] != b"tap\0" or int(struct.unpack_from(">I", v.b, 60)[0]) == 2:
        return []
    n = v.max_table_entries
    at = v.table_offset + -(-n * 4 // SECTOR) * SECTOR
    if v.b[at : at + 8] != b"tdbatmap":
        return []
    batmap_offset = int(struct.unpack_from(">Q", v.b, at + 8)[0])
    block_size = int(struct.unpack_from(">I", v.b, v.header_at + 32)[0])
    spb = block_size // SECTOR
    bitmap_bytes = -(-spb // 8)
    errors = []
    for i in range(n):
        if not v.b[batmap_offset + i // 8] & (0x80 >> (i % 8)):
            continue
        if v.bat(i) == 0xFFFFFFFF:
            errors.append(f"block {i} marked full but unallocated")
            continue
        bm = v.b[v.bat(i) * SECTOR : v.bat(i) * SECTOR + bitmap_bytes]
        full = bm[: spb // 8] == b"\xff" * (spb // 8) and (
            spb % 8 == 0 or bm[spb // 8] & (0xFF << (8 - spb % 8)) & 0xFF == (0xFF << (8 - spb % 8)) & 0xFF
        )
        if not full:
            errors.append(f"block {i} marked full but its bitmap is not")
    return errors
