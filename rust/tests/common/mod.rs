//! Shared helpers of the integration tests: the shared test vectors, decompressed once.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `../shared/vhd-vectors` beside the checkout (CI lays `shared/` out beside the clone).
pub fn vectors_src() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for cand in [
        root.join("../shared/vhd-vectors"),
        PathBuf::from("/work/shared/vhd-vectors"),
    ] {
        if cand.is_dir() {
            return cand;
        }
    }
    panic!("shared/vhd-vectors not found beside the checkout");
}

/// A folder holding every vector decompressed (names kept: locators are relative).
pub fn vectors() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("xencr-vectors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(vectors_src()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "xz") {
                let out = dir.join(p.file_stem().unwrap());
                let data = Command::new("xz")
                    .arg("-dc")
                    .arg(&p)
                    .output()
                    .expect("xz is installed");
                assert!(data.status.success());
                std::fs::write(out, data.stdout).unwrap();
            }
        }
        dir
    })
}

/// (leaf-first file names, spec sha256) from hashes.txt.
pub fn expected_hashes() -> Vec<(Vec<String>, String)> {
    let text = std::fs::read_to_string(vectors_src().join("hashes.txt")).unwrap();
    text.lines()
        .filter(|l| l.contains(".vhd") && l.contains('|'))
        .map(|l| {
            let mut parts = l.split('|');
            let files = parts
                .next()
                .unwrap()
                .split_whitespace()
                .map(String::from)
                .collect();
            let spec = parts.next().unwrap().trim().to_string();
            (files, spec)
        })
        .collect()
}

/// The vectors' sector pattern (`pattern.py`).
pub fn sector(tag: u32, lba: u64) -> [u8; 512] {
    let mut s = [0u8; 512];
    for i in 0..32u32 {
        let r = &mut s[16 * i as usize..16 * (i as usize + 1)];
        r[0..4].copy_from_slice(&tag.to_be_bytes());
        r[4..12].copy_from_slice(&lba.to_be_bytes());
        r[12..16].copy_from_slice(&i.to_be_bytes());
    }
    s
}
