//! Pass a stream through unchanged while validating it, digesting every block and holding a
//! byte-rate limit. The bytes are written out as they are read (one block of buffer), so the
//! output's length equals the input's and can be announced before the first byte.

use std::io::{Read, Write};

use super::parse::{parse, BlockSink, NullSink, ParseOptions};
use super::throttle::Throttle;
use super::StreamReport;
use crate::error::Result;

/// Writes everything read from `inner` to `out`; `consume` blocks the reader when over rate.
struct Tee<'a, R: Read, W: Write> {
    inner: R,
    out: &'a mut W,
    throttle: Throttle,
    written: u64,
    error: Option<std::io::Error>,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.throttle.consume(n);
        if let Err(e) = self.out.write_all(&buf[..n]) {
            // Keep the output's error: it explains the failure better than what follows.
            let kind = e.kind();
            self.error = Some(e);
            return Err(std::io::Error::new(kind, "the output failed"));
        }
        self.written += n as u64;
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
    let mut tee = Tee {
        inner: src,
        out,
        throttle: Throttle::new(rate_limit),
        written: 0,
        error: None,
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
    Ok(report)
}
