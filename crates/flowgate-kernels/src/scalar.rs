//! Portable kernels: four independent accumulators, so the CPU overlaps the additions
//! even without SIMD.

use crate::Cmp;

#[inline]
pub(crate) fn compare(v: f64, cmp: Cmp, t: f64) -> bool {
    match cmp {
        Cmp::Gt => v > t,
        Cmp::Ge => v >= t,
        Cmp::Lt => v < t,
        Cmp::Le => v <= t,
        Cmp::Eq => v == t,
    }
}

/// Sum, min and max in one pass.
pub(crate) fn sum_min_max(x: &[f64]) -> (f64, f64, f64) {
    let mut s = [0.0f64; 4];
    let mut lo = [f64::INFINITY; 4];
    let mut hi = [f64::NEG_INFINITY; 4];
    let chunks = x.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..4 {
            s[i] += c[i];
            lo[i] = lo[i].min(c[i]);
            hi[i] = hi[i].max(c[i]);
        }
    }
    let (mut sum, mut min, mut max) =
        ((s[0] + s[1]) + (s[2] + s[3]), lo[0].min(lo[1]).min(lo[2].min(lo[3])), hi[0].max(hi[1]).max(hi[2].max(hi[3])));
    for &v in tail {
        sum += v;
        min = min.min(v);
        max = max.max(v);
    }
    (sum, min, max)
}

pub(crate) fn count_where(x: &[f64], cmp: Cmp, t: f64) -> usize {
    x.iter().filter(|&&v| compare(v, cmp, t)).count()
}

pub(crate) fn scale_offset(x: &[f64], scale: f64, offset: f64, out: &mut [f64]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * scale + offset;
    }
}
