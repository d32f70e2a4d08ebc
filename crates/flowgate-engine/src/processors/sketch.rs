//! DDSketch: quantiles with a relative-error guarantee in bounded memory
//! (Masson, Rim, Lee, "DDSketch", VLDB 2019). Values are counted in logarithmic buckets
//! of ratio γ = (1+α)/(1−α); any quantile estimate is within α of a true value.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A mergeable quantile sketch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DdSketch {
    alpha: f64,
    positive: BTreeMap<i32, u64>,
    negative: BTreeMap<i32, u64>,
    zeros: u64,
    count: u64,
}

impl DdSketch {
    /// A sketch with relative accuracy `alpha` (e.g. 0.01 for 1 %).
    pub fn new(alpha: f64) -> DdSketch {
        DdSketch { alpha, positive: BTreeMap::new(), negative: BTreeMap::new(), zeros: 0, count: 0 }
    }

    fn gamma(&self) -> f64 {
        (1.0 + self.alpha) / (1.0 - self.alpha)
    }

    fn index(&self, magnitude: f64) -> i32 {
        (magnitude.ln() / self.gamma().ln()).ceil() as i32
    }

    fn value_at(&self, index: i32) -> f64 {
        let g = self.gamma();
        2.0 * g.powi(index) / (g + 1.0)
    }

    /// Adds a value (NaN is ignored).
    pub fn add(&mut self, x: f64) {
        if x.is_nan() {
            return;
        }
        self.count += 1;
        if x.abs() < 1e-300 {
            self.zeros += 1;
        } else if x > 0.0 {
            *self.positive.entry(self.index(x)).or_default() += 1;
        } else {
            *self.negative.entry(self.index(-x)).or_default() += 1;
        }
    }

    /// Adds every value of `other` (same accuracy) to this sketch.
    pub fn merge(&mut self, other: &DdSketch) {
        for (i, n) in &other.positive {
            *self.positive.entry(*i).or_default() += n;
        }
        for (i, n) in &other.negative {
            *self.negative.entry(*i).or_default() += n;
        }
        self.zeros += other.zeros;
        self.count += other.count;
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
            seen += n;
            if seen > rank {
                return Some(-self.value_at(i));
            }
        }
        seen += self.zeros;
        if seen > rank {
            return Some(0.0);
        }
        for (&i, &n) in &self.positive {
            seen += n;
            if seen > rank {
                return Some(self.value_at(i));
            }
        }
        self.positive.keys().next_back().map(|&i| self.value_at(i))
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
    }
}
