//! The data path to HTTPS pools, in Rust end to end: TLS (rustls) on connections the caller
//! opened, the HTTP exchange of XAPI's `/export_raw_vdi` and `/import_raw_vdi`, and the stream
//! transform between them. Python keeps the TCP sockets (so it can cut them at a deadline) and
//! the XAPI tasks; no byte of the stream passes through Python.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::mem::ManuallyDrop;
use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result, VhdError};
use crate::format::FOOTER_SIZE;
use crate::stream::digest::UnitDigests;
use crate::stream::parse::{read_stream_head, NullSink, ParseOptions};
use crate::stream::transform::{transform_cut, Pass};
use crate::stream::{Cut, Keep, StreamReport, Tally};

/// How a pool's certificate is trusted.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The system's CA store, with the host name checked.
    SystemRoots,
    /// Exactly this certificate (sha256 of its DER): self-signed pool certificates.
    Pinned([u8; 32]),
}

/// One side of a transfer: a connected TCP descriptor (owned by the caller), the host name for
/// TLS and the `Host` header, the request path, and TLS settings (`None`: plain HTTP).
pub struct Side {
    pub fd: i32,
    pub host: String,
    pub path: String,
    pub tls: Option<Trust>,
}

#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate fingerprint sha256:{} is not the pinned one",
                hex(&got)
            )))
        }
    }

    // The handshake signatures are still checked: the pool must hold the pinned key.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(ring::default_provider());
    let tls_err = |e: rustls::Error| VhdError::Unsupported(format!("TLS configuration: {e}"));
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?;
    let config = match trust {
        Trust::Pinned(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: *pin,
                provider,
            }))
            .with_no_client_auth(),
        Trust::SystemRoots => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                // A malformed system certificate is skipped, as every TLS client does.
                let _ = roots.add(cert);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// A caller's TCP descriptor, never closed here.
pub(crate) struct Borrowed(ManuallyDrop<TcpStream>);

impl Borrowed {
    pub(crate) fn new(fd: i32) -> Borrowed {
        // SAFETY: the caller owns `fd`, keeps it open for the whole call (Python holds the
        // socket object) and closes it itself; ManuallyDrop means we never close it.
        Borrowed(ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) }))
    }

    /// The peer's address, for messages and as the TLS server name when none is given.
    #[cfg_attr(not(feature = "python"), allow(dead_code))]
    pub(crate) fn peer(&self) -> Option<std::net::SocketAddr> {
        self.0.peer_addr().ok()
    }
}

impl Read for Borrowed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}
impl Write for Borrowed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A connection, plain or TLS.
pub(crate) enum Conn {
    Plain(Borrowed),
    Tls(Box<StreamOwned<ClientConnection, Borrowed>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => match s.read(buf) {
                // XAPI's handlers close without close_notify: for us the length decides.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
        }
    }
}
impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

fn open(side: &Side) -> Result<Conn> {
    let tcp = Borrowed::new(side.fd);
    let Some(trust) = &side.tls else {
        return Ok(Conn::Plain(tcp));
    };
    let name = ServerName::try_from(side.host.clone()).map_err(|_| {
        VhdError::Unsupported(format!("{:?} is not a valid TLS server name", side.host))
    })?;
    let conn = ClientConnection::new(client_config(trust)?, name)
        .map_err(|e| VhdError::Unsupported(format!("TLS to {}: {e}", side.host)))?;
    let mut s = StreamOwned::new(conn, tcp);
    // Handshake now, so that a bad certificate is its own error, before any request.
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .ctx(|| format!("TLS handshake with {}", side.host))?;
    }
    Ok(Conn::Tls(Box::new(s)))
}

fn send_head(c: &mut Conn, method: &str, side: &Side, length: Option<u64>) -> Result<()> {
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: xencr\r\nConnection: close\r\n",
        side.path, side.host
    );
    if let Some(n) = length {
        head.push_str(&format!("Content-Length: {n}\r\n"));
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes())
        .ctx(|| format!("cannot send the request to {}", side.host))?;
    c.flush()
        .ctx(|| format!("cannot send the request to {}", side.host))
}

/// An HTTP response head: its status, its `Location` (for a redirect), and the body bytes that
/// came along with it.
struct Head {
    status: u16,
    location: Option<String>,
    rest: Vec<u8>,
}

fn read_head(c: &mut Conn, side: &'static str, host: &str) -> Result<Head> {
    let bad = || VhdError::Http {
        side,
        host: host.into(),
        status: 0,
    };
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let status = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?;
            let location = lines.find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("location")
                    .then(|| value.trim().to_string())
            });
            return Ok(Head {
                status,
                location,
                rest: buf[end + 4..].to_vec(),
            });
        }
        if buf.len() > 1 << 20 {
            return Err(bad());
        }
        let n = c
            .read(&mut chunk)
            .ctx(|| format!("cannot read the response of {host}"))?;
        if n == 0 {
            return Err(VhdError::StreamLength {
                detail: format!("{host} closed before its HTTP response"),
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A head that is not 200: a redirect to follow (with its location), or the status.
fn refused(head: Head, side: &'static str, host: &str) -> VhdError {
    match head.location {
        Some(location) if (300..400).contains(&head.status) => VhdError::Redirect {
            side,
            host: host.into(),
            location,
        },
        _ => VhdError::Http {
            side,
            host: host.into(),
            status: head.status,
        },
    }
}

/// GET the export on `src`: the stream's head (the bytes read so far, at least footer, header
/// and BAT), the open connection for the rest, and the stream's total length, probed from
/// that head.
fn open_export(src: &Side) -> Result<(Vec<u8>, Conn, u64)> {
    let mut s = open(src)?;
    send_head(&mut s, "GET", src, None)?;
    let response = read_head(&mut s, "export", &src.host)?;
    if response.status != 200 {
        return Err(refused(response, "export", &src.host));
    }
    let (head, total) = read_stream_head(&mut s, response.rest).map_err(|e| match e {
        VhdError::Io { source, .. } => {
            VhdError::io(format!("cannot read the export of {}", src.host), source)
        }
        e => e,
    })?;
    Ok((head, s, total))
}

/// PUT what `pass` keeps of the stream read from `source` to `dst` (its length announced)
/// through the validating transform (each block also shown to `sink`); the report and the
/// import's HTTP status.
fn put_import(
    dst: &Side,
    source: impl Read,
    opts: ParseOptions,
    rate_limit: Option<u64>,
    sink: &mut dyn crate::stream::parse::BlockSink,
    pass: &Pass<'_>,
) -> Result<(StreamReport, u16)> {
    let (mut out, status) = open_import(dst, pass.cut.length())?;
    let report = transform_cut(source, &mut out, opts, rate_limit, sink, pass)?;
    out.flush()
        .ctx(|| format!("cannot send the import to {}", dst.host))?;
    Ok((report, status))
}

/// Start the PUT of a `total`-byte body to `dst`: the connection, ready for the body, and the
/// import's status (200). XAPI answers an import before reading its body (xapi.md 4.3: 200 and
/// the task id, or a 302 to the host that sees the SR, or a refusal): that answer is read
/// here, so that a redirect or a refusal is known before any byte of the disk is sent.
pub(crate) fn open_import(dst: &Side, total: u64) -> Result<(Conn, u16)> {
    let mut out = open(dst)?;
    send_head(&mut out, "PUT", dst, Some(total))?;
    let response = read_head(&mut out, "import", &dst.host)?;
    if response.status != 200 {
        return Err(refused(response, "import", &dst.host));
    }
    Ok((out, response.status))
}

/// How a transfer runs, beside its two ends.
#[derive(Clone, Copy, Default)]
pub struct Run<'a> {
    /// Bytes per second sent.
    pub rate_limit: Option<u64>,
    /// Told (bytes read, bytes to read) as the source is read.
    pub counter: Option<&'a dyn Fn(u64, u64)>,
    /// Counts the blocks as they pass (`Tally::position`), their number and the bytes sent.
    pub tally: Option<&'a Tally>,
    /// K: leave the stream's first K blocks (stream order) out of what is sent, for a target
    /// that already holds them (see `stream::resume`).
    pub resume_from: u64,
}

/// GET the export on `src`; PUT it (with its length, probed from the stream's head) to `dst`
/// through the validating transform, or, with no `dst`, only validate and digest it (with
/// `unit_digests`, also each unit of that many bytes the stream carries whole). Returns the
/// transform's report and the import's HTTP status.
///
/// With `run.resume_from` = K > 0 the import gets the export minus its first K blocks (BAT
/// edited, `Content-Length` that stream's) while the whole export is still read, validated and
/// digested: `digests` lists every block. K past the export's block count is `bad_range`
/// (before the import is opened); so is K > 0 without a destination (nothing would be sent).
pub fn relay(
    src: &Side,
    dst: Option<&Side>,
    run: &Run<'_>,
    require_full_bitmaps: bool,
    unit_digests: Option<u64>,
) -> Result<(StreamReport, Option<u16>)> {
    if dst.is_none() && run.resume_from > 0 {
        return Err(VhdError::BadRange(
            "a resume point needs a destination: without one nothing is sent".into(),
        ));
    }
    let (head, rest, total) = open_export(src)?;
    let cut = Cut::new(&head, total, run.resume_from)?;
    let export = std::io::Cursor::new(head).chain(rest).take(total);
    let source = Counting::new(export, total, run.counter);
    let opts = ParseOptions {
        length: Some(total),
        require_full_bitmaps,
    };
    let mut units = unit_digests.map(UnitDigests::new);
    let sink: &mut dyn crate::stream::parse::BlockSink = match &mut units {
        Some(u) => u,
        None => &mut NullSink,
    };
    let pass = Pass {
        cut: &cut,
        keep: Keep::Import,
        tally: run.tally,
        base: 0,
    };
    let (mut report, status) = match dst {
        None => (
            transform_cut(
                source,
                &mut std::io::sink(),
                opts,
                run.rate_limit,
                sink,
                &pass,
            )?,
            None,
        ),
        Some(d) => {
            let (report, status) = put_import(d, source, opts, run.rate_limit, sink, &pass)?;
            (report, Some(status))
        }
    };
    // Blocks come in file order, which a stream need not keep in index order.
    report.unit_digests.sort_unstable_by_key(|d| d.0);
    Ok((report, status))
}

/// GET the export on `src` into the file at `path` (validated and digested on the way), then
/// make the file durable: a VHD export stream is itself a valid VHD file.
///
/// With `run.resume_from` = 0 the file must not exist (a seed file is never overwritten in
/// place). With K > 0 it is the partial file of an earlier, cut download of the same export:
/// it must hold at least the stream up to block K's offset, and its head (footer, header,
/// BAT) must be this export's (the footer's UUID and checksum aside: XAPI gives every export
/// a fresh UUID), else `resume_mismatch`. It is truncated at block K's offset; the whole
/// export is read (every block validated and digested: `digests` lists all), nothing is
/// written before block K's offset, then the rest; last, the leading footer is rewritten as
/// this export's, so the file is byte for byte what an uncut download of it would be.
/// `bytes_out` counts the bytes written.
pub fn download(src: &Side, path: &Path, run: &Run<'_>) -> Result<StreamReport> {
    let k = run.resume_from;
    // The file is opened once the export has answered: a redirect leaves nothing behind.
    let (head, rest, total) = open_export(src)?;
    let cut = Cut::new(&head, total, k)?;
    let mut options = std::fs::OpenOptions::new();
    let mut file = if k == 0 {
        options.write(true).create_new(true)
    } else {
        options.read(true).write(true)
    }
    .open(path)
    .ctx(|| {
        let verb = if k == 0 { "create" } else { "open" };
        format!("cannot {verb} {}", path.display())
    })?;
    if k > 0 {
        same_start(&file, path, &head, &cut)?;
        file.set_len(cut.resume_at())
            .ctx(|| format!("cannot truncate {}", path.display()))?;
        file.seek(SeekFrom::Start(cut.resume_at()))
            .ctx(|| format!("cannot seek in {}", path.display()))?;
    }
    let export = std::io::Cursor::new(head).chain(rest).take(total);
    let source = Counting::new(export, total, run.counter);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut file);
    let pass = Pass {
        cut: &cut,
        keep: Keep::Tail,
        tally: run.tally,
        base: 0,
    };
    let report = transform_cut(
        source,
        &mut out,
        full_stream(total),
        run.rate_limit,
        &mut NullSink,
        &pass,
    )?;
    out.flush()
        .ctx(|| format!("cannot write {}", path.display()))?;
    drop(out);
    if k > 0 {
        // The trailing footer, just written and checked equal to this export's leading one.
        let mut footer = [0u8; FOOTER_SIZE as usize];
        file.read_exact_at(&mut footer, total - FOOTER_SIZE)
            .and_then(|()| file.write_all_at(&footer, 0))
            .ctx(|| format!("cannot rewrite the footer of {}", path.display()))?;
    }
    file.sync_all()
        .ctx(|| format!("cannot make {} durable", path.display()))?;
    Ok(report)
}

/// The partial file at `path` starts as the export whose head is `head`: long enough to hold
/// everything before block K, and the same footer (UUID and checksum aside), header and BAT.
fn same_start(file: &File, path: &Path, head: &[u8], cut: &Cut) -> Result<()> {
    let mismatch = |detail: String| VhdError::ResumeMismatch {
        path: path.display().to_string(),
        detail,
    };
    let len = file
        .metadata()
        .ctx(|| format!("cannot stat {}", path.display()))?
        .len();
    if len < cut.resume_at() {
        return Err(mismatch(format!(
            "it holds {len} bytes, less than the {} before block {}",
            cut.resume_at(),
            cut.from
        )));
    }
    let n = cut.head_len() as usize;
    let mut mine = vec![0u8; n];
    file.read_exact_at(&mut mine, 0)
        .ctx(|| format!("cannot read {}", path.display()))?;
    // Footer bytes 64..84: checksum and UUID, fresh in every export.
    let differs = |r: std::ops::Range<usize>| mine[r.clone()] != head[r];
    let what = if differs(0..64) || differs(84..512) {
        Some("footer")
    } else if differs(512..n) {
        Some("header or block table")
    } else {
        None
    };
    match what {
        Some(w) => Err(mismatch(format!("its {w} differs from the export's"))),
        None => Ok(()),
    }
}

/// PUT the stream held in `file` to `dst` through the validating transform: a damaged file
/// is refused before the pool is sent a byte past the damage.
///
/// With `run.resume_from` = K > 0 the body is the file's stream minus its first K blocks, as
/// `relay` sends it (BAT edited, then the file from block K's offset: the skipped part is
/// never read). The transform then sees only what is sent: `digests` lists the blocks sent,
/// and `Tally::position` counts from the file's first block (K, then K + 1...).
pub fn upload(file: File, dst: &Side, run: &Run<'_>) -> Result<(StreamReport, u16)> {
    let total = file
        .metadata()
        .ctx(|| "cannot read the disk file's size".to_string())?
        .len();
    let mut at0 = Ranges::new(&file, vec![(0, total)]);
    let (mut head, _) = read_stream_head(&mut at0, Vec::new())?;
    let cut = Cut::new(&head, total, run.resume_from)?;
    head.truncate(cut.head_len() as usize);
    cut.patch(&mut head, 0);
    let length = cut.length();
    let sent = Cut::new(&head, length, 0)?;
    let rest = Ranges::new(
        &file,
        vec![(cut.head_len(), cut.start(0)), (cut.resume_at(), total)],
    );
    let source = Counting::new(std::io::Cursor::new(head).chain(rest), length, run.counter);
    let pass = Pass {
        cut: &sent,
        keep: Keep::Import,
        tally: run.tally,
        base: run.resume_from,
    };
    let (mut report, status) = put_import(
        dst,
        source,
        full_stream(length),
        run.rate_limit,
        &mut NullSink,
        &pass,
    )?;
    report.resumed_from = run.resume_from;
    Ok((report, status))
}

/// Reads byte ranges of a file one after the other (positioned reads: the file's offset is
/// never used).
struct Ranges<'a> {
    file: &'a File,
    ranges: Vec<(u64, u64)>,
    at: usize,
}

impl<'a> Ranges<'a> {
    fn new(file: &'a File, ranges: Vec<(u64, u64)>) -> Self {
        Ranges {
            file,
            ranges,
            at: 0,
        }
    }
}

impl Read for Ranges<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(&(s, e)) = self.ranges.get(self.at) {
            if s >= e {
                self.at += 1;
                continue;
            }
            let want = buf.len().min((e - s) as usize);
            let n = self.file.read_at(&mut buf[..want], s)?;
            if n == 0 {
                // The file is shorter than its stream says: the parser names what is missing.
                return Ok(0);
            }
            self.ranges[self.at].0 += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}

/// Reports bytes read (and the total) to the caller's counter.
struct Counting<'a, R> {
    inner: R,
    done: u64,
    total: u64,
    counter: Option<&'a dyn Fn(u64, u64)>,
}

impl<'a, R: Read> Counting<'a, R> {
    /// Announces the total at once: the caller's display knows the length before any byte.
    fn new(inner: R, total: u64, counter: Option<&'a dyn Fn(u64, u64)>) -> Self {
        if let Some(report) = counter {
            report(0, total);
        }
        Counting {
            inner,
            done: 0,
            total,
            counter,
        }
    }
}

/// What every stream here is parsed with: XAPI's exports always carry full bitmaps.
fn full_stream(total: u64) -> ParseOptions {
    ParseOptions {
        length: Some(total),
        require_full_bitmaps: true,
    }
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if let Some(c) = self.counter {
            c(self.done, self.total);
        }
        Ok(n)
    }
}

/// `sha256:AB:CD...` or plain hex, as Python passes it.
pub fn parse_pin(text: &str) -> Option<[u8; 32]> {
    let h: String = text
        .trim_start_matches("sha256:")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}
