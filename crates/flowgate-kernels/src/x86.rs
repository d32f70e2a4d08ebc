//! AVX2 and AVX-512 kernels. Each public wrapper is only reached through
//! `crate::effective`, which never returns a level above the one `is_x86_feature_detected!`
//! found, so the `#[target_feature]` functions run only on CPUs that have the feature.

use std::arch::x86_64::*;

use crate::Cmp;

/// Sum, min, max with AVX2: two 4-lane accumulators of each, then the scalar tail.
pub(crate) fn sum_min_max_avx2(x: &[f64]) -> (f64, f64, f64) {
    debug_assert!(std::arch::is_x86_feature_detected!("avx2"));
    // SAFETY: only called when level() detected AVX2 (see the module comment).
    unsafe { sum_min_max_avx2_impl(x) }
}

#[target_feature(enable = "avx2")]
unsafe fn sum_min_max_avx2_impl(x: &[f64]) -> (f64, f64, f64) {
    let (mut s0, mut s1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let (mut lo0, mut lo1) = (_mm256_set1_pd(f64::INFINITY), _mm256_set1_pd(f64::INFINITY));
    let (mut hi0, mut hi1) = (_mm256_set1_pd(f64::NEG_INFINITY), _mm256_set1_pd(f64::NEG_INFINITY));
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        // SAFETY: `c` has exactly 8 elements, so both unaligned 4-lane loads are in bounds.
        let (a, b) = unsafe { (_mm256_loadu_pd(c.as_ptr()), _mm256_loadu_pd(c.as_ptr().add(4))) };
        s0 = _mm256_add_pd(s0, a);
        s1 = _mm256_add_pd(s1, b);
        lo0 = _mm256_min_pd(lo0, a);
        lo1 = _mm256_min_pd(lo1, b);
        hi0 = _mm256_max_pd(hi0, a);
        hi1 = _mm256_max_pd(hi1, b);
    }
    let mut s = [0.0f64; 4];
    let mut lo = [0.0f64; 4];
    let mut hi = [0.0f64; 4];
    // SAFETY: each array holds exactly 4 f64, the width of one unaligned store.
    unsafe {
        _mm256_storeu_pd(s.as_mut_ptr(), _mm256_add_pd(s0, s1));
        _mm256_storeu_pd(lo.as_mut_ptr(), _mm256_min_pd(lo0, lo1));
        _mm256_storeu_pd(hi.as_mut_ptr(), _mm256_max_pd(hi0, hi1));
    }
    let mut sum = (s[0] + s[1]) + (s[2] + s[3]);
    let mut min = lo[0].min(lo[1]).min(lo[2].min(lo[3]));
    let mut max = hi[0].max(hi[1]).max(hi[2].max(hi[3]));
    for &v in tail {
        sum += v;
        min = min.min(v);
        max = max.max(v);
    }
    (sum, min, max)
}

/// Sum, min, max with AVX-512F: two 8-lane accumulators of each.
pub(crate) fn sum_min_max_avx512(x: &[f64]) -> (f64, f64, f64) {
    debug_assert!(std::arch::is_x86_feature_detected!("avx512f"));
    // SAFETY: only called when level() detected AVX-512F.
    unsafe { sum_min_max_avx512_impl(x) }
}

#[target_feature(enable = "avx512f")]
unsafe fn sum_min_max_avx512_impl(x: &[f64]) -> (f64, f64, f64) {
    let (mut s0, mut s1) = (_mm512_setzero_pd(), _mm512_setzero_pd());
    let (mut lo0, mut lo1) = (_mm512_set1_pd(f64::INFINITY), _mm512_set1_pd(f64::INFINITY));
    let (mut hi0, mut hi1) = (_mm512_set1_pd(f64::NEG_INFINITY), _mm512_set1_pd(f64::NEG_INFINITY));
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        // SAFETY: `c` has exactly 16 elements, so both unaligned 8-lane loads are in bounds.
        let (a, b) = unsafe { (_mm512_loadu_pd(c.as_ptr()), _mm512_loadu_pd(c.as_ptr().add(8))) };
        s0 = _mm512_add_pd(s0, a);
        s1 = _mm512_add_pd(s1, b);
        lo0 = _mm512_min_pd(lo0, a);
        lo1 = _mm512_min_pd(lo1, b);
        hi0 = _mm512_max_pd(hi0, a);
        hi1 = _mm512_max_pd(hi1, b);
    }
    let mut sum = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    let mut min = _mm512_reduce_min_pd(_mm512_min_pd(lo0, lo1));
    let mut max = _mm512_reduce_max_pd(_mm512_max_pd(hi0, hi1));
    for &v in tail {
        sum += v;
        min = min.min(v);
        max = max.max(v);
    }
    (sum, min, max)
}

pub(crate) fn count_where_avx2(x: &[f64], cmp: Cmp, t: f64) -> usize {
    // SAFETY: only called when level() detected AVX2.
    unsafe { count_where_avx2_impl(x, cmp, t) }
}

#[target_feature(enable = "avx2")]
unsafe fn count_where_avx2_impl(x: &[f64], cmp: Cmp, t: f64) -> usize {
    let tv = _mm256_set1_pd(t);
    let chunks = x.chunks_exact(4);
    let tail = chunks.remainder();
    let mut n = 0usize;
    for c in chunks {
        // SAFETY: `c` has exactly 4 elements.
        let a = unsafe { _mm256_loadu_pd(c.as_ptr()) };
        let m = match cmp {
            Cmp::Gt => _mm256_cmp_pd::<_CMP_GT_OQ>(a, tv),
            Cmp::Ge => _mm256_cmp_pd::<_CMP_GE_OQ>(a, tv),
            Cmp::Lt => _mm256_cmp_pd::<_CMP_LT_OQ>(a, tv),
            Cmp::Le => _mm256_cmp_pd::<_CMP_LE_OQ>(a, tv),
            Cmp::Eq => _mm256_cmp_pd::<_CMP_EQ_OQ>(a, tv),
        };
        n += _mm256_movemask_pd(m).count_ones() as usize;
    }
    n + crate::scalar::count_where(tail, cmp, t)
}

pub(crate) fn count_where_avx512(x: &[f64], cmp: Cmp, t: f64) -> usize {
    // SAFETY: only called when level() detected AVX-512F.
    unsafe { count_where_avx512_impl(x, cmp, t) }
}

#[target_feature(enable = "avx512f")]
unsafe fn count_where_avx512_impl(x: &[f64], cmp: Cmp, t: f64) -> usize {
    let tv = _mm512_set1_pd(t);
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    let mut n = 0usize;
    for c in chunks {
        // SAFETY: `c` has exactly 8 elements.
        let a = unsafe { _mm512_loadu_pd(c.as_ptr()) };
        let m = match cmp {
            Cmp::Gt => _mm512_cmp_pd_mask::<_CMP_GT_OQ>(a, tv),
            Cmp::Ge => _mm512_cmp_pd_mask::<_CMP_GE_OQ>(a, tv),
            Cmp::Lt => _mm512_cmp_pd_mask::<_CMP_LT_OQ>(a, tv),
            Cmp::Le => _mm512_cmp_pd_mask::<_CMP_LE_OQ>(a, tv),
            Cmp::Eq => _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(a, tv),
        };
        n += m.count_ones() as usize;
    }
    n + crate::scalar::count_where(tail, cmp, t)
}

pub(crate) fn scale_offset_avx2(x: &[f64], scale: f64, offset: f64, out: &mut [f64]) {
    assert_eq!(x.len(), out.len());
    // SAFETY: only called when level() detected AVX2; lengths checked above.
    unsafe { scale_offset_avx2_impl(x, scale, offset, out) }
}

#[target_feature(enable = "avx2")]
unsafe fn scale_offset_avx2_impl(x: &[f64], scale: f64, offset: f64, out: &mut [f64]) {
    let (sv, ov) = (_mm256_set1_pd(scale), _mm256_set1_pd(offset));
    let n = x.len() / 4 * 4;
    for i in (0..n).step_by(4) {
        // SAFETY: i + 4 <= n <= x.len() == out.len(), so load and store are in bounds.
        unsafe {
            let a = _mm256_loadu_pd(x.as_ptr().add(i));
            // Multiply then add (not fused), so results equal the scalar `x * s + o`.
            _mm256_storeu_pd(out.as_mut_ptr().add(i), _mm256_add_pd(_mm256_mul_pd(a, sv), ov));
        }
    }
    crate::scalar::scale_offset(&x[n..], scale, offset, &mut out[n..]);
}

pub(crate) fn scale_offset_avx512(x: &[f64], scale: f64, offset: f64, out: &mut [f64]) {
    assert_eq!(x.len(), out.len());
    // SAFETY: only called when level() detected AVX-512F; lengths checked above.
    unsafe { scale_offset_avx512_impl(x, scale, offset, out) }
}

#[target_feature(enable = "avx512f")]
unsafe fn scale_offset_avx512_impl(x: &[f64], scale: f64, offset: f64, out: &mut [f64]) {
    let (sv, ov) = (_mm512_set1_pd(scale), _mm512_set1_pd(offset));
    let n = x.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 <= n <= x.len() == out.len(), so load and store are in bounds.
        unsafe {
            let a = _mm512_loadu_pd(x.as_ptr().add(i));
            _mm512_storeu_pd(out.as_mut_ptr().add(i), _mm512_add_pd(_mm512_mul_pd(a, sv), ov));
        }
    }
    crate::scalar::scale_offset(&x[n..], scale, offset, &mut out[n..]);
}
