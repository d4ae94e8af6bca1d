//! Resuming a stream at its block K (in stream order, i.e. ascending file offset).
//!
//! XAPI's import writes only the blocks a stream carries into a VDI that keeps everything else
//! (vhd.md 1.5), and writing a block again is harmless. So after a cut, a second import that
//! carries only blocks K.. completes the disk: the stream "minus its first K blocks" is the
//! same prologue (footer, header, BAT) with the BAT entries of blocks 0..K unallocated and the
//! others moved down by the bytes removed, then the original bytes from block K's offset to the
//! end, trailing footer included. Its length is known from the head alone.
//!
//! [`Cut`] is that plan, made from the head; [`Tally`] is where a transfer counts the blocks
//! that have passed, for a caller to record where to resume from.

use std::sync::atomic::{AtomicU64, Ordering};

use super::parse::head_of;
use crate::error::{Result, VhdError};
use crate::format::{bat, FOOTER_SIZE, UNALLOCATED};

/// Counters a caller reads while a transfer runs.
#[derive(Debug, Default)]
pub struct Tally {
    /// Blocks passed completely, counted in stream order from the first block of the whole
    /// export: written in full to the output (or, before the resume point, read and digested
    /// and deliberately not sent). Only grows.
    pub position: AtomicU64,
    /// The stream's block count, once known (0 before).
    pub blocks: AtomicU64,
    /// Bytes written to the output so far (what a resumed transfer leaves out is not).
    pub sent: AtomicU64,
}

impl Tally {
    pub fn set_blocks(&self, n: u64) {
        self.blocks.store(n, Ordering::Relaxed);
    }

    pub fn add_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Record that the first `k` blocks have passed (never moves back).
    pub fn passed(&self, k: u64) {
        self.position.fetch_max(k, Ordering::Relaxed);
    }
}

/// A stream's block boundaries and how it is cut to resume at block `from`.
#[derive(Debug, Clone)]
pub struct Cut {
    /// K: the first block (stream order) the output carries.
    pub from: u64,
    /// Each block's offset in the stream, ascending (stream order).
    starts: Vec<u64>,
    block_len: u64,
    total: u64,
    /// Where the BAT is in the stream, and its bytes as the import gets them (edited when K > 0).
    table_offset: u64,
    bat: Vec<u8>,
    /// Bytes of footer, header and BAT: the head `new` was given at least.
    head_len: u64,
}

/// What a pass-through leaves out of its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The stream minus its first K blocks (an import): BAT edited, `[block 0, block K)` out.
    Import,
    /// Only the bytes from block K's offset on (a file that already holds the rest).
    Tail,
}

impl Cut {
    /// The plan for a stream of `total` bytes whose head (footer, header, BAT: at least
    /// `probe_length`'s `head_len` bytes) is `head`, resumed at block `from`. A `from` past the
    /// stream's block count is `bad_range`; `from` equal to it leaves only prologue and footer.
    pub fn new(head: &[u8], total: u64, from: u64) -> Result<Cut> {
        let h = head_of(head, Some(total))?;
        let n = h.blocks.len() as u64;
        if from > n {
            return Err(VhdError::BadRange(format!(
                "resume point {from} beyond the stream's {n} blocks"
            )));
        }
        let starts: Vec<u64> = h.blocks.iter().map(|b| b.0).collect();
        let table_offset = h.header.table_offset;
        let bat_len = bat::padded_size(h.header.max_table_entries);
        let mut cut = Cut {
            from,
            starts,
            block_len: h.header.bitmap_bytes() + u64::from(h.header.block_size),
            total,
            table_offset,
            bat: Vec::new(),
            head_len: table_offset + bat_len,
        };
        if from > 0 {
            let at_k = cut.start(from);
            let removed = cut.removed();
            let range = table_offset as usize..(table_offset + bat_len) as usize;
            let mut entries = bat::parse(&head[range], h.header.max_table_entries);
            for e in entries.iter_mut().filter(|e| **e != UNALLOCATED) {
                let at = u64::from(*e) * 512;
                *e = if at < at_k {
                    UNALLOCATED
                } else {
                    // Both offsets are whole sectors: the difference is too.
                    ((at - removed) / 512) as u32
                };
            }
            cut.bat = bat::to_bytes(&entries);
        }
        Ok(cut)
    }

    /// Bytes of the head: footer, header and BAT (block 0 is at or after it).
    pub fn head_len(&self) -> u64 {
        self.head_len
    }

    /// N: the blocks the whole stream carries.
    pub fn blocks(&self) -> u64 {
        self.starts.len() as u64
    }

    /// The whole stream's length.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Offset of block `k` (stream order) in the whole stream; for `k` = N, the trailing
    /// footer's.
    pub fn start(&self, k: u64) -> u64 {
        self.starts
            .get(k as usize)
            .copied()
            .unwrap_or(self.total - FOOTER_SIZE)
    }

    /// Offset just past block `k`'s last byte.
    pub fn end(&self, k: u64) -> u64 {
        self.start(k) + self.block_len
    }

    /// Offset of block K: where the resumed part of the stream begins.
    pub fn resume_at(&self) -> u64 {
        self.start(self.from)
    }

    /// Bytes the import stream leaves out: `[block 0, block K)`.
    pub fn removed(&self) -> u64 {
        self.resume_at() - self.start(0)
    }

    /// The length of the stream minus its first K blocks (an import's Content-Length).
    pub fn length(&self) -> u64 {
        self.total - self.removed()
    }

    /// The byte range `keep` leaves out of the output.
    pub fn skipped(&self, keep: Keep) -> (u64, u64) {
        match keep {
            _ if self.from == 0 => (0, 0),
            Keep::Import => (self.start(0), self.resume_at()),
            Keep::Tail => (0, self.resume_at()),
        }
    }

    /// The BAT as an import resumed at K gets it: its stream range and bytes (None when K = 0:
    /// sent as read).
    pub fn edited_bat(&self) -> Option<(u64, &[u8])> {
        (!self.bat.is_empty()).then_some((self.table_offset, &self.bat[..]))
    }

    /// Overwrite the part of `buf` (stream bytes from offset `at`) that holds the BAT with the
    /// edited one: how a prologue read from a file becomes the resumed stream's.
    pub fn patch(&self, buf: &mut [u8], at: u64) {
        let Some((t, b)) = self.edited_bat() else {
            return;
        };
        let (s, e) = (t.max(at), (t + b.len() as u64).min(at + buf.len() as u64));
        if s < e {
            buf[(s - at) as usize..(e - at) as usize]
                .copy_from_slice(&b[(s - t) as usize..(e - t) as usize]);
        }
    }
}
