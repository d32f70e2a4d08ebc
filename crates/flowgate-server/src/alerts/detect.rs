//! The tests a rule applies to its samples: a threshold, a learned baseline (anomaly),
//! a trend toward a limit (prediction). Pure: a sample in, whether the rule holds out.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// A comparison with a number, written `> 100`, `<= 0.5`, `== 0`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Threshold {
    op: Op,
    limit: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl Threshold {
    /// Parses `> 100` and the like.
    pub fn parse(text: &str) -> Result<Threshold, String> {
        let t = text.trim();
        let (op, rest) = [(">=", Op::Ge), ("<=", Op::Le), ("==", Op::Eq), ("!=", Op::Ne), (">", Op::Gt), ("<", Op::Lt)]
            .iter()
            .find_map(|(s, op)| t.strip_prefix(s).map(|r| (*op, r)))
            .ok_or_else(|| format!("condition '{text}' must be an operator (>, >=, <, <=, ==, !=) and a number"))?;
        let limit: f64 =
            rest.trim().parse().map_err(|_| format!("condition '{text}': '{}' is not a number", rest.trim()))?;
        if !limit.is_finite() {
            return Err(format!("condition '{text}': the number must be finite"));
        }
        Ok(Threshold { op, limit })
    }

    /// True when `value` meets the condition.
    pub fn holds(&self, value: f64) -> bool {
        match self.op {
            Op::Gt => value > self.limit,
            Op::Ge => value >= self.limit,
            Op::Lt => value < self.limit,
            Op::Le => value <= self.limit,
            Op::Eq => value == self.limit,
            Op::Ne => value != self.limit,
        }
    }
}

/// `anomaly = { … }`: a baseline learned as an exponentially weighted mean and variance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    /// Fires when a sample is this many standard deviations from the baseline.
    #[serde(default = "default_sigmas")]
    pub sigmas: f64,
    /// Clears only once samples are back within this many (hysteresis: no flapping).
    #[serde(default = "default_clear_sigmas")]
    pub clear_sigmas: f64,
    /// How fast the baseline follows: a sample's weight halves after this many seconds.
    #[serde(default = "default_half_life")]
    pub half_life_secs: f64,
    /// Seconds of samples learned before the rule may fire.
    #[serde(default = "default_warmup")]
    pub warmup_secs: f64,
    /// A deviation smaller than this never fires (a flat baseline has no variance).
    #[serde(default)]
    pub min_deviation: f64,
}

fn default_sigmas() -> f64 {
    4.0
}
fn default_clear_sigmas() -> f64 {
    2.0
}
fn default_half_life() -> f64 {
    600.0
}
fn default_warmup() -> f64 {
    300.0
}

impl AnomalyConfig {
    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), String> {
        let ok = self.sigmas.is_finite()
            && self.sigmas > 0.0
            && self.clear_sigmas.is_finite()
            && self.clear_sigmas > 0.0
            && self.clear_sigmas <= self.sigmas
            && self.half_life_secs.is_finite()
            && self.half_life_secs > 0.0
            && self.warmup_secs.is_finite()
            && self.warmup_secs >= 0.0
            && self.min_deviation.is_finite()
            && self.min_deviation >= 0.0;
        if ok {
            Ok(())
        } else {
            Err("anomaly: sigmas > 0, 0 < clear_sigmas <= sigmas, half_life_secs > 0, warmup_secs >= 0 and \
                 min_deviation >= 0, all finite"
                .to_owned())
        }
    }
}

/// The learned baseline of one rule.
#[derive(Clone, Debug, Default)]
pub struct Baseline {
    mean: f64,
    variance: f64,
    learned_secs: f64,
    started: bool,
    anomalous: bool,
    /// How long the samples have been anomalous without a break.
    anomalous_secs: f64,
}

impl Baseline {
    /// Takes a sample `dt_secs` after the previous one; true while it is anomalous.
    /// Anomalous samples are not learned for one half-life, so a short outage does not
    /// become the new normal; a change that lasts longer is learned from then on, and
    /// the alert clears once the baseline has followed it.
    pub fn observe(&mut self, c: &AnomalyConfig, value: f64, dt_secs: f64) -> bool {
        if !value.is_finite() {
            return self.anomalous;
        }
        if !self.started {
            self.started = true;
            self.mean = value;
            return false;
        }
        let deviation = (value - self.mean).abs();
        let sd = self.variance.sqrt();
        let warm = self.learned_secs >= c.warmup_secs;
        let z = if sd > 0.0 {
            deviation / sd
        } else if deviation > 0.0 {
            f64::INFINITY
        } else {
            0.0
        };
        self.anomalous =
            warm && deviation > c.min_deviation && if self.anomalous { z > c.clear_sigmas } else { z > c.sigmas };
        self.anomalous_secs = if self.anomalous { self.anomalous_secs + dt_secs.max(0.0) } else { 0.0 };
        if !self.anomalous || self.anomalous_secs >= c.half_life_secs {
            let alpha = 1.0 - 0.5f64.powf(dt_secs.max(0.0) / c.half_life_secs);
            let diff = value - self.mean;
            self.mean += alpha * diff;
            self.variance = (1.0 - alpha) * (self.variance + alpha * diff * diff);
            self.learned_secs += dt_secs.max(0.0);
        }
        self.anomalous
    }

    /// The baseline's mean and standard deviation.
    pub fn mean_and_sd(&self) -> (f64, f64) {
        (self.mean, self.variance.sqrt())
    }
}

/// `predict = { … }`: fires when the value's recent trend reaches `limit` within
/// `horizon_secs` (or has reached it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictConfig {
    /// The level the value must not reach.
    pub limit: f64,
    /// How far ahead, in seconds.
    pub horizon_secs: f64,
    /// Seconds of samples the trend is fitted to (least squares).
    #[serde(default = "default_window")]
    pub window_secs: f64,
}

fn default_window() -> f64 {
    600.0
}

impl PredictConfig {
    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), String> {
        if self.limit.is_finite() && self.horizon_secs.is_finite() && self.horizon_secs > 0.0 && self.window_secs > 0.0
        {
            Ok(())
        } else {
            Err("predict: limit finite, horizon_secs > 0 and window_secs > 0".to_owned())
        }
    }
}

/// The samples a prediction fits its trend to: at most this many are kept.
pub const MAX_TREND_SAMPLES: usize = 4096;

/// A rule's recent samples and their trend.
#[derive(Clone, Debug, Default)]
pub struct Trend {
    samples: VecDeque<(f64, f64)>,
}

impl Trend {
    /// Takes a sample at `t_secs`; returns the seconds until the trend reaches the
    /// limit (0 when it has), if it will within the horizon.
    pub fn observe(&mut self, c: &PredictConfig, t_secs: f64, value: f64) -> Option<f64> {
        if !value.is_finite() {
            return None;
        }
        self.samples.push_back((t_secs, value));
        while self.samples.front().is_some_and(|(t, _)| t_secs - t > c.window_secs)
            || self.samples.len() > MAX_TREND_SAMPLES
        {
            self.samples.pop_front();
        }
        if value >= c.limit {
            return Some(0.0);
        }
        // A trend needs a quarter of its window: three samples a moment apart are noise.
        let span = self.samples.back().map_or(0.0, |b| b.0) - self.samples.front().map_or(0.0, |f| f.0);
        if span < c.window_secs / 4.0 {
            return None;
        }
        let slope = self.slope()?;
        if slope <= 0.0 {
            return None;
        }
        let eta = (c.limit - value) / slope;
        (eta <= c.horizon_secs).then_some(eta)
    }

    /// The least-squares slope, per second, once there are three samples.
    fn slope(&self) -> Option<f64> {
        let n = self.samples.len();
        if n < 3 {
            return None;
        }
        let (st, sv) = self.samples.iter().fold((0.0, 0.0), |(a, b), (t, v)| (a + t, b + v));
        let (mt, mv) = (st / n as f64, sv / n as f64);
        let (mut num, mut den) = (0.0, 0.0);
        for (t, v) in &self.samples {
            num += (t - mt) * (v - mv);
            den += (t - mt) * (t - mt);
        }
        (den > 0.0).then(|| num / den)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_and_compare() {
        assert!(Threshold::parse("> 10").unwrap().holds(11.0));
        assert!(!Threshold::parse(">10").unwrap().holds(10.0));
        assert!(Threshold::parse(">= 10").unwrap().holds(10.0));
        assert!(Threshold::parse("<0.5").unwrap().holds(0.25));
        assert!(Threshold::parse("== 0").unwrap().holds(0.0));
        assert!(Threshold::parse("!= 0").unwrap().holds(1.0));
        assert!(Threshold::parse("~ 3").is_err());
        assert!(Threshold::parse("> x").is_err());
        assert!(Threshold::parse("> inf").is_err());
    }

    fn config() -> AnomalyConfig {
        AnomalyConfig { sigmas: 4.0, clear_sigmas: 2.0, half_life_secs: 60.0, warmup_secs: 30.0, min_deviation: 0.0 }
    }

    /// A noisy steady series: 1000 ± 50, deterministic.
    fn noisy(i: u64) -> f64 {
        1000.0 + ((i.wrapping_mul(2_654_435_761) % 101) as f64 - 50.0)
    }

    #[test]
    fn noise_does_not_fire_a_spike_does_and_it_clears_only_well_back_inside() {
        let c = config();
        let mut b = Baseline::default();
        for i in 0..600 {
            assert!(!b.observe(&c, noisy(i), 1.0), "noise fired at sample {i}: {:?}", b.mean_and_sd());
        }
        assert!(b.observe(&c, 5000.0, 1.0), "a spike fires");
        // Hysteresis: three deviations is still anomalous (above clear_sigmas), so it
        // does not flap on the way back.
        let (mean, sd) = b.mean_and_sd();
        assert!(b.observe(&c, mean + 3.0 * sd, 1.0));
        assert!(!b.observe(&c, mean, 1.0), "back at the baseline, it clears");
        // The spike was not learned.
        assert!((b.mean_and_sd().0 - mean).abs() < sd);
    }

    #[test]
    fn a_lasting_change_is_learned_after_a_half_life_and_the_alert_clears() {
        let c = config();
        let mut b = Baseline::default();
        for i in 0..600 {
            b.observe(&c, noisy(i), 1.0);
        }
        assert!(b.observe(&c, 1500.0, 1.0), "the step fires");
        let cleared = (0..3600).position(|i| !b.observe(&c, 1500.0 + noisy(i) - 1000.0, 1.0));
        let at = cleared.expect("a new level is learned and the alert clears");
        assert!(at >= 59, "not before a half-life (60 s): cleared after {at} s");
        // And a quiet night then traffic: from a flat 0 the level is learned too.
        let mut night = Baseline::default();
        let quiet = AnomalyConfig { min_deviation: 100.0, ..config() };
        for _ in 0..600 {
            night.observe(&quiet, 0.0, 1.0);
        }
        assert!(night.observe(&quiet, 150.0, 1.0));
        assert!((0..3600).any(|_| !night.observe(&quiet, 150.0, 1.0)), "cleared once learned");
    }

    #[test]
    fn nothing_fires_during_warmup_or_under_the_minimum_deviation() {
        let mut c = config();
        let mut b = Baseline::default();
        b.observe(&c, 10.0, 1.0);
        assert!(!b.observe(&c, 1e6, 1.0), "still warming up");
        c.warmup_secs = 0.0;
        c.min_deviation = 100.0;
        let mut flat = Baseline::default();
        for _ in 0..10 {
            flat.observe(&c, 5.0, 1.0);
        }
        assert!(!flat.observe(&c, 50.0, 1.0), "a flat baseline moved by less than min_deviation");
        assert!(flat.observe(&c, 500.0, 1.0));
    }

    #[test]
    fn a_rising_trend_is_predicted_to_reach_its_limit_and_a_flat_one_is_not() {
        let c = PredictConfig { limit: 1000.0, horizon_secs: 100.0, window_secs: 60.0 };
        let mut early = Trend::default();
        for (t, v) in [(0.0, 0.0), (0.1, 500.0), (0.2, 999.0)] {
            assert_eq!(early.observe(&c, t, v), None, "three samples within 0.2 s predict nothing");
        }
        let mut rising = Trend::default();
        let mut last = None;
        for t in 0..30 {
            last = rising.observe(&c, f64::from(t), 500.0 + 10.0 * f64::from(t));
        }
        // At t = 29 the value is 790, rising 10/s: 21 s to the limit.
        let eta = last.expect("within the horizon");
        assert!((eta - 21.0).abs() < 0.5, "{eta}");
        let mut flat = Trend::default();
        for t in 0..30 {
            assert_eq!(flat.observe(&c, f64::from(t), 500.0), None);
        }
        assert_eq!(flat.observe(&c, 31.0, 1000.0), Some(0.0), "at the limit");
        let slow = PredictConfig { horizon_secs: 5.0, ..c };
        let mut far = Trend::default();
        for t in 0..30 {
            assert_eq!(far.observe(&slow, f64::from(t), 500.0 + f64::from(t)), None, "beyond the horizon");
        }
    }
}
