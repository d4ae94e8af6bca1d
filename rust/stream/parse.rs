//! Read a VHD stream forward-only, as XAPI's import does: footer at 0, header at the footer's
//! data offset, BAT at the header's table offset, then blocks in ascending file offset, then
//! the trailing footer. All metadata (both checksums, BAT bounds, order and overlaps) is
//! validated before the first block reaches the sink; memory is one block whatever the size.

use std::io::Read;

use super::digest::block_digest;
use super::StreamReport;
use crate::error::{Result, VhdError};
use crate::format::layout::{blocks_needed, check_table};
use crate::format::{bat, bitmap, DiskType, Footer, Header, FOOTER_SIZE, HEADER_SIZE, UNALLOCATED};

/// What a stream declares before its first block.
#[derive(Debug, Clone)]
pub struct StreamHead {
    pub footer: Footer,
    pub header: Header,
    /// (file offset, block index), ascending offset.
    pub blocks: Vec<(u64, u32)>,
}

/// Receives each block as it passes. Sectors beyond the virtual size must be ignored.
pub trait BlockSink {
    fn begin(&mut self, _head: &StreamHead) -> Result<()> {
        Ok(())
    }
    fn block(
        &mut self,
        index: u32,
        bitmap: &[u8],
        data: &[u8],
        report: &mut StreamReport,
    ) -> Result<()>;
}

/// A sink that only looks (used by `transform`).
pub struct NullSink;
impl BlockSink for NullSink {
    fn block(&mut self, _: u32, _: &[u8], _: &[u8], _: &mut StreamReport) -> Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ParseOptions {
    /// Total stream length when known (HTTP Content-Length); enables the tightest bounds.
    pub length: Option<u64>,
    /// XAPI's exports always carry full bitmaps: anything else is corruption.
    pub require_full_bitmaps: bool,
}

/// A reader that knows its position and can only move forward.
struct Forward<R: Read> {
    inner: R,
    pos: u64,
    scratch: Vec<u8>,
}

impl<R: Read> Forward<R> {
    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(VhdError::StreamLength {
                        detail: format!(
                            "ended at byte {} inside the {what}",
                            self.pos + done as u64
                        ),
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(VhdError::io(
                        format!("cannot read the stream at byte {}", self.pos + done as u64),
                        e,
                    ))
                }
            }
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn skip_to(&mut self, to: u64, what: &str) -> Result<()> {
        if to < self.pos {
            return Err(VhdError::StreamOrder {
                offset: to,
                detail: format!(
                    "the {what} lies behind the read position {} (streams are forward-only)",
                    self.pos
                ),
            });
        }
        while self.pos < to {
            let n = std::cmp::min(to - self.pos, self.scratch.len() as u64) as usize;
            let mut s = std::mem::take(&mut self.scratch);
            let r = self.read_exact(&mut s[..n], what);
            self.scratch = s;
            r?;
        }
        Ok(())
    }

    /// Read to EOF and return how many bytes there were and the last 512 of them.
    fn drain(&mut self) -> Result<(u64, Vec<u8>)> {
        let mut tail: Vec<u8> = Vec::with_capacity(1024);
        let mut total = 0u64;
        let mut s = std::mem::take(&mut self.scratch);
        loop {
            let n = match self.inner.read(&mut s) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(VhdError::io(
                        format!("cannot read the stream at byte {}", self.pos),
                        e,
                    ))
                }
            };
            total += n as u64;
            self.pos += n as u64;
            tail.extend_from_slice(&s[..n]);
            if tail.len() > 512 {
                tail.drain(..tail.len() - 512);
            }
        }
        self.scratch = s;
        Ok((total, tail))
    }
}

/// Parse the metadata at the head of a stream and validate it against itself.
fn read_head<R: Read>(r: &mut Forward<R>, opts: &ParseOptions) -> Result<(StreamHead, [u8; 512])> {
    let mut fb = [0u8; 512];
    r.read_exact(&mut fb, "footer")?;
    let footer = Footer::parse(&fb, 0)?;
    if footer.disk_type == DiskType::Fixed {
        return Err(VhdError::Unsupported(
            "a fixed VHD cannot be streamed forward-only".into(),
        ));
    }
    r.skip_to(footer.data_offset, "header")?;
    let mut hb = [0u8; 1024];
    r.read_exact(&mut hb, "header")?;
    let header = Header::parse(&hb, footer.data_offset)?;
    check_table(&footer, &header)?;
    let needed = blocks_needed(footer.current_size, header.block_size);
    let bat_len = bat::padded_size(header.max_table_entries);
    let meta_end = footer.data_offset + HEADER_SIZE;
    if header.table_offset < meta_end || header.table_offset % 512 != 0 {
        return Err(VhdError::StreamOrder {
            offset: header.table_offset,
            detail: format!(
                "the BAT must follow the header (ends at {meta_end}) on a sector boundary"
            ),
        });
    }
    if let Some(len) = opts.length {
        if header.table_offset + bat_len + FOOTER_SIZE > len {
            return Err(VhdError::Truncated {
                structure: "bat",
                offset: header.table_offset,
                expected: header.table_offset + bat_len + FOOTER_SIZE,
                file_size: len,
            });
        }
    }
    r.skip_to(header.table_offset, "BAT")?;
    let mut tb = vec![0u8; bat_len as usize];
    r.read_exact(&mut tb, "BAT")?;
    let entries = bat::parse(&tb, header.max_table_entries);
    let data_start = header.table_offset + bat_len;
    let block_len = header.bitmap_bytes() + u64::from(header.block_size);
    let mut blocks = Vec::new();
    for (i, &e) in entries.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let at = u64::from(e) * 512;
        let entry_at = header.table_offset + 4 * i as u64;
        let beyond_disk = i as u64 >= needed;
        let past_end = opts
            .length
            .is_some_and(|len| at + block_len > len - FOOTER_SIZE);
        if at < data_start || beyond_disk || past_end {
            return Err(VhdError::BatOutOfBounds {
                index: i as u32,
                offset: entry_at,
                block_offset: at,
                block_len,
                file_size: opts.length.map_or(u64::MAX, |l| l - FOOTER_SIZE),
            });
        }
        blocks.push((at, i as u32));
    }
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        if w[0].0 + block_len > w[1].0 {
            return Err(VhdError::BatOverlap {
                index: w[1].1,
                offset: header.table_offset + 4 * u64::from(w[1].1),
                block_offset: w[1].0,
                other: format!("block {} at byte {}", w[0].1, w[0].0),
            });
        }
    }
    Ok((
        StreamHead {
            footer,
            header,
            blocks,
        },
        fb,
    ))
}

/// Parse a whole stream, handing each block to `sink`. `bytes_in` counts every byte read.
pub fn parse<R: Read>(
    src: R,
    opts: ParseOptions,
    sink: &mut dyn BlockSink,
) -> Result<StreamReport> {
    let mut r = Forward {
        inner: src,
        pos: 0,
        scratch: vec![0u8; 1 << 20],
    };
    let (head, first_footer) = read_head(&mut r, &opts)?;
    let h = &head.header;
    let mut report = StreamReport::new(
        head.footer.disk_type,
        head.footer.current_size,
        h.block_size,
    );
    if head.footer.disk_type == DiskType::Differencing {
        report.parent_uuid = Some(h.parent_uuid);
    }
    sink.begin(&head)?;
    let bm_len = h.bitmap_bytes() as usize;
    let spb = h.sectors_per_block() as usize;
    let mut buf = vec![0u8; bm_len + h.block_size as usize];
    for &(at, index) in &head.blocks {
        r.skip_to(at, "block")?;
        r.read_exact(&mut buf[..bm_len], "block bitmap")?;
        if opts.require_full_bitmaps && !bitmap::is_full(&buf[..bm_len], spb) {
            return Err(VhdError::PartialBitmap {
                block: index,
                offset: at,
            });
        }
        r.read_exact(&mut buf[bm_len..], "block data")?;
        let (bitmap, data) = buf.split_at(bm_len);
        report.digests.push((index, block_digest(data)));
        sink.block(index, bitmap, data, &mut report)?;
        report.blocks += 1;
    }
    let tail = match opts.length {
        Some(len) => {
            r.skip_to(len - FOOTER_SIZE, "trailing footer")?;
            let mut t = vec![0u8; 512];
            r.read_exact(&mut t, "trailing footer")?;
            t
        }
        None => {
            let (n, t) = r.drain()?;
            if n < FOOTER_SIZE {
                return Err(VhdError::StreamLength {
                    detail: format!("ended at byte {} without a trailing footer", r.pos),
                });
            }
            t
        }
    };
    if tail[..] != first_footer[..] {
        return Err(VhdError::FooterMismatch {
            offset: r.pos - FOOTER_SIZE,
        });
    }
    report.bytes_in = r.pos;
    report.digests.sort_unstable_by_key(|d| d.0);
    Ok(report)
}

/// The metadata of a stream from its head (footer, header, BAT: at least `probe_length`'s
/// `head_len` bytes), validated as `parse` validates it; with `length`, every block is bounded
/// by it.
pub fn head_of(prefix: &[u8], length: Option<u64>) -> Result<StreamHead> {
    let mut r = Forward {
        inner: prefix,
        pos: 0,
        scratch: vec![0u8; 4096],
    };
    let opts = ParseOptions {
        length,
        require_full_bitmaps: false,
    };
    Ok(read_head(&mut r, &opts)?.0)
}

/// Read a stream's head from `src`, after the `have` bytes of it already read: returns the
/// bytes read (at least the head: footer, header, BAT) and the stream's total length, from
/// `probe_length`. A head over 64 MiB is refused (a BAT that size is a 2 TiB disk in 512-byte
/// blocks, far past XAPI's streams).
pub fn read_stream_head<R: Read>(src: &mut R, mut have: Vec<u8>) -> Result<(Vec<u8>, u64)> {
    loop {
        match probe_length(&have)? {
            HeadProbe::Complete { total_len, .. } => return Ok((have, total_len)),
            HeadProbe::NeedMore(n) => {
                if n > 64 << 20 {
                    return Err(VhdError::StreamLength {
                        detail: format!("a stream head of {n} bytes"),
                    });
                }
                let mut at = have.len();
                have.resize(n as usize, 0);
                while at < have.len() {
                    let got = match src.read(&mut have[at..]) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            return Err(VhdError::io(
                                format!("cannot read the stream at byte {at}"),
                                e,
                            ))
                        }
                    };
                    if got == 0 {
                        return Err(VhdError::StreamLength {
                            detail: format!("ended at byte {at} inside its head"),
                        });
                    }
                    at += got;
                }
            }
        }
    }
}

/// What the first bytes of a stream say about its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadProbe {
    /// Give at least this many bytes from the start of the stream.
    NeedMore(u64),
    /// The metadata (through the BAT) is `head_len` bytes; the whole stream is `total_len`.
    Complete { head_len: u64, total_len: u64 },
}

/// The total length of a stream from its head alone (footer, header, BAT), validated. XAPI's
/// export sends no `Content-Length` but its import needs one: reading the head first lets a
/// relay announce the length before forwarding the first byte.
pub fn probe_length(prefix: &[u8]) -> Result<HeadProbe> {
    if prefix.len() < 512 {
        return Ok(HeadProbe::NeedMore(512));
    }
    let footer = Footer::parse(prefix, 0)?;
    let hdr_end = footer.data_offset.saturating_add(HEADER_SIZE);
    if (prefix.len() as u64) < hdr_end {
        return Ok(HeadProbe::NeedMore(hdr_end));
    }
    let header = Header::parse(&prefix[footer.data_offset as usize..], footer.data_offset)?;
    check_table(&footer, &header)?;
    let head_len = header
        .table_offset
        .saturating_add(bat::padded_size(header.max_table_entries));
    if (prefix.len() as u64) < head_len {
        return Ok(HeadProbe::NeedMore(head_len));
    }
    let mut r = Forward {
        inner: &prefix[..head_len as usize],
        pos: 0,
        scratch: vec![0u8; 4096],
    };
    let (head, _) = read_head(&mut r, &ParseOptions::default())?;
    let block_len = head.header.bitmap_bytes() + u64::from(head.header.block_size);
    let data_end = head.blocks.last().map_or(head_len, |b| b.0 + block_len);
    Ok(HeadProbe::Complete {
        head_len,
        total_len: std::cmp::max(data_end, head_len) + FOOTER_SIZE,
    })
}
