//! Conversions between raw images and VHD files (fixed or dynamic; zero blocks never allocated).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::create::{create, create_fixed};
use super::{is_zero, Source, VhdFile};
use crate::error::{IoContext, Result, VhdError};

/// Writes one block's worth of content at a virtual offset into the output.
type BlockWriter = Box<dyn FnMut(u64, &[u8]) -> Result<()>>;

#[derive(Debug, Default, Clone)]
pub struct ConvertReport {
    pub virtual_size: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub blocks_written: u64,
    pub zero_blocks_skipped: u64,
}

pub fn convert(
    src: &Path,
    dst: &Path,
    src_format: &str,
    dst_format: &str,
    parents: &[PathBuf],
    block_size: u32,
) -> Result<ConvertReport> {
    let source = Source::open(src, src_format, parents)?;
    // A VHD's size is whole sectors: a raw file of another length is padded with zeros.
    let size = source.size().div_ceil(512) * 512;
    let bs = match (&source, dst_format) {
        (Source::Vhd(c), "dynamic") if block_size == crate::format::DEFAULT_BLOCK_SIZE => {
            c.block_size()
        }
        _ => block_size,
    };
    let mut report = ConvertReport {
        virtual_size: size,
        ..Default::default()
    };
    let mut buf = vec![0u8; bs as usize];
    let mut out: BlockWriter = match dst_format {
        "raw" => {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dst)
                .ctx(|| format!("cannot create {}", dst.display()))?;
            f.set_len(source.size())
                .ctx(|| format!("cannot size {}", dst.display()))?;
            let path = dst.to_path_buf();
            Box::new(move |off, data| {
                f.write_all_at(data, off)
                    .ctx(|| format!("cannot write {}", path.display()))
            })
        }
        "fixed" => {
            create_fixed(dst, size)?;
            let f = VhdFile::open(dst, true)?;
            Box::new(move |off, data| f.write_all_at(data, off))
        }
        "dynamic" => {
            create(dst, size, bs, None, None)?;
            let mut f = VhdFile::open(dst, true)?;
            let bsz = u64::from(bs);
            Box::new(move |off, data| f.write_block_sectors((off / bsz) as u32, 0, data))
        }
        other => {
            return Err(VhdError::Unsupported(format!(
                "output format {other:?} (raw, dynamic or fixed)"
            )))
        }
    };
    let mut off = 0u64;
    while off < size {
        let n = std::cmp::min(u64::from(bs), size - off) as usize;
        let chunk = &mut buf[..n];
        if !source.may_have_data(off, n as u64) {
            report.zero_blocks_skipped += 1;
            off += n as u64;
            continue;
        }
        source.read_at(off, chunk)?;
        report.bytes_read += n as u64;
        if is_zero(chunk) {
            report.zero_blocks_skipped += 1;
        } else {
            let limit = if dst_format == "raw" {
                source.size().saturating_sub(off).min(n as u64) as usize
            } else {
                n
            };
            out(off, &chunk[..limit])?;
            report.bytes_written += limit as u64;
            report.blocks_written += 1;
        }
        off += n as u64;
    }
    Ok(report)
}
