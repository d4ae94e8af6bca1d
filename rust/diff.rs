//! Compare two images (raw or VHD) into a map of changed units, and turn such a map into a
//! differencing stream that, applied onto the first image, yields the second.

use std::collections::HashSet;
use std::io::Write;

use crate::error::{Result, VhdError};
use crate::format::{bitmap, DiskType, Footer};
use crate::image::{Chain, Source};
use crate::stream::export::{write_stream, StreamLayout};
use crate::stream::StreamReport;

#[derive(Debug, Clone)]
pub struct DiffReport {
    pub granularity: u64,
    pub virtual_size: u64,
    pub units: u64,
    /// Indices of changed units, ascending.
    pub changed: Vec<u64>,
    pub bytes_compared: u64,
}

impl DiffReport {
    pub fn changed_bytes(&self) -> u64 {
        self.changed
            .iter()
            .map(|&u| std::cmp::min(self.granularity, self.virtual_size - u * self.granularity))
            .sum()
    }
}

/// Read `buf.len()` bytes at `offset`; whatever lies past the source's end reads as zeros.
fn read_padded(s: &Source, offset: u64, buf: &mut [u8]) -> Result<()> {
    let avail = s.size().saturating_sub(offset).min(buf.len() as u64) as usize;
    if avail > 0 && s.may_have_data(offset, avail as u64) {
        s.read_at(offset, &mut buf[..avail])?;
    } else {
        buf[..avail].fill(0);
    }
    buf[avail..].fill(0);
    Ok(())
}

/// Blocks that may differ between two nodes of one chain family: those allocated in a layer
/// that only one of them has. `None` when the two share no layer (compare everything).
fn candidate_blocks(a: &Chain, b: &Chain) -> Option<HashSet<u64>> {
    if a.block_size() != b.block_size() {
        return None;
    }
    let key = |c: &Chain, i: usize| c.layers[i].footer.uuid;
    let ka: HashSet<_> = (0..a.layers.len()).map(|i| key(a, i)).collect();
    let kb: HashSet<_> = (0..b.layers.len()).map(|i| key(b, i)).collect();
    if ka.is_disjoint(&kb) {
        return None;
    }
    let mut out = HashSet::new();
    for (c, other) in [(a, &kb), (b, &ka)] {
        for i in (0..c.layers.len()).filter(|&i| !other.contains(&key(c, i))) {
            out.extend(
                (0..c.block_count())
                    .filter(|&blk| c.layer_has_block(i, blk))
                    .map(u64::from),
            );
        }
    }
    Some(out)
}

pub fn diff(a: &Source, b: &Source, granularity: u64) -> Result<DiffReport> {
    if !granularity.is_power_of_two() || !(512..=(256 << 20)).contains(&granularity) {
        return Err(VhdError::BadRange(format!(
            "granularity {granularity} is not a power of two from 512 B to 256 MiB"
        )));
    }
    let size = std::cmp::max(a.size(), b.size());
    let chunk = std::cmp::max(granularity, 2 << 20);
    let candidates = match (a, b) {
        (Source::Vhd(x), Source::Vhd(y)) => candidate_blocks(x, y).map(|mut c| {
            // Past the shorter disk's end, the longer one's shared layers are no longer shared.
            let bs = u64::from(x.block_size());
            let short = std::cmp::min(a.size(), b.size());
            c.extend(short / bs..size.div_ceil(bs));
            (c, bs)
        }),
        _ => None,
    };
    let mut ba = vec![0u8; chunk as usize];
    let mut bb = vec![0u8; chunk as usize];
    let mut report = DiffReport {
        granularity,
        virtual_size: size,
        units: size.div_ceil(granularity),
        changed: Vec::new(),
        bytes_compared: 0,
    };
    let mut off = 0;
    while off < size {
        let n = std::cmp::min(chunk, size - off);
        let skip = match &candidates {
            Some((set, bs)) => (off / bs..=(off + n - 1) / bs).all(|blk| !set.contains(&blk)),
            None => !a.may_have_data(off, n) && !b.may_have_data(off, n),
        };
        if !skip {
            read_padded(a, off, &mut ba[..n as usize])?;
            read_padded(b, off, &mut bb[..n as usize])?;
            report.bytes_compared += n;
            let mut u = 0;
            while u < n {
                let m = std::cmp::min(granularity, n - u) as usize;
                let r = u as usize..u as usize + m;
                if ba[r.clone()] != bb[r] {
                    report.changed.push((off + u) / granularity);
                }
                u += granularity;
            }
        }
        off += n;
    }
    Ok(report)
}

/// A differencing stream of `b`'s changed units (bitmap bits only for them), to apply onto
/// `a`'s content. The stream's block size is `b`'s (2 MiB for raw).
pub fn diff_stream<W: Write>(
    a: &Source,
    b: &Source,
    granularity: u64,
    out: &mut W,
) -> Result<(DiffReport, StreamReport)> {
    let d = diff(a, b, granularity)?;
    let bs: u32 = match b {
        Source::Vhd(c) => c.block_size(),
        Source::Raw { .. } => crate::format::DEFAULT_BLOCK_SIZE,
    };
    if u64::from(bs) % granularity != 0 && granularity % u64::from(bs) != 0 {
        return Err(VhdError::BadRange(format!(
            "granularity {granularity} does not divide block size {bs}"
        )));
    }
    let size = b.size().div_ceil(512) * 512;
    let bsz = u64::from(bs);
    // Changed byte ranges grouped by stream block.
    let mut per_block: Vec<(u32, Vec<(u64, u64)>)> = Vec::new();
    for &u in &d.changed {
        let (mut s, end) = (u * granularity, std::cmp::min((u + 1) * granularity, size));
        while s < end {
            let blk = (s / bsz) as u32;
            let e = std::cmp::min(end, (u64::from(blk) + 1) * bsz);
            match per_block.last_mut() {
                Some((b0, v)) if *b0 == blk => v.push((s, e)),
                _ => per_block.push((blk, vec![(s, e)])),
            }
            s = e;
        }
    }
    // A raw base has no VHD identity: the stream names it but carries a zero parent UUID.
    let no_identity = Footer::new(DiskType::Dynamic, 0, [0; 16], 0);
    let parent = match a {
        Source::Vhd(c) => (&c.leaf().footer, c.leaf().path.as_path()),
        Source::Raw { path, .. } => (&no_identity, path.as_path()),
    };
    let layout = StreamLayout::new(
        size,
        bs,
        per_block.iter().map(|(b, _)| *b).collect(),
        Some(parent),
    );
    let mut next = per_block.iter();
    let r = write_stream(&layout, out, None, |blk, bm, data| {
        let Some((_, ranges)) = next.next() else {
            return Err(VhdError::Unsupported(format!(
                "block {blk} was not planned"
            )));
        };
        let base = u64::from(blk) * bsz;
        read_padded(b, base, data)?;
        bm.fill(0);
        for &(s, e) in ranges {
            bitmap::set_range(
                bm,
                ((s - base) / 512) as usize,
                (e - s).div_ceil(512) as usize,
            );
        }
        Ok(())
    })?;
    Ok((d, r))
}
