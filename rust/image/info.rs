//! A complete, JSON-able description of an image: every field, BAT statistics, the chain.

use serde_json::{json, Value};

use super::{Chain, VhdFile};
use crate::error::Result;
use crate::format::geometry::Geometry;
use crate::format::header::{PLAT_MACX, PLAT_W2KU, PLAT_W2RU};
use crate::format::{bitmap, uuid_to_string, DiskType, VHD_EPOCH_OFFSET};

pub fn describe(chain: &Chain) -> Result<Value> {
    let f = chain.leaf();
    let mut v = describe_file(f)?;
    v["chain"] = json!(chain
        .layers
        .iter()
        .map(|l| l.path.display().to_string())
        .collect::<Vec<_>>());
    Ok(v)
}

pub fn describe_file(f: &VhdFile) -> Result<Value> {
    let ft = &f.footer;
    let expected = Geometry::for_size(ft.current_size);
    let mut warnings = Vec::new();
    if ft.geometry.size() != ft.current_size {
        warnings.push(format!(
            "CHS size {} != current_size {} (qemu reads the CHS size unless the creator is tap, CTXS, win, qem2 or d2v)",
            ft.geometry.size(),
            ft.current_size
        ));
    }
    let footer = json!({
        "cookie": String::from_utf8_lossy(&ft.cookie),
        "features": ft.features,
        "file_format_version": format!("{:#010x}", ft.version),
        "data_offset": ft.data_offset,
        "timestamp": ft.timestamp,
        "timestamp_unix": u64::from(ft.timestamp) + VHD_EPOCH_OFFSET,
        "creator_application": ft.creator(),
        "creator_version": format!("{:#010x}", ft.creator_version),
        "creator_host_os": format!("{:#010x}", ft.creator_host_os),
        "original_size": ft.original_size,
        "current_size": ft.current_size,
        "geometry_chs": [ft.geometry.cylinders, ft.geometry.heads, ft.geometry.sectors_per_track],
        "geometry_size": ft.geometry.size(),
        "expected_chs": [expected.cylinders, expected.heads, expected.sectors_per_track],
        "disk_type": ft.disk_type.code(),
        "disk_type_name": ft.disk_type.name(),
        "checksum": format!("{:#010x}", ft.checksum),
        "uuid": uuid_to_string(&ft.uuid),
        "saved_state": ft.saved_state,
        "hidden_byte_85": ft.hidden,
    });
    let mut v = json!({
        "path": f.path.display().to_string(),
        "file_size": f.file_size,
        "virtual_size": ft.current_size,
        "disk_type": ft.disk_type.name(),
        "footer": footer,
        "header": Value::Null,
        "locators": [],
        "blocks": Value::Null,
        "batmap": Value::Null,
        "warnings": warnings,
    });
    let Some(h) = f.header.as_ref() else {
        return Ok(v);
    };
    let mut copy = [0u8; 512];
    f.read_exact_at(&mut copy, 0)?;
    v["footer_copy_identical"] = json!(copy == raw_footer(f)?);
    v["header"] = json!({
        "cookie": "cxsparse",
        "data_offset": format!("{:#x}", h.data_offset),
        "table_offset": h.table_offset,
        "header_version": format!("{:#010x}", h.version),
        "max_table_entries": h.max_table_entries,
        "block_size": h.block_size,
        "checksum": format!("{:#010x}", h.checksum),
        "parent_uuid": uuid_to_string(&h.parent_uuid),
        "parent_timestamp": h.parent_timestamp,
        "parent_unicode_name": h.parent_name_string(),
    });
    let mut locs = Vec::new();
    for (i, l) in h.locators.iter().enumerate().filter(|(_, l)| l.code != 0) {
        let len = u64::from(l.data_length).min(l.space_bytes()).min(64 * 1024);
        let mut decoded = String::new();
        if len > 0 && l.data_offset + len <= f.file_size {
            let mut data = vec![0u8; len as usize];
            f.read_exact_at(&mut data, l.data_offset)?;
            decoded = match l.code {
                PLAT_MACX => String::from_utf8_lossy(&data)
                    .trim_end_matches('\0')
                    .to_string(),
                PLAT_W2KU | PLAT_W2RU => {
                    let u: Vec<u16> = data
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect();
                    String::from_utf16_lossy(&u)
                        .trim_end_matches('\0')
                        .to_string()
                }
                _ => String::new(),
            };
        }
        locs.push(json!({
            "index": i,
            "code": format!("{:#010x}", l.code),
            "code_name": l.code_name(),
            "data_space_raw": l.data_space,
            "data_space_bytes": l.space_bytes(),
            "data_length": l.data_length,
            "data_offset": l.data_offset,
            "decoded": decoded,
        }));
    }
    v["locators"] = json!(locs);
    v["bitmap_bytes_per_block"] = json!(h.bitmap_bytes());
    let spb = h.sectors_per_block() as usize;
    let (mut full, mut partial, mut empty) = (0u64, 0u64, 0u64);
    let mut offsets = Vec::new();
    let mut bm = vec![0u8; h.bitmap_bytes() as usize];
    for b in 0..f.block_count() {
        if f.read_bitmap(b, &mut bm)? {
            offsets.push(f.block_offset(b).unwrap_or(0));
            if bitmap::is_full(&bm, spb) {
                full += 1;
            } else if bitmap::is_empty(&bm, spb) {
                empty += 1;
            } else {
                partial += 1;
            }
        }
    }
    let ascending = offsets.windows(2).all(|w| w[0] < w[1]);
    let block_len = h.bitmap_bytes() + u64::from(h.block_size);
    v["blocks"] = json!({
        "total_blocks": f.block_count(),
        "allocated_blocks": offsets.len(),
        "bitmap_full": full,
        "bitmap_partial": partial,
        "bitmap_empty": empty,
        "blocks_in_ascending_file_order": ascending,
        "first_block_offset": offsets.iter().min(),
        "end_of_data": offsets.iter().max().map_or(f.file_size - 512, |m| m + block_len),
    });
    if let Some(bm) = &f.batmap {
        v["batmap"] = json!({
            "header_offset": bm.header_offset,
            "batmap_offset": bm.header.batmap_offset,
            "batmap_size_sectors": bm.header.batmap_size,
            "version": format!("{:#010x}", bm.header.version),
            "checksum": format!("{:#010x}", bm.header.checksum),
            "blocks_marked_full": bm.map.iter().map(|b| b.count_ones()).sum::<u32>(),
        });
    }
    if ft.disk_type == DiskType::Differencing {
        v["parent_uuid"] = json!(uuid_to_string(&h.parent_uuid));
    }
    Ok(v)
}

fn raw_footer(f: &VhdFile) -> Result<[u8; 512]> {
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, f.file_size - 512)?;
    Ok(b)
}
