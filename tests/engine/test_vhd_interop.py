"""Round trips with independent implementations: qemu-img reads what we write, we read what
qemu-img writes, and libvhdi reads our differencing chains."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from vhdtest import BASE_EXTENTS, CHILD_EXTENTS, SECTOR, SPEC_CHAIN, MiB, pattern_raw, sha256

from xencr import _engine as eng
from xencr import pattern

# 10 MiB + 7 sectors: neither a whole number of 2 MiB blocks nor a CHS-exact size.
ODD_SIZE = 10 * MiB + 7 * SECTOR
SIZES = [64 * MiB, ODD_SIZE]


def source_raw(size: int) -> bytearray:
    """Pattern data in some blocks, the last sector written, and whole zero blocks left."""
    extents = [(s, c) for s, c in BASE_EXTENTS if (s + c) * SECTOR <= size]
    buf = pattern_raw(size, 0xBA5E, extents)
    last = size // SECTOR - 1
    return pattern_raw(size, 0x1A57, [(last, 1), (9000, 3)], into=buf)


def qemu_to_raw(qemu_img: str, vhd: Path, out: Path) -> bytes:
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", str(vhd), str(out)], check=True)
    return out.read_bytes()


@pytest.mark.parametrize("size", SIZES, ids=["64M", "odd"])
@pytest.mark.parametrize("fmt", ["dynamic", "fixed"])
def test_qemu_reads_our_vhd(tmp_path: Path, qemu_img: str, size: int, fmt: str) -> None:
    raw = source_raw(size)
    (tmp_path / "src.raw").write_bytes(raw)
    vhd = tmp_path / "ours.vhd"
    report = eng.convert(str(tmp_path / "src.raw"), str(vhd), src_format="raw", dst_format=fmt)  # type: ignore[arg-type]
    assert report["virtual_size"] == size
    assert eng.info(str(vhd))["footer"]["creator_application"].rstrip("\0. ") == "tap"
    assert eng.check(str(vhd)) == []
    back = qemu_to_raw(qemu_img, vhd, tmp_path / "back.raw")
    assert len(back) == size
    assert sha256(back) == sha256(raw)


def test_dynamic_convert_skips_zero_blocks(tmp_path: Path) -> None:
    raw = source_raw(64 * MiB)
    (tmp_path / "src.raw").write_bytes(raw)
    eng.convert(str(tmp_path / "src.raw"), str(tmp_path / "d.vhd"), src_format="raw", dst_format="dynamic")
    blocks = eng.info(str(tmp_path / "d.vhd"))["blocks"]
    nonzero = {i for i in range(32) if any(raw[i * 2 * MiB : (i + 1) * 2 * MiB])}
    assert blocks["allocated_blocks"] == len(nonzero)


@pytest.mark.parametrize(
    ("options", "exact"),
    [
        ("subformat=dynamic,force_size=on", True),
        ("subformat=fixed,force_size=on", True),
        ("subformat=dynamic", False),
        ("subformat=fixed", False),
    ],
)
@pytest.mark.parametrize("size", SIZES, ids=["64M", "odd"])
def test_we_read_qemu_vhd(tmp_path: Path, qemu_img: str, options: str, exact: bool, size: int) -> None:
    raw = source_raw(size)
    (tmp_path / "src.raw").write_bytes(raw)
    vhd = tmp_path / "qemu.vhd"
    subprocess.run(
        [qemu_img, "convert", "-f", "raw", "-O", "vpc", "-o", options, str(tmp_path / "src.raw"), str(vhd)],
        check=True,
    )
    assert eng.check(str(vhd)) == []
    vsize = eng.virtual_size(str(vhd))
    if exact:
        assert vsize == size
    else:
        assert vsize >= size  # qemu rounds the size up to the CHS geometry
    expected = bytes(raw) + bytes(vsize - size)
    assert eng.sha256(str(vhd)) == sha256(expected)
    out = tmp_path / "back.raw"
    eng.convert(str(vhd), str(out), src_format="vhd", dst_format="raw")
    assert out.read_bytes() == expected


def _aligned(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Round extents out to 8-sector runs: libvhdi misreads runs ending inside a bitmap byte."""
    out = []
    for s, c in extents:
        start, end = s // 8 * 8, -(-(s + c) // 8) * 8
        out.append((start, end - start))
    return out


def test_libvhdi_reads_our_chain(tmp_path: Path) -> None:
    pyvhdi = pytest.importorskip("pyvhdi")
    size = 64 * MiB
    base, mid, leaf = (str(tmp_path / n) for n in ("base.vhd", "mid.vhd", "leaf.vhd"))
    model = bytearray(size)
    eng.create(base, size)
    for tag, path, extents in [
        (0xBA5E, base, BASE_EXTENTS),
        (0xC41D, mid, _aligned(CHILD_EXTENTS)),
        (0x1EAF, leaf, [(8, 16), (4096 * 5 + 64, 8), (4096 * 7, 4096 + 8), (131064, 8)]),
    ]:
        if path != base:
            eng.create(path, size, parent={mid: base, leaf: mid}[path])
        for start, count in extents:
            data = pattern.sectors(tag, start, count)
            eng.write(path, start * SECTOR, data)
            model[start * SECTOR : (start + count) * SECTOR] = data
    assert eng.sha256(leaf) == sha256(model)

    files = []
    for path in (base, mid, leaf):
        f = pyvhdi.file()
        f.open(path)
        if files:
            f.set_parent(files[-1])
        files.append(f)
    got = files[-1].read_buffer_at_offset(size, 0)
    assert sha256(got) == sha256(model)
    for f in reversed(files):
        f.close()


def _libvhdi_read(pyvhdi: object, chain: list[str]) -> bytes:
    """Open ``chain`` (base first) with libvhdi, linking each child to its parent."""
    files = []
    for path in chain:
        f = pyvhdi.file()  # type: ignore[attr-defined]
        f.open(path)
        if files:
            f.set_parent(files[-1])
        files.append(f)
    data: bytes = files[-1].read_buffer_at_offset(files[-1].get_media_size(), 0)
    for f in reversed(files):
        f.close()
    return data


def test_libvhdi_reads_our_streams_and_converts(vectors: Path, tmp_path: Path) -> None:
    """Our XAPI-style full and delta streams, and our fixed and dynamic converts, read by
    libvhdi (stream bitmaps are full, so its partial-byte bug cannot show)."""
    pyvhdi = pytest.importorskip("pyvhdi")
    base, child = str(vectors / "caml-dynamic-base.vhd"), str(vectors / "caml-diff-child.vhd")
    full, delta = str(tmp_path / "full.vhd"), str(tmp_path / "delta.vhd")
    eng.export_stream(child, full)
    eng.export_stream(child, delta, base)
    assert sha256(_libvhdi_read(pyvhdi, [full])) == SPEC_CHAIN
    assert sha256(_libvhdi_read(pyvhdi, [base, delta])) == SPEC_CHAIN
    for fmt in ("fixed", "dynamic"):
        out = str(tmp_path / f"{fmt}.vhd")
        eng.convert(child, out, dst_format=fmt)  # type: ignore[arg-type]
        assert sha256(_libvhdi_read(pyvhdi, [out])) == SPEC_CHAIN
