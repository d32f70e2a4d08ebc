//! DDSketch: quantiles with a relative-error guarantee in bounded memory
//! (Masson, Rim, Lee, "DDSketch", VLDB 2019). Values are counted in logarithmic buckets
//! of ratio γ = (1+α)/(1−α); any quantile estimate is within α of a true value.
//!
//! Memory is bounded by a maximum number of buckets per sign, as in the reference
//! "collapsing lowest" stores: past it, the buckets of the lowest values merge into the
//! next one up (the positive values nearest zero, the most negative values), so high
//! quantiles keep their accuracy and only the lowest ones lose it. Counts are never lost.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::state::{StateError, StateReader, StateWriter};

/// Buckets per sign a sketch keeps unless told otherwise: with 1 % accuracy, values
/// spanning 17 orders of magnitude fit before any collapse.
pub const DEFAULT_MAX_BUCKETS: usize = 2048;

fn default_max_buckets() -> usize {
    DEFAULT_MAX_BUCKETS
}

/// A mergeable quantile sketch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DdSketch {
    alpha: f64,
    positive: BTreeMap<i32, u64>,
    negative: BTreeMap<i32, u64>,
    zeros: u64,
    count: u64,
    #[serde(default = "default_max_buckets")]
    max_buckets: usize,
}

impl DdSketch {
    /// A sketch with relative accuracy `alpha` (e.g. 0.01 for 1 %) and the default
    /// bucket bound.
    pub fn new(alpha: f64) -> DdSketch {
        DdSketch::with_max_buckets(alpha, DEFAULT_MAX_BUCKETS)
    }

    /// A sketch that keeps at most `max_buckets` (at least 1) buckets per sign.
    pub fn with_max_buckets(alpha: f64, max_buckets: usize) -> DdSketch {
        DdSketch {
            alpha,
            positive: BTreeMap::new(),
            negative: BTreeMap::new(),
            zeros: 0,
            count: 0,
            max_buckets: max_buckets.max(1),
        }
    }

    fn gamma(&self) -> f64 {
        (1.0 + self.alpha) / (1.0 - self.alpha)
    }

    fn index(&self, magnitude: f64) -> i32 {
        // `as` saturates: an infinite magnitude lands in the top bucket.
        (magnitude.ln() / self.gamma().ln()).ceil() as i32
    }

    fn value_at(&self, index: i32) -> f64 {
        let g = self.gamma();
        2.0 * g.powi(index) / (g + 1.0)
    }

    /// Adds a value (NaN is ignored); returns how many buckets were collapsed to stay
    /// within the bound.
    pub fn add(&mut self, x: f64) -> u64 {
        if x.is_nan() {
            return 0;
        }
        self.count = self.count.saturating_add(1);
        if x.abs() < 1e-300 {
            self.zeros = self.zeros.saturating_add(1);
            0
        } else if x > 0.0 {
            let n = self.positive.entry(self.index(x)).or_default();
            *n = n.saturating_add(1);
            self.collapse()
        } else {
            let n = self.negative.entry(self.index(-x)).or_default();
            *n = n.saturating_add(1);
            self.collapse()
        }
    }

    /// Adds every value of `other` (same accuracy) to this sketch; returns how many
    /// buckets were collapsed to stay within the bound.
    pub fn merge(&mut self, other: &DdSketch) -> u64 {
        for (i, n) in &other.positive {
            let m = self.positive.entry(*i).or_default();
            *m = m.saturating_add(*n);
        }
        for (i, n) in &other.negative {
            let m = self.negative.entry(*i).or_default();
            *m = m.saturating_add(*n);
        }
        self.zeros = self.zeros.saturating_add(other.zeros);
        self.count = self.count.saturating_add(other.count);
        self.collapse()
    }

    /// Merges the lowest values' buckets until each sign is within the bound.
    fn collapse(&mut self) -> u64 {
        let mut collapsed = 0;
        while self.positive.len() > self.max_buckets {
            let (_, n) = self.positive.pop_first().expect("over the bound, so not empty");
            let mut next = self.positive.first_entry().expect("bound is at least 1");
            *next.get_mut() = next.get().saturating_add(n);
            collapsed += 1;
        }
        // A negative value's bucket is indexed by its magnitude: the lowest values
        // have the highest indexes.
        while self.negative.len() > self.max_buckets {
            let (_, n) = self.negative.pop_last().expect("over the bound, so not empty");
            let mut next = self.negative.last_entry().expect("bound is at least 1");
            *next.get_mut() = next.get().saturating_add(n);
            collapsed += 1;
        }
        collapsed
    }

    /// Sets the bucket bound (at least 1), collapsing at once if the sketch is over it;
    /// returns how many buckets were collapsed.
    pub fn set_max_buckets(&mut self, max_buckets: usize) -> u64 {
        self.max_buckets = max_buckets.max(1);
        self.collapse()
    }

    /// Buckets in use (both signs).
    pub fn buckets(&self) -> usize {
        self.positive.len() + self.negative.len()
    }

    /// Values added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The estimate of quantile `q` (0 to 1); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.count - 1) as f64).round() as u64;
        let mut seen = 0u64;
        for (&i, &n) in self.negative.iter().rev() {
            seen = seen.saturating_add(n);
            if seen > rank {
                return Some(-self.value_at(i));
            }
        }
        seen = seen.saturating_add(self.zeros);
        if seen > rank {
            return Some(0.0);
        }
        for (&i, &n) in &self.positive {
            seen = seen.saturating_add(n);
            if seen > rank {
                return Some(self.value_at(i));
            }
        }
        self.positive.keys().next_back().map(|&i| self.value_at(i))
    }

    /// Appends the sketch to checkpoint state (the bound is config, not state).
    pub fn encode(&self, w: &mut StateWriter) {
        w.f64(self.alpha);
        w.u64(self.zeros);
        w.u64(self.count);
        for store in [&self.positive, &self.negative] {
            w.len(store.len());
            for (&i, &n) in store {
                w.i32(i);
                w.u64(n);
            }
        }
    }

    /// Reads a sketch written by [`DdSketch::encode`], refusing an inconsistent one
    /// (see [`DdSketch::validate`]) or buckets out of order, then applies `max_buckets`.
    pub fn decode(r: &mut StateReader<'_>, max_buckets: usize) -> Result<DdSketch, StateError> {
        let what = "quantile sketch";
        let mut sketch = DdSketch::with_max_buckets(r.f64(what)?, usize::MAX);
        sketch.zeros = r.u64(what)?;
        sketch.count = r.u64(what)?;
        for negative in [false, true] {
            let n = r.len(12, what)?;
            let mut last = None;
            for _ in 0..n {
                let (i, c) = (r.i32(what)?, r.u64(what)?);
                if last.is_some_and(|l| i <= l) {
                    return Err(StateError(format!("{what} has buckets out of order")));
                }
                last = Some(i);
                let store = if negative { &mut sketch.negative } else { &mut sketch.positive };
                store.insert(i, c);
            }
        }
        sketch.validate()?;
        sketch.set_max_buckets(max_buckets);
        Ok(sketch)
    }

    /// Checks that restored state is one a sketch can hold: accuracy strictly between 0
    /// and 1, no empty bucket, bucket counts that add up to the count.
    pub fn validate(&self) -> Result<(), StateError> {
        let what = "quantile sketch";
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return Err(StateError(format!("{what} has accuracy {}, not between 0 and 1", self.alpha)));
        }
        let mut total = self.zeros;
        for &c in self.positive.values().chain(self.negative.values()) {
            if c == 0 {
                return Err(StateError(format!("{what} has an empty bucket")));
            }
            total = total.checked_add(c).ok_or_else(|| StateError(format!("{what} counts overflow")))?;
        }
        if total != self.count {
            return Err(StateError(format!("{what} buckets hold {total} values but its count is {}", self.count)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn quantiles_are_within_the_relative_accuracy(values in proptest::collection::vec(-1e6f64..1e6, 1..500), q in 0.0f64..=1.0) {
            let mut sketch = DdSketch::new(0.01);
            for v in &values { sketch.add(*v); }
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let rank = (q * (sorted.len() - 1) as f64).round() as usize;
            let exact = sorted[rank];
            let estimate = sketch.quantile(q).unwrap();
            prop_assert!((estimate - exact).abs() <= 0.01 * exact.abs() + 1e-9, "q {} exact {} estimate {}", q, exact, estimate);
        }

        #[test]
        fn any_sketch_round_trips_through_its_encoding(values in proptest::collection::vec(any::<f64>(), 0..300)) {
            let mut sketch = DdSketch::with_max_buckets(0.01, 64);
            for v in values.iter().chain(&[f64::INFINITY, f64::NEG_INFINITY, f64::MAX, f64::MIN, 0.0, -0.0]) {
                sketch.add(*v);
            }
            let mut w = StateWriter::new();
            sketch.encode(&mut w);
            let bytes = w.finish();
            let mut r = StateReader::new(&bytes);
            let back = DdSketch::decode(&mut r, 64).unwrap();
            r.finish("sketch").unwrap();
            prop_assert_eq!(format!("{back:?}"), format!("{sketch:?}"));
        }
    }

    #[test]
    fn buckets_stay_within_the_bound_and_high_quantiles_keep_their_accuracy() {
        let mut sketch = DdSketch::with_max_buckets(0.01, 100);
        let mut collapsed = 0;
        // 1e-6 .. 1e6 spans about 1400 buckets at 1 %; negative values as many again.
        let values: Vec<f64> = (0..12_000).map(|i| 10f64.powf(-6.0 + i as f64 / 1000.0)).collect();
        for v in &values {
            collapsed += sketch.add(*v);
            collapsed += sketch.add(-*v);
        }
        assert!(sketch.buckets() <= 200, "{} buckets", sketch.buckets());
        assert!(collapsed > 0);
        assert_eq!(sketch.count(), 24_000, "collapsing loses no count");
        let p99 = sketch.quantile(0.99).unwrap();
        let exact = values[(0.98 * values.len() as f64) as usize];
        assert!((p99 - exact).abs() <= 0.011 * exact, "p99 {p99} exact {exact}");
        assert!(sketch.quantile(1.0).unwrap() >= 0.99 * 1e6);
        // The lowest values were merged upward: the minimum (-1e6) now reads as the
        // lowest bucket kept, whose magnitude is near 1e-6.
        assert!(sketch.quantile(0.0).unwrap() > -1e-4, "{:?}", sketch.quantile(0.0));
        // An empty sketch round-trips too.
        let empty = DdSketch::new(0.01);
        let mut w = StateWriter::new();
        empty.encode(&mut w);
        let bytes = w.finish();
        let back = DdSketch::decode(&mut StateReader::new(&bytes), 10).unwrap();
        assert_eq!(back.count(), 0);
        assert_eq!(back.quantile(0.5), None);
    }

    #[test]
    fn an_inconsistent_sketch_is_refused() {
        let mut sketch = DdSketch::new(0.01);
        sketch.add(5.0);
        let mut w = StateWriter::new();
        sketch.encode(&mut w);
        let mut bytes = w.finish();
        bytes[16] ^= 1; // the count no longer matches the buckets
        assert!(DdSketch::decode(&mut StateReader::new(&bytes), 10).is_err());
    }
}
