//! Pass a stream through unchanged while validating it, digesting every block and holding a
//! byte-rate limit. The bytes are written out as they are read (one block of buffer), so the
//! output's length equals the input's and can be announced before the first byte.
//!
//! `transform_cut` is the variant that resumes: the parser still reads (validates, digests)
//! the whole original stream while the output gets it minus its first K blocks (see
//! `resume`), and a [`Tally`] counts the blocks as they pass.

use std::io::{Read, Write};

use super::parse::{parse, BlockSink, NullSink, ParseOptions};
use super::resume::{Cut, Keep, Tally};
use super::throttle::Throttle;
use super::StreamReport;
use crate::error::Result;

/// How a pass-through edits what it sends and where it counts blocks.
pub struct Pass<'a> {
    pub cut: &'a Cut,
    pub keep: Keep,
    pub tally: Option<&'a Tally>,
    /// Added to the blocks counted here (a stream that itself starts at block K of an export).
    pub base: u64,
}

/// Writes what it reads from `inner` to `out` (edited per `pass`); `consume` blocks the
/// reader when over rate.
struct Tee<'a, R: Read, W: Write> {
    inner: R,
    out: &'a mut W,
    throttle: Throttle,
    written: u64,
    error: Option<std::io::Error>,
    /// Input bytes read so far.
    pos: u64,
    pass: Option<&'a Pass<'a>>,
    skip: (u64, u64),
    bat: Option<(u64, &'a [u8])>,
    /// The next block (stream order) whose end has not been read yet.
    next: u64,
}

impl<R: Read, W: Write> Tee<'_, R, W> {
    /// Write one piece of output (held to the rate limit), and count it.
    fn put(&mut self, piece: &[u8]) -> std::io::Result<()> {
        self.throttle.consume(piece.len());
        self.out.write_all(piece)?;
        self.written += piece.len() as u64;
        if let Some(t) = self.pass.and_then(|p| p.tally) {
            t.add_sent(piece.len() as u64);
        }
        Ok(())
    }

    /// Send input bytes `buf` (at stream offset `self.pos`): skipped ranges left out, the BAT
    /// replaced.
    fn emit(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let (start, end) = (self.pos, self.pos + buf.len() as u64);
        let bat = self.bat;
        let (t0, t1) = bat.map_or((u64::MAX, u64::MAX), |(t, b)| (t, t + b.len() as u64));
        let mut at = start;
        while at < end {
            let next = [self.skip.0, self.skip.1, t0, t1]
                .into_iter()
                .filter(|&b| b > at && b < end)
                .min()
                .unwrap_or(end);
            if !(self.skip.0..self.skip.1).contains(&at) {
                let piece = match bat {
                    Some((t, b)) if (t0..t1).contains(&at) => {
                        &b[(at - t) as usize..(next - t) as usize]
                    }
                    _ => &buf[(at - start) as usize..(next - start) as usize],
                };
                self.put(piece)?;
            }
            at = next;
        }
        Ok(())
    }

    /// Count the blocks whose last byte has now been read (and so sent, when sent at all).
    fn count(&mut self) -> std::io::Result<()> {
        let Some(pass) = self.pass else {
            return Ok(());
        };
        let n = pass.cut.blocks();
        let before = self.next;
        while self.next < n && pass.cut.end(self.next) <= self.pos {
            self.next += 1;
        }
        if self.next > before {
            // "Passed" means in the output: what a buffered writer holds goes out first.
            if pass.cut.end(self.next - 1) > self.skip.1 {
                self.out.flush()?;
            }
            if let Some(t) = pass.tally {
                t.passed(pass.base + self.next);
            }
        }
        Ok(())
    }

    fn fail(&mut self, e: std::io::Error) -> std::io::Error {
        // Keep the output's error: it explains the failure better than what follows.
        let kind = e.kind();
        self.error = Some(e);
        std::io::Error::new(kind, "the output failed")
    }
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let sent = if self.pass.is_none() {
            self.put(&buf[..n])
        } else {
            self.emit(&buf[..n])
        };
        sent.map_err(|e| self.fail(e))?;
        self.pos += n as u64;
        self.count().map_err(|e| self.fail(e))?;
        Ok(n)
    }
}

pub fn transform<R: Read, W: Write>(
    src: R,
    out: &mut W,
    opts: ParseOptions,
    rate_limit: Option<u64>,
) -> Result<StreamReport> {
    transform_with(src, out, opts, rate_limit, &mut NullSink)
}

/// `transform`, with each block also shown to `sink` (which may only look).
pub fn transform_with<R: Read, W: Write>(
    src: R,
    out: &mut W,
    opts: ParseOptions,
    rate_limit: Option<u64>,
    sink: &mut dyn BlockSink,
) -> Result<StreamReport> {
    run(src, out, opts, rate_limit, sink, None)
}

/// `transform_with` of a stream whose head `pass.cut` was made from: the whole input is
/// parsed (every block validated and digested), the output is what `pass.keep` keeps of it,
/// and `pass.tally` counts each block once its last byte has been read and sent (the output
/// flushed first). The rate limit applies to the bytes sent. `bytes_out` is what was sent;
/// `resumed_from` and `blocks_sent` say what the output carries.
pub fn transform_cut<R: Read, W: Write>(
    src: R,
    out: &mut W,
    opts: ParseOptions,
    rate_limit: Option<u64>,
    sink: &mut dyn BlockSink,
    pass: &Pass<'_>,
) -> Result<StreamReport> {
    if let Some(t) = pass.tally {
        t.set_blocks(pass.base + pass.cut.blocks());
        t.passed(pass.base);
    }
    let mut report = run(src, out, opts, rate_limit, sink, Some(pass))?;
    report.resumed_from = pass.cut.from;
    report.blocks_sent = pass.cut.blocks() - pass.cut.from;
    Ok(report)
}

fn run<R: Read, W: Write>(
    src: R,
    out: &mut W,
    opts: ParseOptions,
    rate_limit: Option<u64>,
    sink: &mut dyn BlockSink,
    pass: Option<&Pass<'_>>,
) -> Result<StreamReport> {
    let mut tee = Tee {
        inner: src,
        out,
        throttle: Throttle::new(rate_limit),
        written: 0,
        error: None,
        pos: 0,
        pass,
        skip: pass.map_or((0, 0), |p| p.cut.skipped(p.keep)),
        bat: pass
            .filter(|p| p.keep == Keep::Import)
            .and_then(|p| p.cut.edited_bat()),
        next: 0,
    };
    let result = parse(&mut tee, opts, sink);
    if let Some(e) = tee.error.take() {
        return Err(crate::VhdError::io(
            format!("cannot write the output at byte {}", tee.written),
            e,
        ));
    }
    let mut report = result?;
    tee.out
        .flush()
        .map_err(|e| crate::VhdError::io("cannot flush the output", e))?;
    report.bytes_out = tee.written;
    report.blocks_sent = report.blocks;
    Ok(report)
}
