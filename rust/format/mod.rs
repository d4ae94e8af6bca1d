//! Pure VHD format code: parse and serialise the on-disk structures and validate them.
//! Nothing here does I/O; callers hand in byte slices and the file's size.

pub mod bat;
pub mod batmap;
pub mod bitmap;
pub mod footer;
pub mod geometry;
pub mod header;
pub mod layout;

pub use footer::{DiskType, Footer};
pub use header::{Header, ParentLocator};

pub const SECTOR: u64 = 512;
pub const FOOTER_SIZE: u64 = 512;
pub const HEADER_SIZE: u64 = 1024;
pub const DEFAULT_BLOCK_SIZE: u32 = 2 * 1024 * 1024;
/// ocaml-vhd's `max_disk_size`; XAPI refuses larger VHDs too.
pub const MAX_DISK_SIZE: u64 = 2040 * 1024 * 1024 * 1024;
/// Largest block size we accept; keeps every per-block buffer bounded.
pub const MAX_BLOCK_SIZE: u32 = 256 * 1024 * 1024;
/// Cap on BAT entries (64 MiB of table): bounds what a crafted header can make us allocate.
pub const MAX_TABLE_ENTRIES: u32 = 1 << 24;
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01T00:00:00Z).
pub const VHD_EPOCH_OFFSET: u64 = 946_684_800;

/// The VHD checksum: one's complement of the byte sum, with the checksum field taken as zero.
pub fn checksum(buf: &[u8], checksum_at: usize) -> u32 {
    let mut sum: u32 = 0;
    for (i, b) in buf.iter().enumerate() {
        if i < checksum_at || i >= checksum_at + 4 {
            sum = sum.wrapping_add(u32::from(*b));
        }
    }
    !sum
}

pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
pub(crate) fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Printable form of a cookie for error messages.
pub(crate) fn printable(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '.'
            }
        })
        .collect()
}

/// Format a raw 16-byte UUID in RFC-4122 text form.
pub fn uuid_to_string(u: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*u).hyphenated().to_string()
}

pub fn uuid_from_str(s: &str) -> Option<[u8; 16]> {
    uuid::Uuid::parse_str(s).ok().map(|u| *u.as_bytes())
}

pub fn new_uuid() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

/// Round up to a multiple of 512.
pub fn sector_align(n: u64) -> u64 {
    n.div_ceil(SECTOR) * SECTOR
}
