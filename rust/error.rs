//! The engine's one error type. Every format failure names the structure, the byte offset and
//! what was expected, so a user gets one readable line and a program gets a stable `kind()`.

use thiserror::Error;

pub type Result<T> = std::result::Result<T, VhdError>;

#[derive(Debug, Error)]
pub enum VhdError {
    #[error("{structure} at offset {offset}: bad cookie {found:?}, expected {expected:?}")]
    BadCookie {
        structure: &'static str,
        offset: u64,
        expected: &'static str,
        found: String,
    },

    #[error(
        "{structure} at offset {offset}: checksum is {found:#010x}, computed {expected:#010x}"
    )]
    BadChecksum {
        structure: &'static str,
        offset: u64,
        expected: u32,
        found: u32,
    },

    #[error(
        "{structure} at offset {offset}: unsupported version {found:#010x}, expected 0x00010000"
    )]
    BadVersion {
        structure: &'static str,
        offset: u64,
        found: u32,
    },

    #[error("footer at offset {offset}: disk type {found} is not fixed (2), dynamic (3) or differencing (4)")]
    BadDiskType { offset: u64, found: u32 },

    #[error("{structure} at offset {offset}: data offset {found:#x}, expected {expected}")]
    BadDataOffset {
        structure: &'static str,
        offset: u64,
        found: u64,
        expected: &'static str,
    },

    #[error("footer copy at offset 0 differs from the footer at offset {offset}")]
    FooterMismatch { offset: u64 },

    #[error("header at offset {offset}: block size {found} is not a power of two of at least 512 bytes (and at most 256 MiB)")]
    BadBlockSize { offset: u64, found: u32 },

    #[error("header at offset {offset}: {entries} table entries cover {covered} bytes, less than the disk size {size}")]
    TableTooSmall {
        offset: u64,
        entries: u32,
        covered: u64,
        size: u64,
    },

    #[error("BAT entry {index} at offset {offset}: block at byte {block_offset} (+{block_len}) lies outside the file ({file_size} bytes of data)")]
    BatOutOfBounds {
        index: u32,
        offset: u64,
        block_offset: u64,
        block_len: u64,
        file_size: u64,
    },

    #[error("BAT entry {index} at offset {offset}: block at byte {block_offset} overlaps {other}")]
    BatOverlap {
        index: u32,
        offset: u64,
        block_offset: u64,
        other: String,
    },

    #[error("parent locator {index} at offset {offset}: data at byte {data_offset} (+{data_len}) {problem}")]
    LocatorOutOfBounds {
        index: usize,
        offset: u64,
        data_offset: u64,
        data_len: u64,
        problem: String,
    },

    /// The file (or stream) ends before a structure that must be there: `expected` is the least
    /// length that would hold it (and whatever must follow it, such as the closing footer).
    #[error("{structure} at offset {offset}: truncated: file ends at {file_size}, expected at least {expected}")]
    Truncated {
        structure: &'static str,
        offset: u64,
        expected: u64,
        file_size: u64,
    },

    #[error("{structure} at offset {offset}: {what} is {found}, over the limit {limit}")]
    TooLarge {
        structure: &'static str,
        offset: u64,
        what: &'static str,
        found: u64,
        limit: u64,
    },

    #[error("parent of {child} not found: {detail}")]
    ParentNotFound { child: String, detail: String },

    #[error("parent {parent} has UUID {found}, but {child} expects {expected}")]
    ParentMismatch {
        child: String,
        parent: String,
        expected: String,
        found: String,
    },

    #[error("{path} is not a differencing disk")]
    NotDifferencing { path: String },

    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("bad range: {0}")]
    BadRange(String),

    #[error("stream at offset {offset}: {detail}")]
    StreamOrder { offset: u64, detail: String },

    #[error("stream: {detail}")]
    StreamLength { detail: String },

    #[error("stream bitmap of block {block} at offset {offset} is not full, as an XAPI export's must be")]
    PartialBitmap { block: u32, offset: u64 },

    #[error("batmap at offset {offset}: {detail}")]
    Batmap { offset: u64, detail: String },

    #[error("merge state {path}: {detail}")]
    MergeState { path: String, detail: String },

    #[error("size mismatch: {0}")]
    SizeMismatch(String),

    #[error("{host} answered HTTP {status} to the {side}")]
    Http {
        side: &'static str,
        host: String,
        status: u16,
    },

    /// A 3xx: the pool sends the request to the host that can serve it (XAPI's 302 for a VDI
    /// whose SR another host sees). The location carries the session in its query: it is an
    /// attribute for the caller to follow, never part of the message.
    #[error("{host} redirected the {side} to another host")]
    Redirect {
        side: &'static str,
        host: String,
        location: String,
    },

    /// The NBD server refused an option or a command, or broke the protocol (a reply that does
    /// not parse, a connection closed mid-reply). `what` names the option or command; nothing
    /// here carries the export name, which holds the session (a secret).
    #[error("NBD server {peer}: {what}: {detail}")]
    Nbd {
        peer: String,
        what: String,
        detail: String,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },

    /// A partial file to resume into is not the start of the stream being resumed.
    #[error("cannot resume into {path}: {detail}")]
    ResumeMismatch { path: String, detail: String },

    /// A file to read does not exist (Python gets `FileNotFoundError` with the path).
    #[error("no such file: {path}")]
    NoSuchFile {
        path: String,
        source: std::io::Error,
    },
}

impl VhdError {
    /// Stable machine-readable code (mirrored in `_engine.pyi`).
    pub fn kind(&self) -> &'static str {
        match self {
            VhdError::BadCookie { .. } => "bad_cookie",
            VhdError::BadChecksum { .. } => "bad_checksum",
            VhdError::BadVersion { .. } => "bad_version",
            VhdError::BadDiskType { .. } => "bad_disk_type",
            VhdError::BadDataOffset { .. } => "bad_data_offset",
            VhdError::FooterMismatch { .. } => "footer_mismatch",
            VhdError::BadBlockSize { .. } => "bad_block_size",
            VhdError::TableTooSmall { .. } => "table_too_small",
            VhdError::BatOutOfBounds { .. } => "bat_out_of_bounds",
            VhdError::BatOverlap { .. } => "bat_overlap",
            VhdError::LocatorOutOfBounds { .. } => "locator_out_of_bounds",
            VhdError::Truncated { .. } => "truncated",
            VhdError::TooLarge { .. } => "too_large",
            VhdError::ParentNotFound { .. } => "parent_not_found",
            VhdError::ParentMismatch { .. } => "parent_mismatch",
            VhdError::NotDifferencing { .. } => "not_differencing",
            VhdError::Unsupported(_) => "unsupported",
            VhdError::BadRange(_) => "bad_range",
            VhdError::StreamOrder { .. } => "stream_order",
            VhdError::StreamLength { .. } => "stream_length",
            VhdError::PartialBitmap { .. } => "partial_bitmap",
            VhdError::Batmap { .. } => "batmap",
            VhdError::MergeState { .. } => "merge_state",
            VhdError::SizeMismatch(_) => "size_mismatch",
            VhdError::Http { .. } => "http_status",
            VhdError::Redirect { .. } => "redirect",
            VhdError::Nbd { .. } => "nbd",
            VhdError::Io { .. } => "io",
            VhdError::NoSuchFile { .. } => "no_such_file",
            VhdError::ResumeMismatch { .. } => "resume_mismatch",
        }
    }

    /// The on-disk structure concerned, when there is one.
    /// Which request of a relay an HTTP answer came to: "export" or "import".
    pub fn side(&self) -> Option<&'static str> {
        match self {
            VhdError::Http { side, .. } | VhdError::Redirect { side, .. } => Some(side),
            _ => None,
        }
    }

    /// Where a redirect sends the request (its whole URL, query included).
    pub fn location(&self) -> Option<&str> {
        match self {
            VhdError::Redirect { location, .. } => Some(location),
            _ => None,
        }
    }

    pub fn structure(&self) -> Option<&'static str> {
        match self {
            VhdError::BadCookie { structure, .. }
            | VhdError::BadChecksum { structure, .. }
            | VhdError::BadVersion { structure, .. }
            | VhdError::BadDataOffset { structure, .. }
            | VhdError::Truncated { structure, .. }
            | VhdError::TooLarge { structure, .. } => Some(structure),
            VhdError::BadDiskType { .. } | VhdError::FooterMismatch { .. } => Some("footer"),
            VhdError::BadBlockSize { .. } | VhdError::TableTooSmall { .. } => Some("header"),
            VhdError::BatOutOfBounds { .. } | VhdError::BatOverlap { .. } => Some("bat"),
            VhdError::LocatorOutOfBounds { .. } => Some("locator"),
            VhdError::ParentNotFound { .. } | VhdError::ParentMismatch { .. } => Some("chain"),
            VhdError::StreamOrder { .. } | VhdError::StreamLength { .. } => Some("stream"),
            VhdError::PartialBitmap { .. } => Some("bitmap"),
            VhdError::Batmap { .. } => Some("batmap"),
            _ => None,
        }
    }

    /// The byte offset concerned, when there is one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            VhdError::BadCookie { offset, .. }
            | VhdError::BadChecksum { offset, .. }
            | VhdError::BadVersion { offset, .. }
            | VhdError::BadDiskType { offset, .. }
            | VhdError::BadDataOffset { offset, .. }
            | VhdError::FooterMismatch { offset }
            | VhdError::BadBlockSize { offset, .. }
            | VhdError::TableTooSmall { offset, .. }
            | VhdError::BatOutOfBounds { offset, .. }
            | VhdError::BatOverlap { offset, .. }
            | VhdError::LocatorOutOfBounds { offset, .. }
            | VhdError::Truncated { offset, .. }
            | VhdError::TooLarge { offset, .. }
            | VhdError::StreamOrder { offset, .. }
            | VhdError::PartialBitmap { offset, .. }
            | VhdError::Batmap { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VhdError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Attach a context string to `std::io::Result`s.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;

    /// The result of opening `path`: a missing file is [`VhdError::NoSuchFile`] naming it
    /// ("no such file: PATH"), any other failure "cannot open PATH: reason".
    fn opening(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| VhdError::io(context(), e))
    }

    fn opening(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VhdError::NoSuchFile {
                path: path.display().to_string(),
                source: e,
            },
            _ => VhdError::io(format!("cannot open {}", path.display()), e),
        })
    }
}
