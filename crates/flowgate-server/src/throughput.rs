//! Throughput and latency over time for `/v1/stats`: once a second the engine's counters
//! (events ingested, read per pipeline, written and failed per sink) and latency
//! histograms are sampled; rates are given now (the last second), over 1 minute and over
//! 5 minutes, latency percentiles over the last minute.

use std::collections::{BTreeMap, VecDeque};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Map, Value};

/// Samples kept: five minutes and one, at one a second.
const KEEP: usize = 301;

/// The counters sampled, by a key of their own (`ingest`, `pipeline:<name>`,
/// `sink:<pipeline>/<sink>`, `sink_errors:<pipeline>/<sink>`, and for histogram buckets
/// `hist:<what>:<whose>:<upper bound>`).
type Counters = BTreeMap<String, f64>;

/// The engine's samples.
#[derive(Debug, Default)]
pub struct Throughput {
    history: Mutex<VecDeque<(Instant, Counters)>>,
}

static THROUGHPUT: OnceLock<Throughput> = OnceLock::new();

/// The process's throughput history.
pub fn global() -> &'static Throughput {
    THROUGHPUT.get_or_init(Throughput::default)
}

/// A label's value in a sample line's label text.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let framed_start = labels.find(&format!("{name}=\""))?;
    if framed_start > 0 && !labels[..framed_start].ends_with(',') {
        return None;
    }
    let rest = &labels[framed_start + name.len() + 2..];
    rest.find('"').map(|end| &rest[..end])
}

/// The counters of interest in the text `/metrics` writes.
pub fn counters(text: &str) -> Counters {
    let mut out = Counters::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if let Some((what, whose)) = histogram(name, labels) {
            if let Some(le) = label(labels, "le") {
                *out.entry(format!("hist:{what}:{whose}:{le}")).or_default() += value;
            }
            continue;
        }
        let key = match name {
            "flowgate_ingest_events_total" => "ingest".to_owned(),
            "flowgate_pipeline_events_read_total" => match label(labels, "pipeline") {
                Some(p) => format!("pipeline:{p}"),
                None => continue,
            },
            "flowgate_sink_events_total" | "flowgate_sink_errors_total" => {
                let (Some(p), Some(s)) = (label(labels, "pipeline"), label(labels, "sink")) else { continue };
                let kind = if name == "flowgate_sink_events_total" { "sink" } else { "sink_errors" };
                format!("{kind}:{p}/{s}")
            }
            _ => continue,
        };
        *out.entry(key).or_default() += value;
    }
    out
}

/// The latency histograms followed: `(what, whose)` of a `_bucket` sample.
fn histogram(name: &str, labels: &str) -> Option<(&'static str, String)> {
    let family = name.strip_suffix("_bucket")?;
    match family {
        "flowgate_append_duration_seconds" => Some(("append", "log".to_owned())),
        "flowgate_pipeline_end_to_end_latency_seconds" => Some(("end_to_end", label(labels, "pipeline")?.to_owned())),
        "flowgate_sink_write_duration_seconds" => {
            Some(("sink_write", format!("{}/{}", label(labels, "pipeline")?, label(labels, "sink")?)))
        }
        _ => None,
    }
}

/// The `q` quantile of cumulative `(upper bound, count)` buckets, interpolated within
/// the bucket that holds it (as Prometheus' `histogram_quantile`); `None` when empty.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let want = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= want {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let frac = if count > prev.1 { (want - prev.1) / (count - prev.1) } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    None
}

impl Throughput {
    /// Records the counters read at `at`.
    pub fn record(&self, at: Instant, counters: Counters) {
        let mut h = self.history.lock();
        if h.len() >= KEEP {
            h.pop_front();
        }
        h.push_back((at, counters));
    }

    /// `{"ingest": {"now", "1m", "5m"}, "pipelines": {name: …}, "sinks": {"pipeline/sink":
    /// {"now", "1m", "5m", "errors_1m"}}}` in events per second; a window not covered
    /// yet uses what there is.
    pub fn to_json(&self) -> Value {
        let h = self.history.lock();
        let Some((now, last)) = h.back() else {
            return json!({"ingest": null, "pipelines": {}, "sinks": {}});
        };
        let rate = |key: &str, window: Duration| -> Option<f64> {
            let (then, earlier) = h.iter().find(|(t, _)| now.duration_since(*t) <= window)?;
            let secs = now.duration_since(*then).as_secs_f64();
            if secs <= 0.0 {
                return None;
            }
            let (a, b) = (earlier.get(key).copied().unwrap_or(0.0), last.get(key).copied()?);
            Some(((b - a) / secs).max(0.0))
        };
        let rates = |key: &str| {
            json!({
                "now": rate(key, Duration::from_millis(1500)),
                "1m": rate(key, Duration::from_secs(60)),
                "5m": rate(key, Duration::from_secs(300)),
            })
        };
        let mut pipelines = Map::new();
        let mut sinks = Map::new();
        for key in last.keys() {
            if let Some(p) = key.strip_prefix("pipeline:") {
                pipelines.insert(p.to_owned(), rates(key));
            } else if let Some(s) = key.strip_prefix("sink:") {
                let mut v = rates(key);
                let errors = format!("sink_errors:{s}");
                // A sink with no failed write has no error series yet: its rate is 0.
                let errors_rate = |window: Duration| rate(&errors, window).or_else(|| rate(key, window).map(|_| 0.0));
                let (now, minute, five) = (
                    errors_rate(Duration::from_millis(1500)),
                    errors_rate(Duration::from_secs(60)),
                    errors_rate(Duration::from_secs(300)),
                );
                v["errors_now"] = json!(now);
                v["errors_1m"] = json!(minute);
                v["errors_5m"] = json!(five);
                v["errors_trend"] = json!(trend(minute, five));
                sinks.insert(s.to_owned(), v);
            }
        }
        json!({"ingest": rates("ingest"), "pipelines": pipelines, "sinks": sinks})
    }

    /// Latency percentiles (ms) over the last minute: `{"append": {"log": …},
    /// "end_to_end": {pipeline: …}, "sink_write": {"pipeline/sink": …}}`, each
    /// `{"p50", "p99", "p999", "count"}`, from the histograms' buckets filled in that
    /// minute.
    pub fn latency_json(&self) -> Value {
        let h = self.history.lock();
        let Some((now, last)) = h.back() else {
            return json!({});
        };
        let Some((_, first)) = h.iter().find(|(t, _)| now.duration_since(*t) <= Duration::from_secs(60)) else {
            return json!({});
        };
        // (what, whose) → [(le, count in the minute)]
        let mut hists: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
        for (key, value) in last.range("hist:".to_owned()..) {
            let Some(rest) = key.strip_prefix("hist:") else { break };
            let mut parts = rest.rsplitn(2, ':');
            let (Some(le), Some(head)) = (parts.next(), parts.next()) else { continue };
            let Some((what, whose)) = head.split_once(':') else { continue };
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
            if le.is_nan() {
                continue;
            }
            let before = first.get(key).copied().unwrap_or(0.0);
            hists.entry((what.to_owned(), whose.to_owned())).or_default().push((le, (value - before).max(0.0)));
        }
        let mut out = Map::new();
        for ((what, whose), mut buckets) in hists {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let ms = |q| quantile(&buckets, q).map(|s| (s * 1e6).round() / 1e3);
            let entry = out.entry(what).or_insert_with(|| json!({}));
            entry[whose] = json!({
                "p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999),
                "count": buckets.last().map_or(0.0, |b| b.1),
            });
        }
        Value::Object(out)
    }
}

/// Samples the counters once a second until shutdown.
pub async fn run(shared: std::sync::Arc<crate::shared::Shared>) {
    // The counters start at 0 with the engine: what comes before the first tick counts.
    global().record(Instant::now(), Counters::new());
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let text = crate::http::metrics_text(&shared);
        global().record(Instant::now(), counters(&text));
    }
}

/// Where a rate is heading: its last minute against its last five minutes: `none` (no
/// errors in either), `rising` (the minute over 1.5 times the five minutes' average),
/// `falling` (under half of it) or `steady`; `None` before there are samples.
fn trend(minute: Option<f64>, five: Option<f64>) -> Option<&'static str> {
    let (minute, five) = (minute?, five?);
    Some(if minute <= 0.0 && five <= 0.0 {
        "none"
    } else if minute > five * 1.5 {
        "rising"
    } else if minute < five * 0.5 {
        "falling"
    } else {
        "steady"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_rate_rises_falls_or_holds_against_its_five_minutes() {
        assert_eq!(trend(None, Some(1.0)), None);
        assert_eq!(trend(Some(0.0), Some(0.0)), Some("none"));
        assert_eq!(trend(Some(3.0), Some(1.0)), Some("rising"));
        assert_eq!(trend(Some(0.2), Some(1.0)), Some("falling"));
        assert_eq!(trend(Some(1.1), Some(1.0)), Some("steady"));
        assert_eq!(trend(Some(0.0), Some(0.5)), Some("falling"));
    }

    #[test]
    fn counters_are_read_by_pipeline_and_sink() {
        let text = "flowgate_ingest_events_total{path=\"http\"} 10\nflowgate_ingest_events_total{path=\"binary\"} 5\n\
                    flowgate_pipeline_events_read_total{pipeline=\"p\"} 7\n\
                    flowgate_sink_events_total{pipeline=\"p\",sink=\"s\"} 3\n\
                    flowgate_sink_errors_total{pipeline=\"p\",sink=\"s\"} 1\nflowgate_other 9\n";
        let c = counters(text);
        assert_eq!(c["ingest"], 15.0);
        assert_eq!(c["pipeline:p"], 7.0);
        assert_eq!((c["sink:p/s"], c["sink_errors:p/s"]), (3.0, 1.0));
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn latency_percentiles_come_from_the_buckets_filled_in_the_last_minute() {
        let t = Throughput::default();
        let t0 = Instant::now();
        let sample = |fast: f64, slow: f64| {
            let text = format!(
                "flowgate_pipeline_end_to_end_latency_seconds_bucket{{pipeline=\"p\",le=\"0.01\"}} {fast}\n\
                 flowgate_pipeline_end_to_end_latency_seconds_bucket{{pipeline=\"p\",le=\"0.1\"}} {}\n\
                 flowgate_pipeline_end_to_end_latency_seconds_bucket{{pipeline=\"p\",le=\"+Inf\"}} {}\n",
                fast + slow,
                fast + slow
            );
            counters(&text)
        };
        // Before the minute: a thousand slow ones; in it: 99 fast, 1 slow.
        t.record(t0, sample(0.0, 1000.0));
        t.record(t0 + Duration::from_secs(100), sample(0.0, 1000.0));
        t.record(t0 + Duration::from_secs(130), sample(99.0, 1001.0));
        let j = t.latency_json();
        let p = &j["end_to_end"]["p"];
        assert_eq!(p["count"], 100.0, "{j}");
        assert!(p["p50"].as_f64().unwrap() <= 10.0, "{j}");
        assert!(p["p999"].as_f64().unwrap() > 10.0, "{j}");
    }

    #[test]
    fn rates_are_given_now_over_one_and_five_minutes() {
        let t = Throughput::default();
        let t0 = Instant::now();
        for s in 0..=120u64 {
            // 100 events/s for two minutes, 1000/s in the last second.
            let v = if s < 120 { 100.0 * s as f64 } else { 100.0 * 119.0 + 1000.0 };
            t.record(t0 + Duration::from_secs(s), Counters::from([("ingest".to_owned(), v)]));
        }
        let j = t.to_json();
        assert_eq!(j["ingest"]["now"], 1000.0);
        let one = j["ingest"]["1m"].as_f64().unwrap();
        assert!((one - (100.0 * 59.0 + 1000.0) / 60.0).abs() < 1e-9, "{one}");
        let five = j["ingest"]["5m"].as_f64().unwrap();
        assert!((five - (100.0 * 119.0 + 1000.0) / 120.0).abs() < 1e-9, "what there is: {five}");
    }
}
