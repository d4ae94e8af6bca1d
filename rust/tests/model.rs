//! Property test: random writes into random chains, checked against a plain in-memory model.
//! Read-through, full and delta export + apply, diff, diff streams and coalesce must all agree.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use xencr_engine::coalesce::coalesce;
use xencr_engine::diff::{diff, diff_stream};
use xencr_engine::image::create::create;
use xencr_engine::image::{Chain, Source};
use xencr_engine::stream::apply::{apply, Target};
use xencr_engine::stream::export::export;
use xencr_engine::stream::parse::ParseOptions;

#[derive(Debug, Clone)]
struct Write {
    offset: u64,
    len: usize,
    seed: u8,
}

fn writes(size: u64) -> impl Strategy<Value = Vec<Write>> {
    prop::collection::vec(
        (0..size, 1usize..200_000, any::<u8>()).prop_map(move |(o, l, s)| Write {
            offset: o,
            len: std::cmp::min(l as u64, size - o) as usize,
            seed: s,
        }),
        0..6,
    )
}

fn content(w: &Write) -> Vec<u8> {
    (0..w.len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(w.seed) | 1)
        .collect()
}

fn raw_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn apply_to_raw(stream: &[u8], raw: &Path) -> Vec<u8> {
    let f = std::fs::OpenOptions::new().write(true).open(raw).unwrap();
    let opts = ParseOptions {
        length: Some(stream.len() as u64),
        require_full_bitmaps: false,
    };
    apply(stream, Target::Raw(f), opts, false).unwrap();
    std::fs::read(raw).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn chains_agree_with_the_model(
        sectors in 1u64..12_000,
        bs_shift in prop::sample::select(vec![12u32, 16, 21]),
        layers in prop::collection::vec(writes(12_000 * 512), 1..4),
    ) {
        let size = sectors * 512;
        let bs = 1u32 << bs_shift;
        let dir = tempfile::tempdir().unwrap();
        let mut model = vec![0u8; size as usize];
        let mut nodes: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        for (i, ws) in layers.iter().enumerate() {
            let path = dir.path().join(format!("n{i}.vhd"));
            let parent = nodes.last().map(|n| n.0.clone());
            create(&path, if parent.is_some() { 0 } else { size }, bs, None, parent.as_deref()).unwrap();
            let mut chain = Chain::open(&path, &[], true).unwrap();
            for w in ws.iter().filter(|w| w.offset < size) {
                let len = std::cmp::min(w.len as u64, size - w.offset) as usize;
                let w = Write { len, ..w.clone() };
                let data = content(&w);
                chain.write_at(w.offset, &data).unwrap();
                model[w.offset as usize..w.offset as usize + len].copy_from_slice(&data);
            }
            nodes.push((path, model.clone()));
        }
        let leaf = nodes.last().unwrap().0.clone();
        let chain = Chain::open(&leaf, &[], false).unwrap();

        // Read-through, whole and at odd ranges.
        let mut all = vec![0u8; size as usize];
        chain.read_at(0, &mut all).unwrap();
        prop_assert!(all == model);
        let mut piece = vec![0u8; std::cmp::min(1000, size as usize)];
        let at = size / 3;
        let n = std::cmp::min(piece.len() as u64, size - at) as usize;
        chain.read_at(at, &mut piece[..n]).unwrap();
        prop_assert!(piece[..n] == model[at as usize..at as usize + n]);

        // Full export onto an empty raw file.
        let mut full = Vec::new();
        export(&chain, None, &mut full, false, None).unwrap();
        let empty = raw_file(dir.path(), "empty.raw", &[]);
        prop_assert!(apply_to_raw(&full, &empty) == model);

        // Delta from the root node onto the root's content.
        let (root_path, root_model) = &nodes[0];
        let root = Chain::open(root_path, &[], false).unwrap();
        let mut delta = Vec::new();
        export(&chain, Some((&root, root_path)), &mut delta, false, None).unwrap();
        let base = raw_file(dir.path(), "root.raw", root_model);
        prop_assert!(apply_to_raw(&delta, &base) == model);

        // Diff at 64 KiB against the model, and a diff stream applied on the root.
        let g = 65536u64;
        let d = diff(&Source::Vhd(Chain::open(root_path, &[], false).unwrap()), &Source::Vhd(Chain::open(&leaf, &[], false).unwrap()), g).unwrap();
        let expect: Vec<u64> = (0..size.div_ceil(g))
            .filter(|&u| {
                let r = (u * g) as usize..std::cmp::min((u + 1) * g, size) as usize;
                root_model[r.clone()] != model[r]
            })
            .collect();
        prop_assert_eq!(&d.changed, &expect);
        let mut ds = Vec::new();
        diff_stream(&Source::Vhd(root), &Source::Vhd(Chain::open(&leaf, &[], false).unwrap()), g, &mut ds).unwrap();
        let base2 = raw_file(dir.path(), "root2.raw", root_model);
        prop_assert!(apply_to_raw(&ds, &base2) == model);

        // Coalesce the leaf into its parent: the leaf's path now holds the same content.
        drop(chain);
        if nodes.len() >= 2 {
            coalesce(&leaf, None).unwrap();
            let merged = Chain::open(&leaf, &[], false).unwrap();
            prop_assert_eq!(merged.layers.len(), nodes.len() - 1);
            let mut got = vec![0u8; size as usize];
            merged.read_at(0, &mut got).unwrap();
            prop_assert!(got == model);
            prop_assert!(!nodes[nodes.len() - 2].0.exists());
        }
    }
}
