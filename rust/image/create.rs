//! Creating dynamic and differencing disks, laid out as blktap lays out an SR's files:
//! footer copy, header, BAT at 1536, batmap, parent locators (MacX + W2KU + W2RU, relative).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::file::VhdFile;
use crate::error::{IoContext, Result, VhdError};
use crate::format::batmap::{self, BatmapHeader};
use crate::format::header::{encode_locator, ParentLocator, PLAT_MACX, PLAT_W2KU, PLAT_W2RU};
use crate::format::layout::blocks_needed;
use crate::format::{
    bat, new_uuid, DiskType, Footer, Header, FOOTER_SIZE, HEADER_SIZE, MAX_BLOCK_SIZE,
    MAX_DISK_SIZE, VHD_EPOCH_OFFSET,
};

/// Room reserved for each locator's data, so a disk can later be re-pointed at a parent
/// with a longer path (`set_parent`).
const LOCATOR_SPACE: u64 = 2048;
const LOCATOR_CODES: [u32; 3] = [PLAT_MACX, PLAT_W2KU, PLAT_W2RU];

pub fn vhd_now() -> u32 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    unix.saturating_sub(VHD_EPOCH_OFFSET) as u32
}

/// A file's modification time in the VHD epoch (what parent timestamps hold).
pub fn mtime_vhd(path: &Path) -> u32 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs().saturating_sub(VHD_EPOCH_OFFSET) as u32)
}

pub fn check_size(size: u64, block_size: u32) -> Result<()> {
    if size % 512 != 0 {
        return Err(VhdError::BadRange(format!(
            "size {size} is not a multiple of 512"
        )));
    }
    if size > MAX_DISK_SIZE {
        return Err(VhdError::TooLarge {
            structure: "footer",
            offset: 48,
            what: "virtual size",
            found: size,
            limit: MAX_DISK_SIZE,
        });
    }
    if !block_size.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(VhdError::BadBlockSize {
            offset: 0,
            found: block_size,
        });
    }
    Ok(())
}

/// Create a dynamic disk (no parent) or a differencing child of `parent`. `size` 0 with a
/// parent means the parent's size. Returns the new disk's UUID. Fails if `path` exists.
pub fn create(
    path: &Path,
    size: u64,
    block_size: u32,
    uuid: Option<[u8; 16]>,
    parent: Option<&Path>,
) -> Result<[u8; 16]> {
    let parent_file = parent.map(|p| VhdFile::open(p, false)).transpose()?;
    let size = match (&parent_file, size) {
        (Some(p), 0) => p.size(),
        _ => size,
    };
    check_size(size, block_size)?;
    let entries = std::cmp::max(1, blocks_needed(size, block_size)) as u32;
    let table_offset = FOOTER_SIZE + HEADER_SIZE;
    let bat_len = bat::padded_size(entries);
    let batmap_hdr_at = table_offset + bat_len;
    let batmap_sectors = batmap::size_sectors(entries);
    let mut next = batmap_hdr_at + 512 + u64::from(batmap_sectors) * 512;

    let disk_type = if parent_file.is_some() {
        DiskType::Differencing
    } else {
        DiskType::Dynamic
    };
    let uuid = uuid.unwrap_or_else(new_uuid);
    let footer = Footer::new(disk_type, size, uuid, vhd_now());
    let mut header = Header::new(table_offset, entries, block_size);
    let mut locator_data = Vec::new();
    if let (Some(pf), Some(pp)) = (&parent_file, parent) {
        for (i, code) in LOCATOR_CODES.iter().enumerate() {
            header.locators[i] = ParentLocator {
                code: *code,
                data_space: LOCATOR_SPACE as u32,
                data_length: 0,
                reserved: 0,
                data_offset: next,
            };
            next += LOCATOR_SPACE;
        }
        locator_data = point_at_parent(&mut header, path, pp, pf)?;
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(|| format!("cannot create {}", path.display()))?;
    let fb = footer.to_bytes();
    let write = |buf: &[u8], at: u64| {
        file.write_all_at(buf, at)
            .ctx(|| format!("cannot write {}", path.display()))
    };
    write(&fb, 0)?;
    write(&header.to_bytes(), footer.data_offset)?;
    write(
        &bat::to_bytes(&vec![crate::format::UNALLOCATED; entries as usize]),
        table_offset,
    )?;
    let map = vec![0u8; batmap_sectors as usize * 512];
    let bh = BatmapHeader {
        batmap_offset: batmap_hdr_at + 512,
        batmap_size: batmap_sectors,
        version: batmap::VERSION,
        checksum: batmap::checksum(&map, batmap::VERSION),
        marker: 0,
    };
    write(&bh.to_bytes(), batmap_hdr_at)?;
    write(&map, batmap_hdr_at + 512)?;
    for (l, data) in header.locators.iter().zip(&locator_data) {
        write(data, l.data_offset)?;
    }
    write(&fb, next)?;
    file.sync_all()
        .ctx(|| format!("cannot sync {}", path.display()))?;
    Ok(uuid)
}

/// Fill the header's parent fields and locator lengths for `parent`; returns each locator's
/// data (padded to its space).
fn point_at_parent(
    header: &mut Header,
    child: &Path,
    parent: &Path,
    pf: &VhdFile,
) -> Result<Vec<Vec<u8>>> {
    let rel = relative_path(child, parent)?;
    let rel_dot = if rel.starts_with("../") {
        rel.clone()
    } else {
        format!("./{rel}")
    };
    header.parent_uuid = pf.footer.uuid;
    header.parent_timestamp = mtime_vhd(parent);
    header.set_parent_name(&rel);
    let mut out = Vec::new();
    for l in header
        .locators
        .iter_mut()
        .filter(|l| LOCATOR_CODES.contains(&l.code))
    {
        let data = encode_locator(l.code, &rel_dot);
        if data.len() as u64 > l.space_bytes() {
            return Err(VhdError::Unsupported(format!(
                "parent path {rel} does not fit the {} bytes of locator space",
                l.space_bytes()
            )));
        }
        l.data_length = data.len() as u32;
        let mut padded = data;
        padded.resize(l.space_bytes() as usize, 0);
        out.push(padded);
    }
    Ok(out)
}

/// Re-point a differencing disk at `parent` (UUID, timestamp, name, locators).
pub fn set_parent(path: &Path, parent: &Path) -> Result<()> {
    let mut f = VhdFile::open(path, true)?;
    if f.disk_type() != DiskType::Differencing {
        return Err(VhdError::NotDifferencing {
            path: path.display().to_string(),
        });
    }
    let pf = VhdFile::open(parent, false)?;
    let mut header = f.header.clone().expect("differencing has a header");
    let data = point_at_parent(&mut header, path, parent, &pf)?;
    let placed: Vec<&ParentLocator> = header
        .locators
        .iter()
        .filter(|l| LOCATOR_CODES.contains(&l.code))
        .collect();
    for (l, d) in placed.iter().zip(&data) {
        f.write_all_at(d, l.data_offset)?;
    }
    f.header = Some(header);
    f.write_header()?;
    f.sync()
}

pub fn set_uuid(path: &Path, uuid: [u8; 16]) -> Result<()> {
    let mut f = VhdFile::open(path, true)?;
    f.footer.uuid = uuid;
    f.write_footers()?;
    f.sync()
}

/// `parent` relative to `child`'s folder, with `/` separators.
pub fn relative_path(child: &Path, parent: &Path) -> Result<String> {
    let abs = |p: &Path| -> Result<PathBuf> {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .ctx(|| "cannot read the current directory".into())?
                .join(p)
        };
        Ok(normalise(&p))
    };
    let child_dir = abs(child)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let parent = abs(parent)?;
    let a: Vec<_> = child_dir.components().collect();
    let b: Vec<_> = parent.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec!["..".into(); a.len() - common];
    parts.extend(
        b[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    Ok(parts.join("/"))
}

pub(crate) fn normalise(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Create a fixed disk of `size` bytes of zeros (sparse).
pub fn create_fixed(path: &Path, size: u64) -> Result<[u8; 16]> {
    check_size(size, crate::format::DEFAULT_BLOCK_SIZE)?;
    let uuid = new_uuid();
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(|| format!("cannot create {}", path.display()))?;
    let footer = Footer::new(DiskType::Fixed, size, uuid, vhd_now());
    file.write_all_at(&footer.to_bytes(), size)
        .ctx(|| format!("cannot write {}", path.display()))?;
    Ok(uuid)
}
