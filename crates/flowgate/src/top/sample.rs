//! One sample of a running engine, as `flowgate top` reads it: `GET /v1/stats` (states,
//! batch targets, concurrency, breakers, memory, topics, sources) and `GET /metrics` (the
//! counters that rates are computed from), read at the same moment and folded into one
//! list of components.
//!
//! Both documents are read leniently: a field the engine does not send leaves its cell
//! empty instead of failing the sample, so `top` keeps working against an engine that
//! is older or newer than itself.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What kind of component a row is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A pipeline (all its workers).
    Pipeline,
    /// One processor of a pipeline, named `pipeline/processor` (its id: its name, or
    /// `<type>-<n>`).
    Processor,
    /// One sink of a pipeline, named `pipeline/sink`.
    Sink,
    /// A `[[sources]]` connector.
    Source,
    /// A topic of the log.
    Topic,
}

impl Kind {
    /// The word shown in the KIND column and matched by the filter.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pipeline => "pipeline",
            Kind::Processor => "processor",
            Kind::Sink => "sink",
            Kind::Source => "source",
            Kind::Topic => "topic",
        }
    }
}

/// How far behind a component is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lag {
    /// Events appended but not committed yet (pipelines).
    Events(u64),
    /// Age of the newest change confirmed upstream (sources).
    Seconds(f64),
}

/// A sink's write concurrency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Concurrency {
    /// Writes in flight now.
    pub in_flight: u32,
    /// Writes allowed at once (`None`: unlimited).
    pub limit: Option<u32>,
}

/// One component's numbers in one sample. Counters are totals since the engine
/// started; rates come from two samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Component {
    /// Pipeline, sink, source or topic.
    pub kind: Kind,
    /// Its name (`pipeline/sink` for a sink).
    pub name: String,
    /// Events in, total: read from the log (pipeline), appended (topic).
    pub events_in: Option<u64>,
    /// Events out, total: written by its sinks (pipeline, sink), changes read upstream
    /// (source).
    pub events_out: Option<u64>,
    /// How far behind it is.
    pub lag: Option<Lag>,
    /// Errors, total: dead-lettered events and failed sink writes (pipeline, sink),
    /// reconnects (source).
    pub errors: Option<u64>,
    /// Events per batch the sink flushes at now.
    pub batch: Option<u64>,
    /// Sink write concurrency.
    pub concurrency: Option<Concurrency>,
    /// Breaker state (sink: `closed`, `half_open`, `open`), worker state (pipeline),
    /// connection state (source).
    pub state: Option<String>,
}

impl Component {
    fn new(kind: Kind, name: impl Into<String>) -> Component {
        Component {
            kind,
            name: name.into(),
            events_in: None,
            events_out: None,
            lag: None,
            errors: None,
            batch: None,
            concurrency: None,
            state: None,
        }
    }
}

/// The engine's memory budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Memory {
    /// Bytes charged now.
    pub used: u64,
    /// The budget.
    pub limit: u64,
    /// The most ever charged at once.
    pub peak: u64,
    /// `used / limit`.
    pub pressure: f64,
    /// `normal`, `soft` or `hard`.
    pub level: String,
}

/// One reading of the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// When it was read (rates divide by the time between two samples).
    pub at: Instant,
    /// Seconds since the engine started.
    pub uptime_secs: Option<u64>,
    /// Whether `/ready` would answer ready.
    pub ready: Option<bool>,
    /// The memory budget.
    pub memory: Option<Memory>,
    /// Every pipeline, sink, source and topic.
    pub components: Vec<Component>,
    /// Active alerts (`/v1/stats` `alerts`): name, severity, state.
    pub alerts: Vec<(String, String, String)>,
}

/// The longest one sample may take before it counts as failed.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads one sample from the engine whose HTTP API is at `addr` (`host:port`).
pub async fn fetch(addr: &str) -> anyhow::Result<Sample> {
    let read = async {
        let (stats, metrics) = tokio::join!(get(addr, "/v1/stats"), get(addr, "/metrics"));
        let at = Instant::now();
        let stats: Value = serde_json::from_slice(&stats?)
            .map_err(|e| anyhow::anyhow!("{addr}/v1/stats is not JSON ({e}); is --addr the engine's HTTP API?"))?;
        let metrics = String::from_utf8_lossy(&metrics?).into_owned();
        Ok(Sample::parse(at, &stats, &metrics))
    };
    tokio::time::timeout(FETCH_TIMEOUT, read)
        .await
        .map_err(|_| anyhow::anyhow!("the engine at {addr} did not answer within {}s", FETCH_TIMEOUT.as_secs()))?
}

async fn get(addr: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    let (status, body) = crate::http::request(addr, "GET", path, b"").await.map_err(|e| {
        anyhow::anyhow!("{e:#} (--addr is the engine's HTTP API, 127.0.0.1:7071 unless its config moves it)")
    })?;
    if status != 200 {
        anyhow::bail!("GET {path} at {addr} answered {status}: {}", String::from_utf8_lossy(&body).trim());
    }
    Ok(body)
}

/// One Prometheus sample: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSample {
    /// The sample's name (with `_total` for counters).
    pub name: String,
    /// Its labels, in the order written.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

impl MetricSample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Parses the Prometheus text format (0.0.4 or OpenMetrics): every sample line; comments
/// and lines it cannot read are skipped.
pub fn parse_metrics(text: &str) -> Vec<MetricSample> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_metric_line).collect()
}

fn parse_metric_line(line: &str) -> Option<MetricSample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    rest = &inner[i + 1..];
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(MetricSample { name, labels, value })
}

fn u64_at(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// The later of two breaker states: `open` over `half_open` over `closed`.
fn worse_breaker<'a>(a: &'a str, b: &'a str) -> &'a str {
    let rank = |s: &str| match s {
        "open" => 2,
        "half_open" => 1,
        _ => 0,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// A pipeline's state from its workers': the one they share, or the most pressing one
/// with how many workers are in it (`restarting 1/4`).
fn worker_state(states: &[&str]) -> Option<String> {
    let rank = |s: &str| match s {
        "running" => 0,
        "stopped" => 1,
        "starting" => 2,
        "restarting" => 4,
        _ => 3,
    };
    let worst = *states.iter().max_by_key(|s| rank(s))?;
    let n = states.iter().filter(|s| **s == worst).count();
    Some(if n == states.len() { worst.to_owned() } else { format!("{worst} {n}/{}", states.len()) })
}

/// Sums `name` over the samples whose `label` is `value` (and, when given, whose
/// `label2` is `value2`); `None` when no sample matched.
fn sum(metrics: &[MetricSample], name: &str, filter: &[(&str, &str)]) -> Option<u64> {
    let mut found = false;
    let mut total = 0f64;
    for m in metrics.iter().filter(|m| m.name == name) {
        if filter.iter().all(|(k, v)| m.label(k) == Some(v)) {
            found = true;
            total += m.value;
        }
    }
    // Counters and gauges of counts: non-negative integers (a float cast saturates).
    found.then_some(total.max(0.0) as u64)
}

fn add(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    }
}

impl Sample {
    /// Folds `/v1/stats` and `/metrics`, read at `at`, into one sample.
    pub fn parse(at: Instant, stats: &Value, metrics_text: &str) -> Sample {
        let metrics = parse_metrics(metrics_text);
        let mut components = Vec::new();

        // Topics: appended events are the sum of the partitions' end offsets.
        let mut end_offsets: BTreeMap<(String, u64), u64> = BTreeMap::new();
        for topic in stats.get("topics").and_then(Value::as_array).into_iter().flatten() {
            let Some(name) = topic.get("name").and_then(Value::as_str) else { continue };
            let mut appended = None;
            for p in topic.get("partitions").and_then(Value::as_array).into_iter().flatten() {
                if let Some(end) = u64_at(p, "end_offset") {
                    appended = add(appended, Some(end));
                    if let Some(partition) = u64_at(p, "partition") {
                        end_offsets.insert((name.to_owned(), partition), end);
                    }
                }
            }
            let mut c = Component::new(Kind::Topic, name);
            c.events_in = appended;
            components.push(c);
        }

        // Pipelines: from their workers in the stats and their samples in the metrics.
        let workers: Vec<&Value> =
            stats.get("pipeline_workers").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
        let mut pipelines: BTreeSet<String> =
            workers.iter().filter_map(|w| w.get("pipeline").and_then(Value::as_str)).map(str::to_owned).collect();
        pipelines.extend(
            metrics
                .iter()
                .filter(|m| m.name == "flowgate_pipeline_events_read_total")
                .filter_map(|m| m.label("pipeline"))
                .map(str::to_owned),
        );
        for pipeline in &pipelines {
            let p = pipeline.as_str();
            let mut c = Component::new(Kind::Pipeline, p);
            c.events_in = sum(&metrics, "flowgate_pipeline_events_read_total", &[("pipeline", p)]);
            c.events_out = sum(&metrics, "flowgate_sink_events_total", &[("pipeline", p)]);
            // Error counters appear with the first error: none yet is 0.
            c.errors = add(
                sum(&metrics, "flowgate_dlq_events_total", &[("pipeline", p)]),
                sum(&metrics, "flowgate_sink_errors_total", &[("pipeline", p)]),
            )
            .or(Some(0));
            let mine: Vec<&&Value> =
                workers.iter().filter(|w| w.get("pipeline").and_then(Value::as_str) == Some(p)).collect();
            let lag = sum(&metrics, "flowgate_pipeline_lag", &[("pipeline", p)]).or_else(|| {
                // Without the gauge: each worker's partition end minus its checkpoint.
                let mut total = None;
                for w in &mine {
                    let topic = w.get("topic").and_then(Value::as_str).unwrap_or_default().to_owned();
                    let (Some(partition), Some(committed)) = (u64_at(w, "partition"), u64_at(w, "committed_offset"))
                    else {
                        continue;
                    };
                    let end = end_offsets.get(&(topic, partition)).copied().unwrap_or(committed);
                    total = add(total, Some(end.saturating_sub(committed)));
                }
                total
            });
            c.lag = lag.map(Lag::Events);
            let states: Vec<&str> = mine.iter().filter_map(|w| w.get("state").and_then(Value::as_str)).collect();
            c.state = worker_state(&states);
            let held = mine.iter().filter(|w| w.get("backpressure").and_then(Value::as_bool) == Some(true)).count();
            if held > 0 && c.state.as_deref() == Some("running") {
                c.state = Some(if held == mine.len() {
                    "backpressure".to_owned()
                } else {
                    format!("backpressure {held}/{}", mine.len())
                });
            }
            components.push(c);
        }

        // Processors: events in and out, failures, from the dashboard's flow.
        let flow_pipelines = stats.pointer("/flow/pipelines").and_then(Value::as_array);
        for p in flow_pipelines.into_iter().flatten() {
            let Some(pipeline) = p.get("name").and_then(Value::as_str) else { continue };
            for proc in p.get("processors").and_then(Value::as_array).into_iter().flatten() {
                let Some(id) = proc.get("id").and_then(Value::as_str) else { continue };
                let mut c = Component::new(Kind::Processor, format!("{pipeline}/{id}"));
                c.events_in = u64_at(proc, "events_in");
                c.events_out = u64_at(proc, "events_out");
                c.errors = u64_at(proc, "failed");
                c.state = proc.get("type").and_then(Value::as_str).map(str::to_owned);
                components.push(c);
            }
        }

        // Sinks: one controller per (pipeline, sink); instances per partition add their
        // breakers (the worst one shows).
        let mut sinks: BTreeMap<(String, String), Component> = BTreeMap::new();
        fn sink(sinks: &mut BTreeMap<(String, String), Component>, key: (String, String)) -> &mut Component {
            let name = format!("{}/{}", key.0, key.1);
            sinks.entry(key).or_insert_with(|| Component::new(Kind::Sink, name))
        }
        for m in metrics.iter().filter(|m| m.name == "flowgate_sink_events_total") {
            if let (Some(p), Some(s)) = (m.label("pipeline"), m.label("sink")) {
                sink(&mut sinks, (p.to_owned(), s.to_owned()));
            }
        }
        let names = |v: &Value| -> Option<(String, String)> {
            Some((v.get("pipeline")?.as_str()?.to_owned(), v.get("sink")?.as_str()?.to_owned()))
        };
        for ctl in stats.get("sink_controllers").and_then(Value::as_array).into_iter().flatten() {
            let Some(key) = names(ctl) else { continue };
            let c = sink(&mut sinks, key);
            c.batch = u64_at(ctl, "batch_target");
            if let Some(in_flight) = u64_at(ctl, "in_flight") {
                c.concurrency = Some(Concurrency {
                    in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX),
                    limit: u64_at(ctl, "concurrency_limit").map(|l| u32::try_from(l).unwrap_or(u32::MAX)),
                });
            }
            if let Some(b) = ctl.get("breaker").and_then(Value::as_str) {
                c.state = Some(b.to_owned());
            }
        }
        for inst in stats.get("pipeline_sinks").and_then(Value::as_array).into_iter().flatten() {
            let Some(key) = names(inst) else { continue };
            let c = sink(&mut sinks, key);
            if let Some(b) = inst.get("breaker").and_then(Value::as_str) {
                let worse = worse_breaker(c.state.as_deref().unwrap_or("closed"), b).to_owned();
                c.state = Some(worse);
            }
            if c.batch.is_none() {
                c.batch = u64_at(inst, "batch_target");
            }
        }
        for ((p, s), mut c) in sinks {
            let labels = [("pipeline", p.as_str()), ("sink", s.as_str())];
            c.events_out = sum(&metrics, "flowgate_sink_events_total", &labels);
            c.errors = add(
                sum(&metrics, "flowgate_sink_errors_total", &labels),
                sum(&metrics, "flowgate_sink_dead_letters_total", &labels),
            )
            .or(Some(0));
            components.push(c);
        }

        // Sources: changes read upstream, reconnects, lag in seconds.
        for src in stats.get("sources").and_then(Value::as_array).into_iter().flatten() {
            let Some(name) = src.get("name").and_then(Value::as_str) else { continue };
            let mut c = Component::new(Kind::Source, name);
            if let Some(changes) = src.get("changes").and_then(Value::as_object) {
                let mut total = Some(0u64);
                for ops in changes.values() {
                    for n in ops.as_object().into_iter().flat_map(|o| o.values()) {
                        total = add(total, n.as_u64());
                    }
                }
                c.events_out = total;
            }
            c.errors = u64_at(src, "reconnects");
            c.lag = src.get("lag_seconds").and_then(Value::as_f64).map(Lag::Seconds);
            c.state = src.get("state").and_then(Value::as_str).map(str::to_owned);
            components.push(c);
        }

        let memory = stats.get("memory").and_then(|m| {
            Some(Memory {
                used: u64_at(m, "used_bytes")?,
                limit: u64_at(m, "limit_bytes")?,
                peak: u64_at(m, "peak_bytes").unwrap_or(0),
                pressure: m.get("pressure").and_then(Value::as_f64).unwrap_or(0.0),
                level: m.get("level").and_then(Value::as_str).unwrap_or("").to_owned(),
            })
        });

        let text = |a: &Value, k: &str| a.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let alerts = stats
            .get("alerts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|a| (text(a, "name"), text(a, "severity"), text(a, "state")))
            .collect();
        Sample {
            at,
            uptime_secs: u64_at(stats, "uptime_secs"),
            ready: stats.get("ready").and_then(Value::as_bool),
            memory,
            components,
            alerts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metric_lines_are_read_with_their_labels() {
        let text = "# TYPE flowgate_sink_events_total counter\n\
                    flowgate_sink_events_total{pipeline=\"a\\\"b\",sink=\"out\"} 42\n\
                    flowgate_memory_used_bytes 7\n\
                    broken{pipeline=\"x\n";
        let m = parse_metrics(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].name, "flowgate_sink_events_total");
        assert_eq!(m[0].labels, vec![("pipeline".into(), "a\"b".into()), ("sink".into(), "out".into())]);
        assert_eq!(m[0].value, 42.0);
        assert_eq!(m[1].labels, vec![]);
    }

    #[test]
    fn stats_and_metrics_fold_into_components() {
        let stats = json!({
            "uptime_secs": 61,
            "ready": true,
            "topics": [{"name": "in", "partitions": [{"partition": 0, "end_offset": 100}, {"partition": 1, "end_offset": 50}]}],
            "pipeline_workers": [
                {"pipeline": "p", "topic": "in", "partition": 0, "state": "running", "committed_offset": 90},
                {"pipeline": "p", "topic": "in", "partition": 1, "state": "running", "committed_offset": 50, "backpressure": true}
            ],
            "flow": {"pipelines": [{"name": "p", "processors": [
                {"id": "keep", "type": "filter", "events_in": 140, "events_out": 120, "dropped": 20, "failed": 0}
            ]}]},
            "pipeline_sinks": [{"pipeline": "p", "sink": "out", "breaker": "half_open", "batch_target": 64}],
            "sink_controllers": [{"pipeline": "p", "sink": "out", "concurrency_limit": 4, "in_flight": 1, "batch_target": 128, "breaker": "closed"}],
            "memory": {"used_bytes": 10, "limit_bytes": 100, "peak_bytes": 20, "pressure": 0.1, "level": "normal"},
            "sources": [{"name": "cdc", "state": "streaming", "reconnects": 2, "lag_seconds": 1.5, "changes": {"t": {"insert": 3, "update": 4}}}]
        });
        let metrics = "flowgate_pipeline_events_read_total{pipeline=\"p\"} 140\n\
                       flowgate_sink_events_total{pipeline=\"p\",sink=\"out\"} 130\n\
                       flowgate_sink_errors_total{pipeline=\"p\",sink=\"out\"} 1\n\
                       flowgate_dlq_events_total{pipeline=\"p\"} 2\n";
        let s = Sample::parse(Instant::now(), &stats, metrics);
        assert_eq!(s.uptime_secs, Some(61));
        assert_eq!(s.memory.as_ref().unwrap().limit, 100);
        let find = |kind, name: &str| s.components.iter().find(|c| c.kind == kind && c.name == name).unwrap();
        assert_eq!(find(Kind::Topic, "in").events_in, Some(150));
        let p = find(Kind::Pipeline, "p");
        assert_eq!((p.events_in, p.events_out, p.errors), (Some(140), Some(130), Some(3)));
        // No lag gauge in the metrics: end offsets minus checkpoints.
        assert_eq!(p.lag, Some(Lag::Events(10)));
        assert_eq!(p.state.as_deref(), Some("backpressure 1/2"), "one worker waits on a full sink queue");
        let keep = find(Kind::Processor, "p/keep");
        assert_eq!((keep.events_in, keep.events_out, keep.errors), (Some(140), Some(120), Some(0)));
        assert_eq!(keep.state.as_deref(), Some("filter"));
        assert_eq!(worker_state(&["running", "restarting", "running"]).as_deref(), Some("restarting 1/3"));
        assert_eq!(worker_state(&["starting", "starting"]).as_deref(), Some("starting"));
        assert_eq!(worker_state(&[]), None);
        let sink = find(Kind::Sink, "p/out");
        assert_eq!(sink.batch, Some(128));
        assert_eq!(sink.concurrency, Some(Concurrency { in_flight: 1, limit: Some(4) }));
        assert_eq!(sink.state.as_deref(), Some("half_open"));
        assert_eq!((sink.events_out, sink.errors), (Some(130), Some(1)));
        let src = find(Kind::Source, "cdc");
        assert_eq!((src.events_out, src.errors, src.lag), (Some(7), Some(2), Some(Lag::Seconds(1.5))));
    }

    #[test]
    fn an_empty_document_gives_an_empty_sample() {
        let s = Sample::parse(Instant::now(), &json!({}), "");
        assert!(s.components.is_empty());
        assert_eq!((s.uptime_secs, s.memory), (None, None));
    }
}
