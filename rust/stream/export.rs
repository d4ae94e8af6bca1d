//! Produce the stream XAPI's `vhd-tool stream` emits for `/export_raw_vdi?format=vhd`:
//! footer, header (table at 2048), one zero sector where the locator points, BAT, then each
//! included block in ascending index with an all-ones bitmap and its data materialised from
//! the chain, then the footer copy. Its length is known before the first byte.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use super::digest::block_digest;
use super::throttle::Throttle;
use super::StreamReport;
use crate::error::{IoContext, Result, VhdError};
use crate::format::geometry::Geometry;
use crate::format::header::{ParentLocator, PLAT_MACX};
use crate::format::{bat, new_uuid, DiskType, Footer, Header, FOOTER_SIZE};
use crate::image::{is_zero, Chain};

const TABLE_OFFSET: u64 = 2048;

/// Everything about a stream but its block data.
#[derive(Debug, Clone)]
pub struct StreamLayout {
    pub footer: Footer,
    pub header: Header,
    /// Included blocks, ascending.
    pub blocks: Vec<u32>,
}

impl StreamLayout {
    pub fn new(
        size: u64,
        block_size: u32,
        blocks: Vec<u32>,
        parent: Option<(&Footer, &Path)>,
    ) -> StreamLayout {
        let disk_type = if parent.is_some() {
            DiskType::Differencing
        } else {
            DiskType::Dynamic
        };
        let footer = Footer {
            creator_application: *b"caml",
            creator_version: 1,
            creator_host_os: 0,
            timestamp: 0,
            geometry: Geometry::for_size(size),
            ..Footer::new(disk_type, size, new_uuid(), 0)
        };
        let entries = crate::format::layout::blocks_needed(size, block_size) as u32;
        let mut header = Header::new(TABLE_OFFSET, entries, block_size);
        if let Some((pf, path)) = parent {
            header.parent_uuid = pf.uuid;
            header.parent_timestamp = crate::image::create::mtime_vhd(path);
            let name = path.display().to_string();
            header.set_parent_name(&name);
            header.locators[0] = ParentLocator {
                code: PLAT_MACX,
                data_space: 1,
                data_length: format!("file://{name}").len() as u32,
                reserved: 0,
                data_offset: 1536,
            };
        }
        StreamLayout {
            footer,
            header,
            blocks,
        }
    }

    fn block_len(&self) -> u64 {
        self.header.bitmap_bytes() + u64::from(self.header.block_size)
    }

    fn data_start(&self) -> u64 {
        TABLE_OFFSET + bat::padded_size(self.header.max_table_entries)
    }

    pub fn length(&self) -> u64 {
        self.data_start() + self.blocks.len() as u64 * self.block_len() + FOOTER_SIZE
    }

    /// Metadata up to the first block: footer, header, zero sector, BAT.
    pub fn prologue(&self) -> Vec<u8> {
        let mut entries = vec![crate::format::UNALLOCATED; self.header.max_table_entries as usize];
        let mut at = self.data_start();
        for &b in &self.blocks {
            entries[b as usize] = (at / 512) as u32;
            at += self.block_len();
        }
        let mut out = Vec::with_capacity(self.data_start() as usize);
        out.extend_from_slice(&self.footer.to_bytes());
        out.extend_from_slice(&self.header.to_bytes());
        out.resize(TABLE_OFFSET as usize, 0);
        out.extend_from_slice(&bat::to_bytes(&entries));
        out
    }
}

/// Identity of a chain layer, as vhd-tool keys them (UUID + file name).
fn layer_key(c: &Chain, i: usize) -> ([u8; 16], String) {
    let l = &c.layers[i];
    (
        l.footer.uuid,
        l.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}

/// The blocks a full (no base) or delta export includes. Delta: blocks allocated in any layer
/// on exactly one of the two chains (the symmetric difference), as vhd-tool chooses them;
/// sector bitmaps are never consulted.
pub fn choose_blocks(chain: &Chain, base: Option<&Chain>) -> Result<Vec<u32>> {
    let n = chain.block_count();
    let layers: Vec<(usize, bool)> = match base {
        None => (0..chain.layers.len()).map(|i| (i, true)).collect(),
        Some(b) => {
            if b.block_size() != chain.block_size() {
                return Err(VhdError::Unsupported(
                    "base and disk have different block sizes".into(),
                ));
            }
            let ours: HashSet<_> = (0..chain.layers.len())
                .map(|i| layer_key(chain, i))
                .collect();
            let theirs: HashSet<_> = (0..b.layers.len()).map(|i| layer_key(b, i)).collect();
            let mut v: Vec<(usize, bool)> = (0..chain.layers.len())
                .filter(|&i| !theirs.contains(&layer_key(chain, i)))
                .map(|i| (i, true))
                .collect();
            v.extend(
                (0..b.layers.len())
                    .filter(|&i| !ours.contains(&layer_key(b, i)))
                    .map(|i| (i, false)),
            );
            v
        }
    };
    Ok((0..n)
        .filter(|&blk| {
            layers.iter().any(|&(i, mine)| {
                if mine {
                    chain.layer_has_block(i, blk)
                } else {
                    base.is_some_and(|b| blk < b.block_count() && b.layer_has_block(i, blk))
                }
            })
        })
        .collect())
}

/// Plan an export. With `skip_zero_blocks` (full streams only: in a delta a zero block is a
/// change), blocks that read as all zeros are left out; that costs one extra read pass, done
/// here so the length is still known before the first byte.
pub fn plan(
    chain: &Chain,
    base: Option<(&Chain, &Path)>,
    skip_zero_blocks: bool,
) -> Result<StreamLayout> {
    let mut blocks = choose_blocks(chain, base.map(|b| b.0))?;
    if skip_zero_blocks && base.is_none() {
        let spb = u64::from(chain.block_size()) / 512;
        let mut buf = vec![0u8; chain.block_size() as usize];
        let mut kept = Vec::with_capacity(blocks.len());
        for b in blocks {
            chain.read_sectors(u64::from(b) * spb, &mut buf)?;
            if !is_zero(&buf) {
                kept.push(b);
            }
        }
        blocks = kept;
    }
    let parent = base.map(|(c, p)| (&c.leaf().footer, p));
    Ok(StreamLayout::new(
        chain.size(),
        chain.block_size(),
        blocks,
        parent,
    ))
}

/// Write a stream: `fill(block, bitmap, data)` provides each included block's content.
pub fn write_stream<W: Write>(
    layout: &StreamLayout,
    out: &mut W,
    rate_limit: Option<u64>,
    mut fill: impl FnMut(u32, &mut [u8], &mut [u8]) -> Result<()>,
) -> Result<StreamReport> {
    let mut report = StreamReport::new(
        layout.footer.disk_type,
        layout.footer.current_size,
        layout.header.block_size,
    );
    if layout.footer.disk_type == DiskType::Differencing {
        report.parent_uuid = Some(layout.header.parent_uuid);
    }
    let mut throttle = Throttle::new(rate_limit);
    let mut put = |buf: &[u8], report: &mut StreamReport| -> Result<()> {
        throttle.consume(buf.len());
        out.write_all(buf)
            .ctx(|| format!("cannot send the stream at byte {}", report.bytes_out))?;
        report.bytes_out += buf.len() as u64;
        Ok(())
    };
    put(&layout.prologue(), &mut report)?;
    let bm_len = layout.header.bitmap_bytes() as usize;
    // One buffer for bitmap + data, so each block goes out in a single write.
    let mut buf = vec![0u8; bm_len + layout.header.block_size as usize];
    for &b in &layout.blocks {
        let (bitmap, data) = buf.split_at_mut(bm_len);
        fill(b, bitmap, data)?;
        report.digests.push((b, block_digest(data)));
        put(&buf, &mut report)?;
        report.blocks += 1;
    }
    put(&layout.footer.to_bytes(), &mut report)?;
    out.flush().ctx(|| "cannot flush the stream".into())?;
    Ok(report)
}

/// Export `chain` (full, or delta against `base`) to `out`.
pub fn export<W: Write>(
    chain: &Chain,
    base: Option<(&Chain, &Path)>,
    out: &mut W,
    skip_zero_blocks: bool,
    rate_limit: Option<u64>,
) -> Result<StreamReport> {
    let layout = plan(chain, base, skip_zero_blocks)?;
    let spb = u64::from(chain.block_size()) / 512;
    let dropped = if skip_zero_blocks && base.is_none() {
        choose_blocks(chain, None)?.len() - layout.blocks.len()
    } else {
        0
    };
    let mut report = write_stream(&layout, out, rate_limit, |b, bitmap, data| {
        bitmap.fill(0xFF);
        chain.read_sectors(u64::from(b) * spb, data)
    })?;
    report.zero_blocks_dropped = dropped as u64;
    Ok(report)
}
