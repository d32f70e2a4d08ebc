//! SIMD numeric kernels over `&[f64]`, for the numeric arrays inside events.
//!
//! - [`level`]: the instruction set chosen once at run time (AVX-512, AVX2, scalar).
//! - [`stats`]: count, sum, min, max and mean in one pass — what the `numeric`
//!   processor calls.
//! - [`sum`], [`min`], [`max`], [`mean`], [`count_where`], [`scale_offset`]: the
//!   single-purpose kernels.
//! - Every kernel has a `_with` form taking a [`Level`], so tests and benchmarks can run
//!   each implementation; asking for a level the CPU lacks falls back to scalar.
//!
//! Inputs must not hold NaN (numbers parsed from JSON never do): min and max of NaN
//! differ between instruction sets. Sums add in a different order per level (several
//! accumulators), so they match a sequential sum to within rounding, not bit for bit;
//! counts, min, max and `scale_offset` are exact at every level.

#![warn(missing_docs)]

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

/// An instruction set level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Portable scalar code with independent accumulators.
    Scalar,
    /// 256-bit AVX2.
    Avx2,
    /// 512-bit AVX-512F.
    Avx512,
}

/// The best level this CPU supports, detected once.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// Levels this CPU can run, lowest first (for tests and benchmarks).
pub fn available_levels() -> Vec<Level> {
    [Level::Scalar, Level::Avx2, Level::Avx512].into_iter().filter(|l| *l <= level()).collect()
}

/// The level actually used when `wanted` is asked for.
fn effective(wanted: Level) -> Level {
    wanted.min(level())
}

/// One-pass statistics of an array.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// Number of elements.
    pub count: usize,
    /// Sum (0 for an empty array).
    pub sum: f64,
    /// Smallest element.
    pub min: Option<f64>,
    /// Largest element.
    pub max: Option<f64>,
    /// Arithmetic mean.
    pub mean: Option<f64>,
}

/// Comparisons for [`count_where`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    /// `x > t`
    Gt,
    /// `x >= t`
    Ge,
    /// `x < t`
    Lt,
    /// `x <= t`
    Le,
    /// `x == t`
    Eq,
}

/// Statistics in one pass at the best level.
pub fn stats(x: &[f64]) -> Stats {
    stats_with(level(), x)
}

/// Statistics in one pass at `level` (or the best below it).
pub fn stats_with(level: Level, x: &[f64]) -> Stats {
    let (sum, min, max) = match effective(level) {
        Level::Scalar => scalar::sum_min_max(x),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::sum_min_max_avx2(x),
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => x86::sum_min_max_avx512(x),
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::sum_min_max(x),
    };
    let count = x.len();
    let some = |v: f64| (count > 0).then_some(v);
    Stats { count, sum, min: some(min), max: some(max), mean: some(sum / count as f64) }
}

/// The sum.
pub fn sum(x: &[f64]) -> f64 {
    stats(x).sum
}

/// The smallest element.
pub fn min(x: &[f64]) -> Option<f64> {
    stats(x).min
}

/// The largest element.
pub fn max(x: &[f64]) -> Option<f64> {
    stats(x).max
}

/// The mean.
pub fn mean(x: &[f64]) -> Option<f64> {
    stats(x).mean
}

/// How many elements compare true against `threshold`.
pub fn count_where(x: &[f64], cmp: Cmp, threshold: f64) -> usize {
    count_where_with(level(), x, cmp, threshold)
}

/// [`count_where`] at `level`.
pub fn count_where_with(level: Level, x: &[f64], cmp: Cmp, threshold: f64) -> usize {
    match effective(level) {
        Level::Scalar => scalar::count_where(x, cmp, threshold),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::count_where_avx2(x, cmp, threshold),
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => x86::count_where_avx512(x, cmp, threshold),
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::count_where(x, cmp, threshold),
    }
}

/// Writes `x * scale + offset` for every element into `out` (replacing its contents).
pub fn scale_offset(x: &[f64], scale: f64, offset: f64, out: &mut Vec<f64>) {
    scale_offset_with(level(), x, scale, offset, out)
}

/// [`scale_offset`] at `level`.
pub fn scale_offset_with(level: Level, x: &[f64], scale: f64, offset: f64, out: &mut Vec<f64>) {
    out.clear();
    out.resize(x.len(), 0.0);
    match effective(level) {
        Level::Scalar => scalar::scale_offset(x, scale, offset, out),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::scale_offset_avx2(x, scale, offset, out),
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => x86::scale_offset_avx512(x, scale, offset, out),
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::scale_offset(x, scale, offset, out),
    }
}

/// The one-element-at-a-time loop the kernels are measured against, and the reference
/// the property tests compare with.
pub mod reference {
    use super::Cmp;

    /// Sequential sum, min and max.
    pub fn sum_min_max(x: &[f64]) -> (f64, f64, f64) {
        let (mut s, mut lo, mut hi) = (0.0, f64::INFINITY, f64::NEG_INFINITY);
        for &v in x {
            s += v;
            lo = if v < lo { v } else { lo };
            hi = if v > hi { v } else { hi };
        }
        (s, lo, hi)
    }

    /// Sequential count.
    pub fn count_where(x: &[f64], cmp: Cmp, t: f64) -> usize {
        x.iter().filter(|&&v| super::scalar::compare(v, cmp, t)).count()
    }
}
