//! Import semantics (`vhd-tool serve`): write only the sectors whose bitmap bit is set, at
//! their virtual offset, into a raw file or the leaf of a VHD chain. Clear sectors and absent
//! blocks leave the target as it was, which is what makes a delta land on a copy of its base.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

use super::parse::{parse, BlockSink, ParseOptions, StreamHead};
use super::StreamReport;
use crate::error::{IoContext, Result, VhdError};
use crate::format::bitmap;
use crate::image::Chain;

/// Where the sectors go.
pub enum Target {
    Raw(File),
    Vhd(Chain),
}

struct ApplySink {
    target: Target,
    size: u64,
}

impl ApplySink {
    fn write_run(&mut self, first_sector: u64, data: &[u8]) -> Result<()> {
        match &mut self.target {
            Target::Raw(f) => f
                .write_all_at(data, first_sector * 512)
                .ctx(|| format!("cannot write the target at byte {}", first_sector * 512)),
            Target::Vhd(c) => c.write_sectors(first_sector, data),
        }
    }
}

impl BlockSink for ApplySink {
    fn begin(&mut self, head: &StreamHead) -> Result<()> {
        let size = head.footer.current_size;
        match &mut self.target {
            Target::Raw(f) => {
                // A raw target grows to the stream's size (a new file is sparse zeros).
                let len = f.metadata().ctx(|| "cannot stat the target".into())?.len();
                if len < size {
                    f.set_len(size).ctx(|| "cannot extend the target".into())?;
                }
            }
            Target::Vhd(c) => {
                if size > c.size() {
                    return Err(VhdError::SizeMismatch(format!(
                        "the stream's disk is {size} bytes, larger than the target's {}",
                        c.size()
                    )));
                }
            }
        }
        self.size = size;
        Ok(())
    }

    fn block(
        &mut self,
        index: u32,
        bm: &[u8],
        data: &[u8],
        report: &mut StreamReport,
    ) -> Result<()> {
        let spb = (data.len() / 512) as u64;
        let base = u64::from(index) * spb;
        // Sectors past the virtual size (a partial last block) are never written.
        let limit = std::cmp::min(spb, (self.size / 512).saturating_sub(base)) as usize;
        for (start, len, set) in bitmap::runs(bm, 0, limit) {
            if set {
                self.write_run(base + start as u64, &data[start * 512..(start + len) * 512])?;
                report.sectors_written += len as u64;
                report.bytes_out += len as u64 * 512;
            }
        }
        Ok(())
    }
}

/// Apply a stream read from `src` to `target`; with `durable`, the data is on stable storage
/// when this returns (fsync), else it may still sit in the page cache.
pub fn apply<R: Read>(
    src: R,
    target: Target,
    opts: ParseOptions,
    durable: bool,
) -> Result<StreamReport> {
    let mut sink = ApplySink { target, size: 0 };
    let report = parse(src, opts, &mut sink)?;
    if durable {
        match &sink.target {
            Target::Raw(f) => f.sync_data().ctx(|| "cannot sync the target".into())?,
            Target::Vhd(c) => c.leaf().sync()?,
        }
    }
    Ok(report)
}
