//! `aggregate`: windowed aggregation by key over event time.
//!
//! Windows are tumbling, hopping or session. The watermark trails the largest event
//! time seen by `max_out_of_orderness_ms`; a window is emitted (once) when the
//! watermark passes its end plus `allowed_lateness_ms`. An event all of whose windows
//! were already emitted is late: counted, and sent to `late_topic` if one is set. When
//! the input idles, the watermark advances with the wall clock so the last windows are
//! emitted too. Window state is checkpointed with the pipeline's offsets.
//!
//! Untrusted input is bounded: an event time outside the pipeline's `event_time` bounds,
//! a time field that is not a number, or a window bound past the range of i64 sends the
//! event to the dead letters without touching the watermark; at `max_groups` groups with
//! open windows or `max_open_windows` windows, events that need a new group or window go
//! to the dead letters too; quantile sketches keep at most `sketch_max_buckets` buckets
//! per sign.

use std::sync::Arc;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use serde::Deserialize;
use vrl::value::{KeyString, ObjectMap, Value};

use super::sketch::DdSketch;
use super::state::{StateError, StateReader, StateWriter};
use super::window_key::{group_hash, WindowKey, WindowProbe};
use super::{duration_ms, DeadLetter, Outputs, Processor, MAX_WINDOWS_PER_EVENT};
use crate::config::{AggregateConfig, EventTimePolicy, WindowConfig};
use crate::event::{as_f64, float_value, get_path, key_str, PipelineEvent};
use crate::projection::{Projection, Reads};

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

impl Func {
    /// The tag its state carries in a checkpoint.
    fn tag(&self) -> u8 {
        match self {
            Func::Count => 0,
            Func::Sum => 1,
            Func::Min => 2,
            Func::Max => 3,
            Func::Avg => 4,
            Func::First => 5,
            Func::Last => 6,
            Func::Quantile(_) => 7,
        }
    }
}

fn tag_name(tag: u8) -> &'static str {
    ["count", "sum", "min", "max", "avg", "first", "last", "quantile"].get(usize::from(tag)).copied().unwrap_or("?")
}

#[derive(Clone, Debug)]
struct Output {
    func: Func,
    field: Option<String>,
    name: String,
}

/// Running state of one output field in one window. (Deserialize: checkpoints of
/// earlier versions were JSON.)
#[derive(Clone, Debug, Deserialize)]
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

impl FieldAcc {
    fn tag(&self) -> u8 {
        match self {
            FieldAcc::Count => 0,
            FieldAcc::Sum(_) => 1,
            FieldAcc::Min(_) => 2,
            FieldAcc::Max(_) => 3,
            FieldAcc::Avg(..) => 4,
            FieldAcc::First(_) => 5,
            FieldAcc::Last(_) => 6,
            FieldAcc::Quantile(_) => 7,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
struct Window {
    start: i64,
    end: i64,
    count: u64,
    fields: Vec<FieldAcc>,
}

/// Where an event went.
enum Placement {
    Accepted,
    Late,
    /// At `max_groups` or `max_open_windows`; the error says which.
    OverLimit(String),
    Unrepresentable(String),
    /// Would create state while shedding at the memory limit.
    Shed,
}

/// Why an event was refused before it reached a window.
struct Refusal {
    error: String,
    out_of_time: bool,
}

/// Memory of one sketch bucket: a B-tree entry (an `i32` and a `u64`) in nodes about
/// half full.
const SKETCH_BUCKET_BYTES: usize = 32;

/// Heap bytes a window's fields hold beyond their fixed size: first and last values
/// (any JSON value an event carried) and quantile sketches' buckets.
fn held_bytes(window: &Window) -> usize {
    window.fields.iter().fold(0, |sum, f| {
        sum.saturating_add(match f {
            FieldAcc::First(Some((_, v))) | FieldAcc::Last(Some((_, v))) => value_bytes(v),
            FieldAcc::Quantile(s) => s.buckets() * SKETCH_BUCKET_BYTES,
            _ => 0,
        })
    })
}

/// Heap bytes of a value: its strings and bytes, and a slot per element or entry.
fn value_bytes(v: &Value) -> usize {
    const SLOT: usize = std::mem::size_of::<Value>() + 16;
    match v {
        Value::Bytes(b) => b.len(),
        Value::String(s) => s.len(),
        Value::Regex(r) => r.as_str().len(),
        Value::Array(items) => items.iter().fold(0, |sum, i| sum.saturating_add(SLOT).saturating_add(value_bytes(i))),
        Value::Object(map) => {
            map.iter().fold(0, |sum, (k, i)| sum.saturating_add(SLOT + k.len()).saturating_add(value_bytes(i)))
        }
        _ => 0,
    }
}

/// Sets a first/last field to `(ts, v)`, keeping `held` in step.
fn replace_value(field: &mut Option<(i64, Value)>, ts: i64, v: &Value, held: &mut usize) {
    let before = field.as_ref().map_or(0, |(_, old)| value_bytes(old));
    *held = held.saturating_sub(before).saturating_add(value_bytes(v));
    *field = Some((ts, v.clone()));
}

/// Open windows by end, group and start ([`WindowKey`]).
type OpenWindows = BTreeMap<WindowKey, Window>;

/// State read from a checkpoint, before it replaces the live state.
struct Restored {
    max_event_ts: i64,
    watermark: i64,
    late_events: u64,
    windows_emitted: u64,
    open: OpenWindows,
}

/// Most window results one call emits (see `emit_closed`).
const MAX_EMIT_PER_CALL: usize = 16_384;

/// Magic and version of the binary state (earlier versions wrote JSON, starting `{`).
const STATE_MAGIC: &[u8] = b"FGAGG\x02";

/// Aggregates events into windows.
pub struct Aggregate {
    /// What to parse events into ([`Processor::project`]).
    projection: Option<Arc<Projection>>,
    group_by: Option<String>,
    time_field: Option<String>,
    window: WindowConfig,
    ooo: i64,
    lateness: i64,
    late_topic: Option<String>,
    idle_advance_ms: i64,
    outputs: Vec<Output>,
    event_time: EventTimePolicy,
    max_groups: usize,
    max_open_windows: usize,
    sketch_max_buckets: usize,
    /// Open windows: (end, group, start) → state. Ordered by end, so emission walks the front.
    open: OpenWindows,
    /// Open windows per group; its length is the number of groups held.
    groups: HashMap<String, usize>,
    /// Session windows only: (group, start) → end, so an event finds the sessions it
    /// touches among its group's, not by scanning every open window.
    sessions: BTreeMap<(String, i64), i64>,
    max_event_ts: i64,
    watermark: i64,
    last_event_wall: i64,
    partition: u32,
    /// Bytes of group names held by the keys of open windows (and of sessions).
    window_key_bytes: usize,
    /// What open windows' fields hold beyond their fixed size ([`held_bytes`]): first
    /// and last values, sketch buckets.
    held_bytes: usize,
    /// Bytes of group names held by `groups`.
    group_key_bytes: usize,
    /// At the memory limit under `drop_newest`: events that need a new window are dropped.
    shedding: bool,
    /// Events that arrived after their windows were emitted.
    pub late_events: u64,
    /// Windows emitted.
    pub windows_emitted: u64,
}

impl Aggregate {
    /// Validates the config; errors name the key.
    pub fn new(c: &AggregateConfig, event_time: &EventTimePolicy) -> anyhow::Result<Aggregate> {
        match c.window {
            WindowConfig::Tumbling { size_ms } => {
                if size_ms == 0 {
                    anyhow::bail!("window.size_ms must be positive");
                }
                duration_ms("window.size_ms", size_ms)?;
            }
            WindowConfig::Hopping { size_ms, hop_ms } => {
                if size_ms == 0 || hop_ms == 0 || hop_ms > size_ms {
                    anyhow::bail!("window needs 0 < hop_ms <= size_ms");
                }
                duration_ms("window.size_ms", size_ms)?;
                if size_ms.div_ceil(hop_ms) > MAX_WINDOWS_PER_EVENT {
                    anyhow::bail!(
                        "window.size_ms / window.hop_ms is {}: an event would fall in that many windows; at most {MAX_WINDOWS_PER_EVENT}",
                        size_ms.div_ceil(hop_ms)
                    );
                }
            }
            WindowConfig::Session { gap_ms } => {
                if gap_ms == 0 {
                    anyhow::bail!("window.gap_ms must be positive");
                }
                duration_ms("window.gap_ms", gap_ms)?;
            }
        }
        if c.functions.is_empty() {
            anyhow::bail!("functions must name at least one aggregate");
        }
        if c.max_groups == 0 {
            anyhow::bail!("max_groups must be at least 1");
        }
        if c.max_open_windows == 0 {
            anyhow::bail!("max_open_windows must be at least 1");
        }
        if c.sketch_max_buckets == 0 {
            anyhow::bail!("sketch_max_buckets must be at least 1");
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
            projection: None,
            group_by: c.group_by.clone(),
            time_field: c.time_field.clone(),
            window: c.window.clone(),
            ooo: duration_ms("max_out_of_orderness_ms", c.max_out_of_orderness_ms)?,
            lateness: duration_ms("allowed_lateness_ms", c.allowed_lateness_ms)?,
            late_topic: c.late_topic.clone(),
            idle_advance_ms: duration_ms("idle_advance_ms", c.idle_advance_ms)?,
            outputs,
            event_time: event_time.clone(),
            max_groups: c.max_groups,
            max_open_windows: c.max_open_windows,
            sketch_max_buckets: c.sketch_max_buckets,
            open: BTreeMap::new(),
            groups: HashMap::new(),
            sessions: BTreeMap::new(),
            max_event_ts: i64::MIN,
            watermark: i64::MIN,
            last_event_wall: flowgate_core::time::now_ms(),
            partition: 0,
            window_key_bytes: 0,
            held_bytes: 0,
            group_key_bytes: 0,
            shedding: false,
            late_events: 0,
            windows_emitted: 0,
        })
    }

    fn empty_window(outputs: &[Output], sketch_max_buckets: usize, start: i64, end: i64) -> Window {
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
                Func::Quantile(_) => FieldAcc::Quantile(Box::new(DdSketch::with_max_buckets(0.01, sketch_max_buckets))),
            })
            .collect();
        Window { start, end, count: 0, fields }
    }

    fn closed(&self, end: i64) -> bool {
        self.watermark != i64::MIN && end.saturating_add(self.lateness) <= self.watermark
    }

    /// Window bounds an event time falls in (not for sessions), computed wide so that no
    /// event time can overflow them; `None` when a bound is past the range of i64.
    fn fixed_windows(&self, ts: i64) -> Option<Vec<(i64, i64)>> {
        let bounds = |start: i128, size: i128| Some((i64::try_from(start).ok()?, i64::try_from(start + size).ok()?));
        let ts = i128::from(ts);
        match self.window {
            WindowConfig::Tumbling { size_ms } => {
                let size = i128::from(size_ms);
                Some(vec![bounds(ts.div_euclid(size) * size, size)?])
            }
            WindowConfig::Hopping { size_ms, hop_ms } => {
                let (size, hop) = (i128::from(size_ms), i128::from(hop_ms));
                let mut out = Vec::new();
                let mut start = ts.div_euclid(hop) * hop;
                while start > ts - size {
                    out.push(bounds(start, size)?);
                    start -= hop;
                }
                out.reverse();
                Some(out)
            }
            WindowConfig::Session { .. } => Some(Vec::new()),
        }
    }

    /// Adds an event to its window's fields; returns the sketch buckets collapsed. `held`
    /// (the processor's [`held_bytes`] of every open window) follows what the window's
    /// fields hold now.
    fn accumulate(outputs: &[Output], window: &mut Window, ts: i64, doc: &Value, held: &mut usize) -> u64 {
        let mut collapsed = 0;
        window.count = window.count.saturating_add(1);
        for (acc, out) in window.fields.iter_mut().zip(outputs) {
            let value = out.field.as_deref().and_then(|f| get_path(doc, f));
            let number = value.and_then(as_f64);
            match acc {
                FieldAcc::Count => {}
                FieldAcc::Sum(s) => {
                    if let Some(x) = number {
                        *s += x;
                    }
                }
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
                        *n = n.saturating_add(1);
                    }
                }
                FieldAcc::First(f) => {
                    if let Some(v) = value {
                        if f.as_ref().is_none_or(|(t, _)| ts < *t) {
                            replace_value(f, ts, v, held);
                        }
                    }
                }
                FieldAcc::Last(l) => {
                    if let Some(v) = value {
                        if l.as_ref().is_none_or(|(t, _)| ts >= *t) {
                            replace_value(l, ts, v, held);
                        }
                    }
                }
                FieldAcc::Quantile(s) => {
                    if let Some(x) = number {
                        let before = s.buckets();
                        collapsed += s.add(x);
                        *held = held
                            .saturating_sub(before * SKETCH_BUCKET_BYTES)
                            .saturating_add(s.buckets() * SKETCH_BUCKET_BYTES);
                    }
                }
            }
        }
        collapsed
    }

    /// Merges one window into another; returns the sketch buckets collapsed.
    fn merge(into: &mut Window, from: Window) -> u64 {
        let mut collapsed = 0;
        into.start = into.start.min(from.start);
        into.end = into.end.max(from.end);
        into.count = into.count.saturating_add(from.count);
        for (a, b) in into.fields.iter_mut().zip(from.fields) {
            match (a, b) {
                (FieldAcc::Sum(x), FieldAcc::Sum(y)) => *x += y,
                (FieldAcc::Min(x), FieldAcc::Min(y)) => *x = [*x, y].into_iter().flatten().reduce(f64::min),
                (FieldAcc::Max(x), FieldAcc::Max(y)) => *x = [*x, y].into_iter().flatten().reduce(f64::max),
                (FieldAcc::Avg(s, n), FieldAcc::Avg(s2, n2)) => {
                    *s += s2;
                    *n = n.saturating_add(n2);
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
                (FieldAcc::Quantile(x), FieldAcc::Quantile(y)) => collapsed += x.merge(&y),
                _ => {}
            }
        }
        collapsed
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
                FieldAcc::Count => {
                    i64::try_from(window.count).map_or_else(|_| float_value(window.count as f64), Value::Integer)
                }
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

    fn hold_group(&mut self, group: &str) {
        match self.groups.get_mut(group) {
            Some(n) => *n += 1,
            None => {
                self.group_key_bytes = self.group_key_bytes.saturating_add(group.len());
                self.groups.insert(group.to_owned(), 1);
            }
        }
    }

    fn release_group(&mut self, group: &str) {
        if let Some(n) = self.groups.get_mut(group) {
            *n -= 1;
            if *n == 0 {
                self.groups.remove(group);
                self.group_key_bytes = self.group_key_bytes.saturating_sub(group.len());
            }
        }
    }

    /// Why an event of `group` that needs `new_windows` more windows would go over a
    /// bound, if it would.
    fn over_limit(&self, group: &str, new_windows: usize) -> Option<String> {
        if self.groups.len() >= self.max_groups && !self.groups.contains_key(group) {
            return Some(format!(
                "aggregate holds open windows for max_groups ({}) groups and this event's group is new",
                self.max_groups
            ));
        }
        if self.open.len().saturating_add(new_windows) > self.max_open_windows {
            return Some(format!(
                "aggregate holds max_open_windows ({}) windows and this event needs a new one",
                self.max_open_windows
            ));
        }
        None
    }

    /// Emits closed windows, oldest first, at most [`MAX_EMIT_PER_CALL`]: the rest stay
    /// in the state (and its checkpoint) for the next call, so that a watermark jump
    /// over many windows does not build all their results at once.
    fn emit_closed(&mut self) -> Vec<PipelineEvent> {
        let mut out = Vec::new();
        while let Some((key, _)) = self.open.first_key_value() {
            if !self.closed(key.end) || out.len() >= MAX_EMIT_PER_CALL {
                break;
            }
            let (WindowKey { end, group, start, .. }, window) = self.open.pop_first().expect("non-empty");
            self.window_key_bytes = self.window_key_bytes.saturating_sub(group.len());
            self.held_bytes = self.held_bytes.saturating_sub(held_bytes(&window));
            self.release_group(&group);
            if matches!(self.window, WindowConfig::Session { .. }) {
                self.sessions.remove(&(group.clone(), start));
            }
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

    /// Groups that have open windows.
    pub fn open_groups(&self) -> usize {
        self.groups.len()
    }

    /// The time and group of an event stamped `event_ts` whose document is `doc`, or why
    /// it is refused. The group borrows from the document when it is a string.
    fn locate<'d>(&self, doc: &'d Value, event_ts: i64, now_ms: i64) -> Result<(i64, Cow<'d, str>), Refusal> {
        let ts = match self.time_field.as_deref().map(|f| (f, get_path(doc, f))) {
            None | Some((_, None)) => event_ts,
            // `as` saturates: a huge number becomes i64::MAX, which the bounds refuse.
            Some((f, Some(v))) => as_f64(v).map(|t| t as i64).ok_or_else(|| Refusal {
                error: format!("time field '{f}' is not a number of milliseconds"),
                out_of_time: false,
            })?,
        };
        self.event_time.check(ts, now_ms).map_err(|error| Refusal { error, out_of_time: true })?;
        // Without the field, an event belongs to the group "" (documented).
        let group = self.group_by.as_deref().and_then(|g| get_path(doc, g)).map_or(Cow::Borrowed(""), key_str);
        Ok((ts, group))
    }

    /// Adds an event to its fixed (tumbling or hopping) windows.
    fn place_fixed(&mut self, ts: i64, group: &str, doc: &Value, collapsed: &mut u64) -> Placement {
        let Some(bounds) = self.fixed_windows(ts) else {
            return Placement::Unrepresentable(format!("event time {ts} has a window bound past the range of i64"));
        };
        let mut open = bounds.into_iter().filter(|&(_, end)| !self.closed(end)).peekable();
        if open.peek().is_none() {
            return Placement::Late;
        }
        let open: Vec<(i64, i64)> = open.collect();
        // Counting the windows an event would add costs a lookup each: only near the bound,
        // or while shedding (which drops events that would add one).
        let hash = group_hash(group);
        let new_windows = if self.shedding || self.open.len().saturating_add(open.len()) > self.max_open_windows {
            open.iter()
                .filter(|&&(start, end)| !self.open.contains_key(WindowProbe::new(end, hash, group, start).key()))
                .count()
        } else {
            0
        };
        if let Some(error) = self.over_limit(group, new_windows) {
            return Placement::OverLimit(error);
        }
        if self.shedding && new_windows > 0 {
            return Placement::Shed;
        }
        for (start, end) in open {
            // Found by a borrowed probe: the group's name is copied only for a new window.
            if let Some(window) = self.open.get_mut(WindowProbe::new(end, hash, group, start).key()) {
                *collapsed += Self::accumulate(&self.outputs, window, ts, doc, &mut self.held_bytes);
                continue;
            }
            let mut window = Self::empty_window(&self.outputs, self.sketch_max_buckets, start, end);
            *collapsed += Self::accumulate(&self.outputs, &mut window, ts, doc, &mut self.held_bytes);
            self.open.insert(WindowKey::new(end, group.to_owned(), start), window);
            self.window_key_bytes = self.window_key_bytes.saturating_add(group.len());
            self.hold_group(group);
        }
        Placement::Accepted
    }

    /// Adds an event to its group's session, merging every open session it touches.
    fn place_session(&mut self, ts: i64, gap: i64, group: String, doc: &Value, collapsed: &mut u64) -> Placement {
        let Some(end) = ts.checked_add(gap) else {
            return Placement::Unrepresentable(format!("event time {ts} plus window.gap_ms is past the range of i64"));
        };
        if self.closed(end) {
            return Placement::Late;
        }
        // A group's sessions never overlap, so ordered by start they are ordered by end
        // too: walk back from the last one starting before `end` while they end after `ts`.
        let touching: Vec<(i64, String, i64)> = self
            .sessions
            .range((group.clone(), i64::MIN)..(group.clone(), end))
            .rev()
            .take_while(|(_, &w_end)| w_end > ts)
            .map(|((g, w_start), &w_end)| (w_end, g.clone(), *w_start))
            .collect();
        if let Some(error) = self.over_limit(&group, usize::from(touching.is_empty())) {
            return Placement::OverLimit(error);
        }
        if self.shedding && touching.is_empty() {
            return Placement::Shed;
        }
        let mut window = Self::empty_window(&self.outputs, self.sketch_max_buckets, ts, end);
        for k in touching {
            self.sessions.remove(&(k.1.clone(), k.2));
            if let Some(w) = self.open.remove(WindowProbe::new(k.0, group_hash(&k.1), &k.1, k.2).key()) {
                self.window_key_bytes = self.window_key_bytes.saturating_sub(k.1.len());
                self.held_bytes = self.held_bytes.saturating_sub(held_bytes(&w));
                self.release_group(&k.1);
                *collapsed += Self::merge(&mut window, w);
            }
        }
        self.held_bytes = self.held_bytes.saturating_add(held_bytes(&window));
        *collapsed += Self::accumulate(&self.outputs, &mut window, ts, doc, &mut self.held_bytes);
        self.hold_group(&group);
        self.sessions.insert((group.clone(), window.start), window.end);
        self.window_key_bytes = self.window_key_bytes.saturating_add(group.len());
        self.open.insert(WindowKey::new(window.end, group, window.start), window);
        Placement::Accepted
    }

    fn encode_state(&self) -> Vec<u8> {
        let mut w = StateWriter::new();
        w.raw(STATE_MAGIC);
        w.i64(self.max_event_ts);
        w.i64(self.watermark);
        w.u64(self.late_events);
        w.u64(self.windows_emitted);
        w.len(self.outputs.len());
        for o in &self.outputs {
            w.u8(o.func.tag());
        }
        w.len(self.open.len());
        for (key, window) in &self.open {
            w.bytes(key.group.as_bytes());
            w.i64(window.start);
            w.i64(window.end);
            w.u64(window.count);
            for acc in &window.fields {
                match acc {
                    FieldAcc::Count => {}
                    FieldAcc::Sum(s) => w.f64(*s),
                    FieldAcc::Min(m) | FieldAcc::Max(m) => {
                        w.u8(u8::from(m.is_some()));
                        w.f64(m.unwrap_or(0.0));
                    }
                    FieldAcc::Avg(s, n) => {
                        w.f64(*s);
                        w.u64(*n);
                    }
                    FieldAcc::First(f) | FieldAcc::Last(f) => match f {
                        None => w.u8(0),
                        Some((t, v)) => {
                            w.u8(1);
                            w.i64(*t);
                            w.value(v);
                        }
                    },
                    FieldAcc::Quantile(sketch) => sketch.encode(&mut w),
                }
            }
        }
        w.finish()
    }

    /// The configured functions as the checkpoint names them, for error messages.
    fn functions_named(tags: impl Iterator<Item = u8>) -> String {
        tags.map(tag_name).collect::<Vec<_>>().join(", ")
    }

    fn config_mismatch(&self, saved: impl Iterator<Item = u8>) -> anyhow::Error {
        anyhow::anyhow!(
            "aggregate state was checkpointed for the functions [{}] but the config now has [{}]: \
             restore the previous functions, or move the checkpoint file away to restart this partition \
             from the pipeline's `start` (its open windows are then lost)",
            Self::functions_named(saved),
            Self::functions_named(self.outputs.iter().map(|o| o.func.tag()))
        )
    }

    fn decode_state(&self, state: &[u8]) -> anyhow::Result<Restored> {
        let damaged = |e: StateError| anyhow::anyhow!("aggregate state in the checkpoint is damaged: {e}");
        let mut r = StateReader::new(state);
        r.expect_raw(STATE_MAGIC, "aggregate state header").map_err(damaged)?;
        let max_event_ts = r.i64("max event time").map_err(damaged)?;
        let watermark = r.i64("watermark").map_err(damaged)?;
        let late_events = r.u64("late events").map_err(damaged)?;
        let windows_emitted = r.u64("windows emitted").map_err(damaged)?;
        let n = r.len(1, "functions").map_err(damaged)?;
        let tags: Vec<u8> = (0..n).map(|_| r.u8("functions")).collect::<Result<_, _>>().map_err(damaged)?;
        if !tags.iter().copied().eq(self.outputs.iter().map(|o| o.func.tag())) {
            return Err(self.config_mismatch(tags.into_iter()));
        }
        let n = r.len(32, "windows").map_err(damaged)?;
        let mut open = BTreeMap::new();
        for _ in 0..n {
            let window = self.decode_window(&mut r).map_err(damaged)?;
            let (group, window) = window;
            if window.start > window.end {
                return Err(damaged(StateError(format!(
                    "a window ends ({}) before it starts ({})",
                    window.end, window.start
                ))));
            }
            if open.insert(WindowKey::new(window.end, group, window.start), window).is_some() {
                return Err(damaged(StateError("two windows have the same group and bounds".into())));
            }
        }
        r.finish("aggregate state").map_err(damaged)?;
        Ok(Restored { max_event_ts, watermark, late_events, windows_emitted, open })
    }

    fn decode_window(&self, r: &mut StateReader<'_>) -> Result<(String, Window), StateError> {
        let group = r.str("window group")?.to_owned();
        let (start, end, count) = (r.i64("window start")?, r.i64("window end")?, r.u64("window count")?);
        let mut fields = Vec::with_capacity(self.outputs.len());
        for o in &self.outputs {
            let what = "window field";
            let optional_f64 = |r: &mut StateReader<'_>| -> Result<Option<f64>, StateError> {
                let present = r.u8(what)?;
                let x = r.f64(what)?;
                match present {
                    0 => Ok(None),
                    1 => Ok(Some(x)),
                    _ => Err(StateError(format!("{what} has a bad presence flag"))),
                }
            };
            let timed_value = |r: &mut StateReader<'_>| -> Result<Option<(i64, Value)>, StateError> {
                match r.u8(what)? {
                    0 => Ok(None),
                    1 => Ok(Some((r.i64(what)?, r.value(what)?))),
                    _ => Err(StateError(format!("{what} has a bad presence flag"))),
                }
            };
            fields.push(match o.func {
                Func::Count => FieldAcc::Count,
                Func::Sum => FieldAcc::Sum(r.f64(what)?),
                Func::Min => FieldAcc::Min(optional_f64(r)?),
                Func::Max => FieldAcc::Max(optional_f64(r)?),
                Func::Avg => FieldAcc::Avg(r.f64(what)?, r.u64(what)?),
                Func::First => FieldAcc::First(timed_value(r)?),
                Func::Last => FieldAcc::Last(timed_value(r)?),
                Func::Quantile(_) => FieldAcc::Quantile(Box::new(DdSketch::decode(r, self.sketch_max_buckets)?)),
            });
        }
        Ok((group, Window { start, end, count, fields }))
    }

    /// Reads the JSON state of earlier versions (which could not hold a non-finite float:
    /// such a state is refused, never read as something else).
    fn decode_legacy_json(&self, state: &[u8]) -> anyhow::Result<Restored> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Legacy {
            max_event_ts: i64,
            watermark: i64,
            late_events: u64,
            windows_emitted: u64,
            windows: Vec<((i64, String, i64), Window)>,
        }
        let legacy: Legacy = serde_json::from_slice(state).map_err(|e| {
            anyhow::anyhow!("aggregate state in the checkpoint (JSON, an earlier version) is damaged: {e}")
        })?;
        let damaged =
            |e: String| anyhow::anyhow!("aggregate state in the checkpoint (JSON, an earlier version) is damaged: {e}");
        let mut open = BTreeMap::new();
        // The key repeats the window's bounds; the window's own are the ones kept.
        for ((_, group, _), mut window) in legacy.windows {
            if !window.fields.iter().map(FieldAcc::tag).eq(self.outputs.iter().map(|o| o.func.tag())) {
                return Err(self.config_mismatch(window.fields.iter().map(FieldAcc::tag)));
            }
            for f in &mut window.fields {
                if let FieldAcc::Quantile(s) = f {
                    s.validate().map_err(|e| damaged(e.0))?;
                    s.set_max_buckets(self.sketch_max_buckets);
                }
            }
            if window.start > window.end {
                return Err(damaged(format!("a window ends ({}) before it starts ({})", window.end, window.start)));
            }
            if open.insert(WindowKey::new(window.end, group, window.start), window).is_some() {
                return Err(damaged("two windows have the same group and bounds".into()));
            }
        }
        Ok(Restored {
            max_event_ts: legacy.max_event_ts,
            watermark: legacy.watermark,
            late_events: legacy.late_events,
            windows_emitted: legacy.windows_emitted,
            open,
        })
    }
}

impl Processor for Aggregate {
    fn kind(&self) -> &'static str {
        "aggregate"
    }

    fn makes_events(&self) -> bool {
        true
    }

    fn project(&mut self, projection: &Arc<Projection>) {
        self.projection = Some(projection.clone());
    }

    fn reads(&self) -> Reads {
        let paths =
            self.group_by.iter().chain(&self.time_field).chain(self.outputs.iter().filter_map(|o| o.field.as_ref()));
        paths.fold(Reads::Nothing, |r, p| r.and(Reads::path(p)))
    }

    fn process(&mut self, events: Vec<PipelineEvent>, out: &mut Outputs) -> Vec<PipelineEvent> {
        if events.is_empty() {
            return Vec::new();
        }
        let now = flowgate_core::time::now_ms();
        self.last_event_wall = now;
        let mut collapsed = 0;
        for mut event in events {
            self.partition = event.partition;
            let event_ts = event.timestamp;
            let located = match event.doc_in(self.projection.as_deref()) {
                Ok(doc) => {
                    let doc: &Value = doc;
                    self.locate(doc, event_ts, now).map(|(ts, group)| (ts, group, doc))
                }
                Err(e) => Err(Refusal { error: e.to_string(), out_of_time: false }),
            };
            let placement = match located {
                Err(refusal) => {
                    if refusal.out_of_time {
                        out.bounds.event_time_out_of_bounds += 1;
                    }
                    out.dead_letters.push(DeadLetter { processor: "aggregate".into(), error: refusal.error, event });
                    continue;
                }
                // Validated at build to fit i64.
                Ok((ts, group, doc)) => match self.window {
                    WindowConfig::Session { gap_ms } => {
                        (ts, self.place_session(ts, gap_ms as i64, group.into_owned(), doc, &mut collapsed))
                    }
                    _ => (ts, self.place_fixed(ts, &group, doc, &mut collapsed)),
                },
            };
            let (ts, placement) = placement;
            match placement {
                Placement::Accepted => {
                    self.max_event_ts = self.max_event_ts.max(ts);
                    self.advance_watermark(self.max_event_ts.saturating_sub(self.ooo));
                }
                Placement::Late => {
                    self.late_events += 1;
                    out.late.push((self.late_topic.clone(), event));
                }
                Placement::OverLimit(error) => {
                    out.bounds.state_over_limit += 1;
                    out.dead_letters.push(DeadLetter { processor: "aggregate".into(), error, event });
                }
                Placement::Unrepresentable(error) => {
                    out.dead_letters.push(DeadLetter { processor: "aggregate".into(), error, event });
                }
                Placement::Shed => out.bounds.memory_dropped += 1,
            }
        }
        out.bounds.sketch_buckets_collapsed += collapsed;
        self.emit_closed()
    }

    fn tick(&mut self, now_ms: i64, _out: &mut Outputs) -> Vec<PipelineEvent> {
        if self.idle_advance_ms > 0 && self.max_event_ts != i64::MIN {
            let idle = now_ms.saturating_sub(self.last_event_wall);
            if idle >= self.idle_advance_ms {
                // Extrapolate event time by the wall clock since the last event.
                self.advance_watermark(self.max_event_ts.saturating_sub(self.ooo).saturating_add(idle));
            }
        }
        self.emit_closed()
    }

    /// Per open window: its map entry with the B-tree's slack, its fields, and a
    /// sketch's typical size for each quantile; plus the group names, the per-group
    /// counts and (sessions) the session index. An estimate, never a walk.
    fn state_bytes(&self) -> usize {
        // B-tree nodes are about half full after the inserts and removals of a moving
        // window front; measured against resident memory, not just the entries' sizes.
        let entry = std::mem::size_of::<(WindowKey, Window)>() * 2;
        let fields = self.outputs.len() * std::mem::size_of::<FieldAcc>()
            + self.outputs.iter().filter(|o| matches!(o.func, Func::Quantile(_))).count()
                * std::mem::size_of::<DdSketch>();
        // Every heap block (the key's name, the fields, the group's name and map slot)
        // costs at least a small size class and its share of allocator pages.
        let per_window = entry + fields + 8 * 16;
        let sessions = if matches!(self.window, WindowConfig::Session { .. }) {
            self.sessions.len() * (std::mem::size_of::<((String, i64), i64)>() * 3 / 2 + 16)
        } else {
            0
        };
        let groups = self.groups.capacity() * (std::mem::size_of::<(String, usize)>() + 1 + 16);
        self.open
            .len()
            .saturating_mul(per_window)
            .saturating_add(self.window_key_bytes.saturating_mul(if sessions > 0 { 2 } else { 1 }))
            .saturating_add(sessions)
            .saturating_add(groups)
            .saturating_add(self.group_key_bytes)
            .saturating_add(self.held_bytes)
    }

    fn shed_new_state(&mut self, on: bool) {
        self.shedding = on;
    }

    /// Binary (see [`StateWriter`]): `FGAGG\x02`, max event time, watermark, late and
    /// emitted counts, the function tags, then each open window (group, start, end,
    /// count, each field's state).
    fn snapshot(&self) -> Vec<u8> {
        self.encode_state()
    }

    fn restore(&mut self, state: &[u8]) -> anyhow::Result<()> {
        if state.is_empty() {
            return Ok(());
        }
        let Restored { max_event_ts, watermark, late_events, windows_emitted, open } =
            if state[0] == b'{' { self.decode_legacy_json(state)? } else { self.decode_state(state)? };
        self.max_event_ts = max_event_ts;
        self.watermark = watermark;
        self.late_events = late_events;
        self.windows_emitted = windows_emitted;
        self.groups.clear();
        self.group_key_bytes = 0;
        self.sessions.clear();
        self.window_key_bytes = open.keys().map(|k| k.group.len()).sum();
        self.held_bytes = open.values().map(held_bytes).fold(0, usize::saturating_add);
        let sessions = matches!(self.window, WindowConfig::Session { .. });
        for key in open.keys() {
            self.hold_group(&key.group);
            if sessions {
                self.sessions.insert((key.group.clone(), key.start), key.end);
            }
        }
        // More groups than `max_groups` (the bound was lowered) are kept, not dropped:
        // new groups wait until enough windows close.
        self.open = open;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AggregateFunction;
    use crate::processors::state::tests::any_value;
    use proptest::prelude::*;

    fn config(window: WindowConfig, ooo: u64, lateness: u64) -> AggregateConfig {
        AggregateConfig {
            group_by: Some("k".into()),
            time_field: Some("t".into()),
            window,
            max_out_of_orderness_ms: ooo,
            allowed_lateness_ms: lateness,
            late_topic: Some("late".into()),
            idle_advance_ms: 0,
            max_groups: 100_000,
            max_open_windows: 1_000_000,
            sketch_max_buckets: 2048,
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

    fn build(c: &AggregateConfig) -> Aggregate {
        Aggregate::new(c, &EventTimePolicy::default()).unwrap()
    }

    fn run(agg: &mut Aggregate, items: &[(&str, i64, f64)]) -> (Vec<serde_json::Value>, Outputs) {
        let json: Vec<String> = items.iter().map(|(k, t, v)| format!(r#"{{"k":"{k}","t":{t},"v":{v}}}"#)).collect();
        let refs: Vec<(i64, &str)> = json.iter().map(|j| (0, j.as_str())).collect();
        let mut out = Outputs::default();
        let emitted = agg.process(super::super::dedup::tests::events(&refs), &mut out);
        (emitted.into_iter().map(|mut e| serde_json::from_slice(e.payload()).unwrap()).collect(), out)
    }

    /// Events whose `v` is a string of `len` bytes.
    fn run_text(agg: &mut Aggregate, items: &[(&str, i64, usize)]) {
        let json: Vec<String> =
            items.iter().map(|(k, t, len)| format!(r#"{{"k":"{k}","t":{t},"v":"{}"}}"#, "x".repeat(*len))).collect();
        let refs: Vec<(i64, &str)> = json.iter().map(|j| (0, j.as_str())).collect();
        let mut out = Outputs::default();
        agg.process(super::super::dedup::tests::events(&refs), &mut out);
        assert!(out.dead_letters.is_empty(), "{:?}", out.dead_letters.first().map(|d| &d.error));
    }

    #[test]
    fn first_and_last_values_and_sketch_buckets_count_in_the_state_estimate() {
        for window in [WindowConfig::Tumbling { size_ms: 1000 }, WindowConfig::Session { gap_ms: 100 }] {
            let mut agg = build(&config(window.clone(), 0, 0));
            run(&mut agg, &[("a", 1, 1.0)]);
            let small = agg.state_bytes();
            // First and last hold a 100 KB value each.
            run_text(&mut agg, &[("a", 2, 100_000)]);
            assert!(agg.state_bytes() >= small + 100_000, "{window:?}: last holds 100 KB: {}", agg.state_bytes());
            run_text(&mut agg, &[("a", 0, 100_000)]);
            assert!(agg.state_bytes() >= small + 200_000, "{window:?}: first and last: {}", agg.state_bytes());
            // A later, short value replaces the large last one.
            run(&mut agg, &[("a", 3, 1.0)]);
            let replaced = agg.state_bytes();
            assert!(replaced < small + 110_000, "{window:?}: {replaced}");
            // Many distinct values make many buckets.
            let many: Vec<(&str, i64, f64)> = (0..1000).map(|i| ("a", 4, 1.5f64.powi(i % 60) + f64::from(i))).collect();
            run(&mut agg, &many);
            let buckets: usize = agg
                .open
                .values()
                .flat_map(|w| &w.fields)
                .map(|f| match f {
                    FieldAcc::Quantile(s) => s.buckets(),
                    _ => 0,
                })
                .sum();
            assert!(buckets > 100, "{buckets}");
            assert!(agg.state_bytes() >= replaced + buckets * SKETCH_BUCKET_BYTES - 64, "{window:?}");
            // The running count is what the windows hold, after merges and closes too.
            run(&mut agg, &[("b", 50, 1.0), ("a", 60, 2.0)]);
            let recount: usize = agg.open.values().map(held_bytes).sum();
            assert_eq!(agg.held_bytes, recount, "{window:?}");
            run(&mut agg, &[("c", 100_000, 1.0)]);
            let recount: usize = agg.open.values().map(held_bytes).sum();
            assert_eq!(agg.held_bytes, recount, "{window:?}: after closing");
            let state = agg.snapshot();
            let mut restored = build(&config(window.clone(), 0, 0));
            restored.restore(&state).unwrap();
            assert_eq!(restored.held_bytes, agg.held_bytes, "{window:?}: restored");
        }
    }

    #[test]
    fn shedding_drops_events_that_would_open_windows_and_the_state_estimate_follows_the_windows() {
        let mut agg = build(&config(WindowConfig::Tumbling { size_ms: 1000 }, 0, 0));
        let empty = agg.state_bytes();
        run(&mut agg, &[("a", 1, 1.0), ("b", 1, 1.0)]);
        let two = agg.state_bytes();
        assert!(two > empty + 2 * 200, "two windows with a sketch each: {empty} -> {two}");
        agg.shed_new_state(true);
        let (_, out) = run(&mut agg, &[("a", 2, 1.0), ("c", 3, 1.0)]);
        assert_eq!(out.bounds.memory_dropped, 1, "c would open a window");
        assert!(out.dead_letters.is_empty(), "dropped, not dead-lettered");
        assert_eq!(
            (agg.open.len(), agg.open[&WindowKey::new(1000, "a".to_owned(), 0)].count),
            (2, 2),
            "a's window still counts"
        );
        agg.shed_new_state(false);
        run(&mut agg, &[("c", 3, 1.0)]);
        assert_eq!(agg.open.len(), 3);
        let (emitted, _) = run(&mut agg, &[("d", 5000, 1.0)]);
        assert_eq!(emitted.len(), 3);
        assert!(agg.state_bytes() < two, "closed windows give their estimate back");
        let mut sessions = build(&config(WindowConfig::Session { gap_ms: 10 }, 0, 0));
        run(&mut sessions, &[("a", 1, 1.0)]);
        sessions.shed_new_state(true);
        let (_, out) = run(&mut sessions, &[("a", 5, 1.0), ("b", 5, 1.0)]);
        assert_eq!((out.bounds.memory_dropped, sessions.open.len()), (1, 1), "a's session extends, b's is not opened");
    }

    #[test]
    fn tumbling_windows_with_out_of_order_and_late_events() {
        let mut agg = build(&config(WindowConfig::Tumbling { size_ms: 10 }, 5, 0));
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
        let mut agg = build(&config(WindowConfig::Tumbling { size_ms: 10 }, 0, 5));
        let (emitted, _) = run(&mut agg, &[("a", 1, 1.0), ("a", 12, 1.0), ("a", 9, 1.0)]);
        assert!(emitted.is_empty(), "watermark 12 < 10 + 5");
        assert_eq!(agg.late_events, 0, "9 arrives within the allowed lateness");
        let (emitted, _) = run(&mut agg, &[("a", 15, 1.0)]);
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0]["count"], 2);
    }

    #[test]
    fn hopping_windows_count_an_event_in_each_window_it_falls_in() {
        let mut agg = build(&config(WindowConfig::Hopping { size_ms: 10, hop_ms: 5 }, 0, 0));
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
        let mut agg = build(&config(WindowConfig::Session { gap_ms: 10 }, 0, 0));
        let (emitted, _) = run(&mut agg, &[("a", 0, 1.0), ("a", 5, 1.0), ("a", 30, 1.0), ("a", 12, 1.0)]);
        // Sessions: {0,5} closed when watermark reached 30 (end 15 <= 30). 12 arrives after: late.
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0]["count"], 2);
        assert_eq!((emitted[0]["window_start"].as_i64(), emitted[0]["window_end"].as_i64()), (Some(0), Some(15)));
        assert_eq!(agg.late_events, 1);
        // A bridging event merges two open sessions.
        let mut agg = build(&config(WindowConfig::Session { gap_ms: 10 }, 100, 0));
        run(&mut agg, &[("a", 0, 1.0), ("a", 18, 1.0), ("a", 9, 1.0)]);
        assert_eq!(agg.open.len(), 1, "0 and 18 are bridged by 9");
        let (_, w) = agg.open.first_key_value().unwrap();
        assert_eq!((w.start, w.end, w.count), (0, 28, 3));
    }

    fn any_field(func: &Func) -> BoxedStrategy<FieldAcc> {
        let float = prop_oneof![
            any::<f64>(),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::NAN),
            Just(-0.0),
            Just(f64::MAX)
        ];
        match func {
            Func::Count => Just(FieldAcc::Count).boxed(),
            Func::Sum => float.prop_map(FieldAcc::Sum).boxed(),
            Func::Min => proptest::option::of(float).prop_map(FieldAcc::Min).boxed(),
            Func::Max => proptest::option::of(float).prop_map(FieldAcc::Max).boxed(),
            Func::Avg => (float, any::<u64>()).prop_map(|(s, n)| FieldAcc::Avg(s, n)).boxed(),
            Func::First => proptest::option::of((any::<i64>(), any_value())).prop_map(FieldAcc::First).boxed(),
            Func::Last => proptest::option::of((any::<i64>(), any_value())).prop_map(FieldAcc::Last).boxed(),
            Func::Quantile(_) => proptest::collection::vec(float, 0..50)
                .prop_map(|values| {
                    let mut sketch = DdSketch::with_max_buckets(0.01, 2048);
                    for v in values {
                        sketch.add(v);
                    }
                    FieldAcc::Quantile(Box::new(sketch))
                })
                .boxed(),
        }
    }

    fn any_window(outputs: &[Output]) -> impl Strategy<Value = (String, Window)> {
        let fields: Vec<BoxedStrategy<FieldAcc>> = outputs.iter().map(|o| any_field(&o.func)).collect();
        let extreme = prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), Just(0)];
        (".{0,8}", extreme.clone(), extreme, any::<u64>(), fields)
            .prop_map(|(group, a, b, count, fields)| (group, Window { start: a.min(b), end: a.max(b), count, fields }))
    }

    fn debug_state(agg: &Aggregate) -> String {
        format!(
            "{:?} {} {} {} {} {:?}",
            agg.open,
            agg.max_event_ts,
            agg.watermark,
            agg.late_events,
            agg.windows_emitted,
            {
                let mut g: Vec<_> = agg.groups.iter().collect();
                g.sort();
                g
            }
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_aggregate_state_round_trips_through_a_checkpoint(
            windows in proptest::collection::vec(any_window(&build(&config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0)).outputs), 0..6),
            max_event_ts in any::<i64>(),
            watermark in any::<i64>(),
            late in any::<u64>(),
            emitted in any::<u64>(),
        ) {
            let c = config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0);
            let mut agg = build(&c);
            for (group, w) in windows {
                agg.open.insert(WindowKey::new(w.end, group, w.start), w);
            }
            let keys: Vec<String> = agg.open.keys().map(|k| k.group.clone()).collect();
            for g in keys { agg.hold_group(&g); }
            (agg.max_event_ts, agg.watermark, agg.late_events, agg.windows_emitted) = (max_event_ts, watermark, late, emitted);
            let bytes = agg.snapshot();
            let mut restored = build(&c);
            restored.restore(&bytes).unwrap();
            prop_assert_eq!(debug_state(&restored), debug_state(&agg));
            prop_assert_eq!(restored.snapshot(), bytes);
        }

        #[test]
        fn damaged_aggregate_state_is_refused_or_read_consistently(bytes in proptest::collection::vec(any::<u8>(), 0..200), flip in any::<prop::sample::Index>()) {
            let c = config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0);
            let mut live = build(&c);
            run(&mut live, &[("a", 1, 1.0), ("b", 2, f64::MAX), ("b", 3, f64::MAX)]);
            let mut state = live.snapshot();
            let at = flip.index(state.len());
            state[at] ^= 0x5a;
            state.extend_from_slice(&bytes[..bytes.len() % 3]);
            let mut restored = build(&c);
            if restored.restore(&state).is_ok() {
                // Whatever was read must write back the same way.
                let again = restored.snapshot();
                let mut twice = build(&c);
                twice.restore(&again).unwrap();
                prop_assert_eq!(twice.snapshot(), again);
            }
        }
    }

    #[test]
    fn a_window_whose_sum_overflows_survives_a_checkpoint_and_restore() {
        let c = config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0);
        let mut agg = build(&c);
        run(&mut agg, &[("a", 1, 1e308), ("a", 2, 1e308), ("a", 3, -1e308)]);
        let (_, w) = agg.open.first_key_value().unwrap();
        assert!(matches!(w.fields[1], FieldAcc::Sum(s) if s == f64::INFINITY), "{:?}", w.fields[1]);
        let mut restored = build(&c);
        restored.restore(&agg.snapshot()).expect("an infinite sum is state like any other");
        let (_, w) = restored.open.first_key_value().unwrap();
        assert!(matches!(w.fields[1], FieldAcc::Sum(s) if s == f64::INFINITY), "{:?}", w.fields[1]);
        // And it restores again after a second checkpoint (a restart loop must not kill it).
        let mut again = build(&c);
        again.restore(&restored.snapshot()).unwrap();
        let (emitted, _) = run(&mut again, &[("a", 25, 0.0)]);
        assert_eq!(emitted[0]["count"], 3);
        assert_eq!(emitted[0]["sum_v"], serde_json::Value::Null, "JSON has no infinity: emitted as null");
        assert_eq!(emitted[0]["max_v"], 1e308);
    }

    #[test]
    fn an_event_stamped_in_microseconds_goes_to_the_dead_letters_and_leaves_the_watermark_alone() {
        let mut agg = build(&config(WindowConfig::Tumbling { size_ms: 60_000 }, 1_000, 0));
        let now = flowgate_core::time::now_ms();
        let (emitted, out) = run(&mut agg, &[("a", now, 1.0), ("a", now * 1000, 1.0), ("a", now + 5, 1.0)]);
        assert!(emitted.is_empty());
        assert_eq!(out.dead_letters.len(), 1);
        assert!(out.dead_letters[0].error.contains("microseconds"), "{}", out.dead_letters[0].error);
        assert_eq!(out.bounds.event_time_out_of_bounds, 1);
        assert_eq!(agg.late_events, 0, "a later normal event is not late");
        assert!(agg.watermark() < now + 60_000, "watermark {} moved by the bad event", agg.watermark());
        // Nor does it come back with a restart.
        let mut restored = build(&config(WindowConfig::Tumbling { size_ms: 60_000 }, 1_000, 0));
        restored.restore(&agg.snapshot()).unwrap();
        let (_, out) = run(&mut restored, &[("a", now + 10, 1.0)]);
        assert!(out.late.is_empty() && out.dead_letters.is_empty());
        // A time field that is not a number is refused, not replaced by another time.
        let mut out = Outputs::default();
        restored.process(super::super::dedup::tests::events(&[(now, r#"{"k":"a","t":"soon","v":1}"#)]), &mut out);
        assert_eq!(out.dead_letters.len(), 1);
        assert!(out.dead_letters[0].error.contains("not a number"));
        // With a bound behind, old events are refused too.
        let policy = EventTimePolicy { max_ahead_ms: 1000, max_behind_ms: Some(1000) };
        let mut strict = Aggregate::new(&config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0), &policy).unwrap();
        let (_, out) = run(&mut strict, &[("a", 5, 1.0), ("a", now, 1.0)]);
        assert_eq!(out.bounds.event_time_out_of_bounds, 1);
        assert!(out.dead_letters[0].error.contains("max_behind_ms"));
    }

    #[test]
    fn a_flood_of_distinct_groups_stays_at_max_groups_and_new_groups_go_to_the_dead_letters() {
        let mut c = config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0);
        c.max_groups = 1000;
        let mut agg = build(&c);
        let groups: Vec<String> = (0..50_000).map(|i| format!("g{i}")).collect();
        let items: Vec<(&str, i64, f64)> = groups.iter().map(|g| (g.as_str(), 1, 1.0)).collect();
        let (emitted, out) = run(&mut agg, &items);
        assert!(emitted.is_empty());
        assert_eq!(agg.open_groups(), 1000);
        assert_eq!(agg.open.len(), 1000);
        assert_eq!(out.bounds.state_over_limit, 49_000);
        assert_eq!(out.dead_letters.len(), 49_000);
        assert!(out.dead_letters[0].error.contains("max_groups"));
        // Groups already open keep counting exactly.
        let (_, out) = run(&mut agg, &[("g0", 2, 1.0), ("g999", 3, 1.0)]);
        assert!(out.dead_letters.is_empty());
        // Once their windows close, the room is free again; the restored state agrees.
        let (emitted, _) = run(&mut agg, &[("g0", 20, 1.0)]);
        assert_eq!(emitted.len(), 1000);
        assert_eq!(emitted.iter().find(|w| w["k"] == "g0").unwrap()["count"], 2);
        assert_eq!(agg.open_groups(), 1);
        let mut restored = build(&c);
        restored.restore(&agg.snapshot()).unwrap();
        assert_eq!(restored.open_groups(), 1);
        let (_, out) = run(&mut restored, &[("new", 21, 1.0)]);
        assert!(out.dead_letters.is_empty());
    }

    #[test]
    fn events_spread_over_many_windows_stay_at_max_open_windows() {
        let mut c = config(WindowConfig::Tumbling { size_ms: 1 }, 1_000_000, 0);
        c.max_open_windows = 100;
        let mut agg = build(&c);
        let items: Vec<(&str, i64, f64)> = (0..10_000).map(|t| ("a", t, 1.0)).collect();
        let (_, out) = run(&mut agg, &items);
        assert_eq!(agg.open.len(), 100);
        assert_eq!(out.bounds.state_over_limit, 9_900);
        assert!(out.dead_letters[0].error.contains("max_open_windows"), "{}", out.dead_letters[0].error);
        let (_, out) = run(&mut agg, &[("a", 5, 1.0)]);
        assert!(out.dead_letters.is_empty(), "an open window still takes events");
        let mut sessions = config(WindowConfig::Session { gap_ms: 1 }, 1_000_000, 0);
        sessions.max_open_windows = 10;
        let mut agg = build(&sessions);
        let items: Vec<(&str, i64, f64)> = (0..100).map(|t| ("a", t * 10, 1.0)).collect();
        let (_, out) = run(&mut agg, &items);
        assert_eq!((agg.open.len(), out.dead_letters.len()), (10, 90));
    }

    #[test]
    fn quantile_sketches_stay_within_their_bucket_bound() {
        let mut c = config(WindowConfig::Tumbling { size_ms: 1_000_000 }, 0, 0);
        c.sketch_max_buckets = 50;
        let mut agg = build(&c);
        let items: Vec<(&str, i64, f64)> = (0..5_000).map(|i| ("a", 1, 1.01f64.powi(i))).collect();
        let (_, out) = run(&mut agg, &items);
        let (_, w) = agg.open.first_key_value().unwrap();
        let FieldAcc::Quantile(sketch) = &w.fields[7] else { panic!("field 7 is the quantile") };
        assert!(sketch.buckets() <= 50, "{} buckets", sketch.buckets());
        assert!(out.bounds.sketch_buckets_collapsed > 0);
        assert_eq!(sketch.count(), 5_000);
    }

    #[test]
    fn extreme_event_times_and_sizes_never_overflow() {
        let anything = EventTimePolicy { max_ahead_ms: u64::MAX, max_behind_ms: None };
        let windows = [
            WindowConfig::Tumbling { size_ms: 7 },
            WindowConfig::Tumbling { size_ms: i64::MAX as u64 },
            WindowConfig::Hopping { size_ms: 10, hop_ms: 3 },
            WindowConfig::Hopping { size_ms: i64::MAX as u64, hop_ms: i64::MAX as u64 / 1000 + 1 },
            WindowConfig::Session { gap_ms: 10 },
            WindowConfig::Session { gap_ms: i64::MAX as u64 },
        ];
        for window in windows {
            let mut agg = Aggregate::new(&config(window.clone(), i64::MAX as u64, i64::MAX as u64), &anything).unwrap();
            let times = [i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX];
            let items: Vec<(&str, i64, f64)> = times.iter().map(|&t| ("a", t, 1.0)).collect();
            let (_, out) = run(&mut agg, &items);
            let handled =
                out.dead_letters.len() + out.late.len() + agg.open.values().map(|w| w.count as usize).sum::<usize>();
            assert!(handled >= times.len(), "{window:?}: every event is counted, dead-lettered or late");
            for dl in &out.dead_letters {
                assert!(dl.error.contains("range of i64"), "{window:?}: {}", dl.error);
            }
            agg.tick(i64::MAX, &mut Outputs::default());
            let mut restored = Aggregate::new(&config(window.clone(), 0, 0), &anything).unwrap();
            restored.restore(&agg.snapshot()).unwrap();
        }
    }

    #[test]
    fn impossible_configs_are_refused_with_the_key_named() {
        let e = |c: AggregateConfig| Aggregate::new(&c, &EventTimePolicy::default()).err().unwrap().to_string();
        assert!(e(config(WindowConfig::Tumbling { size_ms: u64::MAX }, 0, 0)).contains("window.size_ms"));
        assert!(e(config(WindowConfig::Session { gap_ms: u64::MAX }, 0, 0)).contains("window.gap_ms"));
        assert!(e(config(WindowConfig::Hopping { size_ms: 1_000_000, hop_ms: 1 }, 0, 0)).contains("window.hop_ms"));
        assert!(e(config(WindowConfig::Tumbling { size_ms: 10 }, u64::MAX, 0)).contains("max_out_of_orderness_ms"));
        assert!(e(config(WindowConfig::Tumbling { size_ms: 10 }, 0, u64::MAX)).contains("allowed_lateness_ms"));
        let mut c = config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0);
        c.max_groups = 0;
        assert!(e(c).contains("max_groups"));
    }

    #[test]
    fn a_checkpoint_for_other_functions_is_refused_with_what_to_do() {
        let mut agg = build(&config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0));
        run(&mut agg, &[("a", 1, 1.0)]);
        let mut other = config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0);
        other.functions.swap(1, 2);
        let err = build(&other).restore(&agg.snapshot()).unwrap_err().to_string();
        assert!(err.contains("move the checkpoint file away"), "{err}");
        assert!(err.contains("[count, sum, avg"), "{err}");
    }

    #[test]
    fn json_state_of_earlier_versions_is_read_and_a_null_in_it_is_refused() {
        let c = AggregateConfig {
            functions: vec![
                AggregateFunction { function: "count".into(), field: None, q: None, output: None },
                AggregateFunction { function: "sum".into(), field: Some("v".into()), q: None, output: None },
            ],
            ..config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0)
        };
        let legacy = r#"{"max_event_ts":2,"watermark":2,"late_events":0,"windows_emitted":0,
            "windows":[[[10,"a",0],{"start":0,"end":10,"count":2,"fields":["Count",{"Sum":3.0}]}]]}"#;
        let mut agg = build(&c);
        agg.restore(legacy.as_bytes()).unwrap();
        let (emitted, _) = run(&mut agg, &[("a", 20, 0.0)]);
        assert_eq!((emitted[0]["count"].as_i64(), emitted[0]["sum_v"].as_f64()), (Some(2), Some(3.0)));
        let broken = legacy.replace("3.0", "null");
        assert!(build(&c).restore(broken.as_bytes()).is_err(), "a null sum is refused, not read as 0");
    }

    #[test]
    fn state_survives_a_snapshot() {
        let mut agg = build(&config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0));
        run(&mut agg, &[("a", 1, 1.0), ("a", 2, 2.0)]);
        let mut restored = build(&config(WindowConfig::Tumbling { size_ms: 10 }, 0, 0));
        restored.restore(&agg.snapshot()).unwrap();
        let (emitted, _) = run(&mut restored, &[("a", 20, 0.0)]);
        assert_eq!(emitted[0]["count"], 2);
        assert_eq!(emitted[0]["sum_v"], 3.0);
    }
}
