//! What every stream operation reports.

use crate::format::DiskType;

#[derive(Debug, Clone)]
pub struct StreamReport {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub blocks: u64,
    pub zero_blocks_dropped: u64,
    pub sectors_written: u64,
    pub virtual_size: u64,
    pub block_size: u32,
    pub disk_type: DiskType,
    pub parent_uuid: Option<[u8; 16]>,
    /// (block index, digest of the block's data as carried), ascending block index.
    pub digests: Vec<(u32, u128)>,
    /// (unit index, digest of the unit's bytes within the disk), for the units a stream
    /// carries whole, when asked (`digest::UnitDigests`); ascending.
    pub unit_digests: Vec<(u64, u128)>,
    /// A resumed transfer: the stream's first block (stream order) that was sent (0: all).
    pub resumed_from: u64,
    /// Blocks written to the output (a resumed transfer leaves out the first `resumed_from`).
    pub blocks_sent: u64,
}

impl StreamReport {
    pub fn new(disk_type: DiskType, virtual_size: u64, block_size: u32) -> StreamReport {
        StreamReport {
            bytes_in: 0,
            bytes_out: 0,
            blocks: 0,
            zero_blocks_dropped: 0,
            sectors_written: 0,
            virtual_size,
            block_size,
            disk_type,
            parent_uuid: None,
            digests: Vec::new(),
            unit_digests: Vec::new(),
            resumed_from: 0,
            blocks_sent: 0,
        }
    }
}
