//! CHS geometry as the VHD specification's appendix computes it (integer division, as blktap's
//! `vhd_chs()` and ocaml-vhd's `Geometry.of_sectors` do).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

impl Geometry {
    pub fn for_size(size: u64) -> Geometry {
        let mut secs = size / 512;
        let max = 65535u64 * 16 * 255;
        if secs > max {
            secs = max;
        }
        let (spt, heads, cth);
        if secs >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = secs / spt;
        } else {
            let mut s = 17;
            let mut c = secs / s;
            let mut h = std::cmp::max(4, c.div_ceil(1024));
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = secs / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = secs / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        Geometry {
            cylinders: (cth / heads) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }

    /// Bytes addressed by this geometry (what qemu uses for most creators).
    pub fn size(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track) * 512
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_geometry() {
        // From the vectors' inspect dumps: 64 MiB -> (963, 8, 17), size 67 055 616.
        let g = Geometry::for_size(64 << 20);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (963, 8, 17));
        assert_eq!(g.size(), 67_055_616);
    }
}
