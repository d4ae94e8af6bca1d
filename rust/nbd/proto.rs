//! NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): the constants and the pure
//! encoders and decoders of the messages the client sends and receives. No I/O here; every
//! decoder takes the bytes it was given and answers with a value or a reason, never a panic.

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// The oldstyle handshake's second magic (`cliserv_magic`), refused.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of the server's option replies.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;

// Information types of `NBD_OPT_GO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission.
pub const CMD_READ: u16 = 0;
pub const CMD_DISC: u16 = 2;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
pub const ALLOCATION: &str = "base:allocation";

/// Strings (names, messages) are at most 4096 bytes; an option reply carrying more than this
/// is not one this client asked for.
pub const MAX_OPT_REPLY: u32 = 64 * 1024;
/// An error chunk: error, message length, a message of at most 4096 bytes, an offset.
pub const MAX_ERROR_CHUNK: u32 = 4 + 2 + 4096 + 8;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The name of an option, for messages.
pub fn opt_name(opt: u32) -> String {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME".into(),
        OPT_STARTTLS => "NBD_OPT_STARTTLS".into(),
        OPT_GO => "NBD_OPT_GO".into(),
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY".into(),
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT".into(),
        other => format!("option {other}"),
    }
}

/// The name of an option reply type (errors have bit 31 set).
pub fn rep_name(rep: u32) -> String {
    let name = match rep {
        REP_ACK => "NBD_REP_ACK",
        2 => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        0x8000_0002 => "NBD_REP_ERR_POLICY",
        0x8000_0003 => "NBD_REP_ERR_INVALID",
        0x8000_0004 => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        0x8000_0006 => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        0x8000_0009 => "NBD_REP_ERR_TOO_BIG",
        0x8000_000a => "NBD_REP_ERR_EXT_HEADER_REQD",
        other => return format!("reply type {other:#x}"),
    };
    name.into()
}

pub fn is_rep_error(rep: u32) -> bool {
    rep & 0x8000_0000 != 0
}

/// The name of a transmission error value (`NBD_EIO`...).
pub fn errno_name(e: u32) -> String {
    let name = match e {
        1 => "NBD_EPERM (operation not permitted)",
        5 => "NBD_EIO (input/output error)",
        12 => "NBD_ENOMEM (cannot allocate memory)",
        22 => "NBD_EINVAL (invalid argument)",
        28 => "NBD_ENOSPC (no space left on device)",
        75 => "NBD_EOVERFLOW (value too large)",
        95 => "NBD_ENOTSUP (operation not supported)",
        108 => "NBD_ESHUTDOWN (server is shutting down)",
        other => return format!("error {other}"),
    };
    name.into()
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes).
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, String> {
    let magic = be64(b, 0);
    if magic != NBDMAGIC {
        return Err(format!(
            "not an NBD server (greeting {:#018x}, expected NBDMAGIC)",
            magic
        ));
    }
    match be64(b, 8) {
        IHAVEOPT => {}
        CLISERV_MAGIC => return Err("the server speaks only the oldstyle handshake".into()),
        other => return Err(format!("unknown handshake magic {other:#018x}")),
    }
    let flags = be16(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("the server does not offer fixed newstyle negotiation".into());
    }
    Ok(flags)
}

/// An option request: `IHAVEOPT`, option, length, data.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Data of `NBD_OPT_GO`: the export name and one information request, the block sizes (so
/// that the server may state constraints we then honour).
pub fn go_data(export: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(export.len() + 8);
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d
}

/// Data of `NBD_OPT_SET_META_CONTEXT`: the export name and the one query `base:allocation`.
pub fn meta_context_data(export: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(export.len() + 12 + ALLOCATION.len());
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(ALLOCATION.len() as u32).to_be_bytes());
    d.extend_from_slice(ALLOCATION.as_bytes());
    d
}

/// The fixed part of an option reply (20 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReply {
    pub opt: u32,
    pub rep: u32,
    pub len: u32,
}

pub fn parse_opt_reply(b: &[u8; 20], sent: u32) -> Result<OptReply, String> {
    let magic = be64(b, 0);
    if magic != OPT_REPLY_MAGIC {
        return Err(format!("bad option reply magic {magic:#018x}"));
    }
    let r = OptReply {
        opt: be32(b, 8),
        rep: be32(b, 12),
        len: be32(b, 16),
    };
    if r.opt != sent {
        return Err(format!(
            "a reply to {} came while waiting for the reply to {}",
            opt_name(r.opt),
            opt_name(sent)
        ));
    }
    if r.len > MAX_OPT_REPLY {
        return Err(format!(
            "an option reply of {} bytes (at most {MAX_OPT_REPLY})",
            r.len
        ));
    }
    Ok(r)
}

/// What an `NBD_REP_INFO` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    BlockSize { min: u32, preferred: u32, max: u32 },
    Other,
}

pub fn parse_info(p: &[u8]) -> Result<Info, String> {
    if p.len() < 2 {
        return Err(format!("an NBD_REP_INFO of {} bytes", p.len()));
    }
    match be16(p, 0) {
        INFO_EXPORT => {
            if p.len() != 12 {
                return Err(format!("NBD_INFO_EXPORT of {} bytes, expected 12", p.len()));
            }
            Ok(Info::Export {
                size: be64(p, 2),
                flags: be16(p, 10),
            })
        }
        INFO_BLOCK_SIZE => {
            if p.len() != 14 {
                return Err(format!(
                    "NBD_INFO_BLOCK_SIZE of {} bytes, expected 14",
                    p.len()
                ));
            }
            let (min, preferred, max) = (be32(p, 2), be32(p, 6), be32(p, 10));
            if !min.is_power_of_two() || min > 65536 || max < min {
                return Err(format!(
                    "block sizes min {min}, preferred {preferred}, max {max} break the rules"
                ));
            }
            Ok(Info::BlockSize {
                min,
                preferred,
                max,
            })
        }
        _ => Ok(Info::Other),
    }
}

/// An `NBD_REP_META_CONTEXT`: the context's id and name.
pub fn parse_meta_context(p: &[u8]) -> Result<(u32, String), String> {
    if p.len() < 4 {
        return Err(format!("an NBD_REP_META_CONTEXT of {} bytes", p.len()));
    }
    Ok((be32(p, 0), String::from_utf8_lossy(&p[4..]).into_owned()))
}

/// The reply to `NBD_OPT_EXPORT_NAME` (the fallback when `NBD_OPT_GO` is unknown): size and
/// transmission flags (then 124 zeros unless both sides agreed to drop them).
pub fn parse_export_name_reply(b: &[u8; 10]) -> (u64, u16) {
    (be64(b, 0), be16(b, 8))
}

/// A transmission request (28 bytes).
pub fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// The start of every reply: 4 bytes of magic tell which of the two kinds follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A simple reply: 12 more bytes (error, cookie).
    Simple,
    /// A structured reply chunk: 16 more bytes (flags, type, cookie, length).
    Structured,
}

pub fn reply_kind(magic: [u8; 4]) -> Result<ReplyKind, String> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
        other => Err(format!("bad reply magic {other:#010x}")),
    }
}

/// The rest of a simple reply: (error, cookie).
pub fn parse_simple(b: &[u8; 12]) -> (u32, u64) {
    (be32(b, 0), be64(b, 4))
}

/// The rest of a structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub len: u32,
}

impl Chunk {
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
    pub fn is_error(&self) -> bool {
        self.kind & 0x8000 != 0
    }
}

pub fn parse_chunk(b: &[u8; 16]) -> Chunk {
    Chunk {
        flags: be16(b, 0),
        kind: be16(b, 2),
        cookie: be64(b, 4),
        len: be32(b, 12),
    }
}

/// An error chunk's payload: the error, its message, and for `NBD_REPLY_TYPE_ERROR_OFFSET`
/// the offset. Unknown error types (bit 15 set) share the first two fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    pub error: u32,
    pub message: String,
    pub offset: Option<u64>,
}

pub fn parse_error_chunk(kind: u16, p: &[u8]) -> Result<ChunkError, String> {
    let fixed = if kind == REPLY_TYPE_ERROR_OFFSET {
        14
    } else {
        6
    };
    if p.len() < fixed {
        return Err(format!(
            "an error chunk of {} bytes, expected at least {fixed}",
            p.len()
        ));
    }
    let error = be32(p, 0);
    let mlen = usize::from(be16(p, 4));
    if mlen > p.len() - fixed {
        return Err(format!(
            "an error chunk whose message ({mlen} bytes) overruns its {} bytes",
            p.len()
        ));
    }
    let message = printable(&p[6..6 + mlen]);
    let offset = (kind == REPLY_TYPE_ERROR_OFFSET).then(|| be64(p, 6 + mlen));
    Ok(ChunkError {
        error,
        message,
        offset,
    })
}

/// One block status descriptor: (length, flags).
pub fn parse_extent(b: &[u8; 8]) -> (u32, u32) {
    (be32(b, 0), be32(b, 4))
}

/// A server's text on one line, control characters replaced.
pub fn printable(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting() {
        let mut g = [0u8; 18];
        g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_greeting(&g), Ok(3));
        g[17] = 2;
        assert!(parse_greeting(&g).unwrap_err().contains("fixed newstyle"));
        g[8..16].copy_from_slice(&CLISERV_MAGIC.to_be_bytes());
        assert!(parse_greeting(&g).unwrap_err().contains("oldstyle"));
        g[0] = 0;
        assert!(parse_greeting(&g)
            .unwrap_err()
            .contains("not an NBD server"));
    }

    #[test]
    fn option_and_go_encoding() {
        let o = option(OPT_GO, &go_data("ab"));
        assert_eq!(&o[..8], b"IHAVEOPT");
        assert_eq!(&o[8..12], &[0, 0, 0, 7]);
        assert_eq!(&o[12..16], &[0, 0, 0, 10]);
        assert_eq!(&o[16..], &[0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3]);
        let m = meta_context_data("");
        assert_eq!(m.len(), 4 + 4 + 4 + 15);
        assert_eq!(&m[12..], b"base:allocation");
    }

    #[test]
    fn request_encoding() {
        let r = request(CMD_READ, 0, 0x0102, 0x10000, 0x20000);
        assert_eq!(&r[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&r[6..8], &[0, 0]);
        assert_eq!(&r[8..16], &0x0102u64.to_be_bytes());
        assert_eq!(&r[16..24], &0x10000u64.to_be_bytes());
        assert_eq!(&r[24..28], &0x20000u32.to_be_bytes());
    }

    #[test]
    fn opt_reply_checks() {
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&REP_ACK.to_be_bytes());
        assert_eq!(
            parse_opt_reply(&b, OPT_GO),
            Ok(OptReply {
                opt: OPT_GO,
                rep: REP_ACK,
                len: 0
            })
        );
        assert!(parse_opt_reply(&b, OPT_STARTTLS).is_err());
        b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_opt_reply(&b, OPT_GO).unwrap_err().contains("bytes"));
        b[0] = 9;
        assert!(parse_opt_reply(&b, OPT_GO).unwrap_err().contains("magic"));
    }

    #[test]
    fn infos() {
        let mut e = vec![0u8, 0];
        e.extend_from_slice(&(1u64 << 30).to_be_bytes());
        e.extend_from_slice(&0x1u16.to_be_bytes());
        assert_eq!(
            parse_info(&e),
            Ok(Info::Export {
                size: 1 << 30,
                flags: 1
            })
        );
        assert!(parse_info(&e[..11]).is_err());
        let mut bs = vec![0u8, 3];
        for v in [512u32, 4096, 1 << 25] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        assert!(matches!(
            parse_info(&bs),
            Ok(Info::BlockSize { min: 512, .. })
        ));
        bs[2..6].copy_from_slice(&3u32.to_be_bytes());
        assert!(parse_info(&bs).is_err());
        assert_eq!(parse_info(&[0, 9, 1, 2]), Ok(Info::Other));
        assert!(parse_info(&[0]).is_err());
    }

    #[test]
    fn error_chunks() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&3u16.to_be_bytes());
        p.extend_from_slice(b"bad");
        assert_eq!(
            parse_error_chunk(REPLY_TYPE_ERROR, &p),
            Ok(ChunkError {
                error: 5,
                message: "bad".into(),
                offset: None
            })
        );
        // The offset variant needs 8 more bytes.
        assert!(parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p).is_err());
        p.extend_from_slice(&77u64.to_be_bytes());
        assert_eq!(
            parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p)
                .unwrap()
                .offset,
            Some(77)
        );
        // A message length past the payload.
        let mut q = 5u32.to_be_bytes().to_vec();
        q.extend_from_slice(&100u16.to_be_bytes());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &q).is_err());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &q[..3]).is_err());
    }

    #[test]
    fn every_short_or_garbage_input_is_an_answer() {
        // Exhaustive-ish: every prefix of some garbage through each decoder; none may panic.
        let garbage: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
        for n in 0..garbage.len() {
            let g = &garbage[..n];
            let _ = parse_info(g);
            let _ = parse_meta_context(g);
            for kind in [REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET, 0x8fff] {
                let _ = parse_error_chunk(kind, g);
            }
            let _ = printable(g);
        }
        let mut m = [0u8; 4];
        m.copy_from_slice(&garbage[..4]);
        assert!(reply_kind(m).is_err());
    }
}
