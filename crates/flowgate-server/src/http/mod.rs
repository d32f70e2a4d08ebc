//! The HTTP API (axum): produce and read events, topics, metrics, health.
//!
//! [`listener`] applies the connection limit and idle timeout to HTTP connections.

pub mod listener;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flowgate_core::{BatchBuilder, BatchView};
use flowgate_log::LogError;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::ingest::Scratch;
use crate::metrics::IngestPath;
use crate::ndjson::is_json_object;
use crate::shared::Shared;

/// The API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.max_http_body_bytes;
    Router::new()
        .route("/v1/topics/{topic}/events", get(read_events).post(post_events))
        .route("/v1/topics", get(list_topics))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/", get(index))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn log_error(e: LogError) -> Response {
    let status = match &e {
        LogError::UnknownTopic(_) | LogError::UnknownPartition { .. } => StatusCode::NOT_FOUND,
        LogError::InvalidTopicName { .. } | LogError::InvalidBatch(_) | LogError::OffsetOutOfRange { .. } => {
            StatusCode::BAD_REQUEST
        }
        LogError::TopicExists(_) => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.to_string())
}

/// Splits a body into event payloads: a JSON array of objects, or NDJSON. The first
/// problem is reported with its position; nothing is accepted from a bad body.
fn parse_body(body: &[u8]) -> Result<Vec<&[u8]>, String> {
    let first = body.iter().position(|b| !b.is_ascii_whitespace());
    match first {
        None => Err("the body holds no events".into()),
        Some(i) if body[i] == b'[' => {
            let items: Vec<&RawValue> =
                serde_json::from_slice(body).map_err(|e| format!("the body is not a valid JSON array: {e}"))?;
            if items.is_empty() {
                return Err("the array holds no events".into());
            }
            items
                .iter()
                .enumerate()
                .map(|(i, raw)| {
                    let text = raw.get().as_bytes();
                    if text.first() == Some(&b'{') {
                        Ok(text)
                    } else {
                        Err(format!("element {i} is not a JSON object"))
                    }
                })
                .collect()
        }
        Some(_) => {
            let mut out = Vec::new();
            for (n, line) in body.split(|&b| b == b'\n').enumerate() {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                if !is_json_object(line) {
                    return Err(format!("line {} is not a JSON object", n + 1));
                }
                out.push(line);
            }
            if out.is_empty() {
                return Err("the body holds no events".into());
            }
            Ok(out)
        }
    }
}

async fn post_events(State(shared): State<Arc<Shared>>, Path(topic_name): Path<String>, body: Bytes) -> Response {
    let metrics = shared.ingest.metrics();
    let events = match parse_body(&body) {
        Ok(events) => events,
        Err(message) => {
            metrics.rejected(IngestPath::Http, "invalid_body", 1);
            return error(StatusCode::BAD_REQUEST, message);
        }
    };
    let topic = match shared.ingest.topic(&topic_name) {
        Ok(t) => t,
        Err(e) => return log_error(e),
    };
    let now = flowgate_core::time::now_ms();
    let mut builder = BatchBuilder::with_capacity(body.len() + events.len() * 8);
    let mut bytes = 0u64;
    for e in &events {
        builder.push_payload(now, None, e);
        bytes += e.len() as u64;
    }
    let mut scratch = Scratch::default();
    let written = match shared.ingest.append_built(&topic, &mut builder, &mut scratch) {
        Ok(w) => w,
        Err(e) => return log_error(e),
    };
    if let Err(e) = written.durable().await {
        return log_error(e);
    }
    metrics.topic_counters(&topic_name, IngestPath::Http).accepted(events.len() as u64, bytes);
    let ack = written.acks()[0];
    let last = ack.first_offset + u64::from(ack.record_count) - 1;
    Json(json!({"accepted": ack.record_count, "offsets": [ack.first_offset, last], "partition": ack.partition}))
        .into_response()
}

#[derive(Deserialize)]
struct ReadQuery {
    from: Option<String>,
    limit: Option<usize>,
    partition: Option<u32>,
}

async fn read_events(
    State(shared): State<Arc<Shared>>,
    Path(topic_name): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Response {
    let Some(topic) = shared.ingest.log().topic(&topic_name) else {
        return log_error(LogError::UnknownTopic(topic_name));
    };
    let partition = match topic.partition(q.partition.unwrap_or(0)) {
        Ok(p) => p.clone(),
        Err(e) => return log_error(e),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let from = match q.from.as_deref() {
        None | Some("earliest") => partition.start_offset(),
        Some("latest") => partition.end_offset(),
        Some(s) => match s.parse::<u64>() {
            Ok(o) => o,
            Err(_) => return error(StatusCode::BAD_REQUEST, "from must be an offset, 'earliest' or 'latest'"),
        },
    };
    let mut events = Vec::new();
    let mut next = from;
    let mut scratch = Vec::new();
    while events.len() < limit && next < partition.end_offset() {
        let read = match partition.read(next, 256 * 1024) {
            Ok(r) => r,
            Err(e) => return log_error(e),
        };
        if read.batches.is_empty() {
            break;
        }
        let mut rest = &read.batches[..];
        while !rest.is_empty() && events.len() < limit {
            let (view, tail) = match BatchView::parse(rest) {
                Ok(v) => v,
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("stored batch unreadable: {e}")),
            };
            let records = match view.records(&mut scratch) {
                Ok(r) => r,
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("stored batch unreadable: {e}")),
            };
            for record in records {
                let Ok(record) = record else { break };
                let offset = view.base_offset() + u64::from(record.offset_delta);
                if offset < next || events.len() >= limit {
                    continue;
                }
                let payload = serde_json::from_slice::<serde_json::Value>(record.payload).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(record.payload).into_owned())
                });
                events.push(json!({
                    "offset": offset,
                    "timestamp": record.timestamp,
                    "key": record.key.map(|k| String::from_utf8_lossy(k).into_owned()),
                    "payload": payload,
                }));
                next = offset + 1;
            }
            rest = tail;
        }
    }
    Json(json!({
        "topic": topic_name,
        "partition": partition.id(),
        "events": events,
        "next_offset": next,
        "log_end_offset": partition.end_offset(),
    }))
    .into_response()
}

async fn list_topics(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({"topics": shared.ingest.log().topic_infos()})).into_response()
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    let topics = shared.ingest.log().topic_infos();
    let reasons = shared.not_ready_reasons();
    let workers = shared.pipelines.get().map(|h| h.workers()).unwrap_or_default();
    Json(json!({
        "uptime_secs": shared.started.elapsed().as_secs(),
        "ready": reasons.is_empty(),
        "not_ready_reasons": reasons,
        "connections_available": shared.connections.available_permits(),
        "topics": topics,
        "retention": {"unread_deleted_events": shared.ingest.log().unread_deleted_events()},
        "pipeline_workers": workers,
    }))
    .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let text = shared.ingest.metrics().render(shared.ingest.log());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
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

async fn index() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        "<!doctype html><title>flowgate</title><h1>flowgate</h1><ul>\
         <li><a href=\"/v1/topics\">/v1/topics</a></li><li><a href=\"/v1/stats\">/v1/stats</a></li>\
         <li><a href=\"/metrics\">/metrics</a></li><li><a href=\"/health\">/health</a></li></ul>",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::parse_body;

    #[test]
    fn bodies_are_arrays_or_ndjson_and_errors_say_where() {
        assert_eq!(parse_body(br#"[{"a":1}, {"b":[2]}]"#).unwrap(), vec![&br#"{"a":1}"#[..], br#"{"b":[2]}"#]);
        assert_eq!(parse_body(b"{\"a\":1}\n\n{\"b\":2}\r\n").unwrap().len(), 2);
        assert!(parse_body(b"{\"a\":1}\n{oops\n").unwrap_err().contains("line 2"));
        assert!(parse_body(b"[{\"a\":1}, 3]").unwrap_err().contains("element 1"));
        assert!(parse_body(b"[{\"a\":1}").is_err());
        assert!(parse_body(b"  ").is_err());
        assert!(parse_body(b"[]").is_err());
    }
}
