//! Merge a differencing child into its parent, sector-exactly: only the sectors whose bit is
//! set in the child are copied, so a partial bitmap keeps the parent's other sectors (the
//! block-granular merge of Xen Orchestra's vhd-lib loses them).
//!
//! Crash safety, for a kill at any point (the parent must have no other child):
//! 1. a state file `<child>.xencr-merge` records the plan before anything is written;
//! 2. the copy into the parent is idempotent, and while it runs the chain child → parent still
//!    reads exactly as before (the parent only gains sectors the child overrides anyway);
//! 3. the parent's footer takes the child's size, then the parent is renamed over the child
//!    (atomic): from then on the child's path holds the merged disk;
//! 4. the merged disk takes the child's UUID, and the state file goes.
//!
//! Calling `coalesce` again after a kill finishes the job from whatever step it reached.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, Result, VhdError};
use crate::format::geometry::Geometry;
use crate::format::{bitmap, uuid_to_string, DiskType};
use crate::image::chain::locate_parent;
use crate::image::VhdFile;

#[derive(Debug, Clone)]
pub struct MergeReport {
    pub child: PathBuf,
    pub parent: PathBuf,
    pub result: PathBuf,
    pub blocks_merged: u64,
    pub sectors_merged: u64,
    pub resumed: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct MergeState {
    version: u32,
    child: PathBuf,
    parent: PathBuf,
    child_uuid: String,
    parent_uuid: String,
}

pub fn state_path(child: &Path) -> PathBuf {
    let mut s = child.as_os_str().to_owned();
    s.push(".xencr-merge");
    PathBuf::from(s)
}

fn sync_dir(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("cannot sync {}", dir.display()))
}

fn write_state(path: &Path, st: &MergeState) -> Result<()> {
    let tmp = path.with_extension("xencr-merge.tmp");
    let data = serde_json::to_vec_pretty(st).map_err(|e| VhdError::MergeState {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    std::fs::write(&tmp, data).ctx(|| format!("cannot write {}", tmp.display()))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("cannot sync {}", tmp.display()))?;
    std::fs::rename(&tmp, path).ctx(|| format!("cannot rename {}", tmp.display()))?;
    sync_dir(path)
}

fn read_state(path: &Path) -> Result<MergeState> {
    let data = std::fs::read(path).ctx(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&data).map_err(|e| VhdError::MergeState {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

pub fn coalesce(child: &Path, parent: Option<&Path>) -> Result<MergeReport> {
    let sp = state_path(child);
    if sp.exists() {
        return resume(child, &sp);
    }
    let c = VhdFile::open(child, false)?;
    if c.disk_type() != DiskType::Differencing {
        return Err(VhdError::NotDifferencing {
            path: child.display().to_string(),
        });
    }
    let parent_path = match parent {
        Some(p) => p.to_path_buf(),
        None => locate_parent(&c)?,
    };
    let p = VhdFile::open(&parent_path, false)?;
    let expected = c.header.as_ref().map(|h| h.parent_uuid).unwrap_or_default();
    if p.footer.uuid != expected {
        return Err(VhdError::ParentMismatch {
            child: child.display().to_string(),
            parent: parent_path.display().to_string(),
            expected: uuid_to_string(&expected),
            found: uuid_to_string(&p.footer.uuid),
        });
    }
    check_mergeable(&c, &p)?;
    let st = MergeState {
        version: 1,
        child: child.to_path_buf(),
        parent: parent_path.clone(),
        child_uuid: uuid_to_string(&c.footer.uuid),
        parent_uuid: uuid_to_string(&p.footer.uuid),
    };
    drop(p);
    write_state(&sp, &st)?;
    finish(c, &st, &sp, false)
}

fn check_mergeable(c: &VhdFile, p: &VhdFile) -> Result<()> {
    if p.disk_type() == DiskType::Fixed {
        if c.size() > p.size() || c.block_size() != crate::image::file::FIXED_BLOCK_SIZE {
            return Err(VhdError::Unsupported(
                "merging a larger or odd-block child into a fixed parent".into(),
            ));
        }
        return Ok(());
    }
    if c.block_size() != p.block_size() {
        return Err(VhdError::Unsupported(
            "merging disks of different block sizes".into(),
        ));
    }
    // A child grown larger than its parent is fine: `finish` grows the parent's table first.
    Ok(())
}

/// Steps 2-4, each idempotent.
fn finish(c: VhdFile, st: &MergeState, sp: &Path, resumed: bool) -> Result<MergeReport> {
    let mut p = VhdFile::open(&st.parent, true)?;
    if c.size() > p.size() {
        // A child grown larger than its parent (a resized disk): the parent takes its size first,
        // and a table that covers it. Reading the chain is unchanged by either; both idempotent.
        p.grow_table(c.block_count())?;
        p.footer.current_size = c.size();
        p.footer.geometry = Geometry::for_size(c.size());
    }
    p.write_footers()?;
    let (blocks_merged, sectors_merged) = copy_sectors(&c, &mut p)?;
    p.sync()?;
    let child_uuid = c.footer.uuid;
    drop(c);
    drop(p);
    std::fs::rename(&st.parent, &st.child).ctx(|| {
        format!(
            "cannot rename {} over {}",
            st.parent.display(),
            st.child.display()
        )
    })?;
    sync_dir(&st.child)?;
    set_final_uuid(&st.child, child_uuid)?;
    std::fs::remove_file(sp).ctx(|| format!("cannot remove {}", sp.display()))?;
    sync_dir(sp)?;
    Ok(MergeReport {
        child: st.child.clone(),
        parent: st.parent.clone(),
        result: st.child.clone(),
        blocks_merged,
        sectors_merged,
        resumed,
    })
}

fn set_final_uuid(path: &Path, uuid: [u8; 16]) -> Result<()> {
    let mut m = VhdFile::open(path, true)?;
    if m.footer.uuid != uuid {
        m.footer.uuid = uuid;
        m.write_footers()?;
        m.sync()?;
    }
    Ok(())
}

/// Copy every sector the child holds into the parent, block by block.
fn copy_sectors(c: &VhdFile, p: &mut VhdFile) -> Result<(u64, u64)> {
    let spb = c.header.as_ref().map_or(0, |h| h.sectors_per_block()) as usize;
    let bm_len = c.bitmap_bytes() as usize;
    let mut bm = vec![0u8; bm_len];
    let (mut blocks, mut sectors) = (0u64, 0u64);
    let size_sectors = c.size() / 512;
    for b in 0..c.block_count() {
        let Some(at) = c.block_offset(b) else {
            continue;
        };
        c.read_exact_at(&mut bm, at)?;
        let limit = std::cmp::min(
            spb as u64,
            size_sectors.saturating_sub(u64::from(b) * spb as u64),
        ) as usize;
        let runs: Vec<_> = bitmap::runs(&bm, 0, limit)
            .into_iter()
            .filter(|r| r.2)
            .collect();
        if runs.is_empty() {
            continue;
        }
        for (start, len, _) in runs {
            let src_at = at + bm_len as u64 + start as u64 * 512;
            p.copy_block_sectors(b, start as u64, len as u64, c.file(), src_at)?;
            sectors += len as u64;
        }
        blocks += 1;
    }
    Ok((blocks, sectors))
}

/// Finish an interrupted merge from what the files show.
fn resume(child: &Path, sp: &Path) -> Result<MergeReport> {
    let st = read_state(sp)?;
    if st.child != child {
        return Err(VhdError::MergeState {
            path: sp.display().to_string(),
            detail: format!(
                "records a merge of {}, not {}",
                st.child.display(),
                child.display()
            ),
        });
    }
    let child_uuid =
        crate::format::uuid_from_str(&st.child_uuid).ok_or_else(|| VhdError::MergeState {
            path: sp.display().to_string(),
            detail: "bad child UUID".into(),
        })?;
    if st.parent.exists() {
        // Not renamed yet: the child is intact; redo the (idempotent) copy and go on.
        let c = VhdFile::open(child, false)?;
        return finish(c, &st, sp, true);
    }
    // Renamed: the child's path holds the merged disk; give it the child's UUID.
    set_final_uuid(child, child_uuid)?;
    std::fs::remove_file(sp).ctx(|| format!("cannot remove {}", sp.display()))?;
    Ok(MergeReport {
        child: st.child.clone(),
        parent: st.parent.clone(),
        result: st.child,
        blocks_merged: 0,
        sectors_merged: 0,
        resumed: true,
    })
}
