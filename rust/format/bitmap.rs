//! Sector bitmaps: MSB first, sector `s` of a block is bit `0x80 >> (s & 7)` of byte `s >> 3`.

pub fn get(bm: &[u8], s: usize) -> bool {
    bm[s >> 3] & (0x80 >> (s & 7)) != 0
}

pub fn set(bm: &mut [u8], s: usize) {
    bm[s >> 3] |= 0x80 >> (s & 7);
}

/// Set bits `[start, start+count)`.
pub fn set_range(bm: &mut [u8], start: usize, count: usize) {
    let end = start + count;
    let mut s = start;
    while s < end && s & 7 != 0 {
        set(bm, s);
        s += 1;
    }
    while s + 8 <= end {
        bm[s >> 3] = 0xFF;
        s += 8;
    }
    while s < end {
        set(bm, s);
        s += 1;
    }
}

/// Are all of the first `sectors` bits set?
pub fn is_full(bm: &[u8], sectors: usize) -> bool {
    let whole = sectors / 8;
    if !bm[..whole].iter().all(|&b| b == 0xFF) {
        return false;
    }
    (whole * 8..sectors).all(|s| get(bm, s))
}

pub fn is_empty(bm: &[u8], sectors: usize) -> bool {
    let whole = sectors / 8;
    bm[..whole].iter().all(|&b| b == 0) && (whole * 8..sectors).all(|s| !get(bm, s))
}

/// Maximal runs `(start, len, value)` over sectors `[from, to)`.
pub fn runs(bm: &[u8], from: usize, to: usize) -> Vec<(usize, usize, bool)> {
    let mut out = Vec::new();
    let mut s = from;
    while s < to {
        let v = get(bm, s);
        let start = s;
        // Skip whole bytes of the same value quickly.
        while s < to {
            if s & 7 == 0 && s + 8 <= to {
                let byte = bm[s >> 3];
                if (v && byte == 0xFF) || (!v && byte == 0) {
                    s += 8;
                    continue;
                }
            }
            if get(bm, s) != v {
                break;
            }
            s += 1;
        }
        out.push((start, s - start, v));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msb_first() {
        let mut bm = vec![0u8; 2];
        set(&mut bm, 0);
        set(&mut bm, 9);
        assert_eq!(bm, vec![0x80, 0x40]);
    }

    #[test]
    fn range_and_runs() {
        let mut bm = vec![0u8; 4];
        set_range(&mut bm, 3, 18);
        assert_eq!(
            runs(&bm, 0, 32),
            vec![(0, 3, false), (3, 18, true), (21, 11, false)]
        );
        assert!(!is_full(&bm, 32));
        set_range(&mut bm, 0, 32);
        assert!(is_full(&bm, 32));
    }
}
