//! The block allocation table: big-endian u32 sector offsets, `0xFFFFFFFF` = unallocated,
//! padded with 0xFF to a whole sector.

use super::{be_u32, UNALLOCATED};

/// Bytes the table occupies on disk (at least one sector).
pub fn padded_size(entries: u32) -> u64 {
    std::cmp::max(512, super::sector_align(u64::from(entries) * 4))
}

pub fn parse(b: &[u8], entries: u32) -> Vec<u32> {
    (0..entries as usize).map(|i| be_u32(b, 4 * i)).collect()
}

pub fn to_bytes(entries: &[u32]) -> Vec<u8> {
    let mut out = vec![0xFFu8; padded_size(entries.len() as u32) as usize];
    for (i, e) in entries.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&e.to_be_bytes());
    }
    out
}

pub fn allocated_count(entries: &[u32]) -> usize {
    entries.iter().filter(|&&e| e != UNALLOCATED).count()
}
