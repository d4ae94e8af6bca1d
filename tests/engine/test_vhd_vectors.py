"""Every shared vector (made by qemu-img, ocaml-vhd and Xen Orchestra) parses, checks clean,
reads to its spec content hash and has the fields its independent dump shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from vhdtest import SPEC_CHAIN, XO_BLOCK_GRANULAR, file_sha256, norm, parse_inspect, vector_cases

from conftest import VECTORS_SRC
from xencr import _engine as eng

CASES = vector_cases(VECTORS_SRC)
FILES = sorted(p.name.removesuffix(".xz") for p in VECTORS_SRC.glob("*.vhd.xz"))


def test_every_vector_has_a_hash_line() -> None:
    assert sorted(c.leaf for c in CASES) == FILES
    assert len(FILES) == 13


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.leaf)
def test_vector_reads_to_spec_hash(vectors: Path, case: Any) -> None:
    leaf, parents = case.paths(vectors)
    assert eng.check(leaf, parents or None) == []
    assert eng.sha256(leaf, parents or None) == case.spec_sha256
    assert eng.chain(leaf, parents or None) == [leaf, *parents]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.leaf)
def test_vector_cat_matches_hash(vectors: Path, tmp_path: Path, case: Any) -> None:
    leaf, parents = case.paths(vectors)
    out = tmp_path / "out.raw"
    n = eng.cat(leaf, str(out), parents or None)
    assert n == out.stat().st_size == eng.virtual_size(leaf)
    assert file_sha256(out) == case.spec_sha256


@pytest.mark.parametrize("case", [c for c in CASES if c.parents], ids=lambda c: c.leaf)
def test_child_links_to_parent_uuid(vectors: Path, case: Any) -> None:
    leaf, parents = case.paths(vectors)
    child, parent = eng.info(leaf, parents), eng.info(parents[0])
    assert child["header"]["parent_uuid"] == parent["footer"]["uuid"]


def test_partial_bitmap_chain_is_sector_exact(vectors: Path) -> None:
    """The chain XO reads block-granularly (2df6...) must read with the parent's sectors kept."""
    digest = eng.sha256(str(vectors / "caml-diff-child.vhd"), [str(vectors / "caml-dynamic-base.vhd")])
    assert digest == SPEC_CHAIN != XO_BLOCK_GRANULAR


def test_parent_found_by_locator(vectors: Path) -> None:
    """caml-diff-child finds its parent through its relative MacX locator, with no help."""
    leaf = str(vectors / "caml-diff-child.vhd")
    assert eng.chain(leaf) == [leaf, str(vectors / "caml-dynamic-base.vhd")]
    assert eng.sha256(leaf) == SPEC_CHAIN


def test_wrong_parent_is_refused(vectors: Path) -> None:
    with pytest.raises(eng.VhdError) as err:
        eng.sha256(str(vectors / "caml-diff-child.vhd"), [str(vectors / "qemu-dynamic-forcesize.vhd")])
    assert err.value.kind == "parent_mismatch"


def test_read_ranges_through_chain(vectors: Path) -> None:
    """Unaligned ranges across block and bitmap-byte boundaries equal the same slice of cat."""
    leaf, parents = str(vectors / "caml-diff-child.vhd"), [str(vectors / "caml-dynamic-base.vhd")]
    whole = b"".join(eng.read(leaf, off, 1 << 22, parents) for off in range(0, 64 << 20, 1 << 22))
    assert len(whole) == 64 << 20
    for off, length in [
        (0, 1),
        (4100 * 512 - 3, 4000),
        (20490 * 512 + 7, 20 * 512),
        ((2 << 20) - 1, 2),
        (0, 0),
    ]:
        assert eng.read(leaf, off, length, parents) == whole[off : off + length]


# Fields the dump derives that the engine reports differently (as check() results).
DERIVED = {"checksum_ok", "cookie_ok", "reserved_nonzero"}


@pytest.mark.parametrize("name", FILES)
def test_info_matches_independent_dump(vectors: Path, name: str) -> None:
    dump = parse_inspect(VECTORS_SRC / name.replace(".vhd", ".inspect.txt"))
    info = eng.info(str(vectors / name))
    assert info["file_size"] == (vectors / name).stat().st_size
    assert info["virtual_size"] == int(dump["footer"]["current_size"])
    for section in ("footer", "header"):
        expected = dump[section]
        if not expected:
            assert info.get(section) is None, section
            continue
        got = info[section]
        for field, value in expected.items():
            if field in DERIVED:
                continue
            assert field in got, f"{section}.{field} missing from info()"
            if field in ("parent_unicode_name", "cookie", "creator_application"):
                assert str(got[field]).rstrip("\0 ") == value.rstrip("\0 "), f"{section}.{field}"
            else:
                assert norm(got[field]) == norm(value), f"{section}.{field}"
    if "footer_copy_identical" in dump:
        assert info["footer_copy_identical"] == dump["footer_copy_identical"]
    if dump["header"]:
        assert info["bitmap_bytes_per_block"] == dump["bitmap_bytes_per_block"]
        for key, value in dump["blocks"].items():
            assert info["blocks"][key] == value, f"blocks.{key}"
        assert (info["batmap"] is None) == (dump["batmap"] is None)
        present = {i: loc for i, loc in dump["locators"].items() if norm(loc["code"]) != 0}
        got_locs = {loc["index"]: loc for loc in info["locators"]}
        assert sorted(got_locs) == sorted(present)
        for i, loc in present.items():
            for key in ("data_space_raw", "data_space_bytes", "data_length", "data_offset"):
                assert got_locs[i][key] == loc[key], f"locator[{i}].{key}"
            assert norm(got_locs[i]["code"]) == norm(loc["code"])
            assert got_locs[i]["decoded"] == loc.get("decoded", ""), f"locator[{i}].decoded"
