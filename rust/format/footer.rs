//! The 512-byte footer: at EOF-512 always, and copied at offset 0 on dynamic/differencing disks.

use super::geometry::Geometry;
use super::{be_u16, be_u32, be_u64, checksum, printable, put_u16, put_u32, put_u64};
use crate::error::{Result, VhdError};

pub const COOKIE: &[u8; 8] = b"conectix";
/// blktap's poisoned footer (a disk being written); accepted as a cookie.
pub const POISON_COOKIE: &[u8; 8] = b"v_poison";
pub const VERSION: u32 = 0x0001_0000;
const CHECKSUM_AT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub cookie: [u8; 8],
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_application: [u8; 4],
    pub creator_version: u32,
    pub creator_host_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: DiskType,
    pub checksum: u32,
    pub uuid: [u8; 16],
    pub saved_state: u8,
    /// blktap's "hidden" flag (byte 85).
    pub hidden: u8,
}

impl Footer {
    /// A fresh footer as our writers make it (creator `tap`, blktap 1.3, like an SR file).
    pub fn new(disk_type: DiskType, size: u64, uuid: [u8; 16], timestamp: u32) -> Footer {
        Footer {
            cookie: *COOKIE,
            features: 2,
            version: VERSION,
            data_offset: if disk_type == DiskType::Fixed {
                u64::MAX
            } else {
                512
            },
            timestamp,
            creator_application: *b"tap\0",
            creator_version: 0x0001_0003,
            creator_host_os: 0,
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type,
            checksum: 0,
            uuid,
            saved_state: 0,
            hidden: 0,
        }
    }

    /// Parse and validate a footer read at `offset`.
    pub fn parse(b: &[u8], offset: u64) -> Result<Footer> {
        if b.len() < 512 {
            return Err(VhdError::Truncated {
                structure: "footer",
                offset,
                expected: offset + 512,
                file_size: offset + b.len() as u64,
            });
        }
        let b = &b[..512];
        let mut cookie = [0u8; 8];
        cookie.copy_from_slice(&b[0..8]);
        if &cookie != COOKIE && &cookie != POISON_COOKIE {
            return Err(VhdError::BadCookie {
                structure: "footer",
                offset,
                expected: "conectix",
                found: printable(&cookie),
            });
        }
        let stored = be_u32(b, CHECKSUM_AT);
        let computed = checksum(b, CHECKSUM_AT);
        let mut creator_application = [0u8; 4];
        creator_application.copy_from_slice(&b[28..32]);
        let creator_version = be_u32(b, 32);
        if stored != computed
            && !hidden_flag_quirk(b, &creator_application, creator_version, stored)
        {
            return Err(VhdError::BadChecksum {
                structure: "footer",
                offset,
                expected: computed,
                found: stored,
            });
        }
        let version = be_u32(b, 12);
        if version != VERSION {
            return Err(VhdError::BadVersion {
                structure: "footer",
                offset,
                found: version,
            });
        }
        let disk_type = match be_u32(b, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            found => return Err(VhdError::BadDiskType { offset, found }),
        };
        let data_offset = be_u64(b, 16);
        match disk_type {
            DiskType::Fixed if data_offset != u64::MAX => {
                return Err(VhdError::BadDataOffset {
                    structure: "footer",
                    offset: offset + 16,
                    found: data_offset,
                    expected: "0xFFFFFFFFFFFFFFFF for a fixed disk",
                })
            }
            DiskType::Dynamic | DiskType::Differencing
                if data_offset == u64::MAX || data_offset % 512 != 0 =>
            {
                return Err(VhdError::BadDataOffset {
                    structure: "footer",
                    offset: offset + 16,
                    found: data_offset,
                    expected: "a sector-aligned header offset",
                })
            }
            _ => {}
        }
        let current_size = be_u64(b, 48);
        if current_size > super::MAX_DISK_SIZE {
            return Err(VhdError::TooLarge {
                structure: "footer",
                offset: offset + 48,
                what: "current size",
                found: current_size,
                limit: super::MAX_DISK_SIZE,
            });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[68..84]);
        Ok(Footer {
            cookie,
            features: be_u32(b, 8),
            version,
            data_offset,
            timestamp: be_u32(b, 24),
            creator_application,
            creator_version,
            creator_host_os: be_u32(b, 36),
            original_size: be_u64(b, 40),
            current_size,
            geometry: Geometry {
                cylinders: be_u16(b, 56),
                heads: b[58],
                sectors_per_track: b[59],
            },
            disk_type,
            checksum: stored,
            uuid,
            saved_state: b[84],
            hidden: b[85],
        })
    }

    /// Serialise, computing the checksum.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(&self.cookie);
        put_u32(&mut b, 8, self.features);
        put_u32(&mut b, 12, self.version);
        put_u64(&mut b, 16, self.data_offset);
        put_u32(&mut b, 24, self.timestamp);
        b[28..32].copy_from_slice(&self.creator_application);
        put_u32(&mut b, 32, self.creator_version);
        put_u32(&mut b, 36, self.creator_host_os);
        put_u64(&mut b, 40, self.original_size);
        put_u64(&mut b, 48, self.current_size);
        put_u16(&mut b, 56, self.geometry.cylinders);
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors_per_track;
        put_u32(&mut b, 60, self.disk_type.code());
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        b[85] = self.hidden;
        let c = checksum(&b, CHECKSUM_AT);
        put_u32(&mut b, CHECKSUM_AT, c);
        b
    }

    pub fn creator(&self) -> String {
        printable(&self.creator_application)
    }

    /// Does blktap's batmap extension apply (creator `tap`, version >= 1.2)?
    pub fn may_have_batmap(&self) -> bool {
        &self.creator_application[..3] == b"tap"
            && self.creator_version >= 0x0001_0001
            && self.disk_type != DiskType::Fixed
    }
}

/// Early td-util flipped the hidden byte without fixing the checksum; blktap accepts that for
/// creator `tap` versions 0.1 and 1.1, and so do we.
fn hidden_flag_quirk(b: &[u8], app: &[u8; 4], ver: u32, stored: u32) -> bool {
    if &app[..3] != b"tap" || !(ver == 0x0000_0001 || ver == 0x0001_0001) {
        return false;
    }
    let mut copy = [0u8; 512];
    copy.copy_from_slice(&b[..512]);
    copy[85] = if copy[85] == 0 { 1 } else { 0 };
    checksum(&copy, CHECKSUM_AT) == stored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = Footer::new(DiskType::Dynamic, 64 << 20, [7; 16], 123);
        let b = f.to_bytes();
        let g = Footer::parse(&b, 0).unwrap();
        assert_eq!(g.current_size, 64 << 20);
        assert_eq!(g.uuid, [7; 16]);
        assert_eq!(g.to_bytes(), b);
    }

    #[test]
    fn flipped_byte_is_a_checksum_error() {
        let mut b = Footer::new(DiskType::Dynamic, 1 << 20, [1; 16], 0).to_bytes();
        b[40] ^= 1;
        assert_eq!(Footer::parse(&b, 0).unwrap_err().kind(), "bad_checksum");
    }
}
