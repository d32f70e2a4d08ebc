//! `aggregate`: windowed aggregation by key over event time.
//!
//! Windows are tumbling, hopping or session. The watermark trails the largest event
//! time seen by `max_out_of_orderness_ms`; a window is emitted (once) when the
//! watermark passes its end plus `allowed_lateness_ms`. An event all of whose windows
//! were already emitted is late: counted, and sent to `late_topic` if one is set. When
//! the input idles, the watermark advances with the wall clock so the last windows are
//! emitted too. Window state is checkpointed with the pipeline's offsets.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use vrl::value::{KeyString, ObjectMap, Value};

use super::sketch::DdSketch;
use super::{Outputs, Processor};
use crate::config::{AggregateConfig, WindowConfig};
use crate::event::{as_f64, float_value, get_path, key_string, PipelineEvent};

#[derive(Clone, Debug, PartialEq)]
enum Func {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    First,
    Last,
    Quantile(f64),
}

#[derive(Clone, Debug)]
struct Output {
    func: Func,
    field: Option<String>,
    name: String,
}

/// Running state of one output field in one window.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum FieldAcc {
    Count,
    Sum(f64),
    Min(Option<f64>),
    Max(Option<f64>),
    Avg(f64, u64),
    First(Option<(i64, Value)>),
    Last(Option<(i64, Value)>),
    Quantile(Box<DdSketch>),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Window {
    start: i64,
    end: i64,
    count: u64,
    fields: Vec<FieldAcc>,
}

/// Aggregates events into windows.
pub struct Aggregate {
    group_by: Option<String>,
    time_field: Option<String>,
    window: WindowConfig,
    ooo: i64,
    lateness: i64,
    late_topic: Option<String>,
    idle_advance_ms: i64,
    outputs: Vec<Output>,
    /// Open windows: (end, group, start) → state. Ordered by end, so emission walks the front.
    open: BTreeMap<(i64, String, i64), Window>,
    max_event_ts: i64,
    watermark: i64,
    last_event_wall: i64,
    partition: u32,
    /// Events that arrived after their windows were emitted.
    pub late_events: u64,
    /// Windows emitted.
    pub windows_emitted: u64,
}

impl Aggregate {
    /// Validates the config.
    pub fn new(c: &AggregateConfig) -> anyhow::Result<Aggregate> {
        match c.window {
            WindowConfig::Tumbling { size_ms: 0 } => anyhow::bail!("window.size_ms must be positive"),
            WindowConfig::Hopping { size_ms, hop_ms } if size_ms == 0 || hop_ms == 0 || hop_ms > size_ms => {
                anyhow::bail!("window needs 0 < hop_ms <= size_ms")
            }
            WindowConfig::Session { gap_ms: 0 } => anyhow::bail!("window.gap_ms must be positive"),
            _ => {}
        }
        if c.functions.is_empty() {
            anyhow::bail!("functions must name at least one aggregate");
        }
        let outputs = c
            .functions
            .iter()
            .map(|f| {
                let func = match f.function.as_str() {
                    "count" => Func::Count,
                    "sum" => Func::Sum,
                    "min" => Func::Min,
                    "max" => Func::Max,
                    "avg" => Func::Avg,
                    "first" => Func::First,
                    "last" => Func::Last,
                    "quantile" => match f.q {
                        Some(q) if (0.0..=1.0).contains(&q) => Func::Quantile(q),
                        _ => anyhow::bail!("quantile needs q between 0 and 1"),
                    },
                    other => anyhow::bail!(
                        "unknown aggregate function '{other}' (count, sum, min, max, avg, first, last, quantile)"
                    ),
                };
                if func != Func::Count && f.field.is_none() {
                    anyhow::bail!("function '{}' needs a field", f.function);
                }
                let name = f.output.clone().unwrap_or_else(|| match (&func, &f.field) {
                    (Func::Count, _) => "count".to_owned(),
                    (Func::Quantile(q), Some(field)) => format!("p{}_{}", (q * 100.0).round(), field.replace('.', "_")),
                    (_, Some(field)) => format!("{}_{}", f.function, field.replace('.', "_")),
                    (_, None) => f.function.clone(),
                });
                Ok(Output { func, field: f.field.clone(), name })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Aggregate {
            group_by: c.group_by.clone(),
            time_field: c.time_field.clone(),
            window: c.window.clone(),
            ooo: c.max_out_of_orderness_ms as i64,
            lateness: c.allowed_lateness_ms as i64,
            late_topic: c.late_topic.clone(),
            idle_advance_ms: c.idle_advance_ms as i64,
            outputs,
            open: BTreeMap::new(),
            max_event_ts: i64::MIN,
            watermark: i64::MIN,
            last_event_wall: flowgate_core::time::now_ms(),
            partition: 0,
            late_events: 0,
            windows_emitted: 0,
        })
    }

    fn new_window(&self, start: i64, end: i64) -> Window {
        Self::empty_window(&self.outputs, start, end)
    }

    fn empty_window(outputs: &[Output], start: i64, end: i64) -> Window {
        let fields = outputs
            .iter()
            .map(|o| match o.func {
                Func::Count => FieldAcc::Count,
                Func::Sum => FieldAcc::Sum(0.0),
                Func::Min => FieldAcc::Min(None),
                Func::Max => FieldAcc::Max(None),
                Func::Avg => FieldAcc::Avg(0.0, 0),
                Func::First => FieldAcc::First(None),
                Func::Last => FieldAcc::Last(None),
                Func::Quantile(_) => FieldAcc::Quantile(Box::new(DdSketch::new(0.01))),
            })
            .collect();
        Window { start, end, count: 0, fields }
    }

    fn closed(&self, end: i64) -> bool {
        self.watermark != i64::MIN && end.saturating_add(self.lateness) <= self.watermark
    }

    /// Window bounds an event time falls in (not for sessions).
    fn fixed_windows(&self, ts: i64) -> Vec<(i64, i64)> {
        match self.window {
            WindowConfig::Tumbling { size_ms } => {
                let size = size_ms as i64;
                let start = ts.div_euclid(size) * size;
                vec![(start, start + size)]
            }
            WindowConfig::Hopping { size_ms, hop_ms } => {
                let (size, hop) = (size_ms as i64, hop_ms as i64);
                let mut out = Vec::new();
                let mut start = ts.div_euclid(hop) * hop;
                while start > ts - size {
                    out.push((start, start + size));
                    start -= hop;
                }
                out.reverse();
                out
            }
            WindowConfig::Session { .. } => Vec::new(),
        }
    }

    fn accumulate(outputs: &[Output], window: &mut Window, ts: i64, doc: &Value) {
        window.count += 1;
        for (acc, out) in window.fields.iter_mut().zip(outputs) {
            let value = out.field.as_deref().and_then(|f| get_path(doc, f));
            let number = value.and_then(as_f64);
            match acc {
                FieldAcc::Count => {}
                FieldAcc::Sum(s) => *s += number.unwrap_or(0.0),
                FieldAcc::Min(m) => {
                    if let Some(x) = number {
                        *m = Some(m.map_or(x, |m| m.min(x)));
                    }
                }
                FieldAcc::Max(m) => {
                    if let Some(x) = number {
                        *m = Some(m.map_or(x, |m| m.max(x)));
                    }
                }
                FieldAcc::Avg(s, n) => {
                    if let Some(x) = number {
                        *s += x;
                        *n += 1;
                    }
                }
                FieldAcc::First(f) => {
                    if let Some(v) = value {
                        if f.as_ref().is_none_or(|(t, _)| ts < *t) {
                            *f = Some((ts, v.clone()));
                        }
                    }
                }
                FieldAcc::Last(l) => {
                    if let Some(v) = value {
                        if l.as_ref().is_none_or(|(t, _)| ts >= *t) {
                            *l = Some((ts, v.clone()));
                        }
                    }
                }
                FieldAcc::Quantile(s) => {
                    if let Some(x) = number {
                        s.add(x);
                    }
                }
            }
        }
    }

    fn merge(into: &mut Window, from: Window) {
        into.start = into.start.min(from.start);
        into.end = into.end.max(from.end);
        into.count += from.count;
        for (a, b) in into.fields.iter_mut().zip(from.fields) {
            match (a, b) {
                (FieldAcc::Sum(x), FieldAcc::Sum(y)) => *x += y,
                (FieldAcc::Min(x), FieldAcc::Min(y)) => *x = [*x, y].into_iter().flatten().reduce(f64::min),
                (FieldAcc::Max(x), FieldAcc::Max(y)) => *x = [*x, y].into_iter().flatten().reduce(f64::max),
                (FieldAcc::Avg(s, n), FieldAcc::Avg(s2, n2)) => {
                    *s += s2;
                    *n += n2;
                }
                (FieldAcc::First(x), FieldAcc::First(y))
                    if y.as_ref().is_some_and(|(t, _)| x.as_ref().is_none_or(|(t0, _)| t < t0)) =>
                {
                    *x = y;
                }
                (FieldAcc::Last(x), FieldAcc::Last(y))
                    if y.as_ref().is_some_and(|(t, _)| x.as_ref().is_none_or(|(t0, _)| t >= t0)) =>
                {
                    *x = y;
                }
                (FieldAcc::Quantile(x), FieldAcc::Quantile(y)) => x.merge(&y),
                _ => {}
            }
        }
    }

    fn result(&self, group: &str, window: &Window) -> Value {
        let mut map = ObjectMap::new();
        if let Some(g) = &self.group_by {
            map.insert(KeyString::from(g.as_str()), Value::Bytes(Bytes::copy_from_slice(group.as_bytes())));
        }
        map.insert("window_start".into(), Value::Integer(window.start));
        map.insert("window_end".into(), Value::Integer(window.end));
        for (acc, out) in window.fields.iter().zip(&self.outputs) {
            let v = match acc {
                FieldAcc::Count => Value::Integer(window.count as i64),
                FieldAcc::Sum(s) => float_value(*s),
                FieldAcc::Min(m) | FieldAcc::Max(m) => m.map_or(Value::Null, float_value),
                FieldAcc::Avg(s, n) => {
                    if *n == 0 {
                        Value::Null
                    } else {
                        float_value(s / *n as f64)
                    }
                }
                FieldAcc::First(f) | FieldAcc::Last(f) => f.as_ref().map_or(Value::Null, |(_, v)| v.clone()),
                FieldAcc::Quantile(s) => match out.func {
                    Func::Quantile(q) => s.quantile(q).map_or(Value::Null, float_value),
                    _ => Value::Null,
                },
            };
            map.insert(KeyString::from(out.name.as_str()), v);
        }
        Value::Object(map)
    }

    fn emit_closed(&mut self) -> Vec<PipelineEvent> {
        let mut out = Vec::new();
        while let Some(((end, _, _), _)) = self.open.first_key_value() {
            if !self.closed(*end) {
                break;
            }
            let ((end, group, _), window) = self.open.pop_first().expect("non-empty");
            let doc = self.result(&group, &window);
            let key = self.group_by.as_ref().map(|_| Bytes::copy_from_slice(group.as_bytes()));
            out.push(PipelineEvent::from_document(self.partition, end, key, doc));
            self.windows_emitted += 1;
        }
        out
    }

    fn advance_watermark(&mut self, to: i64) {
        if to > self.watermark {
            self.watermark = to;
        }
    }

    /// The current watermark.
    pub fn watermark(&self) -> i64 {
        self.watermark
    }
}

impl Processor for Aggregate {
    fn kind(&self) -> &'static str {
        "aggregate"
    }

    fn process(&mut self, events: Vec<PipelineEvent>, out: &mut Outputs) -> Vec<PipelineEvent> {
        if events.is_empty() {
            return Vec::new();
        }
        self.last_event_wall = flowgate_core::time::now_ms();
        for mut event in events {
            self.partition = event.partition;
            let event_ts = event.timestamp;
            let Ok(doc) = event.doc() else {
                out.dead_letters.push(super::DeadLetter {
                    processor: "aggregate".into(),
                    error: "payload is not JSON".into(),
                    event,
                });
                continue;
            };
            let ts = self.time_field.as_deref().and_then(|f| get_path(doc, f)).and_then(as_f64).map(|t| t as i64);
            let group = self.group_by.as_deref().and_then(|g| get_path(doc, g)).map(key_string).unwrap_or_default();
            let ts = ts.unwrap_or(event_ts);
            let doc: &Value = doc;
            let accepted = match self.window {
                WindowConfig::Session { gap_ms } => {
                    let gap = gap_ms as i64;
                    if self.closed(ts + gap) {
                        false
                    } else {
                        // Merge every open session of this group that the new event touches.
                        let touching: Vec<(i64, String, i64)> = self
                            .open
                            .iter()
                            .filter(|((end, g, start), _)| g == &group && ts < *end && ts + gap > *start)
                            .map(|(k, _)| k.clone())
                            .collect();
                        let mut window = self.new_window(ts, ts + gap);
                        for k in touching {
                            let w = self.open.remove(&k).expect("listed above");
                            Self::merge(&mut window, w);
                        }
                        Self::accumulate(&self.outputs, &mut window, ts, doc);
                        self.open.insert((window.end, group, window.start), window);
                        true
                    }
                }
                _ => {
                    let mut any = false;
                    for (start, end) in self.fixed_windows(ts) {
                        if self.closed(end) {
                            continue;
                        }
                        any = true;
                        let outputs = &self.outputs;
                        let window = self
                            .open
                            .entry((end, group.clone(), start))
                            .or_insert_with(|| Self::empty_window(outputs, start, end));
                        Self::accumulate(outputs, window, ts, doc);
                    }
                    any
                }
            };
            if !accepted {
                self.late_events += 1;
                out.late.push((self.late_topic.clone(), event));
                continue;
            }
            self.max_event_ts = self.max_event_ts.max(ts);
            self.advance_watermark(self.max_event_ts.saturating_sub(self.ooo));
        }
        self.emit_closed()
    }

    fn tick(&mut self, now_ms: i64, _out: &mut Outputs) -> Vec<PipelineEvent> {
        if self.idle_advance_ms > 0 && self.max_event_ts != i64::MIN {
            let idle = now_ms - self.last_event_wall;
            if idle >= self.idle_advance_ms {
                // Extrapolate event time by the wall clock since the last event.
                self.advance_watermark(self.max_event_ts.saturating_sub(self.ooo).saturating_add(idle));
            }
        }
        self.emit_closed()
    }

    fn snapshot(&self) -> Vec<u8> {
        let windows: Vec<(&(i64, String, i64), &Window)> = self.open.iter().collect();
        let state = serde_json::json!({
            "max_event_ts": self.max_event_ts,
            "watermark": self.watermark,
            "late_events": self.late_events,
            "windows_emitted": self.windows_emitted,
            "windows": serde_json::to_value(windows).unwrap_or_default(),
        });
        serde_json::to_vec(&state).unwrap_or_default()
    }

    fn restore(&mut self, state: &[u8]) -> anyhow::Result<()> {
        if state.is_empty() {
            return Ok(());
        }
        let state: serde_json::Value = serde_json::from_slice(state)?;
        self.max_event_ts = state["max_event_ts"].as_i64().unwrap_or(i64::MIN);
        self.watermark = state["watermark"].as_i64().unwrap_or(i64::MIN);
        self.late_events = state["late_events"].as_u64().unwrap_or(0);
        self.windows_emitted = state["windows_emitted"].as_u64().unwrap_or(0);
        let windows: Vec<((i64, String, i64), Window)> = serde_json::from_value(state["windows"].clone())?;
        self.open = windows.into_iter().collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AggregateFunction;

    fn config(window: WindowConfig, ooo: u64, lateness: u64) -> AggregateConfig {
        AggregateConfig {
            group_by: Some("k".into()),
            time_field: Some("t".into()),
            window,
            max_out_of_orderness_ms: ooo,
            allowed_lateness_ms: lateness,
            late_topic: Some("late".into()),
            idle_advance_ms: 0,
            functions: vec![
                AggregateFunction { function: "count".into(), field: None, q: None, output: None },
                AggregateFunction { function: "sum".into(), field: Some("v".into()), q: None, output: None },
                AggregateFunction { function: "avg".into(), field: Some("v".into()), q: None, output: None },
                AggregateFunction { function: "min".into(), field: Some("v".into()), q: None, output: None },
                AggregateFunction { function: "max".into(), field: Some("v".into()), q: None, output: None },
                AggregateFunction { function: "first".into(), field: Some("v".into()), q: None, output: None },
                AggregateFunction { function: "last".into(), field: Some("v".into()), q: None, output: None },
                AggregateFunction { function: "quantile".into(), field: Some("v".into()), q: Some(0.5), output: None },
            ],
        }
    }

    fn run(agg: &mut Aggregate, items: &[(&str, i64, f64)]) -> (Vec<serde_json::Value>, Outputs) {
        let json: Vec<String> = items.iter().map(|(k, t, v)| format!(r#"{{"k":"{k}","t":{t},"v":{v}}}"#)).collect();
        let refs: Vec<(i64, &str)> = json.iter().map(|j| (0, j.as_str())).collect();
        let mut out = Outputs::default();
        let emitted = agg.process(super::super::dedup::tests::events(&refs), &mut out);
        (emitted.into_iter().map(|mut e| serde_json::from_slice(e.payload()).unwrap()).collect(), out)
    }

    #[test]
    fn tumbling_windows_with_out_of_order_and_late_events() {
        let mut agg = Aggregate::new(&config(WindowConfig::Tumbling { size_ms: 10 }, 5, 0)).unwrap();
        // Window [0,10) for key a gets 1@1, 3@3, and 2@8 arriving out of order after 12.
        let (emitted, _) = run(&mut agg, &[("a", 1, 1.0), ("a", 3, 3.0), ("a", 12, 10.0), ("a", 8, 2.0)]);
        assert!(emitted.is_empty(), "watermark 7 < 10: nothing closes yet");
        // 16 moves the watermark to 11: [0,10) closes.
        let (emitted, _) = run(&mut agg, &[("a", 16, 20.0)]);
        assert_eq!(emitted.len(), 1);
        let w = &emitted[0];
        assert_eq!(w["k"], "a");
        assert_eq!((w["window_start"].as_i64(), w["window_end"].as_i64()), (Some(0), Some(10)));
        assert_eq!(w["count"], 3);
        assert_eq!(w["sum_v"], 6.0);
        assert_eq!(w["avg_v"], 2.0);
        assert_eq!((w["min_v"].as_f64(), w["max_v"].as_f64()), (Some(1.0), Some(3.0)));
        assert_eq!((w["first_v"].as_f64(), w["last_v"].as_f64()), (Some(1.0), Some(2.0)), "by event time, not arrival");
        assert!((w["p50_v"].as_f64().unwrap() - 2.0).abs() <= 0.02);
        // An event for the closed window is late: counted and sent to the side topic.
        let (emitted, out) = run(&mut agg, &[("a", 5, 100.0)]);
        assert!(emitted.is_empty());
        assert_eq!(agg.late_events, 1);
        assert_eq!(out.late.len(), 1);
        assert_eq!(out.late[0].0.as_deref(), Some("late"));
    }

    #[test]
    fn allowed_lateness_keeps_a_window_open_longer() {
        let mut agg = Aggregate::new(&config(WindowConfig::Tumbling { size_ms: 10 }, 0, 5)).unwrap();
        let (emitted, _) = run(&mut agg, &[("a", 1, 1.0), ("a", 12, 1.0), ("a", 9, 1.0)]);
        assert!(emitted.is_empty(), "watermark 12 < 10 + 5");
        assert_eq!(agg.late_events, 0, "9 arrives within the allowed lateness");
        let (emitted, _) = run(&mut agg, &[("a", 15, 1.0)]);
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0]["count"], 2);
    }

    #[test]
    fn hopping_windows_count_an_event_in_each_window_it_falls_in() {
        let mut agg = Aggregate::new(&config(WindowConfig::Hopping { size_ms: 10, hop_ms: 5 }, 0, 0)).unwrap();
        let (emitted, _) = run(&mut agg, &[("a", 7, 1.0), ("b", 7, 1.0), ("a", 30, 1.0)]);
        // 7 is in [0,10) and [5,15), for each of a and b: 4 windows, all closed by 30.
        let mut got: Vec<(String, i64, i64)> = emitted
            .iter()
            .map(|w| {
                (w["k"].as_str().unwrap().to_owned(), w["window_start"].as_i64().unwrap(), w["count"].as_i64().unwrap())
            })
            .collect();
        got.sort();
        assert_eq!(got, vec![("a".into(), 0, 1), ("a".into(), 5, 1), ("b".into(), 0, 1), ("b".into(), 5, 1)]);
    }

    #[test]
    fn session_windows_merge_events_closer_than_the_gap() {
        let mut agg = Aggregate::new(&config(WindowConfig::Session { gap_ms: 10 }, 0, 0)).unwrap();
        let (emitted, _) = run(&mut agg, &[("a", 0, 1.0), ("a", 5, 1.0), ("a", 30, 1.0), ("a", 12, 1.0)]);
        // Sessions: {0,5} closed when watermark reached 30 (end 15 <= 30). 12 arrives after: late.
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0]["count"], 2);
        assert_eq!((emitted[0]["window_start"].as_i64(), emitted[0]["window_end"].as_i64()), (Some(0), Some(15)));
        assert_eq!(agg.late_events, 1);
        // A bridging event merges two open sessions.
        let mut agg = Aggregate::new(&config(WindowConfig::Session { gap_ms: 10 }, 100, 0)).unwrap();
        run(&mut agg, &[("a", 0, 1.0), ("a", 18, 1.0), ("a", 9, 1.0)]);
        assert_eq!(agg.open.len(), 1, "0 and 18 are bridged by 9");
        let (_, w) = agg.open.first_key_value().unwrap();
        assert_eq!((w.start, w.end, w.count), (0, 28, 3));
    }

    #[test]
    fn state_survives_a_snapshot() {
        let mut agg = Aggregate::new(&config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0)).unwrap();
        run(&mut agg, &[("a", 1, 1.0), ("a", 2, 2.0)]);
        let mut restored = Aggregate::new(&config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0)).unwrap();
        restored.restore(&agg.snapshot()).unwrap();
        let (emitted, _) = run(&mut restored, &[("a", 20, 0.0)]);
        assert_eq!(emitted[0]["count"], 2);
        assert_eq!(emitted[0]["sum_v"], 3.0);
    }
}
