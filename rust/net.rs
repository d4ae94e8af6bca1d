//! The data path to HTTPS pools, in Rust end to end: TLS (rustls) on connections the caller
//! opened, the HTTP exchange of XAPI's `/export_raw_vdi` and `/import_raw_vdi`, and the stream
//! transform between them. Python keeps the TCP sockets (so it can cut them at a deadline) and
//! the XAPI tasks; no byte of the stream passes through Python.

use std::fs::File;
use std::io::{Read, Write};
use std::mem::ManuallyDrop;
use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result, VhdError};
use crate::stream::digest::UnitDigests;
use crate::stream::parse::{probe_length, HeadProbe, NullSink, ParseOptions};
use crate::stream::transform::{transform, transform_with};
use crate::stream::StreamReport;

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

/// GET the export on `src`: the open connection (the head already read, chained back in front)
/// and the stream's total length, probed from that head.
fn open_export(src: &Side) -> Result<(impl Read, u64)> {
    let mut s = open(src)?;
    send_head(&mut s, "GET", src, None)?;
    let response = read_head(&mut s, "export", &src.host)?;
    if response.status != 200 {
        return Err(refused(response, "export", &src.host));
    }
    let mut head = response.rest;
    let total = loop {
        match probe_length(&head)? {
            HeadProbe::Complete { total_len, .. } => break total_len,
            HeadProbe::NeedMore(n) => {
                let start = head.len();
                if n as usize > 64 << 20 {
                    return Err(VhdError::StreamLength {
                        detail: format!("a stream head of {n} bytes"),
                    });
                }
                head.resize(n as usize, 0);
                let mut at = start;
                while at < head.len() {
                    let got = s
                        .read(&mut head[at..])
                        .ctx(|| format!("cannot read the export of {}", src.host))?;
                    if got == 0 {
                        return Err(VhdError::StreamLength {
                            detail: "the export ended inside its header".into(),
                        });
                    }
                    at += got;
                }
            }
        }
    };
    Ok((std::io::Cursor::new(head).chain(s).take(total), total))
}

/// PUT `total` bytes of `source` to `dst` through the validating transform (each block also
/// shown to `sink`); the report and the import's HTTP status.
fn put_import(
    dst: &Side,
    source: impl Read,
    opts: ParseOptions,
    rate_limit: Option<u64>,
    sink: &mut dyn crate::stream::parse::BlockSink,
) -> Result<(StreamReport, u16)> {
    let (mut out, status) = open_import(dst, opts.length.unwrap_or(0))?;
    let report = transform_with(source, &mut out, opts, rate_limit, sink)?;
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

/// GET the export on `src`; PUT it (with its length, probed from the stream's head) to `dst`
/// through the validating transform, or, with no `dst`, only validate and digest it (with
/// `unit_digests`, also each unit of that many bytes the stream carries whole). Returns the
/// transform's report and the import's HTTP status.
pub fn relay(
    src: &Side,
    dst: Option<&Side>,
    rate_limit: Option<u64>,
    require_full_bitmaps: bool,
    counter: Option<&dyn Fn(u64, u64)>,
    unit_digests: Option<u64>,
) -> Result<(StreamReport, Option<u16>)> {
    let (export, total) = open_export(src)?;
    let source = Counting::new(export, total, counter);
    let opts = ParseOptions {
        length: Some(total),
        require_full_bitmaps,
    };
    let mut units = unit_digests.map(UnitDigests::new);
    let sink: &mut dyn crate::stream::parse::BlockSink = match &mut units {
        Some(u) => u,
        None => &mut NullSink,
    };
    let (mut report, status) = match dst {
        None => (
            transform_with(source, &mut std::io::sink(), opts, rate_limit, sink)?,
            None,
        ),
        Some(d) => {
            let (report, status) = put_import(d, source, opts, rate_limit, sink)?;
            (report, Some(status))
        }
    };
    // Blocks come in file order, which a stream need not keep in index order.
    report.unit_digests.sort_unstable_by_key(|d| d.0);
    Ok((report, status))
}

/// GET the export on `src` into `file` (validated and digested on the way), then make the
/// file durable: a VHD export stream is itself a valid VHD file.
pub fn download(
    src: &Side,
    file: &mut File,
    rate_limit: Option<u64>,
    counter: Option<&dyn Fn(u64, u64)>,
) -> Result<StreamReport> {
    let (export, total) = open_export(src)?;
    let source = Counting::new(export, total, counter);
    let opts = full_stream(total);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut *file);
    let report = transform(source, &mut out, opts, rate_limit)?;
    out.flush()
        .ctx(|| "cannot write the disk file".to_string())?;
    drop(out);
    file.sync_all()
        .ctx(|| "cannot make the disk file durable".to_string())?;
    Ok(report)
}

/// PUT the stream held in `file` (its whole length) to `dst` through the validating transform:
/// a damaged file is refused before the pool is sent a byte past the damage.
pub fn upload(
    file: File,
    dst: &Side,
    rate_limit: Option<u64>,
    counter: Option<&dyn Fn(u64, u64)>,
) -> Result<(StreamReport, u16)> {
    let total = file
        .metadata()
        .ctx(|| "cannot read the disk file's size".to_string())?
        .len();
    let source = Counting::new(
        std::io::BufReader::with_capacity(1 << 20, file),
        total,
        counter,
    );
    put_import(dst, source, full_stream(total), rate_limit, &mut NullSink)
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
