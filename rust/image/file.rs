//! One VHD file on disk: opened with full validation, read and written with positional I/O.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result, VhdError};
use crate::format::batmap::{self, BatmapHeader};
use crate::format::layout::{self, Region};
use crate::format::{
    bat, bitmap, DiskType, Footer, Header, FOOTER_SIZE, HEADER_SIZE, MAX_TABLE_ENTRIES, UNALLOCATED,
};

/// A fixed disk is addressed in virtual blocks of this size (it has no BAT of its own).
pub const FIXED_BLOCK_SIZE: u32 = crate::format::DEFAULT_BLOCK_SIZE;

#[derive(Debug, Clone)]
pub struct Batmap {
    pub header_offset: u64,
    pub header: BatmapHeader,
    pub map: Vec<u8>,
}

#[derive(Debug)]
pub struct VhdFile {
    pub path: PathBuf,
    file: File,
    pub footer: Footer,
    pub header: Option<Header>,
    pub bat: Vec<u32>,
    pub batmap: Option<Batmap>,
    pub file_size: u64,
    writable: bool,
}

/// What `inspect` found: the parsed structures as far as they could be read, and every problem.
pub struct Inspection {
    pub file: Option<VhdFile>,
    pub problems: Vec<VhdError>,
}

/// When the footer at the end is not one, a file cut short (a copy that stopped early) is told
/// apart from a damaged one by its footer copy at offset 0: a dynamic or differencing disk's
/// copy, header and BAT say how long the file must be. `Truncated` naming where the footer
/// should be when the file is shorter than that; `None` when nothing says it was cut.
fn cut_short(file: &File, path: &Path, file_size: u64) -> Result<Option<VhdError>> {
    let read = |buf: &mut [u8], at: u64| -> Result<bool> {
        if at.saturating_add(buf.len() as u64) > file_size {
            return Ok(false);
        }
        file.read_exact_at(buf, at)
            .ctx(|| format!("cannot read {}", path.display()))?;
        Ok(true)
    };
    let truncated = |expected: u64| {
        (file_size < expected).then_some(VhdError::Truncated {
            structure: "footer",
            offset: expected - FOOTER_SIZE,
            expected,
            file_size,
        })
    };
    let mut b = [0u8; 512];
    read(&mut b, 0)?;
    let Ok(copy) = Footer::parse(&b, 0) else {
        return Ok(None);
    };
    if copy.disk_type == DiskType::Fixed {
        return Ok(None); // a fixed disk has no copy at 0: what came first is its data
    }
    let hdr_at = copy.data_offset;
    let mut hb = [0u8; 1024];
    if !read(&mut hb, hdr_at)? {
        return Ok(truncated(hdr_at.saturating_add(HEADER_SIZE + FOOTER_SIZE)));
    }
    let header = match Header::parse(&hb, hdr_at) {
        Ok(h) if h.max_table_entries <= MAX_TABLE_ENTRIES => h,
        _ => return Ok(None),
    };
    let bat_len = bat::padded_size(header.max_table_entries);
    let bat_end = header.table_offset.saturating_add(bat_len);
    if bat_end > file_size {
        return Ok(truncated(bat_end.saturating_add(FOOTER_SIZE)));
    }
    let mut table = vec![0u8; bat_len as usize];
    read(&mut table, header.table_offset)?;
    let block_len = header.bitmap_bytes() + u64::from(header.block_size);
    let data_end = bat::parse(&table, header.max_table_entries)
        .into_iter()
        .filter(|&e| e != UNALLOCATED)
        .map(|e| (u64::from(e) * 512).saturating_add(block_len))
        .fold(bat_end, u64::max);
    Ok(truncated(data_end.saturating_add(FOOTER_SIZE)))
}

impl VhdFile {
    /// Open with strict validation: the first problem is the error.
    pub fn open(path: &Path, writable: bool) -> Result<VhdFile> {
        let mut insp = Self::inspect_with(path, writable)?;
        if !insp.problems.is_empty() {
            return Err(insp.problems.swap_remove(0));
        }
        insp.file
            .ok_or_else(|| VhdError::Unsupported("unreadable image".into()))
    }

    /// Every problem found. Only OS errors (missing file...) are returned as `Err`.
    pub fn inspect(path: &Path) -> Result<Inspection> {
        Self::inspect_with(path, false)
    }

    fn inspect_with(path: &Path, writable: bool) -> Result<Inspection> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .opening(path)?;
        let file_size = file
            .metadata()
            .ctx(|| format!("cannot stat {}", path.display()))?
            .len();
        let fail = |e: VhdError| {
            Ok(Inspection {
                file: None,
                problems: vec![e],
            })
        };
        if file_size < FOOTER_SIZE {
            return fail(VhdError::Truncated {
                structure: "footer",
                offset: 0,
                expected: FOOTER_SIZE,
                file_size,
            });
        }
        let mut buf = [0u8; 512];
        let footer_at = file_size - FOOTER_SIZE;
        file.read_exact_at(&mut buf, footer_at)
            .ctx(|| format!("cannot read {}", path.display()))?;
        let footer = match Footer::parse(&buf, footer_at) {
            Ok(f) => f,
            Err(e) => return fail(cut_short(&file, path, file_size)?.unwrap_or(e)),
        };
        let mut problems = Vec::new();
        let mut vf = VhdFile {
            path: path.to_path_buf(),
            file,
            footer,
            header: None,
            bat: Vec::new(),
            batmap: None,
            file_size,
            writable,
        };
        if vf.footer.disk_type == DiskType::Fixed {
            if file_size - FOOTER_SIZE < vf.footer.current_size {
                problems.push(VhdError::Truncated {
                    structure: "data",
                    offset: 0,
                    expected: vf.footer.current_size.saturating_add(FOOTER_SIZE),
                    file_size,
                });
            }
            return Ok(Inspection {
                file: Some(vf),
                problems,
            });
        }
        // Dynamic and differencing: footer copy at 0, header, BAT.
        let mut copy = [0u8; 512];
        vf.read_exact_at(&mut copy, 0)?;
        if copy != buf {
            problems.push(VhdError::FooterMismatch { offset: footer_at });
        }
        let hdr_at = vf.footer.data_offset;
        if hdr_at
            .checked_add(HEADER_SIZE)
            .is_none_or(|e| e > footer_at)
        {
            problems.push(VhdError::Truncated {
                structure: "header",
                offset: hdr_at,
                // The header, then the footer at the end.
                expected: hdr_at.saturating_add(HEADER_SIZE + FOOTER_SIZE),
                file_size,
            });
            return Ok(Inspection {
                file: None,
                problems,
            });
        }
        let mut hb = [0u8; 1024];
        vf.read_exact_at(&mut hb, hdr_at)?;
        let header = match Header::parse(&hb, hdr_at) {
            Ok(h) => h,
            Err(e) => {
                problems.push(e);
                return Ok(Inspection {
                    file: None,
                    problems,
                });
            }
        };
        if let Err(e) = layout::check_header(&vf.footer, &header, file_size) {
            problems.push(e);
            return Ok(Inspection {
                file: None,
                problems,
            });
        }
        let mut table = vec![0u8; bat::padded_size(header.max_table_entries) as usize];
        vf.read_exact_at(&mut table, header.table_offset)?;
        vf.bat = bat::parse(&table, header.max_table_entries);
        let mut extra = Vec::new();
        if vf.footer.may_have_batmap() {
            match vf.read_batmap(&header) {
                Ok(Some(bm)) => {
                    extra.push(Region {
                        start: bm.header_offset,
                        end: bm.header.batmap_offset + u64::from(bm.header.batmap_size) * 512,
                        what: "the batmap".into(),
                    });
                    vf.batmap = Some(bm);
                }
                Ok(None) => {}
                Err(e) => problems.push(e),
            }
        }
        problems.extend(layout::check_regions(
            &vf.footer, &header, &vf.bat, &extra, file_size,
        ));
        vf.header = Some(header);
        if problems.is_empty() {
            problems.extend(vf.check_batmap_marks()?);
        }
        Ok(Inspection {
            file: Some(vf),
            problems,
        })
    }

    fn read_batmap(&self, header: &Header) -> Result<Option<Batmap>> {
        let at = header.table_offset + bat::padded_size(header.max_table_entries);
        if at + 512 > self.file_size - FOOTER_SIZE {
            return Ok(None);
        }
        let mut hb = [0u8; 512];
        self.read_exact_at(&mut hb, at)?;
        let Some(h) = BatmapHeader::parse(&hb) else {
            return Ok(None);
        };
        let len = u64::from(h.batmap_size) * 512;
        let needed_bits = u64::from(header.max_table_entries);
        if h.batmap_offset < at + 512
            || h.batmap_offset
                .checked_add(len)
                .is_none_or(|e| e > self.file_size - FOOTER_SIZE)
            || len * 8 < needed_bits
        {
            return Err(VhdError::Batmap {
                offset: at,
                detail: format!(
                    "map at byte {} (+{len}) does not fit the file or cover the table",
                    h.batmap_offset
                ),
            });
        }
        let mut map = vec![0u8; len as usize];
        self.read_exact_at(&mut map, h.batmap_offset)?;
        let sum = batmap::checksum(&map, h.version);
        if sum != h.checksum {
            return Err(VhdError::BadChecksum {
                structure: "batmap",
                offset: at,
                expected: sum,
                found: h.checksum,
            });
        }
        Ok(Some(Batmap {
            header_offset: at,
            header: h,
            map,
        }))
    }

    /// A batmap bit says "fully allocated": tapdisk then skips the block's bitmap, so a bit on
    /// an unallocated block or a partial bitmap would make XenServer read the wrong sectors.
    fn check_batmap_marks(&self) -> Result<Vec<VhdError>> {
        let Some(bm) = self.batmap.as_ref() else {
            return Ok(Vec::new());
        };
        let spb = (u64::from(self.block_size()) / 512) as usize;
        let mut bitmap_buf = vec![0u8; self.bitmap_bytes() as usize];
        let mut problems = Vec::new();
        for block in 0..self.block_count() {
            let (byte, mask) = ((block / 8) as usize, 0x80u8 >> (block & 7));
            if bm.map.get(byte).is_none_or(|b| b & mask == 0) {
                continue;
            }
            let detail = if !self.read_bitmap(block, &mut bitmap_buf)? {
                format!("marks block {block} fully allocated, but the BAT has no such block")
            } else if !bitmap::is_full(&bitmap_buf, spb) {
                format!("marks block {block} fully allocated, but its sector bitmap is partial")
            } else {
                continue;
            };
            problems.push(VhdError::Batmap {
                offset: bm.header.batmap_offset + byte as u64,
                detail,
            });
        }
        Ok(problems)
    }

    pub fn read_exact_at(&self, buf: &mut [u8], at: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, at)
            .ctx(|| format!("cannot read {} at {at}", self.path.display()))
    }

    pub fn write_all_at(&self, buf: &[u8], at: u64) -> Result<()> {
        self.file
            .write_all_at(buf, at)
            .ctx(|| format!("cannot write {} at {at}", self.path.display()))
    }

    pub fn size(&self) -> u64 {
        self.footer.current_size
    }

    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn block_size(&self) -> u32 {
        self.header
            .as_ref()
            .map_or(FIXED_BLOCK_SIZE, |h| h.block_size)
    }

    /// Blocks that cover the virtual size.
    pub fn block_count(&self) -> u32 {
        layout::blocks_needed(self.size(), self.block_size()) as u32
    }

    pub fn bitmap_bytes(&self) -> u64 {
        self.header.as_ref().map_or(0, Header::bitmap_bytes)
    }

    /// Byte offset of a block's bitmap, if allocated (dynamic/differencing only).
    pub fn block_offset(&self, block: u32) -> Option<u64> {
        match self.bat.get(block as usize) {
            Some(&e) if e != UNALLOCATED && block < self.block_count() => Some(u64::from(e) * 512),
            _ => None,
        }
    }

    /// Is the block present in this file? A fixed disk holds every block.
    pub fn is_allocated(&self, block: u32) -> bool {
        match self.footer.disk_type {
            DiskType::Fixed => block < self.block_count(),
            _ => self.block_offset(block).is_some(),
        }
    }

    pub fn allocated_blocks(&self) -> Vec<u32> {
        (0..self.block_count())
            .filter(|&b| self.is_allocated(b))
            .collect()
    }

    pub fn read_bitmap(&self, block: u32, buf: &mut [u8]) -> Result<bool> {
        match self.block_offset(block) {
            Some(at) => {
                self.read_exact_at(&mut buf[..self.bitmap_bytes() as usize], at)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The byte offset in the file where this data-region location lives.
    pub fn data_offset(&self, block: u32, byte_in_block: u64) -> Option<u64> {
        match self.footer.disk_type {
            DiskType::Fixed => Some(u64::from(block) * u64::from(FIXED_BLOCK_SIZE) + byte_in_block),
            _ => self
                .block_offset(block)
                .map(|at| at + self.bitmap_bytes() + byte_in_block),
        }
    }

    // ---- writing -------------------------------------------------------------------------

    fn require_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(VhdError::Unsupported(format!(
                "{} is open read-only",
                self.path.display()
            )))
        }
    }

    /// Allocate a block at the end of the data: write the footer at the new end first, then the
    /// bitmap, and only then the BAT entry, so a kill at any point leaves a valid file (at worst
    /// with unreferenced space). Returns the block's bitmap offset.
    pub fn allocate_block(&mut self, block: u32, bitmap_fill: u8) -> Result<u64> {
        self.require_writable()?;
        if self.footer.disk_type == DiskType::Fixed {
            return Err(VhdError::Unsupported(
                "allocating a block in a fixed disk".into(),
            ));
        }
        if block >= self.block_count() || block as usize >= self.bat.len() {
            return Err(VhdError::BadRange(format!(
                "block {block} is beyond the disk"
            )));
        }
        let at = self.file_size - FOOTER_SIZE;
        if at / 512 >= u64::from(UNALLOCATED) {
            return Err(VhdError::TooLarge {
                structure: "bat",
                offset: at,
                what: "block offset",
                found: at,
                limit: u64::from(UNALLOCATED) * 512,
            });
        }
        let bitmap_len = self.bitmap_bytes();
        let new_size = at + bitmap_len + u64::from(self.block_size()) + FOOTER_SIZE;
        let footer = self.footer.to_bytes();
        self.write_all_at(&footer, new_size - FOOTER_SIZE)?;
        // The bitmap (at least one sector) covers the old footer; the data area beyond it was
        // just added to the file and reads as zeros.
        self.write_all_at(&vec![bitmap_fill; bitmap_len as usize], at)?;
        self.file_size = new_size;
        self.set_bat_entry(block, (at / 512) as u32)?;
        Ok(at)
    }

    fn set_bat_entry(&mut self, block: u32, sector: u32) -> Result<()> {
        let Some(h) = self.header.as_ref() else {
            return Err(VhdError::Unsupported("no BAT".into()));
        };
        let at = h.table_offset + 4 * u64::from(block);
        self.write_all_at(&sector.to_be_bytes(), at)?;
        self.bat[block as usize] = sector;
        Ok(())
    }

    /// Keep blktap's batmap consistent with a block's bitmap after we changed it.
    pub fn update_batmap(&mut self, block: u32, full: bool) -> Result<()> {
        let Some(bm) = self.batmap.as_mut() else {
            return Ok(());
        };
        let byte = (block / 8) as usize;
        if byte >= bm.map.len() {
            return Ok(());
        }
        let mask = 0x80u8 >> (block & 7);
        let was = bm.map[byte] & mask != 0;
        if was == full {
            return Ok(());
        }
        if full {
            bm.map[byte] |= mask;
        } else {
            bm.map[byte] &= !mask;
        }
        bm.header.checksum = batmap::checksum(&bm.map, bm.header.version);
        let sector_start = byte / 512 * 512;
        let sector = bm.map[sector_start..sector_start + 512].to_vec();
        let (map_at, hdr_at, hdr) = (
            bm.header.batmap_offset,
            bm.header_offset,
            bm.header.to_bytes(),
        );
        self.write_all_at(&sector, map_at + sector_start as u64)?;
        self.write_all_at(&hdr, hdr_at)
    }

    /// Write whole sectors `[first, first+n)` of a block from `data`, allocating the block if
    /// needed, then mark them in the bitmap (data before bitmap: a kill never exposes garbage).
    pub fn write_block_sectors(&mut self, block: u32, first: u64, data: &[u8]) -> Result<()> {
        let n = data.len() as u64 / 512;
        let at = self.data_location(block, first, n)?;
        self.write_all_at(data, at)?;
        self.mark_sectors(block, first, n)
    }

    /// Like `write_block_sectors`, with the data copied in the kernel from `src` at `src_at`
    /// (`copy_file_range`: no round trip through user memory, a reflink where the filesystem
    /// can). Used by coalesce, which moves whole runs from one file into another.
    pub fn copy_block_sectors(
        &mut self,
        block: u32,
        first: u64,
        n: u64,
        src: &File,
        src_at: u64,
    ) -> Result<()> {
        let at = self.data_location(block, first, n)?;
        copy_range(src, src_at, &self.file, at, n * 512)
            .ctx(|| format!("cannot copy into {} at {at}", self.path.display()))?;
        self.mark_sectors(block, first, n)
    }

    /// Where sectors `[first, first+n)` of a block live in the file, allocating the block.
    fn data_location(&mut self, block: u32, first: u64, n: u64) -> Result<u64> {
        self.require_writable()?;
        if self.footer.disk_type == DiskType::Fixed {
            return Ok(u64::from(block) * u64::from(FIXED_BLOCK_SIZE) + first * 512);
        }
        let spb = u64::from(self.block_size()) / 512;
        if first + n > spb {
            return Err(VhdError::BadRange(format!(
                "sectors {first}+{n} exceed the block"
            )));
        }
        let at = match self.block_offset(block) {
            Some(at) => at,
            // A dynamic disk's fresh block is all zeros, so all-ones is exact (as ocaml-vhd and
            // qemu do); a differencing one must keep reading the parent where we do not write.
            None => {
                let fill = if self.footer.disk_type == DiskType::Dynamic {
                    0xFF
                } else {
                    0
                };
                self.allocate_block(block, fill)?
            }
        };
        Ok(at + self.bitmap_bytes() + first * 512)
    }

    /// Set the bitmap bits of sectors just written (and keep the batmap in step).
    fn mark_sectors(&mut self, block: u32, first: u64, n: u64) -> Result<()> {
        let Some(at) = self.block_offset(block) else {
            return Ok(());
        };
        let spb = u64::from(self.block_size()) / 512;
        let mut bm = vec![0u8; self.bitmap_bytes() as usize];
        self.read_exact_at(&mut bm, at)?;
        let (lo, hi) = ((first / 8) as usize, (first + n).div_ceil(8) as usize);
        let before = bm[lo..hi].to_vec();
        bitmap::set_range(&mut bm, first as usize, n as usize);
        if bm[lo..hi] != before[..] {
            // Only the bitmap bytes that changed: one small write.
            self.write_all_at(&bm[lo..hi], at + lo as u64)?;
        }
        let full = bitmap::is_full(&bm, spb as usize);
        self.update_batmap(block, full)
    }

    /// Make the BAT cover `entries` blocks (a disk grown larger than its table): write a larger
    /// BAT (and batmap) at the end of the data, then point the header at it. The header write is
    /// the commit: a kill before it leaves the old table in force and only unused space behind.
    pub fn grow_table(&mut self, entries: u32) -> Result<()> {
        self.require_writable()?;
        let Some(mut header) = self.header.clone() else {
            return Err(VhdError::Unsupported(
                "growing the table of a fixed disk".into(),
            ));
        };
        if entries <= header.max_table_entries {
            return Ok(());
        }
        if entries > crate::format::MAX_TABLE_ENTRIES {
            return Err(VhdError::TooLarge {
                structure: "header",
                offset: self.footer.data_offset + 28,
                what: "max table entries",
                found: u64::from(entries),
                limit: u64::from(crate::format::MAX_TABLE_ENTRIES),
            });
        }
        let mut table = self.bat.clone();
        table.resize(entries as usize, UNALLOCATED);
        let at = self.file_size - FOOTER_SIZE;
        let mut out = bat::to_bytes(&table);
        let mut new_batmap = None;
        if let Some(bm) = &self.batmap {
            let sectors = batmap::size_sectors(entries);
            let mut map = bm.map.clone();
            map.resize(sectors as usize * 512, 0);
            let hdr_at = at + out.len() as u64;
            let h = BatmapHeader {
                batmap_offset: hdr_at + 512,
                batmap_size: sectors,
                checksum: batmap::checksum(&map, bm.header.version),
                ..bm.header.clone()
            };
            out.extend_from_slice(&h.to_bytes());
            out.extend_from_slice(&map);
            new_batmap = Some(Batmap {
                header_offset: hdr_at,
                header: h,
                map,
            });
        }
        let new_size = at + out.len() as u64 + FOOTER_SIZE;
        self.write_all_at(&self.footer.to_bytes(), new_size - FOOTER_SIZE)?;
        self.write_all_at(&out, at)?;
        self.file_size = new_size;
        header.table_offset = at;
        header.max_table_entries = entries;
        self.header = Some(header);
        self.write_header()?;
        self.bat = table;
        self.batmap = new_batmap;
        Ok(())
    }

    /// Rewrite both footers (after changing `self.footer`).
    pub fn write_footers(&mut self) -> Result<()> {
        self.require_writable()?;
        let b = self.footer.to_bytes();
        if self.footer.disk_type != DiskType::Fixed {
            self.write_all_at(&b, 0)?;
        }
        self.write_all_at(&b, self.file_size - FOOTER_SIZE)
    }

    pub fn write_header(&mut self) -> Result<()> {
        self.require_writable()?;
        let Some(h) = self.header.as_ref() else {
            return Err(VhdError::Unsupported("no header".into()));
        };
        let b = h.to_bytes();
        self.write_all_at(&b, self.footer.data_offset)
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .ctx(|| format!("cannot sync {}", self.path.display()))
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Copy `len` bytes between two files in the kernel, falling back to a buffered copy where
/// `copy_file_range` is not supported (other filesystems, old kernels).
fn copy_range(
    src: &File,
    mut src_at: u64,
    dst: &File,
    mut dst_at: u64,
    len: u64,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut left = len;
    while left > 0 {
        let mut off_in = src_at as libc::loff_t;
        let mut off_out = dst_at as libc::loff_t;
        // SAFETY: both descriptors are open for the duration (borrowed from live `File`s), the
        // offset pointers point at live locals, and the kernel reads/writes only the files.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left as usize,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EXDEV)
                | Some(libc::ENOSYS)
                | Some(libc::EOPNOTSUPP)
                | Some(libc::EINVAL) => buffered_copy(src, src_at, dst, dst_at, left),
                Some(libc::EINTR) => continue,
                _ => Err(e),
            };
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "source ended during a copy",
            ));
        }
        src_at += n as u64;
        dst_at += n as u64;
        left -= n as u64;
    }
    Ok(())
}

fn buffered_copy(
    src: &File,
    mut src_at: u64,
    dst: &File,
    mut dst_at: u64,
    len: u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; std::cmp::min(len, 4 << 20) as usize];
    let mut left = len;
    while left > 0 {
        let n = std::cmp::min(left, buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], src_at)?;
        dst.write_all_at(&buf[..n], dst_at)?;
        src_at += n as u64;
        dst_at += n as u64;
        left -= n as u64;
    }
    Ok(())
}
