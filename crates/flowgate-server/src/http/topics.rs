//! The topic routes: `POST /v1/topics` (create, with settings), `GET /v1/topics/{topic}`
//! (describe), `PATCH /v1/topics/{topic}` (change settings) and
//! `GET /v1/topics/{topic}/events` (read events, as payloads or whole envelopes, of one
//! key or all). `docs/topics.md` documents them.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flowgate_core::BatchView;
use flowgate_log::{LogError, Partition};
use serde::Deserialize;
use serde_json::json;

use super::{error, log_error};
use crate::envelope::{envelope, PayloadJson};
use crate::shared::Shared;
use crate::topic_admin::{self, Op};
use crate::topic_request::{self, ReadFormat, ReadFrom, ReadParams, MAX_BODY_BYTES};

/// Batch bytes one read scans at most, matching or not: a key filter that matches
/// nothing stops here and answers where to go on (`next_offset`).
pub const MAX_SCAN_BYTES: usize = 64 << 20;

/// Batch bytes read from the log at a time.
const READ_CHUNK: usize = 256 * 1024;

/// A refusal of what a request asked: counted, and answered with `status`.
fn refused(shared: &Shared, op: Op, reason: &str, status: StatusCode, message: impl Into<String>) -> Response {
    shared.ingest.metrics().topic_api_rejected(op, reason);
    error(status, message)
}

/// A log error, counted when it is the sender's.
fn failed(shared: &Shared, op: Op, e: LogError) -> Response {
    topic_admin::count_rejection(shared, op, &e);
    log_error(e)
}

/// Reads a small request body, charged to the ingest budget before it is read.
async fn small_body(shared: &Shared, op: Op, body: Body) -> Result<Vec<u8>, Response> {
    let mut charge = shared.charge();
    let deadline = tokio::time::Instant::now() + shared.frame_timeout();
    match tokio::time::timeout_at(deadline, charge.grow_to(MAX_BODY_BYTES)).await {
        Ok(Ok(())) => {}
        Ok(Err(over)) => return Err(error(StatusCode::SERVICE_UNAVAILABLE, over.to_string())),
        Err(_) => {
            return Err(error(StatusCode::SERVICE_UNAVAILABLE, "the server's ingest buffers are full; retry later"))
        }
    }
    match tokio::time::timeout_at(deadline, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => Ok(bytes.to_vec()),
        Ok(Err(_)) => Err(refused(
            shared,
            op,
            "invalid_body",
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {MAX_BODY_BYTES} bytes or could not be read"),
        )),
        Err(_) => Err(refused(
            shared,
            op,
            "body_timeout",
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive whole within ingest.frame_timeout_secs",
        )),
    }
}

/// `POST /v1/topics`: creates a topic, answering 201 with its description.
pub async fn create(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let body = match small_body(&shared, Op::Create, request.into_body()).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let create = match topic_request::parse_create(&body) {
        Ok(c) => c,
        Err(message) => return refused(&shared, Op::Create, "invalid_body", StatusCode::BAD_REQUEST, message),
    };
    if let Err(e) = topic_admin::create(&shared, &create.name, create.partitions, &create.settings).await {
        return failed(&shared, Op::Create, e);
    }
    match topic_admin::describe(&shared, &create.name) {
        Ok(d) => (StatusCode::CREATED, Json(topic_admin::description_json(&d))).into_response(),
        Err(e) => log_error(e),
    }
}

/// `PATCH /v1/topics/{topic}`: changes settings (a JSON merge patch: null returns a
/// setting to the default); answers every setting before and after.
pub async fn alter(State(shared): State<Arc<Shared>>, Path(topic): Path<String>, request: Request) -> Response {
    let body = match small_body(&shared, Op::Alter, request.into_body()).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let updates = match topic_request::parse_alter(&body) {
        Ok(u) => u,
        Err(message) => return refused(&shared, Op::Alter, "invalid_body", StatusCode::BAD_REQUEST, message),
    };
    match topic_admin::alter(&shared, &topic, &updates).await {
        Ok((before, after)) => Json(json!({
            "name": topic,
            "before": topic_admin::settings_json(&before),
            "after": topic_admin::settings_json(&after),
        }))
        .into_response(),
        Err(e) => failed(&shared, Op::Alter, e),
    }
}

/// `GET /v1/topics/{topic}`: settings, partitions, segments, consumers.
pub async fn describe(State(shared): State<Arc<Shared>>, Path(topic): Path<String>) -> Response {
    match topic_admin::describe(&shared, &topic) {
        Ok(d) => Json(topic_admin::description_json(&d)).into_response(),
        Err(e) => failed(&shared, Op::Describe, e),
    }
}

/// The query of a read, each parameter as given.
#[derive(Deserialize)]
pub struct ReadQuery {
    from: Option<String>,
    limit: Option<String>,
    partition: Option<String>,
    format: Option<String>,
    key: Option<String>,
}

/// `GET /v1/topics/{topic}/events?from=&limit=&partition=&format=&key=`: events of one
/// partition from an offset. A reply holds at most `limit` events and about one request
/// body's worth of their bytes, and scans at most [`MAX_SCAN_BYTES`] of batches;
/// `next_offset` says where to go on.
pub async fn read_events(
    State(shared): State<Arc<Shared>>,
    Path(topic_name): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Response {
    let params = match topic_request::parse_read(
        q.from.as_deref(),
        q.limit.as_deref(),
        q.partition.as_deref(),
        q.format.as_deref(),
        q.key.as_deref(),
    ) {
        Ok(p) => p,
        Err(message) => return refused(&shared, Op::Read, "invalid_query", StatusCode::BAD_REQUEST, message),
    };
    let Some(topic) = shared.ingest.log().topic(&topic_name) else {
        return failed(&shared, Op::Read, LogError::UnknownTopic(topic_name));
    };
    let partition = match topic.partition(params.partition) {
        Ok(p) => p.clone(),
        Err(e) => return failed(&shared, Op::Read, e),
    };
    let from = match params.from {
        ReadFrom::Earliest => partition.start_offset(),
        ReadFrom::Latest => partition.end_offset(),
        ReadFrom::Offset(o) => o,
    };
    let max_bytes = shared.config.max_http_body_bytes;
    // At most two scans at once, off the async threads: each holds up to one reply and
    // one read chunk.
    let Ok(_permit) = READS.acquire().await else { unreachable!("the semaphore is never closed") };
    let scan = tokio::task::spawn_blocking(move || {
        let scanned = scan(&topic_name, &partition, from, &params, max_bytes);
        (scanned, topic_name, partition)
    });
    let (scanned, topic_name, partition) = match scan.await {
        Ok(done) => done,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("the read failed: {e}")),
    };
    let (events, next) = match scanned {
        Ok(done) => done,
        Err(Unreadable::Log(e)) => return failed(&shared, Op::Read, e),
        Err(Unreadable::Batch(message)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("stored batch unreadable: {message}; run `flowgate log check`"),
            )
        }
    };
    let mut body = Vec::with_capacity(events.len() + 160);
    body.extend_from_slice(b"{\"topic\":");
    serde_json::to_writer(&mut body, &topic_name).expect("a string serializes");
    body.extend_from_slice(format!(",\"partition\":{},\"events\":[", partition.id()).as_bytes());
    body.extend_from_slice(&events);
    drop(events);
    let end = partition.end_offset();
    body.extend_from_slice(format!("],\"next_offset\":{next},\"log_end_offset\":{end}}}").as_bytes());
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Reads of events running at once.
static READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Why a scan stopped short.
enum Unreadable {
    Log(LogError),
    Batch(String),
}

/// An event of a `format=payload` read.
#[derive(serde::Serialize)]
struct PayloadEvent<'a> {
    offset: u64,
    timestamp: i64,
    key: Option<std::borrow::Cow<'a, str>>,
    payload: PayloadJson<'a>,
}

/// The events of `partition` from `from` as a comma-separated list of JSON objects,
/// and the offset to go on from: at most `params.limit` events, stopping once the list
/// reaches `max_bytes` (one event may pass it) or [`MAX_SCAN_BYTES`] were scanned.
fn scan(
    topic_name: &str,
    partition: &Partition,
    from: u64,
    params: &ReadParams,
    max_bytes: usize,
) -> Result<(Vec<u8>, u64), Unreadable> {
    let mut events: Vec<u8> = Vec::new();
    let mut count = 0usize;
    let mut next = from;
    let mut scanned = 0usize;
    let mut scratch = Vec::new();
    let bad = |e: &dyn std::fmt::Display| Unreadable::Batch(e.to_string());
    'scan: while count < params.limit
        && events.len() < max_bytes
        && scanned < MAX_SCAN_BYTES
        && next < partition.end_offset()
    {
        let read = partition.read(next, READ_CHUNK).map_err(Unreadable::Log)?;
        if read.batches.is_empty() {
            break;
        }
        scanned = scanned.saturating_add(read.batches.len());
        let started_at = next;
        let mut rest = &read.batches[..];
        while !rest.is_empty() {
            let (view, tail) = BatchView::parse(rest).map_err(|e| bad(&e))?;
            for record in view.records(&mut scratch).map_err(|e| bad(&e))? {
                let record = record.map_err(|e| bad(&e))?;
                let offset = view.base_offset().saturating_add(u64::from(record.offset_delta));
                if offset < next {
                    continue;
                }
                if count >= params.limit || events.len() >= max_bytes {
                    break 'scan;
                }
                next = offset.saturating_add(1);
                if params.key.as_deref().is_some_and(|k| record.key != Some(k)) {
                    continue;
                }
                if count > 0 {
                    events.push(b',');
                }
                let written = match params.format {
                    ReadFormat::Envelope => {
                        serde_json::to_writer(&mut events, &envelope(topic_name, partition.id(), offset, &record))
                    }
                    ReadFormat::Payload => {
                        let payload = match PayloadJson::of(record.payload) {
                            PayloadJson::Bytes(_) => {
                                PayloadJson::Bytes(String::from_utf8_lossy(record.payload).into_owned().into())
                            }
                            json => json,
                        };
                        let event = PayloadEvent {
                            offset,
                            timestamp: record.timestamp,
                            key: record.key.map(String::from_utf8_lossy),
                            payload,
                        };
                        serde_json::to_writer(&mut events, &event)
                    }
                };
                written.expect("an event serializes to a vector");
                count += 1;
            }
            rest = tail;
        }
        if next == started_at {
            // Whole batches that held nothing at or after `next`: never spin on them.
            break;
        }
    }
    Ok((events, next))
}
