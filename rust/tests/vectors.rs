//! Every shared vector parses, validates, and reads (with its parent, linked explicitly) to
//! the documented virtual-content sha256 — including the partial-bitmap chain.

mod common;

use xencr_engine::format::uuid_to_string;
use xencr_engine::image::{sha256_hex, Chain, Source, VhdFile};

#[test]
fn every_vector_validates() {
    for e in std::fs::read_dir(common::vectors()).unwrap() {
        let p = e.unwrap().path();
        let insp = VhdFile::inspect(&p).unwrap();
        let problems: Vec<String> = insp.problems.iter().map(|e| e.to_string()).collect();
        assert!(problems.is_empty(), "{}: {problems:?}", p.display());
    }
}

#[test]
fn every_vector_reads_to_its_spec_hash() {
    let dir = common::vectors();
    let cases = common::expected_hashes();
    assert!(cases.len() >= 13, "hashes.txt lists every vector");
    for (files, spec) in cases {
        let leaf = dir.join(&files[0]);
        let parents: Vec<_> = files[1..].iter().map(|f| dir.join(f)).collect();
        let chain = Chain::open(&leaf, &parents, false).unwrap();
        if let Some(p) = chain.layers.get(1) {
            let h = chain.leaf().header.as_ref().unwrap();
            assert_eq!(
                uuid_to_string(&h.parent_uuid),
                uuid_to_string(&p.footer.uuid)
            );
        }
        let got = sha256_hex(&Source::Vhd(chain)).unwrap();
        assert_eq!(got, spec, "{files:?}");
    }
}

#[test]
fn caml_child_finds_its_parent_by_locator() {
    let dir = common::vectors();
    let chain = Chain::open(&dir.join("caml-diff-child.vhd"), &[], false).unwrap();
    assert_eq!(chain.layers.len(), 2);
    assert!(chain.layers[1].path.ends_with("caml-dynamic-base.vhd"));
}

#[test]
fn partial_bitmap_sectors_come_from_the_parent() {
    // Child block 5 holds sectors 10..29 only (a run ending mid-byte); sectors 30..31 of the
    // block must be the base's (tag 0xBA5E), which block-granular readers get wrong.
    let dir = common::vectors();
    let chain = Chain::open(
        &dir.join("caml-diff-child.vhd"),
        &[dir.join("caml-dynamic-base.vhd")],
        false,
    )
    .unwrap();
    let mut buf = vec![0u8; 512 * 4];
    chain.read_at((20480 + 28) * 512, &mut buf).unwrap();
    assert_eq!(&buf[..512], &common::sector(0xC41D, 20480 + 28));
    assert_eq!(&buf[512..1024], &common::sector(0xC41D, 20480 + 29));
    assert_eq!(&buf[1024..1536], &common::sector(0xBA5E, 20480 + 30));
    assert_eq!(&buf[1536..], &common::sector(0xBA5E, 20480 + 31));
}
