//! Any bytes as an import stream: the forward-only consumer and the pass-through transform
//! must return an error or a report, never panic, with or without a known length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xencr_engine::stream::parse::{parse, NullSink, ParseOptions};
use xencr_engine::stream::transform::transform;

fuzz_target!(|data: &[u8]| {
    for length in [None, Some(data.len() as u64)] {
        for require_full_bitmaps in [false, true] {
            let opts = ParseOptions { length, require_full_bitmaps };
            let _ = parse(data, opts, &mut NullSink);
        }
    }
    let mut out = Vec::new();
    let _ = transform(data, &mut out, ParseOptions::default(), None);
});
