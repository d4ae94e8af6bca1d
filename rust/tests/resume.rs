//! Resumed transfers (`stream::resume`): a relay, an upload and a download that leave out the
//! first K blocks of a stream, against HTTP sides faked on local TCP sockets. What the import
//! gets parses as a stream carrying exactly blocks K.. with the export's bytes; the first K
//! blocks of the whole stream, then the resumed one, applied as XAPI's import applies them,
//! give the source disk. A resumed download is byte for byte an uncut one.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};

use xencr_engine::image::{create::create, sha256_hex, Chain, Source};
use xencr_engine::net::{self, Run, Side};
use xencr_engine::stream::apply::{apply, Target};
use xencr_engine::stream::export::export;
use xencr_engine::stream::parse::{parse, BlockSink, NullSink, ParseOptions};
use xencr_engine::stream::{StreamReport, Tally};

const BS: u32 = 65536;
/// 17 blocks, the last one partial (3 sectors).
const SIZE: u64 = 16 * BS as u64 + 1536;
const WRITTEN: [u64; 10] = [0, 1, 2, 4, 5, 7, 9, 10, 13, 16];

/// A dynamic VHD with pattern data in the blocks of `WRITTEN` (the rest is unallocated).
fn source(dir: &Path) -> Chain {
    let p = dir.join("src.vhd");
    create(&p, SIZE, BS, None, None).unwrap();
    let mut c = Chain::open(&p, &[], true).unwrap();
    for b in WRITTEN {
        let at = b * u64::from(BS);
        let len = (SIZE - at).min(u64::from(BS)) as usize;
        let data: Vec<u8> = (0..len).map(|i| ((i / 512) as u8 ^ b as u8) | 1).collect();
        c.write_at(at, &data).unwrap();
    }
    Chain::open(&p, &[], false).unwrap()
}

fn full_stream(c: &Chain) -> Vec<u8> {
    let mut out = Vec::new();
    export(c, None, &mut out, false, None).unwrap();
    out
}

fn read_request(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

fn listen() -> (TcpListener, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    (l, c)
}

/// An export handler serving `body` (no Content-Length, as XAPI's).
fn export_side(body: Vec<u8>) -> (TcpStream, JoinHandle<()>) {
    let (l, c) = listen();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        read_request(&mut s);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let _ = s.write_all(&body);
    });
    (c, h)
}

/// An import handler: answers 200 before the body (as XAPI does), then reads exactly the
/// announced Content-Length; returns that length and the body.
fn import_side() -> (TcpStream, JoinHandle<(u64, Vec<u8>)>) {
    let (l, c) = listen();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let head = read_request(&mut s);
        let len: u64 = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).unwrap();
        (len, body)
    });
    (c, h)
}

fn side(s: &TcpStream, path: &str) -> Side {
    Side {
        fd: s.as_raw_fd(),
        host: "test".into(),
        path: path.into(),
        tls: None,
    }
}

fn run(tally: &Tally, k: u64) -> Run<'_> {
    Run {
        tally: Some(tally),
        resume_from: k,
        ..Run::default()
    }
}

/// Relay `full` resumed at `k`: the report and what the import got.
fn relay(full: &[u8], k: u64, tally: &Tally) -> (StreamReport, Vec<u8>) {
    let (src, h1) = export_side(full.to_vec());
    let (dst, h2) = import_side();
    let (r, status) = net::relay(
        &side(&src, "/export_raw_vdi"),
        Some(&side(&dst, "/import_raw_vdi")),
        &run(tally, k),
        true,
        None,
    )
    .unwrap();
    assert_eq!(status, Some(200));
    h1.join().unwrap();
    let (len, body) = h2.join().unwrap();
    assert_eq!(len, body.len() as u64, "Content-Length is what is sent");
    (r, body)
}

/// Writes the first `k` blocks (stream order) of a stream into a raw image, as XAPI's import
/// does with the blocks it received before a cut.
struct FirstBlocks<'a> {
    k: usize,
    seen: usize,
    raw: &'a mut Vec<u8>,
}

impl BlockSink for FirstBlocks<'_> {
    fn block(
        &mut self,
        index: u32,
        _: &[u8],
        data: &[u8],
        _: &mut StreamReport,
    ) -> xencr_engine::Result<()> {
        if self.seen < self.k {
            let at = index as usize * data.len();
            let end = (at + data.len()).min(self.raw.len());
            self.raw[at..end].copy_from_slice(&data[..end - at]);
        }
        self.seen += 1;
        Ok(())
    }
}

fn opts(len: usize) -> ParseOptions {
    ParseOptions {
        length: Some(len as u64),
        require_full_bitmaps: true,
    }
}

/// The first `k` blocks of `full`, then `resumed`, applied to a zero disk: its sha256.
fn cut_then_resumed(full: &[u8], k: u64, resumed: &[u8], dir: &Path) -> String {
    let mut raw = vec![0u8; SIZE as usize];
    let mut first = FirstBlocks {
        k: k as usize,
        seen: 0,
        raw: &mut raw,
    };
    parse(full, opts(full.len()), &mut first).unwrap();
    let p = dir.join(format!("target-{k}.raw"));
    std::fs::write(&p, &raw).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    apply(resumed, Target::Raw(f), opts(resumed.len()), false).unwrap();
    sha256_hex(&Source::open(&p, "raw", &[]).unwrap()).unwrap()
}

#[test]
fn a_relay_resumed_at_k_carries_blocks_k_on_and_completes_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let c = source(dir.path());
    let want = sha256_hex(&Source::Vhd(
        Chain::open(&dir.path().join("src.vhd"), &[], false).unwrap(),
    ))
    .unwrap();
    let full = full_stream(&c);
    let whole = parse(&full[..], opts(full.len()), &mut NullSink).unwrap();
    let n = whole.blocks;
    assert_eq!(n, WRITTEN.len() as u64);
    for k in [0, 1, n / 2, n] {
        let tally = Tally::default();
        let (r, body) = relay(&full, k, &tally);
        // The whole export was read and digested; only blocks K.. were sent.
        assert_eq!(r.digests, whole.digests, "K={k}");
        assert_eq!((r.resumed_from, r.blocks_sent, r.blocks), (k, n - k, n));
        assert_eq!(r.bytes_out, body.len() as u64);
        assert_eq!(tally.position.load(Ordering::Relaxed), n);
        assert_eq!(tally.blocks.load(Ordering::Relaxed), n);
        assert_eq!(tally.sent.load(Ordering::Relaxed), body.len() as u64);
        let sent = parse(&body[..], opts(body.len()), &mut NullSink).unwrap();
        assert_eq!(
            sent.digests,
            whole.digests[k as usize..],
            "K={k}: exactly blocks K.."
        );
        // Byte-exact: same prologue but the BAT, then the export from block K's offset.
        let removed = full.len() - body.len();
        assert_eq!(body[..2048], full[..2048]);
        assert_eq!(body[body.len() - 512..], full[full.len() - 512..]);
        let data_start = body.len() - (n - k) as usize * (512 + BS as usize) - 512;
        assert_eq!(body[data_start..], full[data_start + removed..]);
        if k == 0 {
            assert!(body == full);
        }
        assert_eq!(cut_then_resumed(&full, k, &body, dir.path()), want, "K={k}");
    }
}

#[test]
fn a_resume_point_past_the_stream_is_refused_before_the_import() {
    let dir = tempfile::tempdir().unwrap();
    let full = full_stream(&source(dir.path()));
    let (src, h) = export_side(full.clone());
    // An import side that is never answered: the error must come first.
    let (_l, dst) = listen();
    let tally = Tally::default();
    let e = net::relay(
        &side(&src, "/x"),
        Some(&side(&dst, "/y")),
        &run(&tally, WRITTEN.len() as u64 + 1),
        true,
        None,
    )
    .unwrap_err();
    assert_eq!(e.kind(), "bad_range", "{e}");
    assert!(
        e.to_string().contains("beyond the stream's 10 blocks"),
        "{e}"
    );
    drop(src);
    h.join().unwrap();
    // Without a destination nothing would be sent: a resume point is refused too.
    let (src, h) = export_side(full);
    let e = net::relay(&side(&src, "/x"), None, &run(&tally, 1), true, None).unwrap_err();
    assert_eq!(e.kind(), "bad_range");
    drop(src);
    h.join().unwrap();
}

#[test]
fn an_upload_resumed_at_k_sends_what_the_relay_sends() {
    let dir = tempfile::tempdir().unwrap();
    let full = full_stream(&source(dir.path()));
    let file = dir.path().join("disk.vhd");
    std::fs::write(&file, &full).unwrap();
    let whole = parse(&full[..], opts(full.len()), &mut NullSink).unwrap();
    let n = whole.blocks;
    for k in [0, 3, n] {
        let tally = Tally::default();
        let (dst, h) = import_side();
        let (r, status) = net::upload(
            std::fs::File::open(&file).unwrap(),
            &side(&dst, "/import_raw_vdi"),
            &run(&tally, k),
        )
        .unwrap();
        assert_eq!(status, 200);
        let (_, body) = h.join().unwrap();
        let (_, relayed) = relay(&full, k, &Tally::default());
        assert!(body == relayed, "K={k}");
        // Only what is sent is read: the digests are those of blocks K..
        assert_eq!(r.digests, whole.digests[k as usize..]);
        assert_eq!((r.resumed_from, r.blocks_sent), (k, n - k));
        assert_eq!(tally.position.load(Ordering::Relaxed), n);
        assert_eq!(tally.blocks.load(Ordering::Relaxed), n);
    }
}

fn download(full: &[u8], path: &Path, k: u64) -> xencr_engine::Result<StreamReport> {
    let (src, h) = export_side(full.to_vec());
    let tally = Tally::default();
    let r = net::download(&side(&src, "/export_raw_vdi"), path, &run(&tally, k));
    drop(src);
    h.join().unwrap();
    if r.is_ok() {
        assert_eq!(tally.position.load(Ordering::Relaxed), WRITTEN.len() as u64);
    }
    r
}

#[test]
fn a_cut_download_resumed_is_byte_equal_to_an_uncut_one() {
    let dir = tempfile::tempdir().unwrap();
    let c = source(dir.path());
    let first = full_stream(&c);
    let whole = parse(&first[..], opts(first.len()), &mut NullSink).unwrap();
    let uncut = dir.path().join("uncut.vhd");
    let r = download(&first, &uncut, 0).unwrap();
    assert!(std::fs::read(&uncut).unwrap() == first);
    assert_eq!(r.bytes_out, first.len() as u64);
    assert!(
        download(&first, &uncut, 0).is_err(),
        "never over an existing file"
    );
    // Another export of the same disk: a fresh footer UUID, the same blocks.
    let second = full_stream(&c);
    assert_ne!(first[..512], second[..512]);
    let block = 512 + BS as usize;
    let data_start = first.len() - whole.blocks as usize * block - 512;
    for (cut_at, k) in [
        (data_start + 3 * block + 100, 2u64),
        (data_start + 5 * block, 5),
        (first.len() - 1, 10),
    ] {
        let partial = dir.path().join(format!("cut-{k}.vhd.partial"));
        std::fs::write(&partial, &first[..cut_at]).unwrap();
        let r = download(&second, &partial, k).unwrap();
        assert!(std::fs::read(&partial).unwrap() == second, "K={k}");
        assert_eq!(r.digests, whole.digests, "every block digested");
        assert_eq!(
            r.bytes_out,
            (second.len() - data_start - k as usize * block) as u64
        );
        assert_eq!(r.resumed_from, k);
        assert_eq!(_engine_check(&partial), Vec::<String>::new());
    }
    // Too short for the resume point, or another disk's start: refused, the file untouched.
    let partial = dir.path().join("short.partial");
    std::fs::write(&partial, &first[..data_start + block]).unwrap();
    let e = download(&second, &partial, 2).unwrap_err();
    assert_eq!(e.kind(), "resume_mismatch", "{e}");
    assert!(e.to_string().contains("short.partial"), "{e}");
    assert!(std::fs::read(&partial).unwrap() == first[..data_start + block]);
    let other = dir.path().join("other.partial");
    let mut o = first.clone();
    o[2048 + 4 * 3] ^= 1; // a BAT entry
    std::fs::write(&other, &o[..data_start + 4 * block]).unwrap();
    let e = download(&second, &other, 2).unwrap_err();
    assert_eq!(e.kind(), "resume_mismatch", "{e}");
    assert!(e.to_string().contains("block table"), "{e}");
}

fn _engine_check(p: &Path) -> Vec<String> {
    let insp = xencr_engine::image::VhdFile::inspect(p).unwrap();
    insp.problems.iter().map(ToString::to_string).collect()
}

/// A writer that takes `left` bytes, then fails.
struct Breaks {
    left: usize,
}

impl Write for Breaks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_position_counts_blocks_whose_last_byte_was_written() {
    use xencr_engine::stream::transform::{transform_cut, Pass};
    use xencr_engine::stream::{Cut, Keep};
    let dir = tempfile::tempdir().unwrap();
    let full = full_stream(&source(dir.path()));
    let n = WRITTEN.len() as u64;
    let block = 512 + u64::from(BS);
    for k in [0u64, 3] {
        let cut = Cut::new(&full, full.len() as u64, k).unwrap();
        let prologue = cut.start(0);
        for x in [
            0,
            prologue,
            prologue + block - 1,
            prologue + block,
            prologue + 4 * block + 7,
        ] {
            let tally = Tally::default();
            let pass = Pass {
                cut: &cut,
                keep: Keep::Import,
                tally: Some(&tally),
                base: 0,
            };
            let mut out = Breaks { left: x as usize };
            let e = transform_cut(
                &full[..],
                &mut out,
                opts(full.len()),
                None,
                &mut NullSink,
                &pass,
            )
            .unwrap_err();
            assert_eq!(e.kind(), "io", "{e}");
            // Blocks before K pass as they are read; the others once their last byte is out.
            let sent_whole = x.saturating_sub(prologue) / block;
            let want = if x < prologue {
                0
            } else {
                (k + sent_whole).min(n)
            };
            assert_eq!(
                tally.position.load(Ordering::Relaxed),
                want,
                "K={k}, {x} bytes out"
            );
            // What went out whole: all but the piece the writer broke in.
            let sent = tally.sent.load(Ordering::Relaxed);
            assert!(
                sent <= x && x - sent < block,
                "K={k}: {sent} of {x} bytes counted"
            );
        }
    }
}
