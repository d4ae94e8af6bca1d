//! A differencing chain (leaf first) read sector-exactly and written at the leaf.

use std::path::{Path, PathBuf};

use super::file::VhdFile;
use crate::error::{Result, VhdError};
use crate::format::header::{PLAT_MACX, PLAT_W2KU, PLAT_W2RU};
use crate::format::{bitmap, uuid_to_string, DiskType};

/// Deeper than any SR allows (XAPI refuses at 30); stops a crafted self-referencing chain.
pub const MAX_CHAIN_DEPTH: usize = 64;
/// Locator data longer than this is not a path.
const MAX_LOCATOR_DATA: u64 = 64 * 1024;

#[derive(Debug)]
pub struct Chain {
    /// Leaf first.
    pub layers: Vec<VhdFile>,
}

impl Chain {
    /// Open `path` and its ancestors. `parents` names them explicitly (nearest first); any
    /// ancestor not named is found through the locators. Every link's UUID is checked.
    pub fn open(path: &Path, parents: &[PathBuf], writable_leaf: bool) -> Result<Chain> {
        let mut layers = vec![VhdFile::open(path, writable_leaf)?];
        while layers
            .last()
            .is_some_and(|l| l.disk_type() == DiskType::Differencing)
        {
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(VhdError::Unsupported(format!(
                    "chain deeper than {MAX_CHAIN_DEPTH}"
                )));
            }
            let child = layers.last().expect("non-empty");
            let parent_path = match parents.get(layers.len() - 1) {
                Some(p) => p.clone(),
                None => locate_parent(child)?,
            };
            let parent = VhdFile::open(&parent_path, false)?;
            let expected = child
                .header
                .as_ref()
                .map(|h| h.parent_uuid)
                .unwrap_or_default();
            if parent.footer.uuid != expected {
                return Err(VhdError::ParentMismatch {
                    child: child.path.display().to_string(),
                    parent: parent_path.display().to_string(),
                    expected: uuid_to_string(&expected),
                    found: uuid_to_string(&parent.footer.uuid),
                });
            }
            layers.push(parent);
        }
        Ok(Chain { layers })
    }

    pub fn leaf(&self) -> &VhdFile {
        &self.layers[0]
    }

    pub fn leaf_mut(&mut self) -> &mut VhdFile {
        &mut self.layers[0]
    }

    pub fn size(&self) -> u64 {
        self.leaf().size()
    }

    pub fn block_size(&self) -> u32 {
        self.leaf().block_size()
    }

    pub fn block_count(&self) -> u32 {
        self.leaf().block_count()
    }

    /// Does any layer hold data for leaf-block `block`? (Block choice of a full export.)
    pub fn layer_has_block(&self, layer: usize, block: u32) -> bool {
        let bs = u64::from(self.block_size());
        let (start, end) = (u64::from(block) * bs, (u64::from(block) + 1) * bs);
        let l = &self.layers[layer];
        if start >= l.size() {
            return false;
        }
        let lbs = u64::from(l.block_size());
        let (first, last) = (start / lbs, (end.min(l.size()) - 1) / lbs);
        (first..=last).any(|b| l.is_allocated(b as u32))
    }

    /// Read `buf.len()` bytes of virtual content at `offset` (any alignment).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size()) {
            return Err(VhdError::BadRange(format!(
                "read of {} bytes at {offset} is beyond the virtual size {}",
                buf.len(),
                self.size()
            )));
        }
        let head = (offset % 512) as usize;
        let mut pos = 0usize;
        let mut at = offset;
        if head != 0 || buf.len() < 512 {
            let mut sector = [0u8; 512];
            self.read_sectors(at / 512, &mut sector)?;
            let n = std::cmp::min(512 - head, buf.len());
            buf[..n].copy_from_slice(&sector[head..head + n]);
            pos = n;
            at += n as u64;
        }
        let whole = (buf.len() - pos) / 512 * 512;
        if whole > 0 {
            self.read_sectors(at / 512, &mut buf[pos..pos + whole])?;
            pos += whole;
            at += whole as u64;
        }
        if pos < buf.len() {
            let mut sector = [0u8; 512];
            self.read_sectors(at / 512, &mut sector)?;
            let n = buf.len() - pos;
            buf[pos..].copy_from_slice(&sector[..n]);
        }
        Ok(())
    }

    /// Read whole sectors starting at virtual sector `first` (`out.len()` a multiple of 512).
    pub fn read_sectors(&self, first: u64, out: &mut [u8]) -> Result<()> {
        self.resolve(0, first, out)
    }

    /// The content of layer `i` and below for sectors `[start, start + out.len()/512)`, using
    /// the bitmap semantics of the spec: in a differencing disk a clear bit (or an unallocated
    /// block) defers to the parent; in a dynamic disk it reads as zero.
    fn resolve(&self, i: usize, start: u64, out: &mut [u8]) -> Result<()> {
        let Some(layer) = self.layers.get(i) else {
            out.fill(0);
            return Ok(());
        };
        let n = out.len() as u64 / 512;
        let size_sectors = layer.size().div_ceil(512);
        let inside = if start >= size_sectors {
            0
        } else {
            std::cmp::min(n, size_sectors - start)
        };
        out[(inside * 512) as usize..].fill(0);
        let spb = u64::from(layer.block_size()) / 512;
        let bitmap_len = layer.bitmap_bytes();
        let mut bm = Vec::new();
        let mut s = start;
        let end = start + inside;
        while s < end {
            let block = (s / spb) as u32;
            let in_blk = s % spb;
            let cnt = std::cmp::min(spb - in_blk, end - s);
            let lo = ((s - start) * 512) as usize;
            let piece = &mut out[lo..lo + (cnt * 512) as usize];
            match (layer.disk_type(), layer.block_offset(block)) {
                (DiskType::Fixed, _) => layer.read_exact_at(piece, s * 512)?,
                (DiskType::Dynamic, None) => piece.fill(0),
                (_, None) => self.resolve(i + 1, s, piece)?,
                (kind, Some(at)) => {
                    bm.resize(bitmap_len as usize, 0);
                    layer.read_exact_at(&mut bm, at)?;
                    for (rs, rl, set) in bitmap::runs(&bm, in_blk as usize, (in_blk + cnt) as usize)
                    {
                        let off = (rs as u64 - in_blk) as usize * 512;
                        let sub = &mut piece[off..off + rl * 512];
                        if set {
                            layer.read_exact_at(sub, at + bitmap_len + rs as u64 * 512)?;
                        } else if kind == DiskType::Dynamic {
                            sub.fill(0);
                        } else {
                            self.resolve(i + 1, u64::from(block) * spb + rs as u64, sub)?;
                        }
                    }
                }
            }
            s += cnt;
        }
        Ok(())
    }

    /// Write `data` at virtual `offset` into the leaf (any alignment: partial sectors are
    /// completed from the chain's current content).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > self.size()) {
            return Err(VhdError::BadRange(format!(
                "write of {} bytes at {offset} is beyond the virtual size {}",
                data.len(),
                self.size()
            )));
        }
        let mut pos = 0usize;
        let mut at = offset;
        while pos < data.len() {
            let head = (at % 512) as usize;
            if head != 0 || data.len() - pos < 512 {
                let mut sector = [0u8; 512];
                self.read_sectors(at / 512, &mut sector)?;
                let n = std::cmp::min(512 - head, data.len() - pos);
                sector[head..head + n].copy_from_slice(&data[pos..pos + n]);
                self.write_sectors(at / 512, &sector)?;
                pos += n;
                at += n as u64;
            } else {
                let whole = (data.len() - pos) / 512 * 512;
                self.write_sectors(at / 512, &data[pos..pos + whole])?;
                pos += whole;
                at += whole as u64;
            }
        }
        Ok(())
    }

    /// Write whole sectors into the leaf, block by block.
    pub fn write_sectors(&mut self, first: u64, data: &[u8]) -> Result<()> {
        let spb = u64::from(self.block_size()) / 512;
        let n = data.len() as u64 / 512;
        let mut s = first;
        while s < first + n {
            let block = (s / spb) as u32;
            let in_blk = s % spb;
            let cnt = std::cmp::min(spb - in_blk, first + n - s);
            let lo = ((s - first) * 512) as usize;
            self.leaf_mut().write_block_sectors(
                block,
                in_blk,
                &data[lo..lo + (cnt * 512) as usize],
            )?;
            s += cnt;
        }
        Ok(())
    }
}

/// Find a differencing disk's parent: locators first (MacX, then W2RU, then W2KU), then the
/// header's unicode name; relative paths are relative to the child's folder.
pub fn locate_parent(child: &VhdFile) -> Result<PathBuf> {
    let Some(h) = child.header.as_ref() else {
        return Err(VhdError::NotDifferencing {
            path: child.path.display().to_string(),
        });
    };
    let dir = child
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    for code in [PLAT_MACX, PLAT_W2RU, PLAT_W2KU] {
        for l in h.locators.iter().filter(|l| l.code == code) {
            let len = u64::from(l.data_length)
                .min(l.space_bytes())
                .min(MAX_LOCATOR_DATA);
            if len == 0
                || l.data_offset
                    .checked_add(len)
                    .is_none_or(|e| e > child.file_size)
            {
                continue;
            }
            let mut data = vec![0u8; len as usize];
            child.read_exact_at(&mut data, l.data_offset)?;
            if let Some(p) = l.decode(&data) {
                candidates.push(p);
            }
        }
    }
    let name = h.parent_name_string();
    if !name.is_empty() {
        candidates.push(name.clone());
        // blktap stores a basename; ocaml-vhd an absolute path that may have moved with the SR.
        if let Some(base) = Path::new(&name).file_name() {
            candidates.push(base.to_string_lossy().into_owned());
        }
    }
    for c in candidates {
        let p = Path::new(&c);
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        };
        if full.is_file() {
            return Ok(full);
        }
        tried.push(full.display().to_string());
    }
    Err(VhdError::ParentNotFound {
        child: child.path.display().to_string(),
        detail: if tried.is_empty() {
            "no parent locator or parent name".into()
        } else {
            format!("tried {}", tried.join(", "))
        },
    })
}
