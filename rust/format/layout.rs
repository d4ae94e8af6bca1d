//! Structural validation of a whole image: where the metadata and the blocks lie in the file,
//! and that none of them overlaps or runs past the end. Pure: the caller supplies the parsed
//! structures and the file size.

use super::{
    bat, DiskType, Footer, Header, FOOTER_SIZE, HEADER_SIZE, MAX_TABLE_ENTRIES, UNALLOCATED,
};
use crate::error::VhdError;

/// A named byte range of the file.
#[derive(Debug, Clone)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    pub what: String,
}

/// Blocks needed to cover the disk.
pub fn blocks_needed(size: u64, block_size: u32) -> u64 {
    size.div_ceil(u64::from(block_size))
}

/// The table's size: capped (so a crafted header cannot make us allocate gigabytes) and large
/// enough to cover the disk. Shared by files and streams.
pub fn check_table(footer: &Footer, header: &Header) -> Result<(), VhdError> {
    if header.max_table_entries > MAX_TABLE_ENTRIES {
        return Err(VhdError::TooLarge {
            structure: "header",
            offset: footer.data_offset + 28,
            what: "max table entries",
            found: u64::from(header.max_table_entries),
            limit: u64::from(MAX_TABLE_ENTRIES),
        });
    }
    if u64::from(header.max_table_entries) < blocks_needed(footer.current_size, header.block_size) {
        return Err(VhdError::TableTooSmall {
            offset: footer.data_offset + 28,
            entries: header.max_table_entries,
            covered: u64::from(header.max_table_entries) * u64::from(header.block_size),
            size: footer.current_size,
        });
    }
    Ok(())
}

/// Checks of the header against the footer and the file size that must pass before the BAT
/// can be read (so that no allocation is made from an unchecked size).
pub fn check_header(footer: &Footer, header: &Header, file_size: u64) -> Result<(), VhdError> {
    check_table(footer, header)?;
    let data_end = file_size.saturating_sub(FOOTER_SIZE);
    let bat_len = bat::padded_size(header.max_table_entries);
    if header.table_offset % 512 != 0
        || header.table_offset < FOOTER_SIZE
        || header
            .table_offset
            .checked_add(bat_len)
            .is_none_or(|e| e > data_end)
    {
        return Err(VhdError::Truncated {
            structure: "bat",
            offset: header.table_offset,
            // The BAT, then at least the footer after it.
            expected: header
                .table_offset
                .saturating_add(bat_len)
                .saturating_add(FOOTER_SIZE),
            file_size,
        });
    }
    let header_region = (footer.data_offset, footer.data_offset + HEADER_SIZE);
    if overlaps(
        (header.table_offset, header.table_offset + bat_len),
        header_region,
    ) {
        return Err(VhdError::BatOverlap {
            index: 0,
            offset: header.table_offset,
            block_offset: header.table_offset,
            other: "the dynamic header".into(),
        });
    }
    Ok(())
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Every problem with the placement of locators and blocks. `extra` holds further metadata
/// regions found by the caller (the batmap).
pub fn check_regions(
    footer: &Footer,
    header: &Header,
    entries: &[u32],
    extra: &[Region],
    file_size: u64,
) -> Vec<VhdError> {
    let mut problems = Vec::new();
    let data_end = file_size.saturating_sub(FOOTER_SIZE);
    let mut meta = vec![
        Region {
            start: 0,
            end: FOOTER_SIZE,
            what: "the footer copy".into(),
        },
        Region {
            start: footer.data_offset,
            end: footer.data_offset + HEADER_SIZE,
            what: "the dynamic header".into(),
        },
        Region {
            start: header.table_offset,
            end: header.table_offset + bat::padded_size(header.max_table_entries),
            what: "the BAT".into(),
        },
    ];
    meta.extend_from_slice(extra);
    if footer.disk_type == DiskType::Differencing {
        for (i, l) in header.locators.iter().enumerate() {
            if l.code == 0 {
                continue;
            }
            let entry_at = footer.data_offset + 576 + 24 * i as u64;
            let len = l.space_bytes();
            let problem = if u64::from(l.data_length) > len {
                Some(format!(
                    "holds {} bytes, more than its space",
                    l.data_length
                ))
            } else if l.data_offset.checked_add(len).is_none_or(|e| e > data_end) {
                Some(format!("runs past the end of the data area ({data_end})"))
            } else if overlaps(
                (l.data_offset, l.data_offset + len),
                (0, footer.data_offset + HEADER_SIZE),
            ) {
                Some("lies inside the footer copy or the header".into())
            } else {
                None
            };
            match problem {
                Some(problem) => problems.push(VhdError::LocatorOutOfBounds {
                    index: i,
                    offset: entry_at,
                    data_offset: l.data_offset,
                    data_len: len,
                    problem,
                }),
                None => meta.push(Region {
                    start: l.data_offset,
                    end: l.data_offset + len,
                    what: format!("parent locator {i}"),
                }),
            }
        }
    }
    let block_len = header.bitmap_bytes() + u64::from(header.block_size);
    let mut blocks: Vec<(u64, u32)> = Vec::new();
    for (i, &e) in entries.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let at = u64::from(e) * 512;
        let entry_offset = header.table_offset + 4 * i as u64;
        if at.checked_add(block_len).is_none_or(|end| end > data_end) {
            problems.push(VhdError::BatOutOfBounds {
                index: i as u32,
                offset: entry_offset,
                block_offset: at,
                block_len,
                file_size: data_end,
            });
            continue;
        }
        if let Some(r) = meta
            .iter()
            .find(|r| overlaps((at, at + block_len), (r.start, r.end)))
        {
            problems.push(VhdError::BatOverlap {
                index: i as u32,
                offset: entry_offset,
                block_offset: at,
                other: r.what.clone(),
            });
            continue;
        }
        blocks.push((at, i as u32));
    }
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        if w[0].0 + block_len > w[1].0 {
            problems.push(VhdError::BatOverlap {
                index: w[1].1,
                offset: header.table_offset + 4 * u64::from(w[1].1),
                block_offset: w[1].0,
                other: format!("block {} at byte {}", w[0].1, w[0].0),
            });
        }
    }
    problems
}
