//! Which units of the disk a copy reads, and so which blocks its stream carries: one bit per
//! unit (64 KiB for XAPI's CBT), MSB first, the layout of `VDI.list_changed_blocks`.

use crate::error::{Result, VhdError};
use crate::format::{layout::blocks_needed, MAX_BLOCK_SIZE, MAX_DISK_SIZE, MAX_TABLE_ENTRIES};

#[derive(Debug, Clone)]
pub struct Plan {
    pub size: u64,
    pub unit: u64,
    pub block_size: u64,
    units: Vec<u8>,
    pub n_units: u64,
    /// Blocks with at least one unit to read, ascending: the blocks of the stream.
    pub blocks: Vec<u32>,
}

fn bit(map: &[u8], i: u64) -> bool {
    map[(i >> 3) as usize] & (0x80 >> (i & 7)) != 0
}

impl Plan {
    /// The sizes a copy accepts: a disk of whole sectors within VHD's limit, a unit of whole
    /// sectors that divides the block, a block a power of two.
    pub fn check(size: u64, unit: u64, block_size: u64) -> Result<()> {
        if !block_size.is_power_of_two() || !(512..=u64::from(MAX_BLOCK_SIZE)).contains(&block_size)
        {
            return Err(VhdError::BadRange(format!(
                "block size {block_size} is not a power of two between 512 and {MAX_BLOCK_SIZE}"
            )));
        }
        if unit == 0 || unit % 512 != 0 || block_size % unit != 0 {
            return Err(VhdError::BadRange(format!(
                "unit {unit} is not a multiple of 512 dividing the block size {block_size}"
            )));
        }
        if size % 512 != 0 {
            return Err(VhdError::Unsupported(format!(
                "an export of {size} bytes, not a whole number of sectors"
            )));
        }
        if size > MAX_DISK_SIZE
            || blocks_needed(size, block_size as u32) > u64::from(MAX_TABLE_ENTRIES)
        {
            return Err(VhdError::Unsupported(format!(
                "an export of {size} bytes, over the VHD limit of {MAX_DISK_SIZE}"
            )));
        }
        Ok(())
    }

    /// Nothing to read yet (`mark` adds).
    pub fn empty(size: u64, unit: u64, block_size: u64) -> Result<Plan> {
        Plan::check(size, unit, block_size)?;
        let n_units = size.div_ceil(unit);
        Ok(Plan {
            size,
            unit,
            block_size,
            units: vec![0u8; n_units.div_ceil(8) as usize],
            n_units,
            blocks: Vec::new(),
        })
    }

    /// Every unit (a full copy from a server that cannot tell what is allocated).
    pub fn all(size: u64, unit: u64, block_size: u64) -> Result<Plan> {
        let mut p = Plan::empty(size, unit, block_size)?;
        p.mark(0, size);
        p.finish();
        Ok(p)
    }

    /// The units a CBT bitmap marks. It must cover the disk; bits past the disk must be clear
    /// (a bitmap of another size means the log does not belong to this disk as it is now).
    pub fn from_changed(size: u64, unit: u64, block_size: u64, changed: &[u8]) -> Result<Plan> {
        let mut p = Plan::empty(size, unit, block_size)?;
        let need = p.units.len();
        if changed.len() < need {
            return Err(VhdError::BadRange(format!(
                "the changed-block bitmap has {} bytes; a disk of {size} bytes in units of {unit} needs {need}",
                changed.len()
            )));
        }
        let beyond = (p.n_units..changed.len() as u64 * 8).find(|&i| bit(changed, i));
        if let Some(i) = beyond {
            return Err(VhdError::BadRange(format!(
                "the changed-block bitmap marks unit {i}, past the end of a disk of {size} bytes"
            )));
        }
        p.units.copy_from_slice(&changed[..need]);
        p.finish();
        Ok(p)
    }

    /// Mark every unit `[start, start+len)` touches.
    pub fn mark(&mut self, start: u64, len: u64) {
        let end = start.saturating_add(len).min(self.size);
        if start >= end {
            return;
        }
        let (first, last) = (start / self.unit, (end - 1) / self.unit);
        for u in first..=last {
            self.units[(u >> 3) as usize] |= 0x80 >> (u & 7);
        }
    }

    /// Work out the blocks once the units are known.
    pub fn finish(&mut self) {
        let per = self.block_size / self.unit;
        let n_blocks = self.size.div_ceil(self.block_size);
        self.blocks = (0..n_blocks)
            .filter(|&b| {
                let first = b * per;
                let last = (first + per).min(self.n_units);
                self.any(first, last)
            })
            .map(|b| b as u32)
            .collect();
    }

    fn any(&self, first: u64, last: u64) -> bool {
        let mut u = first;
        while u < last {
            if u & 7 == 0 && u + 8 <= last {
                if self.units[(u >> 3) as usize] != 0 {
                    return true;
                }
                u += 8;
            } else {
                if bit(&self.units, u) {
                    return true;
                }
                u += 1;
            }
        }
        false
    }

    pub fn is_set(&self, u: u64) -> bool {
        u < self.n_units && bit(&self.units, u)
    }

    /// Runs of marked units of block `b`: (first unit, count), ascending.
    pub fn runs(&self, b: u32) -> Vec<(u64, u64)> {
        let per = self.block_size / self.unit;
        let first = u64::from(b) * per;
        let last = (first + per).min(self.n_units);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for u in first..last {
            if bit(&self.units, u) {
                match out.last_mut() {
                    Some((s, n)) if *s + *n == u => *n += 1,
                    _ => out.push((u, 1)),
                }
            }
        }
        out
    }

    /// Is every unit of block `b` (within the disk) marked?
    pub fn whole(&self, b: u32) -> bool {
        let per = self.block_size / self.unit;
        let first = u64::from(b) * per;
        let last = (first + per).min(self.n_units);
        (first..last).all(|u| bit(&self.units, u))
    }

    /// The byte range of unit `u`, clipped to the disk.
    pub fn unit_range(&self, u: u64) -> (u64, u64) {
        let start = u * self.unit;
        (start, (start + self.unit).min(self.size))
    }

    /// Marked units and the bytes they hold.
    pub fn totals(&self) -> (u64, u64) {
        let mut units = 0;
        let mut bytes = 0;
        for &b in &self.blocks {
            for (u, n) in self.runs(b) {
                units += n;
                bytes += self.unit_range(u + n - 1).1 - u * self.unit;
            }
        }
        (units, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn cbt_bitmap_msb_first() {
        // 8 MiB disk, 64 KiB units: 128 units, 16 bytes. Unit 0 and unit 33 (block 1).
        let mut bm = vec![0u8; 16];
        bm[0] = 0x80;
        bm[4] = 0x40;
        let p = Plan::from_changed(8 * MIB, 65536, 2 * MIB, &bm).unwrap();
        assert_eq!(p.blocks, vec![0, 1]);
        assert_eq!(p.runs(0), vec![(0, 1)]);
        assert_eq!(p.runs(1), vec![(33, 1)]);
        assert_eq!(p.totals(), (2, 2 * 65536));
        assert!(!p.whole(0));
    }

    #[test]
    fn bitmap_size_checks() {
        assert!(Plan::from_changed(8 * MIB, 65536, 2 * MIB, &[0u8; 15]).is_err());
        let mut long = vec![0u8; 17];
        assert!(Plan::from_changed(8 * MIB, 65536, 2 * MIB, &long).is_ok());
        long[16] = 1;
        let e = Plan::from_changed(8 * MIB, 65536, 2 * MIB, &long).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
    }

    #[test]
    fn marks_round_out_to_units_and_clip_to_the_disk() {
        let mut p = Plan::empty(3 * MIB + 512 * 3, 65536, 2 * MIB).unwrap();
        p.mark(65535, 2); // touches units 0 and 1
        p.mark(3 * MIB, 10 * MIB); // the last, partial unit
        p.finish();
        assert_eq!(p.blocks, vec![0, 1]);
        assert_eq!(p.runs(0), vec![(0, 2)]);
        assert_eq!(p.runs(1), vec![(48, 1)]);
        assert_eq!(p.unit_range(48), (3 * MIB, 3 * MIB + 1536));
        // Block 1 holds 17 units of the disk; one is marked.
        assert!(!p.whole(1));
        let all = Plan::all(3 * MIB + 1536, 65536, 2 * MIB).unwrap();
        assert!(all.whole(0) && all.whole(1));
        assert_eq!(all.totals(), (49, 3 * MIB + 1536));
    }

    #[test]
    fn size_rules() {
        assert!(Plan::empty(1000, 65536, 2 * MIB).is_err());
        assert!(Plan::empty(MIB, 1000, 2 * MIB).is_err());
        assert!(Plan::empty(MIB, 65536, 3 * MIB).is_err());
        assert!(Plan::empty(MIB, 4 * MIB, 2 * MIB).is_err());
        assert!(Plan::empty(4096 * 1024 * MIB, 65536, 2 * MIB).is_err());
        assert!(Plan::empty(0, 65536, 2 * MIB).is_ok());
    }
}
