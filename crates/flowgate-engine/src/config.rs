//! Pipeline configuration: `[[pipelines]]` in the engine's TOML.

use serde::{Deserialize, Serialize};

/// One pipeline: source topics → processors in order → sinks (fan-out).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Unique name; names its checkpoints and metrics.
    pub name: String,
    /// Topics it consumes.
    pub topics: Vec<String>,
    /// Where a pipeline without a checkpoint starts: `earliest` or `latest`.
    #[serde(default = "default_start")]
    pub start: String,
    /// How much it reads from the log at once.
    #[serde(default)]
    pub read: ReadPolicy,
    /// Committed offsets and processor state are checkpointed this often (ms).
    #[serde(default = "default_commit_interval")]
    pub commit_interval_ms: u64,
    /// How far event times may stray from the wall clock before an event is refused
    /// (dead-lettered) by the processors that keep state by event time.
    #[serde(default)]
    pub event_time: EventTimePolicy,
    /// Processors, applied in order.
    #[serde(default)]
    pub processors: Vec<ProcessorConfig>,
    /// Ids of processors whose checkpointed state is to be dropped at the next start
    /// (a processor removed for good, or one to restart empty), instead of being carried
    /// forward or refused.
    #[serde(default)]
    pub discard_processor_state: Vec<String>,
    /// Sinks; every sink gets every event unless a `route` processor says otherwise.
    pub sinks: Vec<SinkConfig>,
    /// What the pipeline does at the memory limit (`docs/memory.md`).
    #[serde(default)]
    pub memory_policy: PipelineMemoryPolicy,
    /// What becomes of this pipeline's dead letters (`[pipelines.dlq]`).
    #[serde(default)]
    pub dlq: DlqPolicy,
}

/// `memory_policy` of a pipeline: what it does once the process's memory budget is used
/// up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineMemoryPolicy {
    /// Stop reading the log until memory is freed (the log is the buffer); nothing is
    /// lost, the pipeline falls behind.
    #[default]
    Block,
    /// Read on, but aggregates drop events that would open a new window or group
    /// (counted in `flowgate_memory_dropped_events_total`) instead of growing state.
    DropNewest,
}

/// Automatic reprocessing of a pipeline's sink dead letters (off unless
/// `reprocess_after_ms` is set).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqPolicy {
    /// Replay the pipeline's sink dead letters (`rejected`, `retries_exhausted`) this
    /// long (ms) after they last failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reprocess_after_ms: Option<u64>,
    /// Replay each original event at most this many times (a replay that fails again
    /// makes an entry that counts its replays).
    pub reprocess_max_times: u32,
}

impl Default for DlqPolicy {
    fn default() -> Self {
        DlqPolicy { reprocess_after_ms: None, reprocess_max_times: 3 }
    }
}

fn default_start() -> String {
    "earliest".into()
}

fn default_commit_interval() -> u64 {
    500
}

/// How a pipeline reads its topics.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadPolicy {
    /// Bytes of batches per log read.
    pub max_bytes: usize,
}

impl Default for ReadPolicy {
    fn default() -> Self {
        ReadPolicy { max_bytes: 1 << 20 }
    }
}

/// Bounds on event time, relative to the wall clock when an event is processed. An event
/// outside them goes to the dead-letter topic from the first processor that keeps state
/// by event time (`dedup`, `aggregate`), and never moves a watermark or a TTL horizon:
/// one event stamped in microseconds must not make every later event late.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventTimePolicy {
    /// Event times further ahead of the wall clock than this are refused.
    pub max_ahead_ms: u64,
    /// Event times further behind the wall clock than this are refused; absent: any
    /// age is accepted (a replay of old data is not an error).
    pub max_behind_ms: Option<u64>,
}

impl Default for EventTimePolicy {
    fn default() -> Self {
        EventTimePolicy { max_ahead_ms: 3_600_000, max_behind_ms: None }
    }
}

impl EventTimePolicy {
    /// Checks an event time (ms) against the wall clock `now_ms`; the error says by
    /// how much it is out and which key bounds it.
    pub fn check(&self, event_ms: i64, now_ms: i64) -> Result<(), String> {
        let ahead = i128::from(event_ms) - i128::from(now_ms);
        if ahead > i128::from(self.max_ahead_ms) {
            return Err(format!(
                "event time {event_ms} is {ahead} ms ahead of the wall clock ({now_ms}), more than \
                 event_time.max_ahead_ms ({}); is it in microseconds or nanoseconds instead of milliseconds?",
                self.max_ahead_ms
            ));
        }
        if let Some(max_behind) = self.max_behind_ms {
            if -ahead > i128::from(max_behind) {
                return Err(format!(
                    "event time {event_ms} is {} ms behind the wall clock ({now_ms}), more than \
                     event_time.max_behind_ms ({max_behind})",
                    -ahead
                ));
            }
        }
        Ok(())
    }
}

impl PipelineConfig {
    /// The id of each processor, in order: its `name`, or `<type>-<n>` for the n-th
    /// unnamed processor of that type. Checkpointed state and metrics are keyed by it, so
    /// reordering processors of different types (or named ones) keeps each one's state.
    pub fn processor_ids(&self) -> Vec<String> {
        let mut unnamed: Vec<&'static str> = Vec::new();
        self.processors
            .iter()
            .map(|p| match &p.name {
                Some(name) => name.clone(),
                None => {
                    let kind = p.kind.type_name();
                    unnamed.push(kind);
                    format!("{kind}-{}", unnamed.iter().filter(|k| **k == kind).count())
                }
            })
            .collect()
    }
}

/// A processor: an optional name (its id; see [`PipelineConfig::processor_ids`]) and its
/// type's settings, side by side in the config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "RawProcessor", into = "RawProcessor")]
pub struct ProcessorConfig {
    /// Unique within the pipeline; keys the processor's checkpointed state and metrics.
    pub name: Option<String>,
    /// The processor type and its settings.
    pub kind: ProcessorKind,
}

impl From<ProcessorKind> for ProcessorConfig {
    fn from(kind: ProcessorKind) -> ProcessorConfig {
        ProcessorConfig { name: None, kind }
    }
}

/// The processor as written: `name` and the type's own keys side by side, parsed in two
/// steps so that a misspelt key of the type is still refused by name.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RawProcessor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl TryFrom<RawProcessor> for ProcessorConfig {
    type Error = String;

    fn try_from(raw: RawProcessor) -> Result<Self, Self::Error> {
        let kind = serde_json::from_value(serde_json::Value::Object(raw.rest)).map_err(|e| match &raw.name {
            Some(name) => format!("processor '{name}': {e}"),
            None => e.to_string(),
        })?;
        Ok(ProcessorConfig { name: raw.name, kind })
    }
}

impl From<ProcessorConfig> for RawProcessor {
    fn from(p: ProcessorConfig) -> RawProcessor {
        let rest = match serde_json::to_value(&p.kind) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => Default::default(),
        };
        RawProcessor { name: p.name, rest }
    }
}

/// Processor types.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProcessorKind {
    /// Keeps events for which a VRL condition is true.
    Filter {
        /// VRL boolean expression, e.g. `.temp > 20`.
        condition: String,
    },
    /// Rewrites events with a VRL program.
    Remap {
        /// VRL program, e.g. `.fahrenheit = .celsius * 9 / 5 + 32`.
        source: String,
    },
    /// Drops events whose id was seen within a TTL.
    Dedup {
        /// Where the id comes from: a field path like `id` or `meta.event_id`, or
        /// `@client_id` / `@key` for the event's client id or key.
        by: String,
        /// How long (event time, ms) an id is remembered.
        #[serde(default = "default_dedup_ttl")]
        ttl_ms: u64,
        /// Ids remembered at most (per partition); the oldest go first.
        #[serde(default = "default_dedup_entries")]
        max_entries: usize,
    },
    /// Windowed aggregation by key over event time.
    Aggregate(AggregateConfig),
    /// SIMD statistics over a numeric array field.
    Numeric(NumericConfig),
    /// Sends events to sinks by condition.
    Route {
        /// Checked in order; an event goes to the sinks of every route whose condition holds.
        routes: Vec<RouteConfig>,
        /// Sinks for events no route matched (none: such events are dropped).
        #[serde(default)]
        default: Vec<String>,
    },
}

impl ProcessorKind {
    /// For a processor that keeps state, the settings that state depends on (a dedup's
    /// id source, an aggregate's grouping, window and functions); `None` for a stateless
    /// one. Stored with the state, so that state is never restored into a processor
    /// whose settings give it another meaning.
    pub fn state_settings(&self) -> Option<serde_json::Value> {
        match self {
            ProcessorKind::Dedup { by, .. } => Some(serde_json::json!({ "by": by })),
            ProcessorKind::Aggregate(a) => Some(serde_json::json!({
                "group_by": a.group_by,
                "time_field": a.time_field,
                "window": a.window,
                "functions": a.functions,
            })),
            ProcessorKind::Filter { .. }
            | ProcessorKind::Remap { .. }
            | ProcessorKind::Numeric(_)
            | ProcessorKind::Route { .. } => None,
        }
    }

    /// The `type` as written in the config.
    pub fn type_name(&self) -> &'static str {
        match self {
            ProcessorKind::Filter { .. } => "filter",
            ProcessorKind::Remap { .. } => "remap",
            ProcessorKind::Dedup { .. } => "dedup",
            ProcessorKind::Aggregate(_) => "aggregate",
            ProcessorKind::Numeric(_) => "numeric",
            ProcessorKind::Route { .. } => "route",
        }
    }
}

fn default_dedup_ttl() -> u64 {
    60_000
}

fn default_dedup_entries() -> usize {
    1_000_000
}

/// One route.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// VRL boolean expression.
    pub condition: String,
    /// Sink names.
    pub sinks: Vec<String>,
}

/// `type = "aggregate"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Field path of the group key (e.g. `device`); all events in one group when absent.
    #[serde(default)]
    pub group_by: Option<String>,
    /// Field path of the event time in ms; the event's timestamp when absent.
    #[serde(default)]
    pub time_field: Option<String>,
    /// The window.
    pub window: WindowConfig,
    /// Bounded out-of-orderness: the watermark trails the largest event time by this.
    #[serde(default)]
    pub max_out_of_orderness_ms: u64,
    /// A window is emitted once the watermark passes its end plus this; events for it
    /// that arrive before then are still counted.
    #[serde(default)]
    pub allowed_lateness_ms: u64,
    /// Topic that late events go to (they are counted either way).
    #[serde(default)]
    pub late_topic: Option<String>,
    /// With no new events for this long (processing time), the watermark advances by
    /// the wall clock, so the last windows are emitted. 0 = never.
    #[serde(default = "default_idle")]
    pub idle_advance_ms: u64,
    /// Groups with open windows at most (per partition). At the bound, an event of a
    /// new group goes to the dead-letter topic (counted) until windows close; the
    /// windows of the groups already open stay exact.
    #[serde(default = "default_max_groups")]
    pub max_groups: usize,
    /// Open windows at most (per partition, all groups): the same policy at the bound.
    /// Bounds memory when events spread over many windows of few groups (a small
    /// window and event times spread up to `event_time.max_ahead_ms`).
    #[serde(default = "default_max_open_windows")]
    pub max_open_windows: usize,
    /// Buckets per sign a `quantile` sketch keeps at most; past it the lowest values'
    /// buckets merge (counted), so high quantiles keep their 1 % accuracy.
    #[serde(default = "default_sketch_max_buckets")]
    pub sketch_max_buckets: usize,
    /// The aggregates.
    pub functions: Vec<AggregateFunction>,
}

fn default_idle() -> u64 {
    5_000
}

fn default_max_groups() -> usize {
    100_000
}

fn default_max_open_windows() -> usize {
    1_000_000
}

fn default_sketch_max_buckets() -> usize {
    crate::processors::sketch::DEFAULT_MAX_BUCKETS
}

/// Window shapes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum WindowConfig {
    /// Fixed, non-overlapping windows of `size_ms`.
    Tumbling {
        /// Window length.
        size_ms: u64,
    },
    /// Windows of `size_ms` starting every `hop_ms`.
    Hopping {
        /// Window length.
        size_ms: u64,
        /// Distance between window starts.
        hop_ms: u64,
    },
    /// Per key, events closer than `gap_ms` share a window.
    Session {
        /// Inactivity gap that closes a session.
        gap_ms: u64,
    },
}

/// One aggregate output field.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateFunction {
    /// `count`, `sum`, `min`, `max`, `avg`, `first`, `last` or `quantile`.
    #[serde(rename = "fn")]
    pub function: String,
    /// Field path the function reads (not needed by `count`).
    #[serde(default)]
    pub field: Option<String>,
    /// For `quantile`: which (0 to 1).
    #[serde(default)]
    pub q: Option<f64>,
    /// Output field name; defaults to `<fn>_<field>`.
    #[serde(default, rename = "as")]
    pub output: Option<String>,
}

/// `type = "numeric"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumericConfig {
    /// Field path of an array of numbers.
    pub field: String,
    /// Statistics to add: any of `count`, `sum`, `min`, `max`, `mean`.
    #[serde(default = "default_stats")]
    pub stats: Vec<String>,
    /// Replace the array by `x * scale + offset` first.
    #[serde(default)]
    pub scale: Option<f64>,
    /// See `scale`.
    #[serde(default)]
    pub offset: Option<f64>,
    /// Count elements above this (output `count_above`).
    #[serde(default)]
    pub count_above: Option<f64>,
    /// Object the results go into; `<field>_stats` by default.
    #[serde(default)]
    pub output: Option<String>,
}

fn default_stats() -> Vec<String> {
    ["count", "sum", "min", "max", "mean"].map(String::from).to_vec()
}

/// A sink: the parts every sink has (its name, batching, retries, breaker), its `type`,
/// and that type's own settings.
///
/// The engine knows no sink type: `type` and `options` are handed to the
/// [`crate::SinkFactory`] (the connectors), which owns each type's settings, checks
/// them (a misspelt option is refused by name) and builds the sink. In the config they
/// are written side by side in one table:
///
/// ```toml
/// [[pipelines.sinks]]
/// name = "out"
/// type = "file"
/// path = "out"            # an option of the `file` type
/// batch = { max_events = 500 }
/// ```
#[derive(Clone, Serialize, Deserialize)]
pub struct SinkConfig {
    /// Unique within the pipeline; routes refer to it.
    pub name: String,
    /// The sink type (`file`, `topic`, …), as the connectors register it.
    #[serde(rename = "type")]
    pub kind: String,
    /// Batching toward the sink.
    #[serde(default)]
    pub batch: BatchPolicy,
    /// Retries of events the sink could not deliver for now.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// When to stop writing to a target that keeps failing.
    #[serde(default)]
    pub breaker: BreakerPolicy,
    /// Writes in flight at once.
    #[serde(default)]
    pub concurrency: ConcurrencyPolicy,
    /// Every other key of the sink's table: the settings of its type, checked by the
    /// connector of that type.
    #[serde(flatten)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

impl SinkConfig {
    /// A sink of type `kind` with these options and the default batching, retries and
    /// breaker.
    pub fn new(name: &str, kind: &str, options: serde_json::Value) -> SinkConfig {
        let options = match options {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        SinkConfig {
            name: name.to_owned(),
            kind: kind.to_owned(),
            batch: BatchPolicy::default(),
            retry: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
            concurrency: ConcurrencyPolicy::default(),
            options,
        }
    }
}

// Configs are logged with `{:?}`, and options may hold credentials (an HTTP sink's
// `auth`): only their keys are shown.
impl std::fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkConfig")
            .field("name", &self.name)
            .field("type", &self.kind)
            .field("batch", &self.batch)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker)
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// How a sink's undelivered events are retried: exponential backoff with full jitter
/// (each wait is drawn uniformly from zero to the current step, which doubles from
/// `initial_backoff_ms` up to `max_backoff_ms`), and a target's own hint (Retry-After)
/// when it asks for longer. Events whose retries run out go to the dead-letter topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts per event, the first included, before it is dead-lettered (0: no limit).
    pub max_attempts: u32,
    /// Time from an event's first failure after which it is not retried again, but
    /// dead-lettered (0: no limit).
    pub max_elapsed_ms: u64,
    /// The first backoff step.
    pub initial_backoff_ms: u64,
    /// The largest backoff step.
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 0, max_elapsed_ms: 0, initial_backoff_ms: 50, max_backoff_ms: 5_000 }
    }
}

/// A sink's circuit breaker (see the engine's `runtime/breaker.rs`): open after
/// `consecutive_failures` writes in a row that failed as a whole or came back with every
/// event retryable (0: never), or when the last 20 writes failed at a rate of at least
/// `failure_rate_percent` (raised for a sink whose writes normally fail often); stay open
/// `open_ms`, doubling after each failed probe up to `max_open_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerPolicy {
    /// Failed writes in a row that open the breaker (0: it never opens).
    pub consecutive_failures: u32,
    /// The smallest failure rate, in percent of the last 20 writes, that opens the
    /// breaker (1 to 100; 100: only failures in a row do).
    pub failure_rate_percent: u32,
    /// How long it stays open the first time.
    pub open_ms: u64,
    /// The longest it stays open.
    pub max_open_ms: u64,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy { consecutive_failures: 5, failure_rate_percent: 50, open_ms: 1_000, max_open_ms: 60_000 }
    }
}

/// How many writes a sink has in flight at once, across its instances (one per source
/// partition, each writing one batch at a time in order): a fixed `limit`; a limit the
/// sink's controller learns from write latency (`adaptive`, the default of sinks that
/// write to another system: `http`, `tcp`); or no limit but the number of instances (the
/// default of local sinks). See the engine's `runtime/controller.rs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConcurrencyPolicy {
    /// A fixed limit; overrides `adaptive`.
    pub limit: Option<u32>,
    /// Whether the limit is learned; unset: the sink type's default.
    pub adaptive: Option<bool>,
    /// The adaptive limit at the first start (later starts resume from the limit the
    /// last checkpoint holds).
    pub initial: u32,
    /// The largest adaptive limit.
    pub max: u32,
    /// How far above its floor (the lowest latency seen) write latency may rise, as a
    /// fraction of the floor, before the adaptive limit falls.
    pub latency_tolerance: f64,
}

impl Default for ConcurrencyPolicy {
    fn default() -> Self {
        ConcurrencyPolicy { limit: None, adaptive: None, initial: 1, max: 64, latency_tolerance: 0.3 }
    }
}

/// When a sink's batch is flushed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchPolicy {
    /// Flush at this many events.
    pub max_events: usize,
    /// Flush at this many bytes.
    pub max_bytes: usize,
    /// Flush when the oldest buffered event has waited this long.
    pub max_wait_ms: u64,
    /// Move `max_events` toward `target_latency_ms` per write, within bounds.
    pub adaptive: bool,
    /// The write latency adaptive batching aims for.
    pub target_latency_ms: u64,
    /// Lower bound of adaptive `max_events`.
    pub min_events: usize,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            max_events: 10_000,
            max_bytes: 4 << 20,
            max_wait_ms: 50,
            adaptive: false,
            target_latency_ms: 20,
            min_events: 100,
        }
    }
}
