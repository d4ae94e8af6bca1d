"""XAPI-style streams: export (full and delta), forward-only apply with import semantics, the
validating transform, and rejection of corrupt streams before anything is written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from vhdtest import (
    BASE_EXTENTS,
    SECTOR,
    SPEC_BASE,
    SPEC_CHAIN,
    MiB,
    VhdBytes,
    file_sha256,
    pattern_raw,
)

from xencr import _engine as eng


@pytest.fixture
def chain(vectors: Path, tmp_path: Path) -> tuple[str, str]:
    """(leaf, base) copies of the partial-bitmap vector chain, named as the vectors are."""
    for name in ("caml-dynamic-base.vhd", "caml-diff-child.vhd"):
        shutil.copy(vectors / name, tmp_path / name)
        (tmp_path / name).chmod(0o644)
    return str(tmp_path / "caml-diff-child.vhd"), str(tmp_path / "caml-dynamic-base.vhd")


@pytest.fixture
def base_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "replica.raw"
    raw.write_bytes(pattern_raw(64 * MiB, 0xBA5E, BASE_EXTENTS))
    assert file_sha256(raw) == SPEC_BASE
    return raw


def test_delta_stream_applied_on_base_yields_leaf(
    chain: tuple[str, str], tmp_path: Path, base_raw: Path
) -> None:
    leaf, base = chain
    delta = tmp_path / "delta.vhd"
    length = eng.stream_length(leaf, base)
    report = eng.export_stream(leaf, str(delta), base)
    assert report["bytes_out"] == length == delta.stat().st_size
    assert report["disk_type"] == "differencing"
    assert report["blocks"] == 5
    assert report["parent_uuid"] == eng.info(base)["footer"]["uuid"]
    # The stream is itself a valid differencing VHD of the base.
    assert eng.check(str(delta), [base]) == []
    assert eng.sha256(str(delta), [base]) == SPEC_CHAIN
    got = eng.apply_stream(str(delta), str(base_raw), target_format="raw", require_full_bitmaps=True)
    assert got["blocks"] == 5
    assert got["sectors_written"] == 5 * 4096
    assert file_sha256(base_raw) == SPEC_CHAIN


def test_delta_stream_layout_is_vhd_tool_s(vectors: Path, chain: tuple[str, str], tmp_path: Path) -> None:
    """After the footer and header (fresh UUID, base timestamp and name), our delta stream is
    byte for byte the one ocaml-vhd's stream code (XAPI's vhd-tool) produced."""
    leaf, base = chain
    ours = tmp_path / "delta.vhd"
    eng.export_stream(leaf, str(ours), base)
    theirs = (vectors / "caml-delta-stream.vhd").read_bytes()
    mine = ours.read_bytes()
    assert len(mine) == len(theirs)
    assert mine[1536:-512] == theirs[1536:-512]
    assert mine[:512] == mine[-512:]
    v = VhdBytes(mine)
    assert (v.header_at, v.table_offset) == (512, 2048)
    offsets = [v.bat(i) for i in v.allocated()]
    assert offsets == sorted(offsets)
    for sector in offsets:
        assert mine[sector * SECTOR : sector * SECTOR + SECTOR] == b"\xff" * SECTOR


def test_full_stream_is_a_standalone_copy(chain: tuple[str, str], tmp_path: Path) -> None:
    leaf, _ = chain
    full = tmp_path / "full.vhd"
    report = eng.export_stream(leaf, str(full))
    assert report["disk_type"] == "dynamic"
    assert report["bytes_out"] == eng.stream_length(leaf) == full.stat().st_size
    assert eng.check(str(full)) == []
    assert eng.sha256(str(full)) == SPEC_CHAIN
    target = tmp_path / "fresh.raw"
    with open(target, "wb") as f:
        f.truncate(64 * MiB)
    eng.apply_stream(str(full), str(target), target_format="raw")
    assert file_sha256(target) == SPEC_CHAIN


def test_full_stream_can_skip_zero_blocks(tmp_path: Path) -> None:
    vhd = str(tmp_path / "z.vhd")
    eng.create(vhd, 8 * MiB)
    eng.write(vhd, 0, b"\1" * SECTOR)
    eng.write(vhd, 4 * MiB, bytes(SECTOR))  # allocates block 2 with only zeros
    kept = eng.export_stream(vhd, str(tmp_path / "kept.vhd"))
    skipped = eng.export_stream(vhd, str(tmp_path / "skipped.vhd"), skip_zero_blocks=True)
    assert (kept["blocks"], kept["zero_blocks_dropped"]) == (2, 0)
    assert (skipped["blocks"], skipped["zero_blocks_dropped"]) == (1, 1)
    assert eng.stream_length(vhd, skip_zero_blocks=True) == skipped["bytes_out"]
    assert eng.sha256(str(tmp_path / "skipped.vhd")) == eng.sha256(vhd)


def test_delta_into_vhd_leaf(chain: tuple[str, str], tmp_path: Path) -> None:
    """Import into a VHD: a copy of the base (the previous replica) receives the delta."""
    leaf, base = chain
    delta = tmp_path / "delta.vhd"
    eng.export_stream(leaf, str(delta), base)
    replica = tmp_path / "replica.vhd"
    shutil.copy(base, replica)
    eng.apply_stream(str(delta), str(replica), target_format="vhd")
    assert eng.check(str(replica)) == []
    assert eng.sha256(str(replica)) == SPEC_CHAIN


@pytest.mark.parametrize("name", ["caml-delta-stream.vhd", "xo-stream-of-caml-diff.vhd"])
def test_foreign_streams_apply_with_import_semantics(vectors: Path, base_raw: Path, name: str) -> None:
    """XAPI's delta (full bitmaps) and XO's backup layout (partial bitmaps): only set bits are
    written, so both yield the correct chain content on the base."""
    eng.apply_stream(str(vectors / name), str(base_raw), target_format="raw")
    assert file_sha256(base_raw) == SPEC_CHAIN


def test_partial_bitmaps_rejected_when_required_full(vectors: Path, base_raw: Path) -> None:
    before = base_raw.read_bytes()
    with pytest.raises(eng.VhdError) as err:
        eng.apply_stream(
            str(vectors / "xo-stream-of-caml-diff.vhd"),
            str(base_raw),
            target_format="raw",
            require_full_bitmaps=True,
        )
    assert err.value.kind == "partial_bitmap"
    assert base_raw.read_bytes() == before


def test_apply_from_a_pipe(chain: tuple[str, str], tmp_path: Path, base_raw: Path) -> None:
    """Forward-only: the stream arrives through a pipe, as from an HTTP body."""
    leaf, base = chain
    delta = tmp_path / "delta.vhd"
    eng.export_stream(leaf, str(delta), base)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: feed the pipe
        os.close(r)
        with open(delta, "rb") as f:
            while chunk := f.read(1 << 16):
                os.write(w, chunk)
        os._exit(0)
    os.close(w)
    try:
        eng.apply_stream(r, str(base_raw), target_format="raw")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert file_sha256(base_raw) == SPEC_CHAIN


def _corrupt(stream: bytes, where: str) -> bytes:
    v = VhdBytes(stream)
    first = min(v.bat(i) for i in v.allocated()) * SECTOR
    at = {
        "footer": 20,  # data offset
        "header": v.header_at + 30,  # max_table_entries, covered by the header checksum
        "bat": v.table_offset + 4 * v.allocated()[0],  # high byte of the first entry
        "bitmap": first + 100,  # first block's bitmap
    }[where]
    v.b[at] ^= 0x01
    return bytes(v.b)


@pytest.mark.parametrize("where", ["footer", "header", "bat", "bitmap"])
def test_corrupt_stream_rejected_before_any_write(
    chain: tuple[str, str], tmp_path: Path, base_raw: Path, where: str
) -> None:
    leaf, base = chain
    delta = tmp_path / "delta.vhd"
    eng.export_stream(leaf, str(delta), base)
    bad = tmp_path / "bad.vhd"
    bad.write_bytes(_corrupt(delta.read_bytes(), where))
    before = base_raw.read_bytes()
    with pytest.raises(eng.VhdError):
        eng.apply_stream(str(bad), str(base_raw), target_format="raw", require_full_bitmaps=True)
    assert base_raw.read_bytes() == before
    with pytest.raises(eng.VhdError):
        eng.transform(str(bad), os.devnull)


def test_transform_passes_through_and_digests(chain: tuple[str, str], tmp_path: Path) -> None:
    leaf, base = chain
    delta = tmp_path / "delta.vhd"
    eng.export_stream(leaf, str(delta), base)
    out = tmp_path / "out.vhd"
    report = eng.transform(str(delta), str(out))
    assert out.read_bytes() == delta.read_bytes()
    assert report["bytes_in"] == report["bytes_out"] == delta.stat().st_size
    assert report["blocks"] == 5
    assert [i for i, _ in report["digests"]] == [1, 3, 5, 6, 31]
    assert report["digest_algorithm"] == eng.DIGEST_ALGORITHM
    # Same data, same digests: the export reports the digests the transform computes.
    again = eng.transform(str(delta), os.devnull)
    assert again["digests"] == report["digests"]


def test_transform_rejects_partial_bitmaps_by_default(vectors: Path) -> None:
    with pytest.raises(eng.VhdError) as err:
        eng.transform(str(vectors / "xo-stream-of-caml-diff.vhd"), os.devnull)
    assert err.value.kind == "partial_bitmap"
    report = eng.transform(
        str(vectors / "xo-stream-of-caml-diff.vhd"), os.devnull, require_full_bitmaps=False
    )
    assert report["blocks"] == 5


def test_truncated_stream_is_rejected(chain: tuple[str, str], tmp_path: Path, base_raw: Path) -> None:
    leaf, base = chain
    delta = tmp_path / "delta.vhd"
    eng.export_stream(leaf, str(delta), base)
    data = delta.read_bytes()
    for cut in (100, 1024, 2100, len(data) // 2, len(data) - 1):
        bad = tmp_path / "cut.vhd"
        bad.write_bytes(data[:cut])
        with pytest.raises(eng.VhdError):
            eng.transform(str(bad), os.devnull)


def test_stream_length_header_fields(chain: tuple[str, str]) -> None:
    """Length = 512 + 1024 + 512 (locator sector) + BAT + n x (bitmap + block) + 512."""
    leaf, base = chain
    bat = -(-32 * 4 // SECTOR) * SECTOR
    assert eng.stream_length(leaf, base) == 512 + 1024 + 512 + bat + 5 * (SECTOR + 2 * MiB) + 512


def test_coalesce_partial_bitmap_vector_is_sector_exact(chain: tuple[str, str], tmp_path: Path) -> None:
    """Merging the partial-bitmap child keeps the parent's sectors (XO's merge gives 2df6...)."""
    leaf, base = chain
    report = eng.coalesce(leaf)
    assert report["sectors_merged"] == 8 + 4096 + 20 + 8 + 8
    assert eng.check(leaf) == []
    assert eng.info(leaf)["disk_type"] == "dynamic"
    assert eng.sha256(leaf) == SPEC_CHAIN
    assert not Path(base).exists()


def test_every_bat_byte_flip_rejected_before_any_write(
    chain: tuple[str, str], tmp_path: Path, base_raw: Path
) -> None:
    """Any single-bit change of any allocated BAT entry is caught before the first write: the
    entries are bounded by the stream length and must follow each other without overlap."""
    leaf, base = chain
    delta = tmp_path / "delta.vhd"
    eng.export_stream(leaf, str(delta), base)
    data = delta.read_bytes()
    before = base_raw.read_bytes()
    v = VhdBytes(data)
    bad = tmp_path / "bad.vhd"
    for index in v.allocated():
        for byte in range(4):
            mutated = bytearray(data)
            mutated[v.table_offset + 4 * index + byte] ^= 0x01
            bad.write_bytes(bytes(mutated))
            with pytest.raises(eng.VhdError):
                eng.apply_stream(str(bad), str(base_raw), target_format="raw", require_full_bitmaps=True)
            assert base_raw.read_bytes() == before, (index, byte)


def test_last_bitmap_flip_rejected(chain: tuple[str, str], tmp_path: Path, base_raw: Path) -> None:
    """Rejected, but forward-only with bounded memory: the blocks before it were already
    written (as with XAPI's own import), so only the first block's case is checked unchanged."""
    leaf, base = chain
    delta = tmp_path / "delta.vhd"
    eng.export_stream(leaf, str(delta), base)
    v = VhdBytes(delta.read_bytes())
    last = max(v.bat(i) for i in v.allocated()) * SECTOR
    v.b[last + 7] ^= 0x10
    bad = tmp_path / "bad.vhd"
    v.save(bad)
    with pytest.raises(eng.VhdError) as err:
        eng.apply_stream(str(bad), str(base_raw), target_format="raw", require_full_bitmaps=True)
    assert err.value.kind == "partial_bitmap"
