//! Any bytes as a VHD file: validation, info and a full read-through must return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xencr_engine::image::{info, sha256_hex, Chain, Source, VhdFile};

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("xencr-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.vhd");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(insp) = VhdFile::inspect(&path) {
        if let Some(f) = insp.file.as_ref() {
            let _ = info::describe_file(f);
        }
    }
    if let Ok(c) = Chain::open(&path, &[], false) {
        // Bound the work: a valid header may declare a large, sparse disk.
        if c.size() <= 64 << 20 {
            let _ = sha256_hex(&Source::Vhd(c));
        }
    }
});
