//! The 1024-byte dynamic disk header and its eight parent locator entries.

use super::{be_u32, be_u64, checksum, printable, put_u32, put_u64};
use crate::error::{Result, VhdError};

pub const COOKIE: &[u8; 8] = b"cxsparse";
pub const VERSION: u32 = 0x0001_0000;
const CHECKSUM_AT: usize = 36;

pub const PLAT_NONE: u32 = 0;
pub const PLAT_WI2R: u32 = 0x5769_3272;
pub const PLAT_WI2K: u32 = 0x5769_326B;
pub const PLAT_W2RU: u32 = 0x5732_7275;
pub const PLAT_W2KU: u32 = 0x5732_6B75;
pub const PLAT_MAC: u32 = 0x4D61_6320;
pub const PLAT_MACX: u32 = 0x4D61_6358;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    pub code: u32,
    /// As stored: sectors per the spec, or bytes as blktap and Hyper-V write it.
    pub data_space: u32,
    pub data_length: u32,
    pub reserved: u32,
    pub data_offset: u64,
}

impl ParentLocator {
    /// Space reserved for the data, in bytes. Readers (blktap, ocaml-vhd) decode a value below
    /// 512 as sectors, else as bytes.
    pub fn space_bytes(&self) -> u64 {
        let v = u64::from(self.data_space);
        if v < 512 {
            v * 512
        } else {
            v
        }
    }

    pub fn code_name(&self) -> &'static str {
        match self.code {
            PLAT_NONE => "None",
            PLAT_WI2R => "Wi2r",
            PLAT_WI2K => "Wi2k",
            PLAT_W2RU => "W2ru",
            PLAT_W2KU => "W2ku",
            PLAT_MAC => "Mac ",
            PLAT_MACX => "MacX",
            _ => "unknown",
        }
    }

    /// Decode the locator's data into a path (UTF-8 for MacX, UTF-16LE for W2RU/W2KU).
    pub fn decode(&self, data: &[u8]) -> Option<String> {
        let data = &data[..std::cmp::min(data.len(), self.data_length as usize)];
        match self.code {
            PLAT_MACX => {
                let s = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
                if s.is_empty() {
                    return None;
                }
                Some(s.strip_prefix("file://").unwrap_or(s).to_string())
            }
            PLAT_W2RU | PLAT_W2KU => {
                let units: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                let s = String::from_utf16(&units).ok()?;
                let s = s.trim_end_matches('\0');
                if s.is_empty() {
                    return None;
                }
                Some(s.replace('\\', "/"))
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub data_offset: u64,
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub checksum: u32,
    pub parent_uuid: [u8; 16],
    pub parent_timestamp: u32,
    pub reserved: u32,
    /// UTF-16 code units as stored (big-endian on disk), trailing NULs trimmed.
    pub parent_name: Vec<u16>,
    pub locators: [ParentLocator; 8],
}

impl Header {
    pub fn new(table_offset: u64, max_table_entries: u32, block_size: u32) -> Header {
        Header {
            data_offset: u64::MAX,
            table_offset,
            version: VERSION,
            max_table_entries,
            block_size,
            checksum: 0,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            reserved: 0,
            parent_name: Vec::new(),
            locators: [ParentLocator::default(); 8],
        }
    }

    /// Parse and validate the fields that need no file context (cookie, checksum, version,
    /// data offset, block size). `layout` checks the rest against the file.
    pub fn parse(b: &[u8], offset: u64) -> Result<Header> {
        if b.len() < 1024 {
            return Err(VhdError::Truncated {
                structure: "header",
                offset,
                expected: offset + 1024,
                file_size: offset + b.len() as u64,
            });
        }
        let b = &b[..1024];
        if &b[0..8] != COOKIE {
            return Err(VhdError::BadCookie {
                structure: "header",
                offset,
                expected: "cxsparse",
                found: printable(&b[0..8]),
            });
        }
        let stored = be_u32(b, CHECKSUM_AT);
        let computed = checksum(b, CHECKSUM_AT);
        if stored != computed {
            return Err(VhdError::BadChecksum {
                structure: "header",
                offset,
                expected: computed,
                found: stored,
            });
        }
        let version = be_u32(b, 24);
        if version != VERSION {
            return Err(VhdError::BadVersion {
                structure: "header",
                offset,
                found: version,
            });
        }
        let data_offset = be_u64(b, 8);
        if data_offset != u64::MAX {
            return Err(VhdError::BadDataOffset {
                structure: "header",
                offset: offset + 8,
                found: data_offset,
                expected: "0xFFFFFFFFFFFFFFFF",
            });
        }
        let block_size = be_u32(b, 32);
        if !block_size.is_power_of_two() || !(512..=super::MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(VhdError::BadBlockSize {
                offset,
                found: block_size,
            });
        }
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&b[40..56]);
        let mut parent_name: Vec<u16> = b[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        while parent_name.last() == Some(&0) {
            parent_name.pop();
        }
        let mut locators = [ParentLocator::default(); 8];
        for (i, l) in locators.iter_mut().enumerate() {
            let at = 576 + 24 * i;
            *l = ParentLocator {
                code: be_u32(b, at),
                data_space: be_u32(b, at + 4),
                data_length: be_u32(b, at + 8),
                reserved: be_u32(b, at + 12),
                data_offset: be_u64(b, at + 16),
            };
        }
        Ok(Header {
            data_offset,
            table_offset: be_u64(b, 16),
            version,
            max_table_entries: be_u32(b, 28),
            block_size,
            checksum: stored,
            parent_uuid,
            parent_timestamp: be_u32(b, 56),
            reserved: be_u32(b, 60),
            parent_name,
            locators,
        })
    }

    pub fn to_bytes(&self) -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[0..8].copy_from_slice(COOKIE);
        put_u64(&mut b, 8, self.data_offset);
        put_u64(&mut b, 16, self.table_offset);
        put_u32(&mut b, 24, self.version);
        put_u32(&mut b, 28, self.max_table_entries);
        put_u32(&mut b, 32, self.block_size);
        b[40..56].copy_from_slice(&self.parent_uuid);
        put_u32(&mut b, 56, self.parent_timestamp);
        put_u32(&mut b, 60, self.reserved);
        for (i, u) in self.parent_name.iter().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().enumerate() {
            let at = 576 + 24 * i;
            put_u32(&mut b, at, l.code);
            put_u32(&mut b, at + 4, l.data_space);
            put_u32(&mut b, at + 8, l.data_length);
            put_u32(&mut b, at + 12, l.reserved);
            put_u64(&mut b, at + 16, l.data_offset);
        }
        let c = checksum(&b, CHECKSUM_AT);
        put_u32(&mut b, CHECKSUM_AT, c);
        b
    }

    /// The parent's unicode name (stored big-endian; a BOM, as ocaml-vhd honours, is skipped).
    pub fn parent_name_string(&self) -> String {
        let units: &[u16] = match self.parent_name.first() {
            Some(0xFEFF) => &self.parent_name[1..],
            _ => &self.parent_name,
        };
        String::from_utf16_lossy(units)
    }

    pub fn set_parent_name(&mut self, name: &str) {
        self.parent_name = name.encode_utf16().take(256).collect();
    }

    /// Sectors of bitmap in front of each block (rounded up to a whole sector).
    pub fn bitmap_bytes(&self) -> u64 {
        super::sector_align((u64::from(self.block_size) / 512).div_ceil(8))
    }

    pub fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size) / 512
    }
}

/// Encode a path as locator data: UTF-8 `file://` URL for MacX, UTF-16LE for W2RU/W2KU.
pub fn encode_locator(code: u32, path: &str) -> Vec<u8> {
    match code {
        PLAT_MACX => format!("file://{path}").into_bytes(),
        _ => path
            .replace('/', "\\")
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_locator() {
        let mut h = Header::new(1536, 32, 2 << 20);
        h.parent_uuid = [9; 16];
        h.set_parent_name("base.vhd");
        h.locators[0] = ParentLocator {
            code: PLAT_MACX,
            data_space: 1,
            data_length: 15,
            reserved: 0,
            data_offset: 1536,
        };
        let b = h.to_bytes();
        let g = Header::parse(&b, 512).unwrap();
        assert_eq!(
            g,
            Header {
                checksum: g.checksum,
                ..h
            }
        );
        assert_eq!(g.parent_name_string(), "base.vhd");
        assert_eq!(g.locators[0].space_bytes(), 512);
        let data = encode_locator(PLAT_W2RU, "./base.vhd");
        let l = ParentLocator {
            code: PLAT_W2RU,
            data_length: data.len() as u32,
            ..Default::default()
        };
        assert_eq!(l.decode(&data).unwrap(), "./base.vhd");
    }

    #[test]
    fn block_size_must_be_power_of_two() {
        let mut b = Header::new(1536, 32, 2 << 20).to_bytes();
        b[32..36].copy_from_slice(&3_000_000u32.to_be_bytes());
        let c = checksum(&b, CHECKSUM_AT);
        b[36..40].copy_from_slice(&c.to_be_bytes());
        assert_eq!(Header::parse(&b, 512).unwrap_err().kind(), "bad_block_size");
    }
}
