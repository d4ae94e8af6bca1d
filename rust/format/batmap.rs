//! blktap's batmap extension: one bit per block, set = "block fully allocated". It sits at
//! `table_offset + padded BAT size` on `tap` disks. We validate it when present and keep it
//! consistent when we rewrite such a disk in place.

use super::{be_u32, be_u64, put_u32, put_u64};

pub const COOKIE: &[u8; 8] = b"tdbatmap";
pub const VERSION: u32 = 0x0001_0002;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatmapHeader {
    pub batmap_offset: u64,
    /// In sectors.
    pub batmap_size: u32,
    pub version: u32,
    pub checksum: u32,
    pub marker: u8,
}

impl BatmapHeader {
    /// `None` when the sector does not start with the batmap cookie (no batmap).
    pub fn parse(b: &[u8]) -> Option<BatmapHeader> {
        if b.len() < 512 || &b[0..8] != COOKIE {
            return None;
        }
        Some(BatmapHeader {
            batmap_offset: be_u64(b, 8),
            batmap_size: be_u32(b, 16),
            version: be_u32(b, 20),
            checksum: be_u32(b, 24),
            marker: b[28],
        })
    }

    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(COOKIE);
        put_u64(&mut b, 8, self.batmap_offset);
        put_u32(&mut b, 16, self.batmap_size);
        put_u32(&mut b, 20, self.version);
        put_u32(&mut b, 24, self.checksum);
        b[28] = self.marker;
        b
    }
}

/// Sectors a batmap for `blocks` blocks occupies.
pub fn size_sectors(blocks: u32) -> u32 {
    (u64::from(blocks).div_ceil(8).div_ceil(512)) as u32
}

/// `~sum` of the batmap bytes; version 1.1 summed signed chars.
pub fn checksum(map: &[u8], version: u32) -> u32 {
    let mut sum: u32 = 0;
    for &b in map {
        let v = if version <= 0x0001_0001 {
            (b as i8) as i32 as u32
        } else {
            u32::from(b)
        };
        sum = sum.wrapping_add(v);
    }
    !sum
}
