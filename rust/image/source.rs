//! A readable virtual disk: a raw file or a VHD chain.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::Chain;
use crate::error::{IoContext, Result, VhdError};

pub enum Source {
    Raw {
        file: File,
        path: PathBuf,
        size: u64,
    },
    Vhd(Chain),
}

impl Source {
    pub fn open(path: &Path, format: &str, parents: &[PathBuf]) -> Result<Source> {
        match format {
            "raw" => {
                let file = File::open(path).opening(path)?;
                let size = file
                    .metadata()
                    .ctx(|| format!("cannot stat {}", path.display()))?
                    .len();
                Ok(Source::Raw {
                    file,
                    path: path.to_path_buf(),
                    size,
                })
            }
            "vhd" => Ok(Source::Vhd(Chain::open(path, parents, false)?)),
            other => Err(VhdError::Unsupported(format!(
                "source format {other:?} (raw or vhd)"
            ))),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Source::Raw { size, .. } => *size,
            Source::Vhd(c) => c.size(),
        }
    }

    /// Read at `offset`; bytes past the end of a raw file read as zeros.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::Vhd(c) => c.read_at(offset, buf),
            Source::Raw { file, path, size } => {
                let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..avail], offset)
                    .ctx(|| format!("cannot read {}", path.display()))?;
                buf[avail..].fill(0);
                Ok(())
            }
        }
    }

    /// Could the range hold data? (False only where a VHD chain has no block at all.)
    pub fn may_have_data(&self, offset: u64, len: u64) -> bool {
        match self {
            Source::Raw { .. } => true,
            Source::Vhd(c) => {
                let bs = u64::from(c.block_size());
                let first = offset / bs;
                let last = (offset + len.max(1) - 1) / bs;
                (first..=last).any(|b| (0..c.layers.len()).any(|l| c.layer_has_block(l, b as u32)))
            }
        }
    }
}
