"""Every validation rule of vhd.md, one mutation each, gives its typed error (and `check`
reports it); truncated files and garbage give `VhdError`, never a crash."""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from vhdtest import MiB, VhdBytes, batmap_consistency_errors

from xencr import _engine as eng

DYNAMIC = "qemu-dynamic-forcesize.vhd"  # BAT at 1536, 4 blocks
CHILD = "caml-diff-child.vhd"  # BAT at 2048, a MacX locator at 1536
PARENT = "caml-dynamic-base.vhd"


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def _footer_copy_differs(v: VhdBytes) -> None:
    v.b[24:28] = u32(12345)  # timestamp of the copy at 0 only, with its checksum fixed
    struct.pack_into(">I", v.b, 64, 0)
    total = ~sum(v.b[0:512]) & 0xFFFFFFFF
    struct.pack_into(">I", v.b, 64, total)


def _bat_overlap(v: VhdBytes) -> None:
    a, b = v.allocated()[:2]
    v.set_bat(b, v.bat(a))


def _bat_into_metadata(v: VhdBytes) -> None:
    v.set_bat(v.allocated()[0], 1)  # sector 1: the dynamic header


def _bat_out_of_bounds(v: VhdBytes) -> None:
    v.set_bat(v.allocated()[-1], len(v.b) // 512 - 2)  # the block would run over the footer


def _locator_out_of_bounds(v: VhdBytes) -> None:
    v.patch_header(576 + 16, u64(len(v.b) + 4096))


def _flip_checksum(offset: int) -> Callable[[VhdBytes], None]:
    def mutate(v: VhdBytes) -> None:
        if offset < 0:
            v.patch_footer(64, bytes([v.b[v.footer_at + 64] ^ 0xFF]), fix=False)
        else:
            v.patch_header(36, bytes([v.b[v.header_at + 36] ^ 0xFF]), fix=False)

    return mutate


# (rule, file, mutation, expected kind)
MUTATIONS: list[tuple[str, str, Callable[[VhdBytes], None], str]] = [
    ("footer-cookie", DYNAMIC, lambda v: v.patch_footer(0, b"conectiX"), "bad_cookie"),
    ("header-cookie", DYNAMIC, lambda v: v.patch_header(0, b"cxsparsX"), "bad_cookie"),
    ("footer-version", DYNAMIC, lambda v: v.patch_footer(12, u32(0x00020000)), "bad_version"),
    ("header-version", DYNAMIC, lambda v: v.patch_header(24, u32(0x00020000)), "bad_version"),
    ("footer-checksum", DYNAMIC, _flip_checksum(-1), "bad_checksum"),
    ("header-checksum", DYNAMIC, _flip_checksum(1), "bad_checksum"),
    ("footer-copy", DYNAMIC, _footer_copy_differs, "footer_mismatch"),
    ("disk-type", DYNAMIC, lambda v: v.patch_footer(60, u32(7)), "bad_disk_type"),
    ("header-data-offset", DYNAMIC, lambda v: v.patch_header(8, u64(0)), "bad_data_offset"),
    ("block-size", DYNAMIC, lambda v: v.patch_header(32, u32(3 * MiB)), "bad_block_size"),
    ("table-too-small", DYNAMIC, lambda v: v.patch_header(28, u32(16)), "table_too_small"),
    ("bat-out-of-bounds", DYNAMIC, _bat_out_of_bounds, "bat_out_of_bounds"),
    ("bat-overlap", DYNAMIC, _bat_overlap, "bat_overlap"),
    ("bat-into-metadata", DYNAMIC, _bat_into_metadata, "bat_overlap"),
    ("child-bat-overlap", CHILD, _bat_overlap, "bat_overlap"),
    ("locator-out-of-bounds", CHILD, _locator_out_of_bounds, "locator_out_of_bounds"),
]


@pytest.mark.parametrize(("rule", "name", "mutate", "kind"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_validation_rule(
    vectors: Path, tmp_path: Path, rule: str, name: str, mutate: Callable[[VhdBytes], None], kind: str
) -> None:
    v = VhdBytes.load(vectors / name)
    mutate(v)
    bad = tmp_path / name
    v.save(bad)
    parents = [str(vectors / PARENT)] if name == CHILD else None
    with pytest.raises(eng.VhdError) as err:
        eng.sha256(str(bad), parents)
    assert err.value.kind == kind, str(err.value)
    assert str(err.value) and "\n" not in str(err.value)
    with pytest.raises(eng.VhdError) as again:
        eng.info(str(bad), parents)
    assert again.value.kind == kind
    problems = eng.check(str(bad), parents)
    assert problems, f"check() found nothing wrong after {rule}"
    assert all(p and "\n" not in p for p in problems)


def test_mutations_start_from_valid_files(vectors: Path) -> None:
    assert eng.check(str(vectors / DYNAMIC)) == []
    assert eng.check(str(vectors / CHILD), [str(vectors / PARENT)]) == []


@pytest.mark.parametrize("name", [DYNAMIC, CHILD, "qemu-fixed.vhd", "caml-delta-stream.vhd"])
def test_truncated_files_give_errors(vectors: Path, tmp_path: Path, name: str) -> None:
    data = (vectors / name).read_bytes()
    for cut in sorted({0, 1, 511, 512, 513, 1024, 1536, 2047, 2048, 3000, len(data) // 2, len(data) - 1}):
        bad = tmp_path / "cut.vhd"
        bad.write_bytes(data[:cut])
        with pytest.raises(eng.VhdError):
            eng.sha256(str(bad), [str(vectors / PARENT)] if name != DYNAMIC else None)
        assert eng.check(str(bad)), f"check() accepted {name} cut at {cut}"


def test_garbage_gives_errors(tmp_path: Path) -> None:
    rng = random.Random(20261123)
    bad = tmp_path / "garbage.vhd"
    for size in [0, 1, 100, 511, 512, 1024, 1536, 2048, 4096, 65536, 1 << 20]:
        bad.write_bytes(rng.randbytes(size))
        with pytest.raises(eng.VhdError):
            eng.info(str(bad))
        assert eng.check(str(bad))


def test_garbage_with_valid_cookies_gives_errors(tmp_path: Path) -> None:
    """Random metadata behind the right cookies and checksums reaches the deeper checks."""
    rng = random.Random(7)
    bad = tmp_path / "garbage.vhd"
    for _ in range(200):
        v = VhdBytes(rng.randbytes(4096))
        v.b[0:8] = b"conectix"
        v.b[16:24] = u64(512)
        v.b[12:16] = u32(0x00010000)
        v.b[60:64] = u32(rng.choice([2, 3, 4]))
        v.b[512:520] = b"cxsparse"
        v.b[-512:] = v.b[:512]
        v.patch_footer(0, b"conectix")
        v.fix_header()
        v.save(bad)
        with contextlib.suppress(eng.VhdError):
            eng.sha256(str(bad))


def test_random_byte_flips_never_crash(vectors: Path, tmp_path: Path) -> None:
    """Each flipped metadata byte is either harmless or a VhdError: never a panic or a hang."""
    data = (vectors / CHILD).read_bytes()
    rng = random.Random(42)
    bad = tmp_path / CHILD
    parent = [str(vectors / PARENT)]
    for _ in range(150):
        v = VhdBytes(data)
        at = rng.choice([rng.randrange(0, 2560), rng.randrange(len(data) - 512, len(data))])
        v.b[at] ^= 1 << rng.randrange(8)
        if rng.random() < 0.5:  # half the time keep the checksums right to go deeper
            v.fix_header()
            v.patch_footer(0, bytes(v.b[v.footer_at : v.footer_at + 8]))
        v.save(bad)
        with contextlib.suppress(eng.VhdError):
            eng.sha256(str(bad), parent)
        eng.check(str(bad), parent)


def _tap_chain(d: Path) -> tuple[str, str]:
    """A blktap-style (creator tap, with batmap) parent with a full block and a child with a
    partial one."""
    parent, child = str(d / "p.vhd"), str(d / "c.vhd")
    eng.create(parent, 16 * MiB)
    eng.write(parent, 0, b"\7" * (2 * MiB))
    eng.create(child, 16 * MiB, parent=parent)
    eng.write(child, 512, b"\5" * 512)
    assert batmap_consistency_errors(parent) == batmap_consistency_errors(child) == []
    assert eng.info(parent)["batmap"]["blocks_marked_full"] == 1
    return parent, child


def _set_batmap_bit(path: str, block: int) -> None:
    info = eng.info(path)["batmap"]
    v = VhdBytes.load(path)
    at, size = info["batmap_offset"], info["batmap_size_sectors"] * 512
    v.b[at + block // 8] |= 0x80 >> (block % 8)
    struct.pack_into(">I", v.b, info["header_offset"] + 24, ~sum(v.b[at : at + size]) & 0xFFFFFFFF)
    v.save(path)


def test_batmap_checksum_is_checked(tmp_path: Path) -> None:
    parent, _ = _tap_chain(tmp_path)
    v = VhdBytes.load(parent)
    v.b[eng.info(parent)["batmap"]["batmap_offset"]] ^= 0x01
    v.save(parent)
    problems = eng.check(parent)
    assert problems and "batmap" in problems[0]


# tapdisk skips the bitmap of a block its batmap marks full, so such a mark on a partial block
# makes XenServer read the child's zeros instead of the parent's data: check() reports it.
def test_batmap_mark_on_a_partial_block_is_reported(tmp_path: Path) -> None:
    parent, child = _tap_chain(tmp_path)
    _set_batmap_bit(child, 0)
    assert batmap_consistency_errors(child) == ["block 0 marked full but its bitmap is not"]
    assert eng.check(child, [parent]) != []
