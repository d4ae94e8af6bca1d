//! The NBD reader against an in-process server written from the protocol document (its own
//! code, not a real server: the Python tests run nbdkit). The streams it makes are applied
//! the way XAPI's import does and compared with the disk; every truncation and many
//! corruptions of a real conversation end in a typed error, never a panic or a hang.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;

use xencr_engine::nbd::{self, Options, Output, Source};
use xencr_engine::stream::apply::{apply, Target};
use xencr_engine::stream::parse::{parse, NullSink, ParseOptions};
use xencr_engine::VhdError;

const MIB: u64 = 1 << 20;
const UNIT: u64 = 65536;

// ------------------------------------------------------------------------------- the server

#[derive(Clone, Copy)]
struct Behaviour {
    structured: bool,
    meta: bool,
    go: bool,
    /// Content chunks of 4 KiB, sent in reverse order.
    split: bool,
    /// Holes sent as hole chunks.
    holes: bool,
    /// At most this many extents per block status reply.
    extents_per_reply: usize,
    /// Reply to pipelined requests last first.
    reverse: bool,
    /// Fail reads touching this offset with EIO.
    fail_at: Option<u64>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            structured: true,
            meta: true,
            go: true,
            split: false,
            holes: true,
            extents_per_reply: 3,
            reverse: true,
            fail_at: None,
        }
    }
}

struct Disk {
    data: Vec<u8>,
    /// Allocated byte ranges, sorted.
    alloc: Vec<(u64, u64)>,
}

impl Disk {
    /// A disk of `size` bytes whose allocated ranges hold a pattern; the rest reads as zeros.
    fn new(size: u64, alloc: &[(u64, u64)], seed: u8) -> Disk {
        let mut data = vec![0u8; size as usize];
        for &(s, e) in alloc {
            for (i, b) in data[s as usize..e as usize].iter_mut().enumerate() {
                *b = ((s as usize + i) / 512 % 251) as u8 ^ seed | 1;
            }
        }
        Disk {
            data,
            alloc: alloc.to_vec(),
        }
    }

    /// (start, end, allocated) pieces covering [s, e).
    fn pieces(&self, s: u64, e: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut at = s;
        for &(a, b) in &self.alloc {
            if b <= at || a >= e {
                continue;
            }
            if a > at {
                out.push((at, a.min(e), false));
            }
            out.push((at.max(a), b.min(e), true));
            at = b.min(e);
        }
        if at < e {
            out.push((at, e, false));
        }
        out
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn opt_reply(out: &mut Vec<u8>, opt: u32, rep: u32, data: &[u8]) {
    out.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&rep.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn chunk(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    out.extend_from_slice(&0x668e_33efu32.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Serve `disk` on `s` until the client disconnects; everything sent is also appended to
/// `transcript` when given.
fn serve(mut s: UnixStream, disk: &Disk, b: Behaviour, mut transcript: Option<&mut Vec<u8>>) {
    let mut send = |s: &mut UnixStream, bytes: &[u8]| {
        if let Some(t) = transcript.as_deref_mut() {
            t.extend_from_slice(bytes);
        }
        let _ = s.write_all(bytes);
    };
    let mut g = b"NBDMAGICIHAVEOPT".to_vec();
    g.extend_from_slice(&3u16.to_be_bytes());
    send(&mut s, &g);
    let mut cf = [0u8; 4];
    if s.read_exact(&mut cf).is_err() {
        return;
    }
    let no_zeroes = be32(&cf) & 2 != 0;
    let size = disk.data.len() as u64;
    loop {
        let mut h = [0u8; 16];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let opt = be32(&h[8..]);
        let mut data = vec![0u8; be32(&h[12..]) as usize];
        if s.read_exact(&mut data).is_err() {
            return;
        }
        let mut out = Vec::new();
        match opt {
            8 if b.structured => opt_reply(&mut out, opt, 1, &[]),
            10 if b.meta => {
                let mut p = 7u32.to_be_bytes().to_vec();
                p.extend_from_slice(b"base:allocation");
                opt_reply(&mut out, opt, 4, &p);
                opt_reply(&mut out, opt, 1, &[]);
            }
            7 if b.go => {
                let mut p = vec![0u8, 0];
                p.extend_from_slice(&size.to_be_bytes());
                p.extend_from_slice(&1u16.to_be_bytes());
                opt_reply(&mut out, opt, 3, &p);
                let mut q = vec![0u8, 3];
                for v in [512u32, 4096, 1 << 20] {
                    q.extend_from_slice(&v.to_be_bytes());
                }
                opt_reply(&mut out, opt, 3, &q);
                opt_reply(&mut out, opt, 1, &[]);
                send(&mut s, &out);
                break;
            }
            1 => {
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&1u16.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(&mut s, &out);
                break;
            }
            _ => opt_reply(&mut out, opt, 0x8000_0001, b"not here"),
        }
        send(&mut s, &out);
    }
    // Transmission: requests that arrive together are answered together (reversed).
    loop {
        let mut batch = Vec::new();
        let mut r = [0u8; 28];
        if s.read_exact(&mut r).is_err() {
            return;
        }
        batch.push(r);
        s.set_nonblocking(true).unwrap();
        while let Ok(()) = s.read_exact(&mut r) {
            batch.push(r);
        }
        s.set_nonblocking(false).unwrap();
        if b.reverse {
            batch.reverse();
        }
        let mut out = Vec::new();
        for r in batch {
            let (kind, cookie, off, len) = (
                u16::from_be_bytes([r[6], r[7]]),
                be64(&r[8..]),
                be64(&r[16..]),
                u64::from(be32(&r[24..])),
            );
            match kind {
                2 => {
                    send(&mut s, &out);
                    return;
                }
                0 => read_reply(&mut out, disk, b, cookie, off, len),
                7 => {
                    let mut p = 7u32.to_be_bytes().to_vec();
                    for (a, e, allocated) in disk
                        .pieces(off, (off + len).min(size))
                        .into_iter()
                        .take(b.extents_per_reply)
                    {
                        p.extend_from_slice(&((e - a) as u32).to_be_bytes());
                        p.extend_from_slice(&(if allocated { 0u32 } else { 3 }).to_be_bytes());
                    }
                    chunk(&mut out, 1, 5, cookie, &p);
                }
                _ => {
                    let mut p = 22u32.to_be_bytes().to_vec();
                    p.extend_from_slice(&0u16.to_be_bytes());
                    chunk(&mut out, 1, 0x8001, cookie, &p);
                }
            }
        }
        send(&mut s, &out);
    }
}

fn read_reply(out: &mut Vec<u8>, disk: &Disk, b: Behaviour, cookie: u64, off: u64, len: u64) {
    let end = off + len;
    if b.fail_at.is_some_and(|f| f >= off && f < end) {
        let msg = b"disk on fire";
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg);
        if b.structured {
            chunk(out, 1, 0x8001, cookie, &p);
        } else {
            out.extend_from_slice(&0x6744_6698u32.to_be_bytes());
            out.extend_from_slice(&5u32.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
        }
        return;
    }
    if !b.structured {
        out.extend_from_slice(&0x6744_6698u32.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&disk.data[off as usize..end as usize]);
        return;
    }
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    for (a, e, allocated) in disk.pieces(off, end) {
        if b.split {
            let mut x = a;
            while x < e {
                let y = (x + 4096).min(e);
                pieces.push((x, y, allocated));
                x = y;
            }
        } else {
            pieces.push((a, e, allocated));
        }
    }
    if b.split {
        pieces.reverse();
    }
    for (a, e, allocated) in pieces {
        if allocated || !b.holes {
            let mut p = a.to_be_bytes().to_vec();
            p.extend_from_slice(&disk.data[a as usize..e as usize]);
            chunk(out, 0, 1, cookie, &p);
        } else {
            let mut p = a.to_be_bytes().to_vec();
            p.extend_from_slice(&((e - a) as u32).to_be_bytes());
            chunk(out, 0, 2, cookie, &p);
        }
    }
    chunk(out, 1, 0, cookie, &[]);
}

// ----------------------------------------------------------------------------- the harness

/// Run a copy on `n` connections to servers of `disk`, the stream kept in memory.
fn run(
    disk: &Arc<Disk>,
    n: usize,
    b: Behaviour,
    opts: &Options,
) -> (Result<nbd::Report, VhdError>, Vec<u8>) {
    let mut sources = Vec::new();
    let mut servers = Vec::new();
    for i in 0..n {
        let (c, s) = UnixStream::pair().unwrap();
        let d = disk.clone();
        servers.push(thread::spawn(move || serve(s, &d, b, None)));
        sources.push(Source {
            io: c,
            peer: format!("test:{i}"),
        });
    }
    let mut out = Vec::new();
    let r = nbd::copy(sources, opts, Output::Writer(&mut out), None);
    for s in servers {
        s.join().unwrap();
    }
    (r, out)
}

/// Apply `stream` onto a raw file holding `base`, as XAPI's import does; the result.
fn applied(stream: &[u8], base: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.raw");
    std::fs::write(&p, base).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    apply(
        stream,
        Target::Raw(f),
        ParseOptions {
            length: Some(stream.len() as u64),
            require_full_bitmaps: false,
        },
        false,
    )
    .unwrap();
    std::fs::read(&p).unwrap()
}

fn sample() -> Arc<Disk> {
    // 9 MiB: block 0 has two runs, block 1 nothing, block 2 all, block 3 a tail, block 4
    // (partial, 1 MiB) a few sectors.
    Arc::new(Disk::new(
        9 * MIB,
        &[
            (4096, 70000),
            (MIB, MIB + 512),
            (4 * MIB, 6 * MIB),
            (7 * MIB + 3 * UNIT, 8 * MIB),
            (8 * MIB + 512, 8 * MIB + 2048),
        ],
        0x5a,
    ))
}

// ----------------------------------------------------------------------------------- tests

#[test]
fn full_reads_only_allocated_units_and_applies_to_the_disk() {
    let disk = sample();
    let opts = Options::new("/disk?session_id=OpaqueRef:secret");
    let (r, stream) = run(&disk, 1, Behaviour::default(), &opts);
    let r = r.unwrap();
    assert_eq!(applied(&stream, &vec![0u8; disk.data.len()]), disk.data);
    assert_eq!(
        r.stream.blocks, 4,
        "block 1 holds nothing: not in the stream"
    );
    assert_eq!(r.stream.disk_type.name(), "dynamic");
    assert!(r.block_status && r.structured_replies);
    // Units: block 0: 0, 1 (4096..70000) and 16 (1 MiB); block 2: 32 units; block 3: 13;
    // block 4: 1.
    assert_eq!(r.units, 2 + 1 + 32 + 13 + 1);
    assert_eq!(
        r.extents,
        Some((70000 - 4096) + 512 + 2 * MIB + 13 * UNIT + 1536)
    );
    // Holes inside the read units are never sent: bytes_in is the allocated bytes.
    assert_eq!(r.stream.bytes_in, r.extents.unwrap());
    assert_eq!(r.stream.bytes_out, stream.len() as u64);
    // Only block 2 is carried whole; its digest is the export's digest of the same data.
    assert_eq!(r.stream.digests.len(), 1);
    assert_eq!(r.stream.digests[0].0, 2);
    let b2 = &disk.data[4 * MIB as usize..6 * MIB as usize];
    assert_eq!(r.stream.digests[0].1, xxhash_rust_digest(b2));
    assert_eq!(r.unit_digests.len() as u64, r.units);
    let (u, d) = r.unit_digests[0];
    assert_eq!((u, d), (0, xxhash_rust_digest(&disk.data[..UNIT as usize])));
    // The stream parses as XAPI's import reads it, with partial bitmaps.
    let parsed = parse(&stream[..], ParseOptions::default(), &mut NullSink).unwrap();
    assert_eq!(parsed.blocks, 4);
    let partial = parse(
        &stream[..],
        ParseOptions {
            length: None,
            require_full_bitmaps: true,
        },
        &mut NullSink,
    );
    assert!(partial.is_err(), "block 0 is carried with a partial bitmap");
    assert_eq!(r.stream.sectors_written, r.unit_bytes / 512);
}

fn xxhash_rust_digest(b: &[u8]) -> u128 {
    xencr_engine::stream::digest::block_digest(b)
}

#[test]
fn delta_reads_exactly_the_changed_units_onto_the_base() {
    let new = sample();
    let base = Disk::new(9 * MIB, &[(0, 9 * MIB)], 0x11).data;
    // Units 1, 2, 3 (block 0), 64 (block 2), the last unit (block 4).
    let mut bm = vec![0u8; (9 * MIB / UNIT).div_ceil(8) as usize];
    for u in [1u64, 2, 3, 64, 143] {
        bm[(u / 8) as usize] |= 0x80 >> (u % 8);
    }
    let mut opts = Options::new("x");
    opts.changed = Some(bm);
    let (r, stream) = run(
        &new,
        2,
        Behaviour {
            split: true,
            ..Behaviour::default()
        },
        &opts,
    );
    let r = r.unwrap();
    let mut expect = base.clone();
    for u in [1u64, 2, 3, 64, 143] {
        let (s, e) = ((u * UNIT) as usize, ((u + 1) * UNIT) as usize);
        expect[s..e].copy_from_slice(&new.data[s..e]);
    }
    assert_eq!(applied(&stream, &base), expect);
    assert_eq!(r.stream.disk_type.name(), "differencing");
    assert_eq!(r.stream.blocks, 3);
    assert_eq!(r.units, 5);
    assert_eq!(r.stream.sectors_written, 5 * 128);
    assert!(r.stream.digests.is_empty(), "no block is carried whole");
    assert_eq!(
        r.unit_digests.iter().map(|u| u.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 64, 143]
    );
    assert!(r.extents.is_none());
    // Holes within changed units are sent as hole chunks, so the payload is the data only.
    assert!(r.stream.bytes_in < 5 * UNIT);
}

#[test]
fn simple_replies_and_the_old_export_name_still_copy_everything() {
    let disk = sample();
    let b = Behaviour {
        structured: false,
        meta: false,
        go: false,
        ..Behaviour::default()
    };
    let (r, stream) = run(&disk, 3, b, &Options::new("x"));
    let r = r.unwrap();
    assert!(!r.block_status && !r.structured_replies);
    // Without block status every unit is read.
    assert_eq!(r.stream.blocks, 5);
    assert_eq!(r.stream.bytes_in, 9 * MIB);
    assert_eq!(applied(&stream, &vec![0u8; disk.data.len()]), disk.data);
    assert_eq!(r.stream.digests.len(), 5);
}

#[test]
fn connections_and_chunking_do_not_change_the_stream() {
    let disk = Arc::new(Disk::new(
        64 * MIB,
        &(0..40)
            .map(|i| (i * 1_600_000, i * 1_600_000 + 300_000))
            .collect::<Vec<_>>(),
        3,
    ));
    let opts = Options::new("x");
    let (one, s1) = run(&disk, 1, Behaviour::default(), &opts);
    let one = one.unwrap();
    for (n, b) in [
        (
            2,
            Behaviour {
                split: true,
                ..Behaviour::default()
            },
        ),
        (
            8,
            Behaviour {
                reverse: false,
                holes: false,
                ..Behaviour::default()
            },
        ),
    ] {
        let (r, s) = run(&disk, n, b, &opts);
        let r = r.unwrap();
        assert_eq!(r.connections, n);
        assert_eq!(r.stream.digests, one.stream.digests);
        assert_eq!(r.unit_digests, one.unit_digests);
        // Same bytes after the footer's fresh UUID and checksum.
        assert_eq!(s.len(), s1.len());
        assert_eq!(s[512..s.len() - 512], s1[512..s1.len() - 512]);
    }
    assert_eq!(applied(&s1, &vec![0u8; disk.data.len()]), disk.data);
}

#[test]
fn a_read_error_is_one_line_naming_the_command_and_never_the_export() {
    let disk = sample();
    for structured in [true, false] {
        let b = Behaviour {
            structured,
            meta: structured,
            fail_at: Some(4 * MIB + 5),
            ..Behaviour::default()
        };
        let (r, _) = run(&disk, 2, b, &Options::new("/vdi?session_id=OpaqueRef:abc"));
        let e = r.unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.kind(), "nbd", "{msg}");
        assert!(msg.contains("NBD_CMD_READ at offset"), "{msg}");
        assert!(msg.contains("NBD_EIO"), "{msg}");
        if structured {
            assert!(msg.contains("disk on fire"), "{msg}");
        }
        assert!(
            !msg.contains("OpaqueRef:abc") && !msg.contains('\n'),
            "{msg}"
        );
    }
}

#[test]
fn a_bitmap_of_the_wrong_size_is_refused_before_any_read() {
    let disk = sample();
    let mut opts = Options::new("x");
    opts.changed = Some(vec![0xFF; 3]);
    let (r, _) = run(&disk, 1, Behaviour::default(), &opts);
    assert_eq!(r.unwrap_err().kind(), "bad_range");
}

#[test]
fn an_empty_delta_is_a_stream_without_blocks() {
    let disk = sample();
    let mut opts = Options::new("x");
    opts.changed = Some(vec![0; 18]);
    let (r, stream) = run(&disk, 2, Behaviour::default(), &opts);
    let r = r.unwrap();
    assert_eq!((r.stream.blocks, r.stream.bytes_in, r.units), (0, 0, 0));
    let base = vec![7u8; disk.data.len()];
    assert_eq!(applied(&stream, &base), base);
}

/// A server that sends `bytes` then closes, reading (and dropping) whatever the client sends.
fn canned(bytes: Vec<u8>) -> (UnixStream, thread::JoinHandle<()>) {
    let (c, mut s) = UnixStream::pair().unwrap();
    let h = thread::spawn(move || {
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    (c, h)
}

fn replay(bytes: Vec<u8>, opts: &Options) -> Result<nbd::Report, VhdError> {
    let (c, h) = canned(bytes);
    let r = nbd::copy(
        vec![Source {
            io: c,
            peer: "canned".into(),
        }],
        opts,
        Output::Discard,
        None,
    );
    h.join().unwrap();
    r
}

/// What a server sends for a small full copy (one connection, deterministic cookies).
fn transcript(b: Behaviour) -> (Vec<u8>, Options) {
    let disk = Disk::new(3 * MIB, &[(4096, 70000), (2 * MIB, 2 * MIB + 3 * UNIT)], 9);
    let (c, s) = UnixStream::pair().unwrap();
    let mut t = Vec::new();
    let opts = Options::new("x");
    thread::scope(|sc| {
        sc.spawn(|| serve(s, &disk, b, Some(&mut t)));
        nbd::copy(
            vec![Source {
                io: c,
                peer: "t".into(),
            }],
            &opts,
            Output::Discard,
            None,
        )
        .unwrap();
    });
    (t, opts)
}

#[test]
fn every_truncated_conversation_is_a_typed_error() {
    for b in [
        Behaviour::default(),
        Behaviour {
            split: true,
            ..Behaviour::default()
        },
        Behaviour {
            structured: false,
            meta: false,
            go: false,
            ..Behaviour::default()
        },
    ] {
        let (t, opts) = transcript(b);
        assert!(
            replay(t.clone(), &opts).is_ok(),
            "the whole conversation copies"
        );
        let step = (t.len() / 300).max(1);
        for n in (0..t.len()).step_by(step).chain([t.len() - 1]) {
            let e = replay(t[..n].to_vec(), &opts).unwrap_err();
            assert!(matches!(e.kind(), "nbd" | "io"), "cut at {n}: {e}");
            assert!(!e.to_string().contains('\n'));
        }
    }
}

#[test]
fn corrupted_conversations_end_in_an_answer_never_a_panic() {
    let (t, opts) = transcript(Behaviour {
        split: true,
        ..Behaviour::default()
    });
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // Flip bytes in the part that carries protocol (headers are dense at the start and in
    // the chunk headers; a flip in data just changes data).
    for _ in 0..400 {
        let mut c = t.clone();
        for _ in 0..1 + rnd() % 3 {
            let at = (rnd() % c.len() as u64) as usize;
            c[at] ^= 1 << (rnd() % 8);
        }
        let _ = replay(c, &opts);
    }
    // Pure garbage after a valid greeting.
    for _ in 0..100 {
        let mut c = t[..18].to_vec();
        c.extend((0..rnd() % 300).map(|_| rnd() as u8));
        assert!(replay(c, &opts).is_err());
    }
}

#[test]
fn servers_that_break_the_rules_are_named() {
    let greet = |flags: u16| {
        let mut g = b"NBDMAGICIHAVEOPT".to_vec();
        g.extend_from_slice(&flags.to_be_bytes());
        g
    };
    let opts = Options::new("/v?session_id=OpaqueRef:zz");
    let e = replay(greet(0), &opts).unwrap_err();
    assert!(e.to_string().contains("fixed newstyle"), "{e}");
    let e = replay(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(), &opts).unwrap_err();
    assert!(e.to_string().contains("not an NBD server"), "{e}");
    // A GO refused as unknown, quoting the export name: the name is cut out.
    let mut t = greet(3);
    opt_reply(&mut t, 8, 1, &[]);
    opt_reply(&mut t, 10, 1, &[]);
    opt_reply(
        &mut t,
        7,
        0x8000_0006,
        b"export /v?session_id=OpaqueRef:zz not found",
    );
    let e = replay(t, &opts).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("NBD_OPT_GO") && msg.contains("no such export"),
        "{msg}"
    );
    assert!(!msg.contains("OpaqueRef:zz"), "{msg}");
    // TLS asked, the server refuses it: never a plain session.
    let mut t = greet(3);
    opt_reply(&mut t, 5, 0x8000_0002, b"");
    let mut o = Options::new("x");
    o.tls =
        Some(nbd::tls_setup(&format!("sha256:{}", "00".repeat(32)), "host", "127.0.0.1").unwrap());
    let e = replay(t, &o).unwrap_err();
    assert!(
        e.to_string().contains("NBD_OPT_STARTTLS") && e.to_string().contains("POLICY"),
        "{e}"
    );
    // TLS required, not asked for.
    let mut t = greet(3);
    opt_reply(&mut t, 8, 0x8000_0005, b"");
    let e = replay(t, &opts).unwrap_err();
    assert!(e.to_string().contains("requires TLS"), "{e}");
}

#[test]
fn a_stream_read_back_gives_the_same_unit_digests() {
    use xencr_engine::stream::digest::UnitDigests;
    let disk = sample();
    let (r, stream) = run(&disk, 2, Behaviour::default(), &Options::new("x"));
    let r = r.unwrap();
    let mut sink = UnitDigests::new(UNIT);
    let back = parse(&stream[..], ParseOptions::default(), &mut sink).unwrap();
    assert_eq!(back.unit_digests, r.unit_digests);
}

#[test]
fn a_copy_resumed_at_k_sends_blocks_k_on_and_completes_the_disk() {
    use std::sync::atomic::Ordering;
    use xencr_engine::stream::Tally;
    let disk = sample();
    let (whole, full) = run(&disk, 2, Behaviour::default(), &Options::new("x"));
    let whole = whole.unwrap();
    let n = whole.stream.blocks;
    assert_eq!(n, 4);
    let zero = vec![0u8; disk.data.len()];
    for k in [0, 1, n / 2, n] {
        let mut opts = Options::new("x");
        opts.resume_from = k;
        let tally = Arc::new(Tally::default());
        opts.tally = Some(tally.clone());
        let (r, stream) = run(&disk, 2, Behaviour::default(), &opts);
        let r = r.unwrap();
        // Every block is still read and digested; only blocks K.. are in the stream.
        assert_eq!(r.stream.digests, whole.stream.digests);
        assert_eq!(r.unit_digests, whole.unit_digests);
        assert_eq!((r.stream.resumed_from, r.stream.blocks_sent), (k, n - k));
        assert_eq!(r.stream.bytes_out, stream.len() as u64);
        assert_eq!(tally.position.load(Ordering::Relaxed), n);
        assert_eq!(tally.blocks.load(Ordering::Relaxed), n);
        assert_eq!(tally.sent.load(Ordering::Relaxed), stream.len() as u64);
        let parsed = parse(&stream[..], ParseOptions::default(), &mut NullSink).unwrap();
        assert_eq!(parsed.blocks, n - k);
        // The whole stream's first K blocks, then the resumed stream: the disk.
        let first_k = first_blocks(&full, k as usize, &zero);
        assert!(applied(&stream, &first_k) == disk.data, "K={k}");
        if k < n {
            assert!(first_k != disk.data, "K={k}: the resumed stream is needed");
        }
    }
    let mut opts = Options::new("x");
    opts.resume_from = n + 1;
    let (r, _) = run(&disk, 1, Behaviour::default(), &opts);
    assert_eq!(r.unwrap_err().kind(), "bad_range");
}

/// `base` with the first `k` blocks (stream order) of `stream` applied: what XAPI's import
/// wrote before a cut.
fn first_blocks(stream: &[u8], k: usize, base: &[u8]) -> Vec<u8> {
    use xencr_engine::stream::parse::BlockSink;
    use xencr_engine::stream::StreamReport;
    struct First<'a> {
        k: usize,
        seen: usize,
        raw: &'a mut Vec<u8>,
    }
    impl BlockSink for First<'_> {
        fn block(
            &mut self,
            index: u32,
            bm: &[u8],
            data: &[u8],
            _: &mut StreamReport,
        ) -> xencr_engine::Result<()> {
            if self.seen < self.k {
                let base = index as usize * data.len();
                for s in 0..data.len() / 512 {
                    let at = base + s * 512;
                    if xencr_engine::format::bitmap::get(bm, s) && at < self.raw.len() {
                        self.raw[at..at + 512].copy_from_slice(&data[s * 512..(s + 1) * 512]);
                    }
                }
            }
            self.seen += 1;
            Ok(())
        }
    }
    let mut raw = base.to_vec();
    let mut sink = First {
        k,
        seen: 0,
        raw: &mut raw,
    };
    parse(stream, ParseOptions::default(), &mut sink).unwrap();
    raw
}
