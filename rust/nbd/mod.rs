//! The fast path's reader: a disk read over NBD (several connections at once) into the VHD
//! stream XAPI's import takes, with partial sector bitmaps where a block is only partly read.
//!
//! A **full** reads the units `NBD_CMD_BLOCK_STATUS` reports as holding data (extents flagged
//! zero are never read, and a block with nothing to read is not in the stream); a **delta**
//! reads exactly the units a CBT bitmap marks. The plan is known before the first read, so
//! the stream's length is too (XAPI's import needs it up front).
//!
//! Work is shared through a queue of output blocks: each connection's worker takes the next
//! block, pipelines the reads of its units, fills its bitmap and digests; one writer emits the
//! blocks in order. Memory is bounded whatever the disk: at most `2 × connections` block
//! buffers exist (a worker takes a buffer before it takes a block, so the block the writer
//! waits for always holds one), each `block_size + 512`; plus one bit per unit for the plan,
//! 4 bytes per block for the BAT and the block list, 64 KiB of read buffer per connection, and
//! the digests reported (20 bytes per unit read, 20 per whole block). For 4 connections and
//! 2 MiB blocks: 16 MiB of buffers; a 2 TiB disk adds 4 MiB of plan and 4 MiB of BAT.
//!
//! A copy resumed at block K (`Options::resume_from`, after a cut) still reads and digests
//! every block of the plan, but the stream it writes carries blocks K.. only (`stream::resume`:
//! the import keeps what the target VDI already holds).
//!
//! Several connections are used whether or not the server sets `NBD_FLAG_CAN_MULTI_CONN`:
//! that flag is about the visibility of writes and flushes across connections, and this
//! client only reads an export that does not change (a snapshot).

pub mod client;
pub mod plan;
pub mod proto;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use client::{Client, ExportInfo, ReadReq, TlsSetup};
pub use plan::Plan;

use crate::error::{IoContext, Result, VhdError};
use crate::format::{bitmap, DiskType, DEFAULT_BLOCK_SIZE};
use crate::net::{Side, Trust};
use crate::stream::digest::block_digest;
use crate::stream::export::StreamLayout;
use crate::stream::{StreamReport, Tally};

/// XAPI's CBT granularity.
pub const DEFAULT_UNIT: u32 = 64 * 1024;
/// Block status is asked in pieces of this much (a request's length is 32 bits).
const STATUS_SPAN: u64 = 1 << 30;

/// One connection to the server: the transport (TCP, already connected) and a label for
/// messages (its address).
pub struct Source<T> {
    pub io: T,
    pub peer: String,
}

pub struct Options {
    /// `/<vdi-uuid>?session_id=...` for XAPI: a secret, never in a message.
    pub export_name: String,
    pub tls: Option<TlsSetup>,
    /// A CBT bitmap (one bit per unit, MSB first): a delta of those units. None: a full.
    pub changed: Option<Vec<u8>>,
    pub unit: u32,
    pub block_size: u32,
    /// Bytes per second read, all connections together.
    pub rate_limit: Option<u64>,
    /// Digest every unit read (costs 20 bytes of report per unit).
    pub unit_digests: bool,
    /// K: the stream sent carries the plan's blocks K.. only (a target that holds the first
    /// K already); blocks before K are still read and digested.
    pub resume_from: u64,
    /// Counts the blocks as they pass, and their number.
    pub tally: Option<Arc<Tally>>,
}

impl Options {
    pub fn new(export_name: &str) -> Options {
        Options {
            export_name: export_name.to_string(),
            tls: None,
            changed: None,
            unit: DEFAULT_UNIT,
            block_size: DEFAULT_BLOCK_SIZE,
            rate_limit: None,
            unit_digests: true,
            resume_from: 0,
            tally: None,
        }
    }
}

/// Where the stream goes.
pub enum Output<'a> {
    /// Nowhere: read and digested only.
    Discard,
    /// Written as is (a file, a pipe).
    Writer(&'a mut dyn Write),
    /// PUT to XAPI's `/import_raw_vdi` with its length, the import's answer read first.
    Import(&'a Side),
}

#[derive(Debug, Clone)]
pub struct Report {
    /// `bytes_in`: NBD payload bytes read; `digests`: blocks carried whole only.
    pub stream: StreamReport,
    pub unit: u32,
    /// (unit index, digest of its bytes within the disk), ascending.
    pub unit_digests: Vec<(u64, u128)>,
    /// Units read and the bytes they span.
    pub units: u64,
    pub unit_bytes: u64,
    pub connections: usize,
    /// A full with block status: the bytes the server reported holding data.
    pub extents: Option<u64>,
    pub import_status: Option<u16>,
    pub structured_replies: bool,
    pub block_status: bool,
}

/// TLS for an NBD server, from how the caller trusts it: `"verify"` (the system CAs and
/// `server_name`), the server's certificate in PEM (as `VDI.get_nbd_info` gives it), or its
/// sha256 fingerprint (`sha256:AB:CD...` or hex). A pinned certificate must be exactly the
/// one the server shows (its name is then only what the TLS hello carries: `fallback_name`,
/// the server's address, when `server_name` is not a valid TLS name).
pub fn tls_setup(trust: &str, server_name: &str, fallback_name: &str) -> Result<TlsSetup> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use sha2::{Digest, Sha256};
    let trust = if trust == "verify" {
        Trust::SystemRoots
    } else if trust.trim_start().starts_with("-----BEGIN") {
        let cert = CertificateDer::from_pem_slice(trust.as_bytes())
            .map_err(|e| VhdError::BadRange(format!("the NBD server's certificate: {e}")))?;
        Trust::Pinned(Sha256::digest(cert.as_ref()).into())
    } else {
        Trust::Pinned(crate::net::parse_pin(trust).ok_or_else(|| {
            VhdError::BadRange(format!(
                "{trust:?} is neither a PEM certificate nor a sha256 fingerprint"
            ))
        })?)
    };
    let name = match (ServerName::try_from(server_name.to_string()), &trust) {
        (Ok(n), _) => n,
        (Err(_), Trust::Pinned(_)) => {
            ServerName::try_from(fallback_name.to_string()).map_err(|_| {
                VhdError::BadRange(format!("{fallback_name:?} is not a valid TLS server name"))
            })?
        }
        (Err(_), Trust::SystemRoots) => {
            return Err(VhdError::BadRange(format!(
                "{server_name:?} is not a valid TLS server name"
            )))
        }
    };
    Ok(TlsSetup {
        config: crate::net::client_config(&trust)?,
        server_name: name,
    })
}

/// A total read rate shared by every worker.
struct Limiter {
    rate: Option<u64>,
    start: Instant,
    bytes: AtomicU64,
}

impl Limiter {
    fn consume(&self, n: u64) {
        let Some(rate) = self.rate.filter(|&r| r > 0) else {
            return;
        };
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        let due = Duration::from_secs_f64(total as f64 / rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// The block queue and the buffer pool.
struct Queue {
    state: Mutex<QState>,
    cv: Condvar,
    abort: AtomicBool,
    cap: usize,
    buf_len: usize,
}

struct QState {
    next: usize,
    free: Vec<Vec<u8>>,
    made: usize,
}

impl Queue {
    /// A buffer, then the next block: None when there is no more work or the copy failed.
    fn take(&self, n: usize) -> Option<(usize, Vec<u8>)> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.abort.load(Ordering::Relaxed) || s.next >= n {
                return None;
            }
            let buf = match s.free.pop() {
                Some(b) => Some(b),
                None if s.made < self.cap => {
                    s.made += 1;
                    Some(vec![0u8; self.buf_len])
                }
                None => None,
            };
            if let Some(b) = buf {
                let k = s.next;
                s.next += 1;
                return Some((k, b));
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn give_back(&self, b: Vec<u8>) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free
            .push(b);
        self.cv.notify_one();
    }

    fn stop(&self) {
        self.abort.store(true, Ordering::Relaxed);
        // Taking the lock orders the flag before any waiter's next check.
        drop(self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.cv.notify_all();
    }
}

/// A block read and ready to write.
struct Filled {
    k: usize,
    buf: Vec<u8>,
    sectors: u64,
    digest: Option<u128>,
    unit_digests: Vec<(u64, u128)>,
}

/// What every worker shares.
struct Job<'a> {
    plan: &'a Plan,
    bm_len: usize,
    unit_digests: bool,
    queue: Queue,
    limiter: Limiter,
    done: AtomicU64,
    total: u64,
    progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
}

/// Read the disk on `sources` (one worker each) into a VHD stream sent to `out`.
/// `progress(done, total)` is told the payload bytes read so far and the bytes to read.
pub fn copy<T: Read + Write + Send>(
    sources: Vec<Source<T>>,
    opts: &Options,
    out: Output<'_>,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<Report> {
    if sources.is_empty() {
        return Err(VhdError::BadRange("no NBD connection given".into()));
    }
    Plan::check(0, u64::from(opts.unit), u64::from(opts.block_size))?;
    let want_allocation = opts.changed.is_none();
    let mut clients = connect_all(sources, opts, want_allocation)?;
    let info = clients[0].info;
    if let Some(c) = clients.iter().find(|c| c.info.size != info.size) {
        return Err(VhdError::Nbd {
            peer: String::new(),
            what: "NBD_OPT_GO".into(),
            detail: format!(
                "the connections disagree on the export's size ({} and {})",
                info.size, c.info.size
            ),
        });
    }
    let (unit, bs) = (u64::from(opts.unit), u64::from(opts.block_size));
    let (plan, extents) = match &opts.changed {
        Some(bm) => (Plan::from_changed(info.size, unit, bs, bm)?, None),
        None if info.allocation.is_some() => {
            let (p, e) = allocated(&mut clients[0], unit, bs)?;
            (p, Some(e))
        }
        None => (Plan::all(info.size, unit, bs)?, None),
    };
    let n_blocks = plan.blocks.len() as u64;
    if opts.resume_from > n_blocks {
        return Err(VhdError::BadRange(format!(
            "resume point {} beyond the stream's {n_blocks} blocks",
            opts.resume_from
        )));
    }
    let sent = plan.blocks[opts.resume_from as usize..].to_vec();
    let mut layout = StreamLayout::new(info.size, opts.block_size, sent, None);
    if opts.changed.is_some() {
        // A delta: clear bits mean "as the target already holds", as in XAPI's deltas.
        layout.footer.disk_type = DiskType::Differencing;
    }
    let length = layout.length();
    let mut report = StreamReport::new(layout.footer.disk_type, info.size, opts.block_size);
    let (units, unit_bytes) = plan.totals();

    let (mut sink, import_status): (Box<dyn Write + '_>, Option<u16>) = match out {
        Output::Discard => (Box::new(std::io::sink()), None),
        Output::Writer(w) => (Box::new(w), None),
        Output::Import(side) => {
            let (conn, status) = crate::net::open_import(side, length)?;
            (Box::new(conn), Some(status))
        }
    };
    let connections = clients.len();
    let bm_len = layout.header.bitmap_bytes() as usize;
    let job = Job {
        plan: &plan,
        bm_len,
        unit_digests: opts.unit_digests,
        queue: Queue {
            state: Mutex::new(QState {
                next: 0,
                free: Vec::new(),
                made: 0,
            }),
            cv: Condvar::new(),
            abort: AtomicBool::new(false),
            cap: 2 * connections,
            buf_len: bm_len + opts.block_size as usize,
        },
        limiter: Limiter {
            rate: opts.rate_limit,
            start: Instant::now(),
            bytes: AtomicU64::new(0),
        },
        done: AtomicU64::new(0),
        total: unit_bytes,
        progress,
    };
    if let Some(p) = progress {
        p(0, unit_bytes);
    }
    if let Some(t) = &opts.tally {
        t.set_blocks(n_blocks);
    }
    let mut unit_digests = Vec::new();
    let written = std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<Result<Filled>>();
        for c in clients {
            let tx = tx.clone();
            let job = &job;
            s.spawn(move || worker(c, job, tx));
        }
        drop(tx);
        let r = write_stream(
            &job,
            &layout,
            (opts.resume_from as usize, opts.tally.as_deref()),
            &mut *sink,
            rx,
            &mut report,
            &mut unit_digests,
        );
        if r.is_err() {
            job.queue.stop();
        }
        r
    });
    written?;
    report.bytes_in = job.done.load(Ordering::Relaxed);
    report.bytes_out = length;
    report.resumed_from = opts.resume_from;
    report.blocks_sent = n_blocks - opts.resume_from;
    Ok(Report {
        stream: report,
        unit: opts.unit,
        unit_digests,
        units,
        unit_bytes,
        connections,
        extents,
        import_status,
        structured_replies: info.structured,
        block_status: info.allocation.is_some(),
    })
}

/// Handshake every connection at once (TLS handshakes are the slow part).
fn connect_all<T: Read + Write + Send>(
    sources: Vec<Source<T>>,
    opts: &Options,
    want_allocation: bool,
) -> Result<Vec<Client<T>>> {
    let results: Vec<Result<Client<T>>> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .into_iter()
            .map(|src| {
                s.spawn(move || {
                    Client::handshake(
                        src.io,
                        &src.peer,
                        &opts.export_name,
                        opts.tls.as_ref(),
                        want_allocation,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(VhdError::Unsupported(
                        "an NBD handshake thread panicked".into(),
                    ))
                })
            })
            .collect()
    });
    results.into_iter().collect()
}

/// The units holding data, from block status: extents flagged zero are skipped. Also the
/// bytes reported as data.
fn allocated<T: Read + Write>(c: &mut Client<T>, unit: u64, bs: u64) -> Result<(Plan, u64)> {
    let size = c.info.size;
    let mut plan = Plan::empty(size, unit, bs)?;
    let mut data = 0u64;
    let mut off = 0u64;
    while off < size {
        let len = (size - off).min(STATUS_SPAN) as u32;
        off += c.block_status(off, len, |start, n, flags| {
            if flags & proto::STATE_ZERO == 0 {
                plan.mark(start, n);
                data += n;
            }
        })?;
    }
    plan.finish();
    Ok((plan, data))
}

fn worker<T: Read + Write>(mut c: Client<T>, job: &Job<'_>, tx: mpsc::Sender<Result<Filled>>) {
    let n = job.plan.blocks.len();
    while let Some((k, mut buf)) = job.queue.take(n) {
        match fill(&mut c, job, k, &mut buf) {
            Ok(mut f) => {
                f.buf = buf;
                if tx.send(Ok(f)).is_err() {
                    return;
                }
            }
            Err(e) => {
                job.queue.stop();
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
    // This connection is between requests: end it cleanly (also when another one failed).
    c.disconnect();
}

/// Read block `k` of the plan into `buf` (bitmap, then data): its units, zeros elsewhere.
fn fill<T: Read + Write>(
    c: &mut Client<T>,
    job: &Job<'_>,
    k: usize,
    buf: &mut [u8],
) -> Result<Filled> {
    let plan = job.plan;
    let b = plan.blocks[k];
    let base = u64::from(b) * plan.block_size;
    let (bm, data) = buf.split_at_mut(job.bm_len);
    bm.fill(0);
    let max = u64::from(c.max_read());
    let runs = plan.runs(b);
    let mut reqs = Vec::new();
    let mut cursor = 0usize;
    let mut sectors = 0u64;
    for &(u, count) in &runs {
        let start = u * plan.unit;
        let end = plan.unit_range(u + count - 1).1;
        let (s, e) = ((start - base) as usize, (end - base) as usize);
        data[cursor..s].fill(0);
        cursor = e;
        bitmap::set_range(bm, s / 512, (e - s) / 512);
        sectors += ((e - s) / 512) as u64;
        let mut off = start;
        while off < end {
            let len = (end - off).min(max);
            reqs.push(ReadReq {
                offset: off,
                len: len as u32,
                at: (off - base) as usize,
            });
            off += len;
        }
    }
    data[cursor..].fill(0);
    let payload = c.read_many(&reqs, data)?;
    job.limiter.consume(payload);
    let done = job.done.fetch_add(payload, Ordering::Relaxed) + payload;
    if let Some(p) = job.progress {
        p(done, job.total);
    }
    let mut unit_digests = Vec::new();
    if job.unit_digests {
        for &(u, count) in &runs {
            for i in u..u + count {
                let (s, e) = plan.unit_range(i);
                let part = &data[(s - base) as usize..(e - base) as usize];
                unit_digests.push((i, block_digest(part)));
            }
        }
    }
    let digest = plan.whole(b).then(|| block_digest(data));
    Ok(Filled {
        k,
        buf: Vec::new(),
        sectors,
        digest,
        unit_digests,
    })
}

/// The writer: the stream's head, then each block in order as the workers deliver it (at
/// most the pool's buffers wait here), then the footer. `resume.0` = K: the plan's first K
/// blocks are taken and digested but not written (`layout` holds the blocks from K on);
/// `resume.1` is told each block once it has passed.
fn write_stream(
    job: &Job<'_>,
    layout: &StreamLayout,
    resume: (usize, Option<&Tally>),
    out: &mut dyn Write,
    rx: mpsc::Receiver<Result<Filled>>,
    report: &mut StreamReport,
    unit_digests: &mut Vec<(u64, u128)>,
) -> Result<()> {
    let (skip, tally) = resume;
    let mut at = 0u64;
    let mut put = |b: &[u8], at: &mut u64| -> Result<()> {
        out.write_all(b)
            .ctx(|| format!("cannot send the stream at byte {at}"))?;
        *at += b.len() as u64;
        if let Some(t) = tally {
            t.add_sent(b.len() as u64);
        }
        Ok(())
    };
    put(&layout.prologue(), &mut at)?;
    let mut waiting: BTreeMap<usize, Filled> = BTreeMap::new();
    for k in 0..job.plan.blocks.len() {
        let f = loop {
            if let Some(f) = waiting.remove(&k) {
                break f;
            }
            match rx.recv() {
                Ok(Ok(f)) => {
                    waiting.insert(f.k, f);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(VhdError::Unsupported(
                        "the NBD readers stopped before the last block".into(),
                    ))
                }
            }
        };
        if k >= skip {
            put(&f.buf, &mut at)?;
            report.sectors_written += f.sectors;
        }
        let b = job.plan.blocks[k];
        report.blocks += 1;
        if let Some(d) = f.digest {
            report.digests.push((b, d));
        }
        unit_digests.extend_from_slice(&f.unit_digests);
        job.queue.give_back(f.buf);
        if let Some(t) = tally {
            t.passed(k as u64 + 1);
        }
    }
    put(&layout.footer.to_bytes(), &mut at)?;
    out.flush().ctx(|| "cannot flush the stream".into())?;
    Ok(())
}
