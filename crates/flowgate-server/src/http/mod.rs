//! The HTTP API (axum): produce events, topics ([`topics`]: create, change, describe,
//! read events), the dead-letter topic ([`dlq`]), pipelines ([`pipelines`]), metrics,
//! health.
//!
//! [`listener`] applies the connection limit and idle timeout to HTTP connections. A
//! produce body is read into memory charged to the ingest budget as it arrives, and must
//! arrive whole within `ingest.frame_timeout_secs`.

mod dashboard;
pub mod dlq;
pub mod listener;
pub mod pipelines;
mod produce;
pub mod topics;

use std::sync::Arc;

use axum::body::{Body, HttpBody};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flowgate_core::BatchBuilder;
use flowgate_log::LogError;
use serde::Deserialize;
use serde_json::json;

use crate::budget::Charge;
use crate::ingest::Scratch;
use crate::metrics::{IngestPath, Metrics};
use crate::shared::Shared;
use crate::trace::IngestTrace;

/// The API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.max_http_body_bytes;
    Router::new()
        .route("/v1/topics/{topic}/events", get(topics::read_events).post(post_events))
        .route("/v1/topics/{topic}", get(topics::describe).patch(topics::alter))
        .route("/v1/topics", get(list_topics).post(topics::create))
        .route("/v1/stats", get(stats))
        .route("/v1/stats/stream", get(stats_stream))
        .route("/v1/alerts", get(alerts))
        .route("/v1/reload", axum::routing::post(reload))
        .route("/v1/pipelines", get(pipelines::list))
        .route("/v1/pipelines/{name}", get(pipelines::show))
        .route("/v1/pipelines/{name}/pause", axum::routing::post(pipelines::pause))
        .route("/v1/pipelines/{name}/resume", axum::routing::post(pipelines::resume))
        .route("/v1/pipelines/{name}/reset", axum::routing::post(pipelines::reset))
        .route("/v1/dlq", get(dlq::list))
        .route("/v1/dlq/stats", get(dlq::stats))
        .route("/v1/dlq/replay", axum::routing::post(dlq::replay))
        .route("/v1/dlq/replayed", get(dlq::replayed_marks))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/", get(dashboard::index))
        .route("/dashboard/{file}", get(dashboard::asset))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn log_error(e: LogError) -> Response {
    error(log_status(&e), e.to_string())
}

/// The status that answers a storage error.
fn log_status(e: &LogError) -> StatusCode {
    match e {
        LogError::UnknownTopic(_) | LogError::UnknownPartition { .. } => StatusCode::NOT_FOUND,
        LogError::InvalidTopicName { .. }
        | LogError::InvalidSetting { .. }
        | LogError::InvalidBatch(_)
        | LogError::OffsetOutOfRange { .. } => StatusCode::BAD_REQUEST,
        LogError::TopicExists(_) => StatusCode::CONFLICT,
        // A limit the operator set: retrying does not help until topics are deleted.
        LogError::PartitionLimit { .. } => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Answers a refused produce request, `{"error": …, "reason": …}`, counted in
/// `flowgate_ingest_rejected_total{path="http",reason}`.
fn refuse(metrics: &Metrics, status: StatusCode, reason: &'static str, message: impl Into<String>) -> Response {
    metrics.rejected(IngestPath::Http, reason, 1);
    (status, Json(json!({"error": message.into(), "reason": reason}))).into_response()
}

/// Answers a produce request the log refused, counted like every refusal.
fn refuse_stored(metrics: &Metrics, e: LogError) -> Response {
    let reason = match &e {
        LogError::UnknownTopic(_) => "unknown_topic",
        LogError::InvalidTopicName { .. } => "invalid_topic",
        LogError::PartitionLimit { .. } => "partition_limit",
        LogError::Closed => "shutting_down",
        _ => "storage_error",
    };
    refuse(metrics, log_status(&e), reason, e.to_string())
}

/// Answers a keyed request whose split failed after some partitions' parts were stored:
/// once those parts are durable (else it is a plain storage error), 500 with
/// `reason="partially_stored"` and the parts stored, in the shape of a success's
/// `partitions`. The stored events count as accepted.
async fn partly_stored(metrics: &Metrics, topic_name: &str, e: LogError, (events, bytes): (u64, u64)) -> Response {
    let LogError::PartiallyStored { stored, failed_partition, source } = e else { return refuse_stored(metrics, e) };
    if let Err(e) = stored.durable().await {
        return refuse_stored(metrics, e);
    }
    metrics.topic_counters(topic_name, IngestPath::Http).accepted_part(stored.events(), events, bytes);
    metrics.rejected(IngestPath::Http, "partially_stored", 1);
    let mut body = json!({
        "error": format!(
            "stored only in part: partition {failed_partition} failed ({source}); the events of the \
             partitions listed in `stored` were stored, the others were not"
        ),
        "reason": "partially_stored",
        "failed_partition": failed_partition,
    });
    body["stored"] = produce::answer(&stored);
    (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
}

/// Reads a request body into memory charged to the ingest budget as it arrives, within
/// `ingest.max_http_body_bytes` and `ingest.frame_timeout_secs` of the handler starting
/// to read it, whatever length the client announces.
async fn read_body(shared: &Shared, mut body: Body, charge: &mut Charge) -> Result<Vec<u8>, Response> {
    let metrics = shared.ingest.metrics();
    let limit = shared.config.max_http_body_bytes;
    let too_large = |metrics: &Metrics| {
        refuse(
            metrics,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is over {limit} bytes (ingest.max_http_body_bytes); send smaller requests"),
        )
    };
    if usize::try_from(body.size_hint().lower()).map_or(true, |announced| announced > limit) {
        return Err(too_large(metrics));
    }
    let deadline = tokio::time::Instant::now() + shared.frame_timeout();
    let timed_out = |metrics: &Metrics| {
        refuse(
            metrics,
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the body did not arrive whole within ingest.frame_timeout_secs",
        )
    };
    let mut out: Vec<u8> = Vec::new();
    loop {
        let next = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx));
        let frame = match tokio::time::timeout_at(deadline, next).await {
            Err(_) => return Err(timed_out(metrics)),
            Ok(None) => return Ok(out),
            Ok(Some(Err(e))) => {
                return Err(refuse(
                    metrics,
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    format!("the body could not be read: {e}"),
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        let len = out.len().saturating_add(data.len());
        if len > limit {
            return Err(too_large(metrics));
        }
        if len > out.capacity() {
            // Double as bytes arrive (never past the limit), charged before allocating.
            let target = len.max(out.capacity().saturating_mul(2)).min(limit).max(len);
            match tokio::time::timeout_at(deadline, charge.grow_to(target)).await {
                Ok(Ok(())) => out.reserve_exact(target - out.len()),
                Ok(Err(over)) => {
                    return Err(refuse(
                        metrics,
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "over_budget",
                        format!("{over}; send smaller requests"),
                    ));
                }
                Err(_) => return Err(timed_out(metrics)),
            }
        }
        out.extend_from_slice(&data);
    }
}

/// `POST /v1/topics/{topic}/events`, traced (docs/tracing.md) when tracing is on and the
/// request's `traceparent` or the sample ratio says so.
async fn post_events(State(shared): State<Arc<Shared>>, Path(topic_name): Path<String>, request: Request) -> Response {
    // The one check per request tracing costs while it is off.
    let trace = if flowgate_engine::trace::enabled() {
        crate::trace::ingest(request.headers(), &topic_name, shared.ingest.metrics())
    } else {
        None
    };
    let response = produce(&shared, &topic_name, request, trace.as_ref()).await;
    if let Some(trace) = trace {
        trace.finish(response.status());
    }
    response
}

/// Stores the events of a produce request's body; answers once they are durable.
async fn produce(shared: &Arc<Shared>, topic_name: &str, request: Request, trace: Option<&IngestTrace>) -> Response {
    let metrics = shared.ingest.metrics();
    let (parts, body) = request.into_parts();
    let plan = match produce::Plan::new(&shared.fields, &parts.uri, &parts.headers) {
        Ok(plan) => plan,
        Err(refusal) => return refusal.respond(metrics),
    };
    // Under pressure the body is not read until there is room again (or, at the limit
    // under `reject`, the request is refused unread).
    crate::memory::pause_while_pressed(shared, IngestPath::Http).await;
    if crate::memory::should_refuse(shared) {
        let mut response = refuse(metrics, StatusCode::SERVICE_UNAVAILABLE, "memory_pressure", crate::memory::REFUSED);
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    }
    if shared.shutdown.is_cancelled() && crate::memory::should_pause(shared) {
        // The pause ended with the shutdown, not with room.
        return refuse(metrics, StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the server is shutting down");
    }
    let mut charge = shared.charge();
    let body = match read_body(shared, body, &mut charge).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    // The batch's records, then its encoded copy while it is appended, are charged
    // before they are allocated, for as many events as the body could hold (and the
    // `traceparent` header the request's first events carry when it is traced). A
    // request that may be split by key needs four copies besides the records: the whole
    // batch, its records decompressed, the per-partition builders and one encoded part;
    // a compressed topic's codec needs its own buffers on top.
    let traced = trace.map(|t| (t.header(), produce::partitions_of(shared, topic_name)));
    let records = plan.records_len(body.len(), crate::parse::max_events(&body), traced.map(|(_, p)| p));
    let copies = if plan.may_split() { 5 } else { 2 } + produce::compression_copies(shared, topic_name);
    let working = body.capacity().saturating_add(records.saturating_mul(copies));
    match tokio::time::timeout(shared.frame_timeout(), charge.grow_to(working)).await {
        Ok(Ok(())) => {}
        Ok(Err(over)) => {
            return refuse(
                metrics,
                StatusCode::PAYLOAD_TOO_LARGE,
                "over_budget",
                format!("storing this body needs {over}; send smaller requests"),
            );
        }
        Err(_) => {
            return refuse(
                metrics,
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the server's ingest buffers are full; retry later",
            );
        }
    }
    let mut builder = BatchBuilder::with_capacity(records);
    let filled = match plan.fill(&body, &mut builder, flowgate_core::time::now_ms(), traced) {
        Ok(filled) => filled,
        Err(refusal) => return refusal.respond(metrics),
    };
    let (accepted, bytes) = (filled.events, filled.bytes);
    drop(body);
    if let Some(trace) = trace {
        trace.parsed(accepted, bytes);
    }
    // Only a good body may create a topic.
    let topic = match shared.ingest.topic(topic_name) {
        Ok(t) => t,
        Err(e) => return refuse_stored(metrics, e),
    };
    let append = trace.map(|t| t.append(topic_name, accepted));
    let mut scratch = Scratch::default();
    let result = shared.ingest.append_built(&topic, filled.route(), &mut builder, &mut scratch);
    drop((builder, scratch, charge));
    let written = match result {
        Ok(w) => w,
        Err(e) => {
            append.as_ref().inspect(|s| crate::trace::failed(s));
            return partly_stored(metrics, topic_name, e, (accepted, bytes)).await;
        }
    };
    if let Err(e) = written.durable().await {
        append.as_ref().inspect(|s| crate::trace::failed(s));
        return refuse_stored(metrics, e);
    }
    metrics.topic_counters(topic_name, IngestPath::Http).accepted(accepted, bytes);
    if let (Some(trace), Some(append)) = (trace, append) {
        // Split across partitions, the spans name the first part.
        let ack = written.acks()[0];
        trace.stored(&append, ack.partition, ack.first_offset, ack.first_offset + u64::from(ack.record_count) - 1);
    }
    Json(produce::answer(&written)).into_response()
}

async fn list_topics(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({"topics": shared.ingest.log().topic_infos()})).into_response()
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    Json(stats_document(&shared, true)).into_response()
}

/// `GET /v1/alerts`: active and recently resolved alerts (docs/alerts.md).
async fn alerts(State(shared): State<Arc<Shared>>) -> Response {
    let body = shared.alerts.get().map_or_else(|| json!({"active": [], "resolved": [], "rules": 0}), |a| a.to_json());
    Json(body).into_response()
}

/// The document of `GET /v1/stats`, with the active alerts when `with_alerts` (the
/// alert rules read it without, as they are evaluated).
pub(crate) fn stats_document(shared: &Shared, with_alerts: bool) -> serde_json::Value {
    let mut doc = stats_json(shared);
    if with_alerts {
        doc["alerts"] = json!(shared.alerts.get().map(|a| a.active()).unwrap_or_default());
    }
    doc
}

/// `POST /v1/reload`: reads the config file again and applies it; answers with what
/// changed, or with why the new config was refused (the old one stays).
async fn reload(State(shared): State<Arc<Shared>>) -> Response {
    use crate::reload::ReloadError;
    match crate::reload::reload_from_source(&shared).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => {
            let status = match e {
                ReloadError::Invalid(_) => StatusCode::BAD_REQUEST,
                ReloadError::NoSource => StatusCode::CONFLICT,
                ReloadError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                ReloadError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, Json(json!({"error": e.to_string()}))).into_response()
        }
    }
}

/// Everything `/metrics` writes, in OpenMetrics.
pub(crate) fn metrics_text(shared: &Shared) -> String {
    shared.ingest.metrics().observe_memory(&shared.memory);
    let mut text = shared.ingest.metrics().render(shared.ingest.log());
    let sources = shared.sources.read().clone();
    if !sources.is_empty() {
        // Before the OpenMetrics end marker, which must come last.
        let end = text.rfind("# EOF").unwrap_or(text.len());
        let mut extra = String::new();
        flowgate_connectors::sources::SourceStatus::render_metrics(&sources, &mut extra);
        text.insert_str(end, &extra);
    }
    text
}

/// Streams open at once at most: each holds a connection and renders the stats.
const MAX_STATS_STREAMS: usize = 64;

/// Streams one client address may hold at once, so that one client cannot take them all.
const MAX_STATS_STREAMS_PER_CLIENT: usize = 8;

/// Open streams, by client address.
static STATS_STREAMS: std::sync::LazyLock<parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
    std::sync::LazyLock::new(Default::default);

/// A stream's place, given back when it ends.
struct StreamPlace(std::net::IpAddr);

impl StreamPlace {
    /// A place for a stream of `client`, or the answer that there is none.
    fn take(client: std::net::IpAddr) -> Result<StreamPlace, String> {
        let mut open = STATS_STREAMS.lock();
        if open.values().sum::<usize>() >= MAX_STATS_STREAMS {
            return Err(format!("{MAX_STATS_STREAMS} stats streams are open already; try again later"));
        }
        let mine = open.entry(client).or_default();
        if *mine >= MAX_STATS_STREAMS_PER_CLIENT {
            return Err(format!(
                "this client has {MAX_STATS_STREAMS_PER_CLIENT} stats streams open already; close one or try again later"
            ));
        }
        *mine += 1;
        Ok(StreamPlace(client))
    }
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        let mut open = STATS_STREAMS.lock();
        if let Some(n) = open.get_mut(&self.0) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.0);
            }
        }
    }
}

#[derive(Deserialize)]
struct StreamQuery {
    interval_ms: Option<u64>,
}

/// `GET /v1/stats/stream`: server-sent events, one `stats` event holding the document
/// of `/v1/stats` every `interval_ms` (default 1000, 100 to 60000), until the client
/// goes or the engine stops.
async fn stats_stream(
    State(shared): State<Arc<Shared>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<listener::Peer>,
    Query(q): Query<StreamQuery>,
) -> Response {
    let interval = q.interval_ms.unwrap_or(1000);
    if !(100..=60_000).contains(&interval) {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "interval_ms must be from 100 to 60000"})))
            .into_response();
    }
    let place = match StreamPlace::take(peer.0.ip()) {
        Ok(place) => place,
        Err(error) => {
            return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "5")], Json(json!({"error": error})))
                .into_response()
        }
    };
    let headers = [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")];
    if interval == 1000 {
        // Every stream at the default interval shares one document a second.
        let feed = stats_feed(&shared);
        let events = futures_util::stream::unfold((shared, feed, place), |(shared, mut feed, place)| async move {
            tokio::select! {
                changed = feed.changed() => changed.ok()?,
                _ = shared.shutdown.cancelled() => return None,
            }
            let frame = feed.borrow_and_update().clone();
            Some((Ok::<_, std::convert::Infallible>(frame), (shared, feed, place)))
        });
        return (headers, Body::from_stream(events)).into_response();
    }
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(interval));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = (shared, ticks, place);
    let events = futures_util::stream::unfold(state, |(shared, mut ticks, place)| async move {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shared.shutdown.cancelled() => return None,
        }
        Some((Ok::<_, std::convert::Infallible>(stats_frame(&shared)), (shared, ticks, place)))
    });
    (headers, Body::from_stream(events)).into_response()
}

/// One server-sent event holding the stats document.
fn stats_frame(shared: &Shared) -> axum::body::Bytes {
    axum::body::Bytes::from(format!("event: stats\ndata: {}\n\n", stats_document(shared, true)))
}

/// The feed of one stats event a second, started at its first use; it ends with the
/// engine.
fn stats_feed(shared: &Arc<Shared>) -> tokio::sync::watch::Receiver<axum::body::Bytes> {
    shared
        .stats_feed
        .get_or_init(|| {
            let (tx, rx) = tokio::sync::watch::channel(axum::body::Bytes::new());
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        _ = shared.shutdown.cancelled() => return,
                    }
                    if tx.send(stats_frame(&shared)).is_err() {
                        return;
                    }
                }
            });
            rx
        })
        .clone()
}

/// The document of `GET /v1/stats`.
fn stats_json(shared: &Shared) -> serde_json::Value {
    let topics = shared.ingest.log().topic_infos();
    let reasons = shared.not_ready_reasons();
    let workers = shared.pipelines.get().map(|h| h.workers()).unwrap_or_default();
    let sinks = shared.pipelines.get().map(|h| h.sinks()).unwrap_or_default();
    let controllers = shared.pipelines.get().map(|h| h.controllers()).unwrap_or_default();
    json!({
        "uptime_secs": shared.started.elapsed().as_secs(),
        "ready": reasons.is_empty(),
        "not_ready_reasons": reasons,
        "connections_available": shared.connections.available_permits(),
        "topics": topics,
        "retention": {"unread_deleted_events": shared.ingest.log().unread_deleted_events()},
        "pipeline_workers": workers,
        "pipeline_sinks": sinks,
        "sink_controllers": controllers,
        "memory": shared.memory.stats(),
        "throughput": crate::throughput::global().to_json(),
        "latency": crate::throughput::global().latency_json(),
        "sources": shared.sources.read().iter().map(|s| s.to_json()).collect::<Vec<_>>(),
        "flow": dashboard::flow_json(shared),
        "tracing": crate::trace::stats_json(),
    })
}

/// `GET /metrics`: OpenMetrics to a scraper that asks for it (Prometheus does), the
/// Prometheus text format 0.0.4 to any other, each with its own content type.
async fn metrics(State(shared): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    let text = metrics_text(&shared);
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if crate::metrics::wants_openmetrics(accept) {
        ([(header::CONTENT_TYPE, crate::metrics::OPENMETRICS_CONTENT_TYPE)], text).into_response()
    } else {
        let text = crate::metrics::openmetrics_to_text(&text);
        ([(header::CONTENT_TYPE, crate::metrics::TEXT_CONTENT_TYPE)], text).into_response()
    }
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let reasons = shared.not_ready_reasons();
    if reasons.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "error": "not ready", "reasons": reasons})),
        )
            .into_response()
    }
}
