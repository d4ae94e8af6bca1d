//! Streams against the shared vectors: our exports match ocaml-vhd's byte for byte after the
//! header, they apply back to the right content, and corrupt streams are refused before any
//! write.

mod common;

use std::path::PathBuf;

use xencr_engine::image::{sha256_hex, Chain, Source};
use xencr_engine::stream::apply::{apply, Target};
use xencr_engine::stream::export::export;
use xencr_engine::stream::parse::ParseOptions;

fn chain(files: &[&str]) -> Chain {
    let dir = common::vectors();
    let parents: Vec<PathBuf> = files[1..].iter().map(|f| dir.join(f)).collect();
    Chain::open(&dir.join(files[0]), &parents, false).unwrap()
}

fn base_raw(dir: &tempfile::TempDir) -> PathBuf {
    let raw = dir.path().join("base.raw");
    let mut f = std::fs::File::create(&raw).unwrap();
    xencr_engine::image::cat(
        &Source::Vhd(chain(&["caml-dynamic-base.vhd"])),
        &mut f,
        true,
    )
    .unwrap();
    raw
}

fn raw_sha(p: &std::path::Path) -> String {
    sha256_hex(&Source::open(p, "raw", &[]).unwrap()).unwrap()
}

const CHILD: &str = "9cc1ba5ff8b5023fcc793d667a2f0f41224cc0c16cc59d036c7e98d079e0426a";

#[test]
fn delta_export_matches_vhd_tool_after_the_header() {
    let c = chain(&["caml-diff-child.vhd", "caml-dynamic-base.vhd"]);
    let b = chain(&["caml-dynamic-base.vhd"]);
    let mut out = Vec::new();
    let base_path = common::vectors().join("caml-dynamic-base.vhd");
    let r = export(&c, Some((&b, &base_path)), &mut out, false, None).unwrap();
    let theirs = std::fs::read(common::vectors().join("caml-delta-stream.vhd")).unwrap();
    assert_eq!(out.len(), theirs.len());
    assert_eq!(r.blocks, 5);
    // BAT and every block identical; the footer differs only by its fresh UUID.
    assert_eq!(
        &out[2048..out.len() - 512],
        &theirs[2048..theirs.len() - 512]
    );
    assert_eq!(
        &out[..64],
        &theirs[..64],
        "footer fields before the checksum"
    );
    assert_eq!(
        &out[512 + 40..512 + 56],
        &theirs[512 + 40..512 + 56],
        "parent UUID"
    );
}

#[test]
fn full_export_matches_vhd_tool_after_the_header() {
    let c = chain(&["caml-diff-child.vhd", "caml-dynamic-base.vhd"]);
    let mut out = Vec::new();
    let r = export(&c, None, &mut out, false, None).unwrap();
    let theirs = std::fs::read(common::vectors().join("caml-full-stream.vhd")).unwrap();
    assert_eq!(r.blocks, 6);
    assert_eq!(out.len(), theirs.len());
    assert_eq!(
        &out[2048..out.len() - 512],
        &theirs[2048..theirs.len() - 512]
    );
}

#[test]
fn delta_applied_on_base_raw_gives_child() {
    let dir = tempfile::tempdir().unwrap();
    for stream in ["caml-delta-stream.vhd", "xo-stream-of-caml-diff.vhd"] {
        let raw = base_raw(&dir);
        let src = std::fs::File::open(common::vectors().join(stream)).unwrap();
        let len = src.metadata().unwrap().len();
        let target = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        let r = apply(
            src,
            Target::Raw(target),
            ParseOptions {
                length: Some(len),
                require_full_bitmaps: false,
            },
            true,
        )
        .unwrap();
        assert!(r.sectors_written > 0);
        assert_eq!(raw_sha(&raw), CHILD, "{stream}");
        std::fs::remove_file(&raw).unwrap();
    }
}

#[test]
fn corrupt_streams_are_refused_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(common::vectors().join("caml-delta-stream.vhd")).unwrap();
    // (byte to flip, expected kind, full-bitmap policy)
    let cases = [
        (100usize, "bad_checksum", false),      // footer
        (512 + 20, "bad_checksum", false),      // header
        (2048 + 7, "bat_overlap", false),       // first BAT entry's low byte
        (2048 + 4, "bat_out_of_bounds", false), // second entry's high byte
        (2560 + 3, "partial_bitmap", true),     // first block's bitmap
    ];
    for (at, kind, full) in cases {
        let raw = base_raw(&dir);
        let before = std::fs::read(&raw).unwrap();
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        let target = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        let opts = ParseOptions {
            length: Some(bad.len() as u64),
            require_full_bitmaps: full,
        };
        let err = apply(&bad[..], Target::Raw(target), opts, true).unwrap_err();
        assert_eq!(err.kind(), kind, "flip at {at}: {err}");
        assert!(
            std::fs::read(&raw).unwrap() == before,
            "flip at {at} wrote to the target"
        );
        std::fs::remove_file(&raw).unwrap();
    }
}

#[test]
fn truncated_stream_is_an_error() {
    let good = std::fs::read(common::vectors().join("caml-delta-stream.vhd")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for cut in [100usize, 1000, 2100, 5000, good.len() - 100] {
        let raw = dir.path().join(format!("t{cut}.raw"));
        let target = std::fs::File::create(&raw).unwrap();
        let err = apply(
            &good[..cut],
            Target::Raw(target),
            ParseOptions::default(),
            true,
        )
        .unwrap_err();
        assert!(
            ["stream_length", "truncated", "footer_mismatch"].contains(&err.kind()),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn length_is_known_from_the_head() {
    use xencr_engine::stream::parse::{probe_length, HeadProbe};
    for name in [
        "caml-delta-stream.vhd",
        "caml-full-stream.vhd",
        "xo-stream-of-caml-diff.vhd",
    ] {
        let s = std::fs::read(common::vectors().join(name)).unwrap();
        let mut have = 0u64;
        let total = loop {
            match probe_length(&s[..have as usize]).unwrap() {
                HeadProbe::NeedMore(n) => {
                    assert!(n > have, "{name}: progress");
                    have = n;
                }
                HeadProbe::Complete {
                    total_len,
                    head_len,
                } => {
                    assert!(head_len <= have);
                    break total_len;
                }
            }
        };
        assert_eq!(total, s.len() as u64, "{name}");
    }
}
