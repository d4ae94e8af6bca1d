//! Coalesce is sector-exact on the partial-bitmap vector and finishes after an interruption
//! at each of its steps.

mod common;

use std::path::{Path, PathBuf};

use xencr_engine::coalesce::{coalesce, state_path};
use xencr_engine::format::uuid_to_string;
use xencr_engine::image::{sha256_hex, Chain, Source, VhdFile};

const CHILD: &str = "9cc1ba5ff8b5023fcc793d667a2f0f41224cc0c16cc59d036c7e98d079e0426a";

/// Copies of the base and the partial-bitmap child in a fresh folder.
fn copies(dir: &Path) -> (PathBuf, PathBuf) {
    let v = common::vectors();
    let base = dir.join("caml-dynamic-base.vhd");
    let child = dir.join("caml-diff-child.vhd");
    std::fs::copy(v.join("caml-dynamic-base.vhd"), &base).unwrap();
    std::fs::copy(v.join("caml-diff-child.vhd"), &child).unwrap();
    (base, child)
}

fn sha(p: &Path) -> String {
    sha256_hex(&Source::Vhd(Chain::open(p, &[], false).unwrap())).unwrap()
}

#[test]
fn merge_keeps_parent_sectors_under_partial_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = copies(dir.path());
    let child_uuid = VhdFile::open(&child, false).unwrap().footer.uuid;
    let r = coalesce(&child, Some(&base)).unwrap();
    assert_eq!(r.blocks_merged, 5);
    assert!(!base.exists(), "the parent was renamed over the child");
    assert_eq!(sha(&child), CHILD, "not the block-granular 2df6...");
    let merged = VhdFile::open(&child, false).unwrap();
    assert_eq!(
        uuid_to_string(&merged.footer.uuid),
        uuid_to_string(&child_uuid)
    );
    assert!(!state_path(&child).exists());
}

#[test]
fn interrupted_during_the_copy_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = copies(dir.path());
    // The state of a kill mid-copy: plan written, some of the child's sectors already in the
    // parent.
    let st = format!(
        "{{\"version\":1,\"child\":{:?},\"parent\":{:?},\"child_uuid\":{:?},\"parent_uuid\":{:?}}}",
        child,
        base,
        uuid_to_string(&VhdFile::open(&child, false).unwrap().footer.uuid),
        uuid_to_string(&VhdFile::open(&base, false).unwrap().footer.uuid),
    );
    std::fs::write(state_path(&child), st).unwrap();
    {
        let c = Chain::open(&child, std::slice::from_ref(&base), false).unwrap();
        let mut buf = vec![0u8; 8 * 512];
        c.read_at((4100) * 512, &mut buf).unwrap();
        let mut p = Chain::open(&base, &[], true).unwrap();
        p.write_at(4100 * 512, &buf).unwrap();
        // The chain still reads as the child, mid-merge.
        assert_eq!(sha(&child), CHILD);
    }
    let r = coalesce(&child, None).unwrap();
    assert!(r.resumed);
    assert_eq!(sha(&child), CHILD);
    assert!(!base.exists() && !state_path(&child).exists());
}

#[test]
fn interrupted_after_the_rename_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = copies(dir.path());
    let child_uuid = uuid_to_string(&VhdFile::open(&child, false).unwrap().footer.uuid);
    let st = format!(
        "{{\"version\":1,\"child\":{:?},\"parent\":{:?},\"child_uuid\":{:?},\"parent_uuid\":\"x\"}}",
        child, base, child_uuid
    );
    // Merge fully into a scratch copy of the base, then put it in place as a kill right after
    // the rename would leave it: merged content at the child's path, parent's old UUID.
    let scratch = tempfile::tempdir().unwrap();
    let (_, c2) = copies(scratch.path());
    coalesce(&c2, None).unwrap();
    let mut f = VhdFile::open(&c2, true).unwrap();
    f.footer.uuid = VhdFile::open(&base, false).unwrap().footer.uuid;
    f.write_footers().unwrap();
    drop(f);
    std::fs::rename(&c2, &child).unwrap();
    std::fs::remove_file(&base).unwrap();
    std::fs::write(state_path(&child), st).unwrap();
    let r = coalesce(&child, None).unwrap();
    assert!(r.resumed);
    assert_eq!(
        uuid_to_string(&VhdFile::open(&child, false).unwrap().footer.uuid),
        child_uuid
    );
    assert_eq!(sha(&child), CHILD);
}

#[test]
fn refuses_a_dynamic_disk_and_a_wrong_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = copies(dir.path());
    assert_eq!(
        coalesce(&base, None).unwrap_err().kind(),
        "not_differencing"
    );
    let other = dir.path().join("other.vhd");
    std::fs::copy(common::vectors().join("qemu-dynamic-forcesize.vhd"), &other).unwrap();
    assert_eq!(
        coalesce(&child, Some(&other)).unwrap_err().kind(),
        "parent_mismatch"
    );
    assert!(!state_path(&child).exists(), "nothing planned on refusal");
}

#[test]
fn a_child_grown_past_its_parent_merges() {
    use xencr_engine::image::create::create;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    create(&base, 4 << 20, 2 << 20, None, None).unwrap();
    Chain::open(&base, &[], true)
        .unwrap()
        .write_at(1 << 20, &[7u8; 4096])
        .unwrap();
    create(&child, 12 << 20, 2 << 20, None, Some(&base)).unwrap();
    let mut c = Chain::open(&child, &[], true).unwrap();
    c.write_at((9 << 20) + 512, &[9u8; 8192]).unwrap();
    let before = sha(&child);
    drop(c);
    coalesce(&child, None).unwrap();
    let merged = VhdFile::open(&child, false).unwrap();
    assert_eq!(merged.size(), 12 << 20);
    assert!(VhdFile::inspect(&child).unwrap().problems.is_empty());
    assert_eq!(sha(&child), before);
}

#[test]
fn diff_sees_data_past_the_shorter_disk() {
    use xencr_engine::diff::diff;
    use xencr_engine::image::create::create;
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.vhd");
    let small = dir.path().join("small.vhd");
    create(&big, 8 << 20, 2 << 20, None, None).unwrap();
    Chain::open(&big, &[], true)
        .unwrap()
        .write_at(6 << 20, &[5u8; 512])
        .unwrap();
    create(&small, 4 << 20, 2 << 20, None, Some(&big)).unwrap();
    let a = Source::Vhd(Chain::open(&big, &[], false).unwrap());
    let b = Source::Vhd(Chain::open(&small, &[], false).unwrap());
    let d = diff(&a, &b, 2 << 20).unwrap();
    assert_eq!(d.changed, vec![3]);
}
