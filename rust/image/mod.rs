//! Image I/O: VHD files and chains on disk, raw files, creation and conversion.

pub mod chain;
pub mod convert;
pub mod create;
pub mod file;
pub mod info;
pub mod source;

pub use chain::Chain;
pub use file::VhdFile;
pub use source::Source;

/// Is every byte zero? (Word-at-a-time: this runs on every block of a full export.)
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = unsafe {
        // SAFETY: u8 -> u128 reinterpretation has no invalid bit patterns; `align_to` only
        // yields correctly aligned, in-bounds middle elements.
        buf.align_to::<u128>()
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Hex sha256 of a disk's whole virtual content, read block by block (bounded memory).
pub fn sha256_hex(src: &Source) -> crate::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let chunk = 2u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut off = 0;
    let size = src.size();
    while off < size {
        let n = std::cmp::min(chunk, size - off) as usize;
        if src.may_have_data(off, n as u64) {
            src.read_at(off, &mut buf[..n])?;
        } else {
            buf[..n].fill(0);
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Write a disk's virtual content to `out` (a file or pipe), in blocks. `sparse` seeks over
/// zero blocks instead of writing them (only for a seekable, freshly created file).
pub fn cat(src: &Source, out: &mut std::fs::File, sparse: bool) -> crate::Result<u64> {
    use crate::error::IoContext;
    use std::io::{Seek, SeekFrom, Write};
    let chunk = 2u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let size = src.size();
    let mut off = 0;
    while off < size {
        let n = std::cmp::min(chunk, size - off) as usize;
        let has = src.may_have_data(off, n as u64);
        if has {
            src.read_at(off, &mut buf[..n])?;
        }
        if sparse && (!has || is_zero(&buf[..n])) {
            out.seek(SeekFrom::Current(n as i64))
                .ctx(|| "cannot seek the output".into())?;
        } else {
            if !has {
                buf[..n].fill(0);
            }
            out.write_all(&buf[..n])
                .ctx(|| "cannot write the output".into())?;
        }
        off += n as u64;
    }
    if sparse {
        out.set_len(size).ctx(|| "cannot size the output".into())?;
    }
    Ok(size)
}
