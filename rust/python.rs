//! The PyO3 seam: a few coarse calls that take paths or file descriptors, release the GIL for
//! their whole duration and return plain dicts. Typed stub: `python/xencr/_engine.pyi`.

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pyo3::exceptions::{PyException, PyFileNotFoundError, PyOSError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::error::{IoContext, VhdError as Error};
use crate::format::{uuid_from_str, uuid_to_string, DEFAULT_BLOCK_SIZE, SECTOR};
use crate::image::{self, convert as conv, create as make, Chain, Source, VhdFile};
use crate::stream::apply::{apply, Target};
use crate::stream::parse::ParseOptions;
use crate::stream::{digest, export, transform as tr, StreamReport, Tally};

pyo3::create_exception!(
    _engine,
    VhdError,
    PyException,
    "A typed engine error; str(err) is one readable line."
);

type PyRes<T> = PyResult<T>;

fn to_py(py: Python<'_>, e: Error) -> PyErr {
    if let Error::NoSuchFile { path, source } = &e {
        // FileNotFoundError(errno, "no such file", path): `.filename` names the file.
        let errno = source.raw_os_error().unwrap_or(libc::ENOENT);
        return PyFileNotFoundError::new_err((errno, "no such file", path.clone()));
    }
    if let Error::Io { context, source } = &e {
        let msg = format!("{context}: {source}");
        return match source.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, msg)),
            None => PyOSError::new_err(msg),
        };
    }
    let err = VhdError::new_err(e.to_string());
    let value = err.value(py);
    // Attribute setting on a fresh exception instance cannot fail in practice; ignore if it does.
    let _ = value.setattr("kind", e.kind());
    let _ = value.setattr("structure", e.structure());
    let _ = value.setattr("offset", e.offset());
    let _ = value.setattr("side", e.side());
    let _ = value.setattr("location", e.location());
    err
}

/// Run `f` without the GIL and map its error.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> crate::Result<T> + Send) -> PyRes<T> {
    py.detach(f).map_err(|e| to_py(py, e))
}

fn paths(v: Option<Vec<PathBuf>>) -> Vec<PathBuf> {
    v.unwrap_or_default()
}

/// A file descriptor owned by the caller, or a path we open ourselves.
#[derive(FromPyObject)]
pub enum Endpoint {
    Fd(i32),
    Path(PathBuf),
}

/// Borrow a caller's file descriptor as a `File` that is never closed by us.
pub fn borrow_fd(fd: i32) -> ManuallyDrop<File> {
    // SAFETY: the caller (Python) owns `fd` and keeps it open for the duration of the call,
    // which holds a reference to the object that owns it; ManuallyDrop guarantees we never
    // close it, so no double close or use-after-close can come from this side.
    ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

/// A byte counter a Python thread can read while a coarse call runs without the GIL: how a
/// caller shows progress, rate and ETA without a per-block callback. The transfer counters
/// (`position`, `blocks`, `sent`) say where a cut transfer can resume and what it sent.
#[pyclass(frozen, module = "xencr._engine")]
pub struct Progress {
    done: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    tally: Arc<Tally>,
}

#[pymethods]
impl Progress {
    #[new]
    fn new() -> Self {
        Progress {
            done: Arc::new(AtomicU64::new(0)),
            total: Arc::new(AtomicU64::new(0)),
            tally: Arc::new(Tally::default()),
        }
    }

    /// Bytes read from the source so far (for an export: bytes written).
    #[getter]
    fn bytes(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// The stream's total length once known (0 before), for calls that learn it themselves.
    #[getter]
    fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Blocks of the stream passed completely, counted in stream order from the first block
    /// of the whole export (relay, nbd_copy, download, upload).
    #[getter]
    fn position(&self) -> u64 {
        self.tally.position.load(Ordering::Relaxed)
    }

    /// The blocks the whole stream has, once known (0 before).
    #[getter]
    fn blocks(&self) -> u64 {
        self.tally.blocks.load(Ordering::Relaxed)
    }

    /// Bytes written to the output so far (relay, nbd_copy, download, upload).
    #[getter]
    fn sent(&self) -> u64 {
        self.tally.sent.load(Ordering::Relaxed)
    }
}

/// The block counters of a caller's `Progress`, for the engine.
fn tally_of(progress: &Option<Py<Progress>>) -> Option<Arc<Tally>> {
    progress.as_ref().map(|p| p.get().tally.clone())
}

/// The keys every resumable call adds to its report.
fn resume_keys(d: &Bound<'_, PyDict>, r: &StreamReport) -> PyRes<()> {
    d.set_item("resumed_from", r.resumed_from)?;
    d.set_item("blocks_sent", r.blocks_sent)?;
    Ok(())
}

/// Counts the bytes that pass through a reader or a writer into a `Progress`.
struct Counted<T> {
    inner: T,
    done: Option<Arc<AtomicU64>>,
}

impl<T> Counted<T> {
    fn new(inner: T, progress: &Option<Py<Progress>>) -> Self {
        Counted {
            inner,
            done: progress.as_ref().map(|p| p.get().done.clone()),
        }
    }
    fn add(&self, n: usize) {
        if let Some(d) = &self.done {
            d.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.add(n);
        Ok(n)
    }
}

impl<W: std::io::Write> std::io::Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.add(n);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn json_to_py<'py>(py: Python<'py>, v: &serde_json::Value) -> PyRes<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (v.to_string(),))
}

#[pyfunction]
#[pyo3(signature = (path, parents=None))]
fn info<'py>(
    py: Python<'py>,
    path: PathBuf,
    parents: Option<Vec<PathBuf>>,
) -> PyRes<Bound<'py, PyAny>> {
    let v = detached(py, || {
        let parents = paths(parents);
        let leaf = VhdFile::open(&path, false)?;
        // A differencing disk whose parent cannot be found is still described, alone.
        match Chain::open(&path, &parents, false) {
            Ok(c) => image::info::describe(&c),
            Err(Error::ParentNotFound { .. }) if parents.is_empty() => {
                let mut v = image::info::describe_file(&leaf)?;
                v["chain"] = serde_json::json!([path.display().to_string()]);
                Ok(v)
            }
            Err(e) => Err(e),
        }
    })?;
    json_to_py(py, &v)
}

#[pyfunction]
#[pyo3(signature = (path, parents=None))]
fn check(py: Python<'_>, path: PathBuf, parents: Option<Vec<PathBuf>>) -> PyRes<Vec<String>> {
    detached(py, || {
        let insp = VhdFile::inspect(&path)?;
        let mut out: Vec<String> = insp.problems.iter().map(ToString::to_string).collect();
        if out.is_empty() {
            if let Some(p) = parents.filter(|p| !p.is_empty()) {
                if let Err(e) = Chain::open(&path, &p, false) {
                    out.push(e.to_string());
                }
            }
        }
        Ok(out)
    })
}

#[pyfunction]
#[pyo3(signature = (path, parents=None))]
fn chain(py: Python<'_>, path: PathBuf, parents: Option<Vec<PathBuf>>) -> PyRes<Vec<String>> {
    detached(py, || {
        let c = Chain::open(&path, &paths(parents), false)?;
        Ok(c.layers
            .iter()
            .map(|l| l.path.display().to_string())
            .collect())
    })
}

#[pyfunction]
fn virtual_size(py: Python<'_>, path: PathBuf) -> PyRes<u64> {
    detached(py, || Ok(VhdFile::open(&path, false)?.size()))
}

#[pyfunction]
#[pyo3(signature = (path, offset, length, parents=None))]
fn read<'py>(
    py: Python<'py>,
    path: PathBuf,
    offset: u64,
    length: usize,
    parents: Option<Vec<PathBuf>>,
) -> PyRes<Bound<'py, PyBytes>> {
    let data = detached(py, || {
        let c = Chain::open(&path, &paths(parents), false)?;
        let mut buf = vec![0u8; length];
        c.read_at(offset, &mut buf)?;
        Ok(buf)
    })?;
    Ok(PyBytes::new(py, &data))
}

#[pyfunction]
#[pyo3(signature = (path, parents=None))]
fn sha256(py: Python<'_>, path: PathBuf, parents: Option<Vec<PathBuf>>) -> PyRes<String> {
    detached(py, || {
        image::sha256_hex(&Source::Vhd(Chain::open(&path, &paths(parents), false)?))
    })
}

#[pyfunction]
#[pyo3(signature = (path, dst, parents=None))]
fn cat(py: Python<'_>, path: PathBuf, dst: Endpoint, parents: Option<Vec<PathBuf>>) -> PyRes<u64> {
    detached(py, || {
        let src = Source::Vhd(Chain::open(&path, &paths(parents), false)?);
        match dst {
            Endpoint::Fd(fd) => image::cat(&src, &mut borrow_fd(fd), false),
            Endpoint::Path(p) => {
                let mut f = File::create(&p).ctx(|| format!("cannot create {}", p.display()))?;
                image::cat(&src, &mut f, true)
            }
        }
    })
}

fn parse_uuid(s: &str) -> crate::Result<[u8; 16]> {
    uuid_from_str(s).ok_or_else(|| Error::BadRange(format!("{s:?} is not a UUID")))
}

#[pyfunction]
#[pyo3(signature = (path, size, *, parent=None, block_size=DEFAULT_BLOCK_SIZE, uuid=None))]
fn create(
    py: Python<'_>,
    path: PathBuf,
    size: u64,
    parent: Option<PathBuf>,
    block_size: u32,
    uuid: Option<String>,
) -> PyRes<String> {
    detached(py, || {
        let uuid = uuid.as_deref().map(parse_uuid).transpose()?;
        let u = make::create(&path, size, block_size, uuid, parent.as_deref())?;
        Ok(uuid_to_string(&u))
    })
}

#[pyfunction]
#[pyo3(signature = (path, offset, data, parents=None))]
fn write(
    py: Python<'_>,
    path: PathBuf,
    offset: u64,
    data: Vec<u8>,
    parents: Option<Vec<PathBuf>>,
) -> PyRes<()> {
    detached(py, || {
        let mut c = Chain::open(&path, &paths(parents), true)?;
        c.write_at(offset, &data)
    })
}

#[pyfunction]
fn set_uuid(py: Python<'_>, path: PathBuf, uuid: String) -> PyRes<()> {
    detached(py, || make::set_uuid(&path, parse_uuid(&uuid)?))
}

#[pyfunction]
fn set_parent(py: Python<'_>, path: PathBuf, parent: PathBuf) -> PyRes<()> {
    detached(py, || make::set_parent(&path, &parent))
}

#[pyfunction]
#[pyo3(signature = (src, dst, *, src_format="vhd".to_string(), dst_format="dynamic".to_string(), parents=None, block_size=DEFAULT_BLOCK_SIZE))]
fn convert<'py>(
    py: Python<'py>,
    src: PathBuf,
    dst: PathBuf,
    src_format: String,
    dst_format: String,
    parents: Option<Vec<PathBuf>>,
    block_size: u32,
) -> PyRes<Bound<'py, PyDict>> {
    let r = detached(py, || {
        conv::convert(
            &src,
            &dst,
            &src_format,
            &dst_format,
            &paths(parents),
            block_size,
        )
    })?;
    let d = PyDict::new(py);
    d.set_item("virtual_size", r.virtual_size)?;
    d.set_item("bytes_read", r.bytes_read)?;
    d.set_item("bytes_written", r.bytes_written)?;
    d.set_item("blocks_written", r.blocks_written)?;
    d.set_item("zero_blocks_skipped", r.zero_blocks_skipped)?;
    Ok(d)
}

fn report_to_py<'py>(py: Python<'py>, r: &StreamReport) -> PyRes<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("bytes_in", r.bytes_in)?;
    d.set_item("bytes_out", r.bytes_out)?;
    d.set_item("blocks", r.blocks)?;
    d.set_item("zero_blocks_dropped", r.zero_blocks_dropped)?;
    d.set_item("sectors_written", r.sectors_written)?;
    d.set_item("virtual_size", r.virtual_size)?;
    d.set_item("block_size", r.block_size)?;
    d.set_item("disk_type", r.disk_type.name())?;
    d.set_item("parent_uuid", r.parent_uuid.as_ref().map(uuid_to_string))?;
    d.set_item("digest_algorithm", digest::ALGORITHM)?;
    let digests: Vec<(u32, String)> = r
        .digests
        .iter()
        .map(|(b, h)| (*b, digest::hex(*h)))
        .collect();
    d.set_item("digests", digests)?;
    Ok(d)
}

/// Open the disk to export and, for a delta, its base chain.
fn export_chains(
    path: &std::path::Path,
    parents: Vec<PathBuf>,
    base: Option<&std::path::Path>,
    base_parents: Vec<PathBuf>,
) -> crate::Result<(Chain, Option<Chain>)> {
    let chain = Chain::open(path, &parents, false)?;
    let base = base
        .map(|b| Chain::open(b, &base_parents, false))
        .transpose()?;
    Ok((chain, base))
}

#[pyfunction]
#[pyo3(signature = (path, base=None, *, parents=None, base_parents=None, skip_zero_blocks=false))]
fn stream_length(
    py: Python<'_>,
    path: PathBuf,
    base: Option<PathBuf>,
    parents: Option<Vec<PathBuf>>,
    base_parents: Option<Vec<PathBuf>>,
    skip_zero_blocks: bool,
) -> PyRes<u64> {
    detached(py, || {
        let (chain, base_chain) =
            export_chains(&path, paths(parents), base.as_deref(), paths(base_parents))?;
        let b = base_chain.as_ref().zip(base.as_deref());
        Ok(export::plan(&chain, b, skip_zero_blocks)?.length())
    })
}

#[pyfunction]
#[pyo3(signature = (path, dst, base=None, *, parents=None, base_parents=None, skip_zero_blocks=false, rate_limit=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn export_stream<'py>(
    py: Python<'py>,
    path: PathBuf,
    dst: Endpoint,
    base: Option<PathBuf>,
    parents: Option<Vec<PathBuf>>,
    base_parents: Option<Vec<PathBuf>>,
    skip_zero_blocks: bool,
    rate_limit: Option<u64>,
    progress: Option<Py<Progress>>,
) -> PyRes<Bound<'py, PyDict>> {
    let r = detached(py, || {
        let (chain, base_chain) =
            export_chains(&path, paths(parents), base.as_deref(), paths(base_parents))?;
        let b = base_chain.as_ref().zip(base.as_deref());
        match dst {
            Endpoint::Fd(fd) => {
                let mut f = borrow_fd(fd);
                let mut w = Counted::new(&mut *f, &progress);
                export::export(&chain, b, &mut w, skip_zero_blocks, rate_limit)
            }
            Endpoint::Path(p) => {
                let f = File::create(&p).ctx(|| format!("cannot create {}", p.display()))?;
                let mut w = Counted::new(std::io::BufWriter::with_capacity(1 << 20, f), &progress);
                export::export(&chain, b, &mut w, skip_zero_blocks, rate_limit)
            }
        }
    })?;
    report_to_py(py, &r)
}

/// The stream's source: caller's prefix bytes (already read off the socket), then the rest,
/// and its total length: as given, else what a regular file holds, so that every BAT entry is
/// bounded before the first write. A pipe or socket without a given length stays unbounded.
fn open_source(
    src: Endpoint,
    prefix: Vec<u8>,
    length: Option<u64>,
) -> crate::Result<(Box<dyn std::io::Read + Send>, Option<u64>)> {
    use std::io::{Read, Seek};
    let (rest, remaining): (Box<dyn Read + Send>, Option<u64>) = match src {
        Endpoint::Fd(fd) => {
            let mut f = borrow_fd(fd);
            let meta = f
                .metadata()
                .ctx(|| format!("cannot stat descriptor {fd}"))?;
            let remaining = if meta.is_file() {
                let pos = f
                    .stream_position()
                    .ctx(|| format!("cannot tell descriptor {fd}"))?;
                Some(meta.len().saturating_sub(pos))
            } else {
                None
            };
            (Box::new(FdReader(f)), remaining)
        }
        Endpoint::Path(p) => {
            let f = File::open(&p).opening(&p)?;
            let len = f
                .metadata()
                .ctx(|| format!("cannot stat {}", p.display()))?
                .len();
            (Box::new(f), Some(len))
        }
    };
    let length = length.or(remaining.map(|r| r + prefix.len() as u64));
    let joined = std::io::Cursor::new(prefix).chain(rest);
    Ok(match length {
        // Never read past the announced length: the socket may carry more after it.
        Some(n) => (Box::new(joined.take(n)), Some(n)),
        None => (Box::new(joined), None),
    })
}

/// `Read` over a borrowed descriptor.
struct FdReader(ManuallyDrop<File>);
impl std::io::Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::io::Read::read(&mut *self.0, buf)
    }
}

#[pyfunction]
#[pyo3(signature = (src, target, *, target_format="vhd".to_string(), length=None, prefix=Vec::new(), require_full_bitmaps=false, parents=None, durable=true, progress=None))]
#[allow(clippy::too_many_arguments)]
fn apply_stream<'py>(
    py: Python<'py>,
    src: Endpoint,
    target: PathBuf,
    target_format: String,
    length: Option<u64>,
    prefix: Vec<u8>,
    require_full_bitmaps: bool,
    parents: Option<Vec<PathBuf>>,
    durable: bool,
    progress: Option<Py<Progress>>,
) -> PyRes<Bound<'py, PyDict>> {
    let r = detached(py, || {
        let t = match target_format.as_str() {
            "raw" => Target::Raw(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&target)
                    .ctx(|| format!("cannot open {}", target.display()))?,
            ),
            "vhd" => Target::Vhd(Chain::open(&target, &paths(parents), true)?),
            other => {
                return Err(Error::Unsupported(format!(
                    "target format {other:?} (raw or vhd)"
                )))
            }
        };
        let (source, length) = open_source(src, prefix, length)?;
        let source = Counted::new(source, &progress);
        apply(
            source,
            t,
            ParseOptions {
                length,
                require_full_bitmaps,
            },
            durable,
        )
    })?;
    report_to_py(py, &r)
}

#[pyfunction]
#[pyo3(signature = (src, dst, *, length=None, prefix=Vec::new(), rate_limit=None, require_full_bitmaps=true, progress=None))]
#[allow(clippy::too_many_arguments)]
fn transform<'py>(
    py: Python<'py>,
    src: Endpoint,
    dst: Endpoint,
    length: Option<u64>,
    prefix: Vec<u8>,
    rate_limit: Option<u64>,
    require_full_bitmaps: bool,
    progress: Option<Py<Progress>>,
) -> PyRes<Bound<'py, PyDict>> {
    let r = detached(py, || {
        let (source, length) = open_source(src, prefix, length)?;
        let source = Counted::new(source, &progress);
        let opts = ParseOptions {
            length,
            require_full_bitmaps,
        };
        match dst {
            Endpoint::Fd(fd) => tr::transform(source, &mut *borrow_fd(fd), opts, rate_limit),
            Endpoint::Path(p) => {
                let mut f = File::create(&p).ctx(|| format!("cannot create {}", p.display()))?;
                tr::transform(source, &mut f, opts, rate_limit)
            }
        }
    })?;
    report_to_py(py, &r)
}

#[pyfunction]
#[pyo3(signature = (child, parent=None))]
fn coalesce<'py>(
    py: Python<'py>,
    child: PathBuf,
    parent: Option<PathBuf>,
) -> PyRes<Bound<'py, PyDict>> {
    let r = detached(py, || crate::coalesce::coalesce(&child, parent.as_deref()))?;
    let d = PyDict::new(py);
    d.set_item("child", r.child.display().to_string())?;
    d.set_item("parent", r.parent.display().to_string())?;
    d.set_item("result", r.result.display().to_string())?;
    d.set_item("blocks_merged", r.blocks_merged)?;
    d.set_item("sectors_merged", r.sectors_merged)?;
    d.set_item("bytes_merged", r.sectors_merged * 512)?;
    d.set_item("resumed", r.resumed)?;
    Ok(d)
}

fn diff_sources(
    a: &std::path::Path,
    b: &std::path::Path,
    a_format: &str,
    b_format: &str,
    a_parents: Vec<PathBuf>,
    b_parents: Vec<PathBuf>,
) -> crate::Result<(Source, Source)> {
    Ok((
        Source::open(a, a_format, &a_parents)?,
        Source::open(b, b_format, &b_parents)?,
    ))
}

fn diff_to_py<'py>(py: Python<'py>, r: &crate::diff::DiffReport) -> PyRes<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("granularity", r.granularity)?;
    d.set_item("virtual_size", r.virtual_size)?;
    d.set_item("units", r.units)?;
    d.set_item("changed", &r.changed)?;
    d.set_item("changed_bytes", r.changed_bytes())?;
    d.set_item("bytes_compared", r.bytes_compared)?;
    Ok(d)
}

#[pyfunction]
#[pyo3(signature = (a, b, *, granularity=2097152, a_format="vhd".to_string(), b_format="vhd".to_string(), a_parents=None, b_parents=None))]
#[allow(clippy::too_many_arguments)]
fn diff<'py>(
    py: Python<'py>,
    a: PathBuf,
    b: PathBuf,
    granularity: u64,
    a_format: String,
    b_format: String,
    a_parents: Option<Vec<PathBuf>>,
    b_parents: Option<Vec<PathBuf>>,
) -> PyRes<Bound<'py, PyDict>> {
    let r = detached(py, || {
        let (sa, sb) = diff_sources(
            &a,
            &b,
            &a_format,
            &b_format,
            paths(a_parents),
            paths(b_parents),
        )?;
        crate::diff::diff(&sa, &sb, granularity)
    })?;
    diff_to_py(py, &r)
}

#[pyfunction]
#[pyo3(signature = (a, b, dst, *, granularity=2097152, a_format="vhd".to_string(), b_format="vhd".to_string(), a_parents=None, b_parents=None))]
#[allow(clippy::too_many_arguments)]
fn diff_stream<'py>(
    py: Python<'py>,
    a: PathBuf,
    b: PathBuf,
    dst: Endpoint,
    granularity: u64,
    a_format: String,
    b_format: String,
    a_parents: Option<Vec<PathBuf>>,
    b_parents: Option<Vec<PathBuf>>,
) -> PyRes<Bound<'py, PyDict>> {
    let r = detached(py, || {
        let (sa, sb) = diff_sources(
            &a,
            &b,
            &a_format,
            &b_format,
            paths(a_parents),
            paths(b_parents),
        )?;
        match dst {
            Endpoint::Fd(fd) => {
                crate::diff::diff_stream(&sa, &sb, granularity, &mut *borrow_fd(fd))
            }
            Endpoint::Path(p) => {
                let f = File::create(&p).ctx(|| format!("cannot create {}", p.display()))?;
                crate::diff::diff_stream(
                    &sa,
                    &sb,
                    granularity,
                    &mut std::io::BufWriter::with_capacity(1 << 20, f),
                )
            }
        }
    })?;
    report_to_py(py, &r.1)
}

#[pyfunction]
fn probe_stream_length(py: Python<'_>, prefix: Vec<u8>) -> PyRes<(u64, Option<u64>)> {
    use crate::stream::parse::{probe_length, HeadProbe};
    detached(py, || {
        Ok(match probe_length(&prefix)? {
            HeadProbe::NeedMore(n) => (n, None),
            HeadProbe::Complete {
                head_len,
                total_len,
            } => (head_len, Some(total_len)),
        })
    })
}

fn trust_of(spec: Option<String>) -> crate::Result<Option<crate::net::Trust>> {
    match spec.as_deref() {
        None => Ok(None),
        Some("verify") => Ok(Some(crate::net::Trust::SystemRoots)),
        Some(pin) => crate::net::parse_pin(pin)
            .map(|p| Some(crate::net::Trust::Pinned(p)))
            .ok_or_else(|| Error::BadRange(format!("{pin:?} is not a sha256 fingerprint"))),
    }
}

#[pyfunction]
#[pyo3(signature = (src_fd, src_host, src_path, dst_fd=None, dst_host=None, dst_path=None, *, src_tls=None, dst_tls=None, rate_limit=None, require_full_bitmaps=true, unit_digests=false, progress=None, resume_from=0))]
#[allow(clippy::too_many_arguments)]
fn relay<'py>(
    py: Python<'py>,
    src_fd: i32,
    src_host: String,
    src_path: String,
    dst_fd: Option<i32>,
    dst_host: Option<String>,
    dst_path: Option<String>,
    src_tls: Option<String>,
    dst_tls: Option<String>,
    rate_limit: Option<u64>,
    require_full_bitmaps: bool,
    unit_digests: bool,
    progress: Option<Py<Progress>>,
    resume_from: u64,
) -> PyRes<Bound<'py, PyDict>> {
    let update = counter_of(&progress);
    let tally = tally_of(&progress);
    let (r, status) = detached(py, || {
        let src = crate::net::Side {
            fd: src_fd,
            host: src_host,
            path: src_path,
            tls: trust_of(src_tls)?,
        };
        let dst = match (dst_fd, dst_host, dst_path) {
            (Some(fd), Some(host), Some(path)) => Some(crate::net::Side {
                fd,
                host,
                path,
                tls: trust_of(dst_tls)?,
            }),
            (None, _, _) => None,
            _ => {
                return Err(Error::BadRange(
                    "dst_fd, dst_host and dst_path go together".into(),
                ))
            }
        };
        let run = crate::net::Run {
            rate_limit,
            counter: Some(&update),
            tally: tally.as_deref(),
            resume_from,
        };
        crate::net::relay(
            &src,
            dst.as_ref(),
            &run,
            require_full_bitmaps,
            unit_digests.then_some(u64::from(crate::nbd::DEFAULT_UNIT)),
        )
    })?;
    let d = report_to_py(py, &r)?;
    d.set_item("import_status", status)?;
    resume_keys(&d, &r)?;
    if unit_digests {
        d.set_item("unit_digests", unit_digests_to_py(&r.unit_digests))?;
    }
    Ok(d)
}

fn unit_digests_to_py(v: &[(u64, u128)]) -> Vec<(u64, String)> {
    v.iter().map(|(u, h)| (*u, digest::hex(*h))).collect()
}

#[pyfunction]
#[pyo3(signature = (src_fds, export_name, dst_fd=None, dst_host=None, dst_path=None, *, src_tls=None, src_server_name=None, dst_tls=None, changed=None, unit=crate::nbd::DEFAULT_UNIT, block_size=DEFAULT_BLOCK_SIZE, rate_limit=None, unit_digests=true, progress=None, resume_from=0))]
#[allow(clippy::too_many_arguments)]
fn nbd_copy<'py>(
    py: Python<'py>,
    src_fds: Vec<i32>,
    export_name: String,
    dst_fd: Option<i32>,
    dst_host: Option<String>,
    dst_path: Option<String>,
    src_tls: Option<String>,
    src_server_name: Option<String>,
    dst_tls: Option<String>,
    changed: Option<Vec<u8>>,
    unit: u32,
    block_size: u32,
    rate_limit: Option<u64>,
    unit_digests: bool,
    progress: Option<Py<Progress>>,
    resume_from: u64,
) -> PyRes<Bound<'py, PyDict>> {
    use crate::nbd::{self, Output};
    let update = counter_of(&progress);
    let tally = tally_of(&progress);
    let r = detached(py, || {
        let sources: Vec<nbd::Source<crate::net::Borrowed>> = src_fds
            .iter()
            .map(|&fd| {
                let io = crate::net::Borrowed::new(fd);
                let peer = io
                    .peer()
                    .map_or_else(|| format!("on fd {fd}"), |a| a.to_string());
                nbd::Source { io, peer }
            })
            .collect();
        let address = sources
            .first()
            .and_then(|s| s.io.peer())
            .map_or_else(String::new, |a| a.ip().to_string());
        let mut opts = nbd::Options::new(&export_name);
        opts.tls = src_tls
            .as_deref()
            .map(|t| nbd::tls_setup(t, src_server_name.as_deref().unwrap_or(&address), &address))
            .transpose()?;
        opts.changed = changed;
        opts.unit = unit;
        opts.block_size = block_size;
        opts.rate_limit = rate_limit;
        opts.unit_digests = unit_digests;
        opts.resume_from = resume_from;
        opts.tally = tally;
        let progress: &(dyn Fn(u64, u64) + Sync) = &update;
        match (dst_fd, dst_host, dst_path) {
            (Some(fd), Some(host), Some(path)) => {
                let side = crate::net::Side {
                    fd,
                    host,
                    path,
                    tls: trust_of(dst_tls)?,
                };
                nbd::copy(sources, &opts, Output::Import(&side), Some(progress))
            }
            (Some(fd), None, None) => {
                let mut f = borrow_fd(fd);
                nbd::copy(sources, &opts, Output::Writer(&mut *f), Some(progress))
            }
            (None, None, None) => nbd::copy(sources, &opts, Output::Discard, Some(progress)),
            _ => Err(Error::BadRange(
                "dst_host and dst_path go with dst_fd, both or neither".into(),
            )),
        }
    })?;
    let d = report_to_py(py, &r.stream)?;
    d.set_item("unit", r.unit)?;
    d.set_item("unit_digests", unit_digests_to_py(&r.unit_digests))?;
    d.set_item("units", r.units)?;
    d.set_item("unit_bytes", r.unit_bytes)?;
    d.set_item("connections", r.connections)?;
    d.set_item("extents", r.extents)?;
    d.set_item("import_status", r.import_status)?;
    d.set_item("structured_replies", r.structured_replies)?;
    d.set_item("block_status", r.block_status)?;
    resume_keys(&d, &r.stream)?;
    Ok(d)
}

/// The engine's byte counter, as the closure the net functions report to.
fn counter_of(progress: &Option<Py<Progress>>) -> impl Fn(u64, u64) + Send + Sync {
    let counters = progress
        .as_ref()
        .map(|p| (p.get().done.clone(), p.get().total.clone()));
    move |done: u64, total: u64| {
        if let Some((d, t)) = &counters {
            d.store(done, Ordering::Relaxed);
            t.store(total, Ordering::Relaxed);
        }
    }
}

#[pyfunction]
#[pyo3(signature = (src_fd, src_host, src_path, path, *, src_tls=None, rate_limit=None, progress=None, resume_from=0))]
#[allow(clippy::too_many_arguments)]
fn download<'py>(
    py: Python<'py>,
    src_fd: i32,
    src_host: String,
    src_path: String,
    path: PathBuf,
    src_tls: Option<String>,
    rate_limit: Option<u64>,
    progress: Option<Py<Progress>>,
    resume_from: u64,
) -> PyRes<Bound<'py, PyDict>> {
    let update = counter_of(&progress);
    let tally = tally_of(&progress);
    let r = detached(py, || {
        let src = crate::net::Side {
            fd: src_fd,
            host: src_host,
            path: src_path,
            tls: trust_of(src_tls)?,
        };
        let run = crate::net::Run {
            rate_limit,
            counter: Some(&update),
            tally: tally.as_deref(),
            resume_from,
        };
        crate::net::download(&src, &path, &run)
    })?;
    let d = report_to_py(py, &r)?;
    d.set_item("resumed_from", r.resumed_from)?;
    d.set_item("bytes_written", r.bytes_out)?;
    Ok(d)
}

#[pyfunction]
#[pyo3(signature = (path, dst_fd, dst_host, dst_path, *, dst_tls=None, rate_limit=None, progress=None, resume_from=0))]
#[allow(clippy::too_many_arguments)]
fn upload<'py>(
    py: Python<'py>,
    path: PathBuf,
    dst_fd: i32,
    dst_host: String,
    dst_path: String,
    dst_tls: Option<String>,
    rate_limit: Option<u64>,
    progress: Option<Py<Progress>>,
    resume_from: u64,
) -> PyRes<Bound<'py, PyDict>> {
    let update = counter_of(&progress);
    let tally = tally_of(&progress);
    let (r, status) = detached(py, || {
        let dst = crate::net::Side {
            fd: dst_fd,
            host: dst_host,
            path: dst_path,
            tls: trust_of(dst_tls)?,
        };
        let file = std::fs::File::open(&path).opening(&path)?;
        let run = crate::net::Run {
            rate_limit,
            counter: Some(&update),
            tally: tally.as_deref(),
            resume_from,
        };
        crate::net::upload(file, &dst, &run)
    })?;
    let d = report_to_py(py, &r)?;
    d.set_item("import_status", status)?;
    resume_keys(&d, &r)?;
    Ok(d)
}

#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SECTOR_SIZE", SECTOR)?;
    m.add("DEFAULT_BLOCK_SIZE", DEFAULT_BLOCK_SIZE)?;
    m.add("DIGEST_ALGORITHM", "xxh3-128")?;
    m.add("VhdError", py.get_type::<VhdError>())?;
    m.add_class::<Progress>()?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(chain, m)?)?;
    m.add_function(wrap_pyfunction!(virtual_size, m)?)?;
    m.add_function(wrap_pyfunction!(read, m)?)?;
    m.add_function(wrap_pyfunction!(sha256, m)?)?;
    m.add_function(wrap_pyfunction!(cat, m)?)?;
    m.add_function(wrap_pyfunction!(create, m)?)?;
    m.add_function(wrap_pyfunction!(write, m)?)?;
    m.add_function(wrap_pyfunction!(set_uuid, m)?)?;
    m.add_function(wrap_pyfunction!(set_parent, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(stream_length, m)?)?;
    m.add_function(wrap_pyfunction!(export_stream, m)?)?;
    m.add_function(wrap_pyfunction!(apply_stream, m)?)?;
    m.add_function(wrap_pyfunction!(transform, m)?)?;
    m.add_function(wrap_pyfunction!(coalesce, m)?)?;
    m.add_function(wrap_pyfunction!(probe_stream_length, m)?)?;
    m.add_function(wrap_pyfunction!(relay, m)?)?;
    m.add_function(wrap_pyfunction!(nbd_copy, m)?)?;
    m.add_function(wrap_pyfunction!(download, m)?)?;
    m.add_function(wrap_pyfunction!(upload, m)?)?;
    m.add_function(wrap_pyfunction!(diff, m)?)?;
    m.add_function(wrap_pyfunction!(diff_stream, m)?)?;
    Ok(())
}
