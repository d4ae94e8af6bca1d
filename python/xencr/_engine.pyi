"""Typed stub of the Rust engine (`rust/python.rs`).

Every call releases the GIL for its whole duration and moves whole files or streams; there are no
per-block callbacks. Format problems raise :class:`VhdError`; operating-system failures raise
``OSError``.

``parents`` arguments name the ancestors of a differencing disk explicitly, nearest first. When
omitted, each parent is found through the child's parent locators (relative to the child's folder),
then its header's parent name; either way ``child.header.parent_uuid`` must equal the parent's
footer UUID.

``src`` / ``dst`` arguments that take ``int`` take an open file descriptor (a file, a pipe or a
socket); the engine never closes it.
"""

from typing import Any, Literal, NotRequired, TypedDict

__version__: str

SECTOR_SIZE: int
DEFAULT_BLOCK_SIZE: int
DIGEST_ALGORITHM: str

class VhdError(Exception):
    """A typed engine error; ``str(err)`` is one readable line (``truncated``: "STRUCTURE at
    offset N: truncated: file ends at N, expected at least M"). I/O failures are ``OSError``
    instead; a file to read that does not exist is ``FileNotFoundError`` whose ``filename`` is
    its path (shown as "no such file: PATH")."""

    kind: str
    """Stable machine code: ``bad_cookie``, ``bad_checksum``, ``bad_version``, ``bad_disk_type``,
    ``bad_data_offset``, ``footer_mismatch``, ``bad_block_size``, ``table_too_small``,
    ``bat_out_of_bounds``, ``bat_misaligned``, ``bat_overlap``, ``locator_out_of_bounds``,
    ``truncated``, ``too_large``, ``parent_not_found``, ``parent_mismatch``, ``not_differencing``,
    ``unsupported``, ``bad_range``, ``stream_order``, ``stream_length``, ``partial_bitmap``,
    ``batmap``, ``merge_state``, ``size_mismatch``, ``http_status``, ``redirect``, ``nbd``, ``io``,
    ``resume_mismatch``.

    ``resume_mismatch``: :func:`download` with ``resume_from`` was given a partial file that is
    not the start of this export ("cannot resume into PATH: it holds N bytes, less than the M
    before block K" / "...: its header or block table differs from the export's").

    ``nbd``: the NBD server refused an option or a command, broke the protocol, or closed or
    reset the connection ("NBD server ADDR: WHAT: DETAIL", ``WHAT`` the option or command, e.g.
    ``NBD_OPT_GO``, ``NBD_CMD_READ at offset N (+LEN)``, ``TLS handshake``); the export name
    (it holds the session) is never in it."""
    structure: str | None
    """``footer``, ``header``, ``bat``, ``bitmap``, ``locator``, ``batmap``, ``stream``, ``chain``..."""
    offset: int | None
    """Byte offset in the file or stream where the problem is, when there is one."""
    side: str | None
    """For ``http_status`` and ``redirect``: which request of a relay was answered, ``"export"``
    or ``"import"``."""
    location: str | None
    """For ``redirect``: the URL the pool sends the request to (its query carries the session:
    never show it)."""

class Progress:
    """A byte counter that a coarse call updates as it goes; read ``bytes`` from another thread
    (the call releases the GIL) to show progress, rate and ETA. ``position`` and ``blocks`` say
    where a cut transfer can resume (set by :func:`relay`, :func:`nbd_copy`, :func:`download`
    and :func:`upload`)."""

    def __init__(self) -> None: ...
    @property
    def bytes(self) -> int: ...
    @property
    def total(self) -> int:
        """The stream's length once the call knows it (0 before); set by :func:`relay`."""
    @property
    def position(self) -> int:
        """Blocks of the stream that have passed completely, counted in stream order (ascending
        file offset) from the first block of the *whole* export (position 0): their bytes were
        written in full to the output (a buffered file writer is flushed first), or, for blocks
        before ``resume_from``, read and digested and deliberately not sent (:func:`upload`
        never reads those: it starts at ``resume_from``). Only grows. What the receiving end has
        *stored* may be less (socket buffers, the page cache): resume a little before it."""
    @property
    def blocks(self) -> int:
        """The blocks the whole stream has, once known (0 before)."""
    @property
    def sent(self) -> int:
        """Bytes written to the output so far: the import's connection (:func:`relay`,
        :func:`nbd_copy`, :func:`upload`) or the file (:func:`download`); what a resumed call
        leaves out is not counted. Set by those four calls only."""

class StreamReport(TypedDict):
    bytes_in: int
    bytes_out: int
    blocks: int
    """Blocks carried (read from the input or written to the output)."""
    zero_blocks_dropped: int
    sectors_written: int
    virtual_size: int
    block_size: int
    disk_type: str
    """``dynamic`` (full) or ``differencing`` (delta)."""
    parent_uuid: str | None
    digest_algorithm: str
    digests: list[tuple[int, str]]
    """(block index, hex digest of the block's data as carried), ascending block index."""
    resumed_from: NotRequired[int]
    """:func:`download` (and :func:`relay`, :func:`upload`): the ``resume_from`` given, K (0:
    the whole stream was sent)."""
    bytes_written: NotRequired[int]
    """:func:`download` only: bytes written to the file by this call (from block K's offset
    on; ``bytes_out`` is the same)."""
    blocks_sent: NotRequired[int]
    """:func:`relay` and :func:`upload`: blocks written to the import (N - K)."""

class NbdReport(TypedDict):
    """What :func:`nbd_copy` did: the :class:`StreamReport` fields (``bytes_in``: NBD payload
    bytes read, holes excluded; ``bytes_out``: the length of the stream sent; ``blocks``:
    blocks read (the whole plan, also those before ``resume_from``); ``sectors_written``:
    sectors whose bitmap bit is set in the blocks sent, i.e. what the import writes;
    ``digests``: only blocks carried whole), then the NBD side."""

    bytes_in: int
    bytes_out: int
    blocks: int
    zero_blocks_dropped: int
    sectors_written: int
    virtual_size: int
    block_size: int
    disk_type: str
    """``dynamic`` (a full) or ``differencing`` (a delta: clear bits keep the target's data)."""
    parent_uuid: str | None
    digest_algorithm: str
    digests: list[tuple[int, str]]
    """(block index, digest of the whole block), for blocks whose every unit was read."""
    unit: int
    """The unit size in bytes (64 KiB: one bit of a CBT bitmap)."""
    unit_digests: list[tuple[int, str]]
    """(unit index, digest of the unit's bytes within the disk) for every unit read,
    ascending; empty when ``unit_digests=False``."""
    units: int
    """Units read."""
    unit_bytes: int
    """Bytes those units span (what was asked of the server; holes come back as no payload)."""
    connections: int
    extents: int | None
    """A full with block status: bytes the server reported as data (not zero); else None."""
    import_status: int | None
    structured_replies: bool
    block_status: bool
    """Whether the server gave ``base:allocation`` (a full without it reads every unit)."""
    resumed_from: int
    """The ``resume_from`` given, K: the stream carries the plan's blocks K.. only."""
    blocks_sent: int
    """Blocks in the stream sent (N - K; ``blocks`` counts every block read, sent or not)."""

class MergeReport(TypedDict):
    child: str
    parent: str
    result: str
    blocks_merged: int
    sectors_merged: int
    bytes_merged: int
    resumed: bool

class DiffReport(TypedDict):
    granularity: int
    virtual_size: int
    units: int
    changed: list[int]
    """Indices of changed units (unit = granularity bytes), ascending."""
    changed_bytes: int
    bytes_compared: int

def info(path: str, parents: list[str] | None = None) -> dict[str, Any]:
    """Every footer/header/locator field, BAT statistics and the resolved chain (JSON-able)."""

def check(path: str, parents: list[str] | None = None) -> list[str]:
    """Every problem found, one readable line each; ``[]`` means valid. Raises only ``OSError``."""

def chain(path: str, parents: list[str] | None = None) -> list[str]:
    """Paths of the chain, leaf first."""

def virtual_size(path: str) -> int: ...
def read(path: str, offset: int, length: int, parents: list[str] | None = None) -> bytes:
    """Virtual content of ``[offset, offset+length)`` read sector-exactly through the chain."""

def sha256(path: str, parents: list[str] | None = None) -> str:
    """Hex sha256 of the whole virtual content."""

def cat(path: str, dst: int | str, parents: list[str] | None = None) -> int:
    """Write the virtual content to ``dst`` (fd or path); returns bytes written."""

def create(
    path: str,
    size: int,
    *,
    parent: str | None = None,
    block_size: int = 2097152,
    uuid: str | None = None,
) -> str:
    """Create a dynamic disk, or a differencing child of ``parent``; returns its UUID."""

def write(path: str, offset: int, data: bytes, parents: list[str] | None = None) -> None:
    """Write bytes at a virtual offset into the leaf (dynamic or differencing); any alignment."""

def set_uuid(path: str, uuid: str) -> None: ...
def set_parent(path: str, parent: str) -> None:
    """Re-point a differencing disk at ``parent`` (UUID, timestamp, name, locators)."""

def convert(
    src: str,
    dst: str,
    *,
    src_format: Literal["raw", "vhd"] = "vhd",
    dst_format: Literal["raw", "dynamic", "fixed"] = "dynamic",
    parents: list[str] | None = None,
    block_size: int = 2097152,
) -> dict[str, int]:
    """Convert; zero blocks are never allocated in a dynamic output."""

def stream_length(
    path: str,
    base: str | None = None,
    *,
    parents: list[str] | None = None,
    base_parents: list[str] | None = None,
    skip_zero_blocks: bool = False,
) -> int:
    """Exact byte length of :func:`export_stream` with the same arguments."""

def export_stream(
    path: str,
    dst: int | str,
    base: str | None = None,
    *,
    parents: list[str] | None = None,
    base_parents: list[str] | None = None,
    skip_zero_blocks: bool = False,
    rate_limit: int | None = None,
    progress: Progress | None = None,
) -> StreamReport:
    """XAPI-style export stream (vhd-tool layout): full, or delta against ``base``'s chain."""

def apply_stream(
    src: int | str,
    target: str,
    *,
    target_format: Literal["raw", "vhd"] = "vhd",
    length: int | None = None,
    prefix: bytes = b"",
    require_full_bitmaps: bool = False,
    parents: list[str] | None = None,
    durable: bool = True,
    progress: Progress | None = None,
) -> StreamReport:
    """Consume a stream forward-only as XAPI's import does: only sectors whose bit is set are
    written, into a raw file or a VHD leaf. All metadata is validated before the first write.

    ``length`` is the stream's total size (an HTTP ``Content-Length``, ``prefix`` included); for
    a path or a regular file it defaults to what the file holds. With a length, every BAT entry
    is bounded before anything is written; never more than ``length`` bytes are read. With
    ``durable`` (the default) the target is fsynced before returning."""

def probe_stream_length(prefix: bytes) -> tuple[int, int | None]:
    """The total length of a stream from its first bytes (footer, header, BAT), validated.

    Returns ``(need, None)`` while ``prefix`` is too short (give at least ``need`` bytes), then
    ``(head_length, total_length)``. XAPI's export sends no ``Content-Length`` and its import
    requires one: a relay reads the head, announces the total, then forwards everything."""

def relay(
    src_fd: int,
    src_host: str,
    src_path: str,
    dst_fd: int | None = None,
    dst_host: str | None = None,
    dst_path: str | None = None,
    *,
    src_tls: str | None = None,
    dst_tls: str | None = None,
    rate_limit: int | None = None,
    require_full_bitmaps: bool = True,
    unit_digests: bool = False,
    progress: Progress | None = None,
    resume_from: int = 0,
) -> dict[str, Any]:
    """XAPI's export to XAPI's import over connected TCP descriptors (the caller's): TLS where
    ``*_tls`` is given (``"verify"``: the system CAs and host name; ``"sha256:..."``/hex: exactly
    that certificate), ``GET src_path``, the length probed from the stream's head, ``PUT
    dst_path`` with that ``Content-Length``, and the stream through :func:`transform`. With no
    destination the stream is only validated and digested. Returns the transform's report plus
    ``import_status`` (the import's HTTP status, or None). The import's answer is read before
    its body is sent (XAPI answers first). A non-200 answer raises :class:`VhdError` of kind
    ``http_status``, a 3xx with a location one of kind ``redirect`` (``side`` says which request,
    ``location`` where to), before any byte of the disk is sent to the import.

    With ``unit_digests`` the report also has ``unit_digests``: (unit index, digest) for each
    64 KiB unit the stream carries whole (all its sectors set), as :func:`nbd_copy` reports
    them: a read-back of a target compares at that granularity.

    ``resume_from`` = K > 0 (a destination is required, else ``bad_range``): the import gets
    the export minus its first K blocks in stream order, for a target VDI that already holds
    them (XAPI's import writes only the blocks a stream carries): the same bytes up to block
    0's offset except the BAT, whose entries for those K blocks are unallocated and whose others
    move down by the bytes removed, then the export's bytes from block K's offset to the end
    (trailing footer included). ``Content-Length`` is that length, known from the head. The
    whole export is still read, validated and digested: ``digests`` lists *every* block (the
    source's digests of the blocks not sent too). ``bytes_out`` is the bytes sent to the
    import; ``rate_limit`` applies to them. K past the export's N blocks raises ``bad_range``
    ("resume point K beyond the stream's N blocks") before the import is opened; K = N sends
    the prologue and the footer only. The report also has ``resumed_from`` (K) and
    ``blocks_sent`` (N - K; without a destination: N, what would have been sent).
    ``progress.position`` counts blocks as in :class:`Progress`."""

def nbd_copy(
    src_fds: list[int],
    export_name: str,
    dst_fd: int | None = None,
    dst_host: str | None = None,
    dst_path: str | None = None,
    *,
    src_tls: str | None = None,
    src_server_name: str | None = None,
    dst_tls: str | None = None,
    changed: bytes | None = None,
    unit: int = 65536,
    block_size: int = 2097152,
    rate_limit: int | None = None,
    unit_digests: bool = True,
    progress: Progress | None = None,
    resume_from: int = 0,
) -> NbdReport:
    """Read a disk over NBD into the VHD stream XAPI's import takes.

    ``src_fds``: connected TCP descriptors to the NBD server (the caller's, blocking; each
    does its own handshake, and the blocks are shared among them). ``export_name`` is the
    export (XAPI: ``/<vdi-uuid>?session_id=...``, a secret: never in a message). ``src_tls``:
    None for a plain session, else TLS is required (``NBD_OPT_STARTTLS`` first; a refusal is an
    error, never a plain session) and the server must show exactly this certificate: its PEM
    (``VDI.get_nbd_info``'s ``cert``) or ``"sha256:..."``/hex fingerprint; ``"verify"``
    checks the system CAs and ``src_server_name``. ``src_server_name`` is the name sent in
    the TLS hello (default: the server's address).

    ``changed`` None: a **full**, the units that ``NBD_CMD_BLOCK_STATUS`` (``base:allocation``)
    reports as data (zero extents and holes are never read; a block with nothing to read is not
    in the stream; a server without block status has every unit read). Else a **delta**: a CBT
    bitmap (``VDI.list_changed_blocks`` base64-decoded: one bit per ``unit``, MSB first,
    covering the disk; set bits past its end are refused) and exactly those units are read.

    The stream: footer, header, BAT, then each block in ascending order with a bitmap whose
    bits are set only for the sectors of the units read (partial bitmaps), then the footer; its
    length is known before the first read. ``dst_fd`` with ``dst_host`` and ``dst_path``: PUT
    to XAPI's import with that ``Content-Length`` (TLS per ``dst_tls`` as :func:`relay`; the
    import's answer is read before any NBD read: a 3xx raises ``redirect`` with ``side``
    ``"import"``, another refusal ``http_status``). ``dst_fd`` alone: the stream written to it
    (a file, a pipe). No destination: read and digested only.

    ``rate_limit`` caps the bytes read per second, all connections together; ``progress``
    counts payload bytes read (``total``: the bytes the units span). Memory is bounded whatever
    the disk: at most ``2 * len(src_fds)`` block buffers (bitmap + ``block_size``), one bit per
    unit, the BAT, and the digest lists (20 bytes per unit read; ``unit_digests=False`` drops
    the per-unit list).

    ``resume_from`` = K: the stream written carries the plan's blocks K.. only (a target that
    holds the first K already; a delta stays differencing): its layout is that of those
    blocks, ``bytes_out`` its length. Blocks before K are still read over NBD and digested
    (``digests`` and ``unit_digests`` report them as without a resume point); ``sectors_written``
    counts the blocks sent only. K past the plan's blocks raises ``bad_range`` before the import
    is opened. ``resumed_from`` and ``blocks_sent`` say what was sent; ``progress.position``
    counts blocks as in :class:`Progress`."""

def download(
    src_fd: int,
    src_host: str,
    src_path: str,
    path: str,
    *,
    src_tls: str | None = None,
    rate_limit: int | None = None,
    progress: Progress | None = None,
    resume_from: int = 0,
) -> StreamReport:
    """XAPI's export into a new file at ``path`` (never an existing one), validated and digested
    on the way, then fsynced. The export stream is itself a valid dynamic VHD file.

    ``resume_from`` = K > 0: ``path`` is the partial file of an earlier, cut download of the
    same export (it must exist) holding at least the stream up to block K's offset. Its head
    (footer, header, BAT) must be this export's, the footer's UUID and checksum aside (XAPI
    gives every export a fresh UUID), else ``resume_mismatch`` and the file is left as it was.
    It is truncated at block K's offset; the export is read from its start (every block
    validated and digested: ``digests`` lists all of them, also those already in the file);
    nothing is written before block K's offset, then the rest to the end; then the leading
    footer is rewritten as this export's, so the file is byte for byte an uncut download of
    it; fsynced. The blocks before K in the file are *not* re-read here: compare the file with
    ``digests`` to be sure of them. The report adds ``resumed_from`` (K) and
    ``bytes_written`` (bytes written by this call). ``progress.position`` counts blocks as in
    :class:`Progress`."""

def upload(
    path: str,
    dst_fd: int,
    dst_host: str,
    dst_path: str,
    *,
    dst_tls: str | None = None,
    rate_limit: int | None = None,
    progress: Progress | None = None,
    resume_from: int = 0,
) -> dict[str, Any]:
    """PUT the VHD stream held in the file at ``path`` to XAPI's import, through the validating
    transform (a damaged file fails before its damage is sent). Returns the report plus
    ``import_status``, ``resumed_from`` and ``blocks_sent``.

    ``resume_from`` = K > 0: the body is the file's stream minus its first K blocks, exactly as
    :func:`relay` sends it (BAT edited, then the file from block K's offset), for a target VDI
    that holds those blocks already; the skipped part of the file is never read, so the
    report's ``digests`` list **only the blocks sent** (and ``bytes_in``/``bytes_out`` count
    the stream sent). K past the file's blocks raises ``bad_range`` before the import is
    opened. ``progress.position`` starts at K and counts on as blocks pass;
    ``progress.bytes``/``total`` count the stream sent."""

def transform(
    src: int | str,
    dst: int | str,
    *,
    length: int | None = None,
    prefix: bytes = b"",
    rate_limit: int | None = None,
    require_full_bitmaps: bool = True,
    progress: Progress | None = None,
) -> StreamReport:
    """Pass a stream through unchanged while validating it, digesting each block and throttling
    (blocking the reader when over ``rate_limit`` bytes/s)."""

def coalesce(child: str, parent: str | None = None) -> MergeReport:
    """Merge ``child`` into its parent sector-exactly, crash-safe; the merged disk takes the
    child's path and UUID. An interrupted merge is resumed by calling again."""

def diff(
    a: str,
    b: str,
    *,
    granularity: int = 2097152,
    a_format: Literal["raw", "vhd"] = "vhd",
    b_format: Literal["raw", "vhd"] = "vhd",
    a_parents: list[str] | None = None,
    b_parents: list[str] | None = None,
) -> DiffReport: ...
def diff_stream(
    a: str,
    b: str,
    dst: int | str,
    *,
    granularity: int = 2097152,
    a_format: Literal["raw", "vhd"] = "vhd",
    b_format: Literal["raw", "vhd"] = "vhd",
    a_parents: list[str] | None = None,
    b_parents: list[str] | None = None,
) -> StreamReport:
    """A differencing stream that, applied onto ``a``'s content, yields ``b``'s."""
