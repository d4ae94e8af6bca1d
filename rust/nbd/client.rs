//! One NBD connection: the fixed-newstyle handshake (STARTTLS first when TLS is asked, then
//! structured replies, the `base:allocation` context and `NBD_OPT_GO`), then pipelined
//! `NBD_CMD_READ`s, `NBD_CMD_BLOCK_STATUS` and `NBD_CMD_DISC`.
//!
//! Whatever the server sends, the answer is a value or a typed error, never a panic and never
//! an allocation sized by the server beyond a small fixed cap: read payloads land in the
//! caller's buffer after their bounds were checked against the request, block status
//! descriptors are consumed one by one, and any other payload is capped.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use super::proto::{self as p, Info, ReplyKind};
use crate::error::{Result, VhdError};

/// How the server's certificate is checked, and the name sent in the TLS hello.
pub struct TlsSetup {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// What the handshake settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// Requests' offsets and lengths are multiples of this.
    pub min_block: u32,
    /// No read asks for more than this.
    pub max_payload: u32,
    pub structured: bool,
    /// The id of `base:allocation` when the server selected it.
    pub allocation: Option<u32>,
    pub tls: bool,
}

/// A read the server is asked for: `len` bytes at `offset` of the export, into the caller's
/// buffer at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadReq {
    pub offset: u64,
    pub len: u32,
    pub at: usize,
}

/// Reads smaller than this go through the connection's buffer; larger ones go straight into
/// the caller's.
const RBUF: usize = 64 * 1024;
/// The payload limit when the server states none (proto.md: "at least 2^25").
const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;

enum Io<T: Read + Write> {
    Plain(T),
    Tls(Box<StreamOwned<ClientConnection, T>>),
    Gone,
}

impl<T: Read + Write> Read for Io<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Io::Plain(t) => t.read(buf),
            Io::Tls(s) => match s.read(buf) {
                // A server that closes without close_notify has closed all the same.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
            Io::Gone => Ok(0),
        }
    }
}

impl<T: Read + Write> Write for Io<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Io::Plain(t) => t.write(buf),
            Io::Tls(s) => s.write(buf),
            Io::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Io::Plain(t) => t.flush(),
            Io::Tls(s) => s.flush(),
            Io::Gone => Ok(()),
        }
    }
}

/// The state of one request of a batch while its reply comes in.
#[derive(Default)]
struct Pending {
    done: bool,
    /// Byte ranges of the export covered so far, to refuse overlaps and count coverage.
    covered: Vec<(u64, u64)>,
    error: Option<String>,
}

pub struct Client<T: Read + Write> {
    io: Io<T>,
    peer: String,
    /// The export name: it embeds the session (a secret), so it is cut out of server text.
    secret: String,
    rbuf: Vec<u8>,
    rpos: usize,
    rend: usize,
    cookie: u64,
    pub info: ExportInfo,
}

impl<T: Read + Write> Client<T> {
    /// Connect on `io` (already connected to the server at `peer`, a label for messages):
    /// STARTTLS first when `tls` is given (any refusal is an error: never a silent plain
    /// session), structured replies, `base:allocation` when `want_allocation`, then
    /// `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME` where the server knows no `NBD_OPT_GO`).
    pub fn handshake(
        io: T,
        peer: &str,
        export: &str,
        tls: Option<&TlsSetup>,
        want_allocation: bool,
    ) -> Result<Client<T>> {
        let mut c = Client {
            io: Io::Plain(io),
            peer: peer.to_string(),
            secret: export.to_string(),
            rbuf: vec![0u8; RBUF],
            rpos: 0,
            rend: 0,
            cookie: 1,
            info: ExportInfo {
                size: 0,
                flags: 0,
                min_block: 1,
                max_payload: DEFAULT_MAX_PAYLOAD,
                structured: false,
                allocation: None,
                tls: false,
            },
        };
        let mut g = [0u8; 18];
        c.fill(&mut g, "handshake")?;
        let flags = p::parse_greeting(&g).map_err(|d| c.err("handshake", d))?;
        let no_zeroes = flags & p::FLAG_NO_ZEROES != 0;
        let mut cflags = p::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= p::FLAG_C_NO_ZEROES;
        }
        c.send(&cflags.to_be_bytes(), "handshake")?;
        if let Some(t) = tls {
            c.starttls(t)?;
        }
        c.info.structured = c.optional(p::OPT_STRUCTURED_REPLY, &[])?;
        if c.info.structured && want_allocation {
            c.set_meta_context(export)?;
        }
        c.go(export, no_zeroes)?;
        Ok(c)
    }

    /// An error of this connection; server text in `detail` has the export name cut out.
    fn err(&self, what: impl Into<String>, detail: impl Into<String>) -> VhdError {
        VhdError::Nbd {
            peer: self.peer.clone(),
            what: what.into(),
            detail: redact(&detail.into(), &self.secret),
        }
    }

    /// An I/O failure: the server closing or resetting the connection is the server's doing
    /// (kind `nbd`); anything else (a timeout, a descriptor cut by the caller) stays `io`.
    fn io_err(&self, what: &str, e: std::io::Error) -> VhdError {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                self.err(what, format!("the server dropped the connection ({e})"))
            }
            _ => VhdError::io(format!("NBD server {}: {what}", self.peer), e),
        }
    }

    /// Read exactly `dst.len()` bytes; the server closing first is an error naming `what`.
    fn fill(&mut self, dst: &mut [u8], what: &str) -> Result<()> {
        let mut done = 0;
        let have = self.rend - self.rpos;
        if have > 0 {
            let n = have.min(dst.len());
            dst[..n].copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
            self.rpos += n;
            done = n;
        }
        while done < dst.len() {
            let want = dst.len() - done;
            let r = if want >= RBUF / 2 {
                self.io.read(&mut dst[done..])
            } else {
                self.io.read(&mut self.rbuf)
            };
            let n = match r {
                Ok(0) => {
                    return Err(self.err(what, "the server closed the connection"));
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_err(what, e)),
            };
            if want >= RBUF / 2 {
                done += n;
            } else {
                let k = n.min(want);
                dst[done..done + k].copy_from_slice(&self.rbuf[..k]);
                self.rpos = k;
                self.rend = n;
                done += k;
            }
        }
        Ok(())
    }

    /// Read and drop `n` bytes.
    fn skip(&mut self, mut n: u64, what: &str) -> Result<()> {
        let mut scratch = [0u8; 512];
        while n > 0 {
            let k = n.min(512) as usize;
            self.fill(&mut scratch[..k], what)?;
            n -= k as u64;
        }
        Ok(())
    }

    fn send(&mut self, b: &[u8], what: &str) -> Result<()> {
        let r = self.io.write_all(b).and_then(|_| self.io.flush());
        r.map_err(|e| self.io_err(what, e))
    }

    /// Send an option and read one reply to it, with its payload (capped by `parse_opt_reply`).
    fn opt_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>)> {
        let what = p::opt_name(opt);
        let mut h = [0u8; 20];
        self.fill(&mut h, &what)?;
        let r = p::parse_opt_reply(&h, opt).map_err(|d| self.err(&what, d))?;
        let mut payload = vec![0u8; r.len as usize];
        self.fill(&mut payload, &what)?;
        Ok((r.rep, payload))
    }

    /// The server's error reply as one line: its name and its message, if any.
    fn refusal(&self, opt: u32, rep: u32, payload: &[u8]) -> VhdError {
        let mut detail = match rep {
            p::REP_ERR_TLS_REQD => "the server requires TLS (NBD_REP_ERR_TLS_REQD)".to_string(),
            0x8000_0006 => "no such export on this server (NBD_REP_ERR_UNKNOWN)".to_string(),
            other if p::is_rep_error(other) => format!("refused with {}", p::rep_name(other)),
            other => format!("unexpected {}", p::rep_name(other)),
        };
        let msg = p::printable(payload);
        if p::is_rep_error(rep) && !msg.is_empty() {
            detail.push_str(": ");
            detail.push_str(&msg);
        }
        self.err(p::opt_name(opt), detail)
    }

    /// An option the server may decline: `true` on ACK, `false` on an error reply that only
    /// means "not here" (anything but TLS required or shutting down).
    fn optional(&mut self, opt: u32, data: &[u8]) -> Result<bool> {
        self.send(&p::option(opt, data), &p::opt_name(opt))?;
        let (rep, payload) = self.opt_reply(opt)?;
        match rep {
            p::REP_ACK => Ok(true),
            p::REP_ERR_TLS_REQD | p::REP_ERR_SHUTDOWN => Err(self.refusal(opt, rep, &payload)),
            r if p::is_rep_error(r) => Ok(false),
            r => Err(self.refusal(opt, r, &payload)),
        }
    }

    fn starttls(&mut self, tls: &TlsSetup) -> Result<()> {
        let opt = p::OPT_STARTTLS;
        self.send(&p::option(opt, &[]), "NBD_OPT_STARTTLS")?;
        let (rep, payload) = self.opt_reply(opt)?;
        if rep != p::REP_ACK {
            // TLS was asked for: a plain session is never an acceptable answer.
            return Err(self.refusal(opt, rep, &payload));
        }
        if self.rpos != self.rend {
            return Err(self.err("NBD_OPT_STARTTLS", "data arrived before the TLS handshake"));
        }
        let Io::Plain(t) = std::mem::replace(&mut self.io, Io::Gone) else {
            return Err(self.err("NBD_OPT_STARTTLS", "TLS is already on"));
        };
        let conn = ClientConnection::new(tls.config.clone(), tls.server_name.clone())
            .map_err(|e| self.err("TLS handshake", e.to_string()))?;
        let mut s = StreamOwned::new(conn, t);
        // Handshake now, so that a refused certificate is its own error before any option.
        while s.conn.is_handshaking() {
            if let Err(e) = s.conn.complete_io(&mut s.sock) {
                let detail = match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => "the server closed the connection".into(),
                    // rustls words a verifier's refusal "unexpected error: ...".
                    _ => e
                        .to_string()
                        .trim_start_matches("unexpected error: ")
                        .to_string(),
                };
                return Err(self.err("TLS handshake", detail));
            }
        }
        self.io = Io::Tls(Box::new(s));
        self.info.tls = true;
        Ok(())
    }

    fn set_meta_context(&mut self, export: &str) -> Result<()> {
        let opt = p::OPT_SET_META_CONTEXT;
        self.send(
            &p::option(opt, &p::meta_context_data(export)),
            "NBD_OPT_SET_META_CONTEXT",
        )?;
        // One reply per selected context, then ACK; a server that answers more than a few
        // contexts to one query is not following the protocol.
        for _ in 0..64 {
            let (rep, payload) = self.opt_reply(opt)?;
            match rep {
                p::REP_META_CONTEXT => {
                    let (id, name) = p::parse_meta_context(&payload)
                        .map_err(|d| self.err("NBD_OPT_SET_META_CONTEXT", d))?;
                    if name == p::ALLOCATION {
                        self.info.allocation = Some(id);
                    }
                }
                p::REP_ACK => return Ok(()),
                p::REP_ERR_TLS_REQD | p::REP_ERR_SHUTDOWN => {
                    return Err(self.refusal(opt, rep, &payload))
                }
                r if p::is_rep_error(r) => {
                    // Block status is then unavailable: a full reads every unit.
                    self.info.allocation = None;
                    return Ok(());
                }
                r => return Err(self.refusal(opt, r, &payload)),
            }
        }
        Err(self.err("NBD_OPT_SET_META_CONTEXT", "more than 64 replies"))
    }

    fn go(&mut self, export: &str, no_zeroes: bool) -> Result<()> {
        let opt = p::OPT_GO;
        self.send(&p::option(opt, &p::go_data(export)), "NBD_OPT_GO")?;
        let mut export_info = None;
        for _ in 0..64 {
            let (rep, payload) = self.opt_reply(opt)?;
            match rep {
                p::REP_INFO => {
                    match p::parse_info(&payload).map_err(|d| self.err("NBD_OPT_GO", d))? {
                        Info::Export { size, flags } => export_info = Some((size, flags)),
                        Info::BlockSize { min, max, .. } => {
                            self.info.min_block = min;
                            self.info.max_payload = max;
                        }
                        Info::Other => {}
                    }
                }
                p::REP_ACK => {
                    let Some((size, flags)) = export_info else {
                        return Err(self.err("NBD_OPT_GO", "success without NBD_INFO_EXPORT"));
                    };
                    self.info.size = size;
                    self.info.flags = flags;
                    return Ok(());
                }
                p::REP_ERR_UNSUP => return self.export_name(export, no_zeroes),
                r => return Err(self.refusal(opt, r, &payload)),
            }
        }
        Err(self.err("NBD_OPT_GO", "more than 64 replies"))
    }

    /// The old way in, for servers that know no `NBD_OPT_GO`: a refusal is a closed
    /// connection, with no reason given.
    fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<()> {
        let what = "NBD_OPT_EXPORT_NAME";
        self.send(&p::option(p::OPT_EXPORT_NAME, export.as_bytes()), what)?;
        let mut b = [0u8; 10];
        self.fill(&mut b, what).map_err(|e| match e {
            VhdError::Nbd { .. } => self.err(
                what,
                "the server closed the connection: no such export, or refused",
            ),
            e => e,
        })?;
        let (size, flags) = p::parse_export_name_reply(&b);
        if !no_zeroes {
            self.skip(124, what)?;
        }
        self.info.size = size;
        self.info.flags = flags;
        Ok(())
    }

    /// The largest read this connection asks for in one request: the server's limit, a
    /// multiple of its minimum block (and of a sector).
    pub fn max_read(&self) -> u32 {
        let align = self.info.min_block.max(512);
        let cap = self.info.max_payload.min(DEFAULT_MAX_PAYLOAD);
        (cap / align * align).max(align)
    }

    fn next_cookies(&mut self, n: usize) -> u64 {
        let first = self.cookie;
        self.cookie = self.cookie.wrapping_add(n as u64);
        first
    }

    /// Read every request of `reqs` into `buf`, all sent at once (the server may answer them
    /// in any order); returns the payload bytes the server sent (holes are not sent). Every
    /// reply of the batch is consumed before an error of one of them is returned.
    pub fn read_many(&mut self, reqs: &[ReadReq], buf: &mut [u8]) -> Result<u64> {
        for r in reqs {
            if r.at
                .checked_add(r.len as usize)
                .is_none_or(|e| e > buf.len())
            {
                return Err(VhdError::BadRange(format!(
                    "a read of {} bytes at {} does not fit its buffer",
                    r.len, r.at
                )));
            }
        }
        let first = self.next_cookies(reqs.len());
        let mut out = Vec::with_capacity(28 * reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            out.extend_from_slice(&p::request(
                p::CMD_READ,
                0,
                first.wrapping_add(i as u64),
                r.offset,
                r.len,
            ));
        }
        self.send(&out, "NBD_CMD_READ")?;
        let mut state: Vec<Pending> = reqs.iter().map(|_| Pending::default()).collect();
        let mut left = reqs.len();
        let mut payload = 0u64;
        while left > 0 {
            let (idx, finished, got) = self.read_reply(reqs, &mut state, first, buf)?;
            payload += got;
            if finished {
                state[idx].done = true;
                left -= 1;
            }
        }
        if let Some((r, e)) = reqs
            .iter()
            .zip(&state)
            .find_map(|(r, s)| s.error.as_ref().map(|e| (r, e)))
        {
            return Err(self.err(
                format!("NBD_CMD_READ at offset {} (+{})", r.offset, r.len),
                e.clone(),
            ));
        }
        Ok(payload)
    }

    /// One reply message of a read batch: (which request, whether it is now complete, the
    /// payload bytes it carried).
    fn read_reply(
        &mut self,
        reqs: &[ReadReq],
        state: &mut [Pending],
        first: u64,
        buf: &mut [u8],
    ) -> Result<(usize, bool, u64)> {
        const WHAT: &str = "NBD_CMD_READ";
        let mut m = [0u8; 4];
        self.fill(&mut m, WHAT)?;
        let kind = p::reply_kind(m).map_err(|d| self.err(WHAT, d))?;
        let find = |c: &Self, cookie: u64| -> Result<usize> {
            let i = cookie.wrapping_sub(first);
            if i < reqs.len() as u64 && !state[i as usize].done {
                Ok(i as usize)
            } else {
                Err(c.err(
                    WHAT,
                    format!("a reply to cookie {cookie}, which is not pending"),
                ))
            }
        };
        match kind {
            ReplyKind::Simple => {
                let mut b = [0u8; 12];
                self.fill(&mut b, WHAT)?;
                let (error, cookie) = p::parse_simple(&b);
                let i = find(self, cookie)?;
                if self.info.structured {
                    return Err(
                        self.err(WHAT, "a simple reply after structured replies were agreed")
                    );
                }
                let r = reqs[i];
                if error != 0 {
                    state[i].error = Some(p::errno_name(error));
                    return Ok((i, true, 0));
                }
                self.fill(&mut buf[r.at..r.at + r.len as usize], WHAT)?;
                Ok((i, true, u64::from(r.len)))
            }
            ReplyKind::Structured => {
                let mut b = [0u8; 16];
                self.fill(&mut b, WHAT)?;
                let ch = p::parse_chunk(&b);
                let i = find(self, ch.cookie)?;
                if !self.info.structured {
                    return Err(self.err(WHAT, "a structured reply that was never agreed"));
                }
                let r = reqs[i];
                let mut got = 0u64;
                match ch.kind {
                    p::REPLY_TYPE_OFFSET_DATA => {
                        if ch.len < 9 {
                            return Err(self.err(WHAT, format!("a data chunk of {} bytes", ch.len)));
                        }
                        let mut o = [0u8; 8];
                        self.fill(&mut o, WHAT)?;
                        let off = u64::from_be_bytes(o);
                        let n = u64::from(ch.len - 8);
                        let at = self.place(&r, &mut state[i], off, n)?;
                        self.fill(&mut buf[at..at + n as usize], WHAT)?;
                        got = n;
                    }
                    p::REPLY_TYPE_OFFSET_HOLE => {
                        if ch.len != 12 {
                            return Err(self.err(WHAT, format!("a hole chunk of {} bytes", ch.len)));
                        }
                        let mut h = [0u8; 12];
                        self.fill(&mut h, WHAT)?;
                        let off = u64::from_be_bytes(h[..8].try_into().unwrap_or_default());
                        let n =
                            u64::from(u32::from_be_bytes(h[8..].try_into().unwrap_or_default()));
                        if n == 0 {
                            return Err(self.err(WHAT, "a hole of 0 bytes"));
                        }
                        let at = self.place(&r, &mut state[i], off, n)?;
                        buf[at..at + n as usize].fill(0);
                    }
                    p::REPLY_TYPE_NONE => {
                        if ch.len != 0 || !ch.done() {
                            return Err(self.err(WHAT, "a malformed NBD_REPLY_TYPE_NONE chunk"));
                        }
                    }
                    k if ch.is_error() => {
                        let e = self.error_chunk(k, ch.len, WHAT)?;
                        state[i].error.get_or_insert(e);
                    }
                    k => {
                        return Err(self.err(WHAT, format!("an unexpected chunk of type {k}")));
                    }
                }
                if ch.done() {
                    let s = &state[i];
                    let covered: u64 = s.covered.iter().map(|(a, b)| b - a).sum();
                    if s.error.is_none() && covered != u64::from(r.len) {
                        return Err(self.err(
                            WHAT,
                            format!(
                                "the server ended the reply to offset {} with {covered} of {} bytes",
                                r.offset, r.len
                            ),
                        ));
                    }
                }
                Ok((i, ch.done(), got))
            }
        }
    }

    /// Where a content chunk for `[off, off+n)` goes in the caller's buffer, after checking it
    /// lies in its request and overlaps no earlier chunk.
    fn place(&self, r: &ReadReq, s: &mut Pending, off: u64, n: u64) -> Result<usize> {
        let end = off.checked_add(n);
        let req_end = r.offset + u64::from(r.len);
        let Some(end) = end.filter(|&e| off >= r.offset && e <= req_end) else {
            return Err(self.err(
                "NBD_CMD_READ",
                format!(
                    "a chunk at {off} (+{n}) outside the request at {} (+{})",
                    r.offset, r.len
                ),
            ));
        };
        let pos = s.covered.partition_point(|&(a, _)| a < off);
        let clash_before = pos > 0 && s.covered[pos - 1].1 > off;
        let clash_after = pos < s.covered.len() && s.covered[pos].0 < end;
        if clash_before || clash_after {
            return Err(self.err(
                "NBD_CMD_READ",
                format!("overlapping chunks at {off} (+{n})"),
            ));
        }
        s.covered.insert(pos, (off, end));
        Ok(r.at + (off - r.offset) as usize)
    }

    /// Read an error chunk's payload (capped) into one line: the error and its message.
    fn error_chunk(&mut self, kind: u16, len: u32, what: &str) -> Result<String> {
        if len > p::MAX_ERROR_CHUNK {
            return Err(self.err(what, format!("an error chunk of {len} bytes")));
        }
        let mut b = vec![0u8; len as usize];
        self.fill(&mut b, what)?;
        let e = p::parse_error_chunk(kind, &b).map_err(|d| self.err(what, d))?;
        Ok(if e.message.is_empty() {
            p::errno_name(e.error)
        } else {
            format!("{}: {}", p::errno_name(e.error), e.message)
        })
    }

    /// Allocation status of `[offset, offset+len)`: `each(start, length, flags)` for each
    /// extent, clipped to the range asked. Returns how far the answer reaches (servers may
    /// answer less than asked; never 0).
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        mut each: impl FnMut(u64, u64, u32),
    ) -> Result<u64> {
        let what = format!("NBD_CMD_BLOCK_STATUS at offset {offset} (+{len})");
        let Some(id) = self.info.allocation else {
            return Err(self.err(&what, "the server offers no base:allocation context"));
        };
        let cookie = self.next_cookies(1);
        self.send(
            &p::request(p::CMD_BLOCK_STATUS, 0, cookie, offset, len),
            &what,
        )?;
        let end = offset + u64::from(len);
        let mut pos = offset;
        let mut seen = false;
        let mut error: Option<String> = None;
        loop {
            let mut m = [0u8; 4];
            self.fill(&mut m, &what)?;
            match p::reply_kind(m).map_err(|d| self.err(&what, d))? {
                ReplyKind::Simple => {
                    let mut b = [0u8; 12];
                    self.fill(&mut b, &what)?;
                    let (e, c) = p::parse_simple(&b);
                    if c != cookie {
                        return Err(self.err(
                            &what,
                            format!("a reply to cookie {c}, which is not pending"),
                        ));
                    }
                    if e == 0 {
                        return Err(self.err(&what, "a simple reply without the extents"));
                    }
                    return Err(self.err(&what, p::errno_name(e)));
                }
                ReplyKind::Structured => {
                    let mut b = [0u8; 16];
                    self.fill(&mut b, &what)?;
                    let ch = p::parse_chunk(&b);
                    if ch.cookie != cookie {
                        return Err(self.err(
                            &what,
                            format!("a reply to cookie {}, which is not pending", ch.cookie),
                        ));
                    }
                    match ch.kind {
                        p::REPLY_TYPE_BLOCK_STATUS => {
                            if ch.len < 12 || (ch.len - 4) % 8 != 0 {
                                return Err(self.err(
                                    &what,
                                    format!("a block status chunk of {} bytes", ch.len),
                                ));
                            }
                            let mut i = [0u8; 4];
                            self.fill(&mut i, &what)?;
                            let mine = u32::from_be_bytes(i) == id;
                            seen |= mine;
                            // Descriptors one at a time: a long list costs no memory.
                            for _ in 0..(ch.len - 4) / 8 {
                                let mut d = [0u8; 8];
                                self.fill(&mut d, &what)?;
                                let (elen, flags) = p::parse_extent(&d);
                                if elen == 0 {
                                    return Err(self.err(&what, "an extent of 0 bytes"));
                                }
                                if mine && pos < end {
                                    let stop = (pos + u64::from(elen)).min(end);
                                    each(pos, stop - pos, flags);
                                    pos = stop;
                                }
                            }
                        }
                        p::REPLY_TYPE_NONE => {
                            if ch.len != 0 || !ch.done() {
                                return Err(
                                    self.err(&what, "a malformed NBD_REPLY_TYPE_NONE chunk")
                                );
                            }
                        }
                        k if ch.is_error() => {
                            let e = self.error_chunk(k, ch.len, &what)?;
                            error.get_or_insert(e);
                        }
                        k => {
                            return Err(self.err(&what, format!("an unexpected chunk of type {k}")))
                        }
                    }
                    if ch.done() {
                        break;
                    }
                }
            }
        }
        if let Some(e) = error {
            return Err(self.err(&what, e));
        }
        if !seen || pos == offset {
            return Err(self.err(&what, "no extent of base:allocation in the reply"));
        }
        Ok(pos - offset)
    }

    /// End the session politely (`NBD_CMD_DISC`, then TLS close_notify); errors are moot.
    pub fn disconnect(mut self) {
        let cookie = self.next_cookies(1);
        let _ = self
            .io
            .write_all(&p::request(p::CMD_DISC, 0, cookie, 0, 0))
            .and_then(|_| self.io.flush());
        if let Io::Tls(s) = &mut self.io {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    }
}

/// `text` with the export name (and the session it embeds) replaced: server messages may
/// quote what the client sent.
pub fn redact(text: &str, secret: &str) -> String {
    let mut out = text.to_string();
    if !secret.is_empty() {
        out = out.replace(secret, "<export>");
    }
    if let Some((_, session)) = secret.split_once("session_id=") {
        let session = session.split('&').next().unwrap_or("");
        if !session.is_empty() {
            out = out.replace(session, "<session>");
        }
    }
    out
}
