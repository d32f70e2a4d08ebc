//! `GET /v1/dlq` and `GET /v1/dlq/stats`: the dead-letter topic over HTTP, with the
//! filters of `flowgate dlq` (`pipeline`, `category`, `since` in ms since the epoch).
//! Entries carry `replayed` and the stats count them once pipelines run (the marks are
//! theirs). `POST /v1/dlq/replay` replays entries ([`flowgate_engine::runtime::replay`]);
//! `GET /v1/dlq/replayed` lists the marks, for `flowgate dlq list` and `stats`.
//!
//! A listing holds at most `limit` entries (default 100, at most 10,000) and about one
//! request body's worth of bytes (`ingest.max_http_body_bytes`); `truncated` says when
//! more matched. Stats read every entry, off the async runtime, in bounded memory.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flowgate_core::BatchView;
use flowgate_engine::runtime::dead_letters::{EntryFilter, Stats};
use flowgate_engine::runtime::replay::{ReplayRequest, Replayer};
use flowgate_engine::DLQ_TOPIC;
use flowgate_log::Log;
use serde::Deserialize;
use serde_json::json;

use super::error;
use crate::shared::Shared;

/// The query of both routes.
#[derive(Debug, Deserialize)]
pub struct DlqQuery {
    pipeline: Option<String>,
    category: Option<String>,
    since: Option<i64>,
    limit: Option<usize>,
}

/// An entry's place and bytes, for [`Replayer::is_replayed`].
struct Stored<'a> {
    partition: u32,
    offset: u64,
    bytes: &'a [u8],
}

/// Whether the entry is marked replayed; `None` without pipelines.
fn replayed(replayer: Option<&Arc<Replayer>>, stored: &Stored<'_>) -> Result<Option<bool>, String> {
    replayer
        .map(|r| r.is_replayed(stored.partition, stored.offset, stored.bytes).map_err(|e| format!("{e:#}")))
        .transpose()
}

/// Calls `visit` with each entry that passes, partition by partition, oldest first,
/// until it returns false.
fn each_entry(
    log: &Log,
    filter: &EntryFilter,
    since: Option<i64>,
    mut visit: impl FnMut(serde_json::Value, Stored<'_>) -> Result<bool, String>,
) -> Result<(), String> {
    let Some(topic) = log.topic(DLQ_TOPIC) else { return Ok(()) };
    let mut scratch = Vec::new();
    for partition in topic.partitions() {
        let mut next = match since {
            Some(ts) => match partition.offset_for_timestamp(ts).map_err(|e| e.to_string())? {
                Some(o) => o,
                None => continue,
            },
            None => partition.start_offset(),
        };
        while next < partition.end_offset() {
            let read = partition.read(next, 256 * 1024).map_err(|e| e.to_string())?;
            if read.batches.is_empty() {
                break;
            }
            let mut rest = &read.batches[..];
            while !rest.is_empty() {
                let (view, tail) = BatchView::parse(rest).map_err(|e| format!("stored batch unreadable: {e}"))?;
                for record in view.records(&mut scratch).map_err(|e| format!("stored batch unreadable: {e}"))? {
                    let record = record.map_err(|e| format!("stored record unreadable: {e}"))?;
                    let offset = view.base_offset().saturating_add(u64::from(record.offset_delta));
                    if offset < next {
                        continue;
                    }
                    next = offset.saturating_add(1);
                    let Ok(entry) = serde_json::from_slice::<serde_json::Value>(record.payload) else { continue };
                    let stored = Stored { partition: partition.id(), offset, bytes: record.payload };
                    if filter.matches(&entry) && !visit(entry, stored)? {
                        return Ok(());
                    }
                }
                rest = tail;
            }
        }
    }
    Ok(())
}

fn filter_of(q: &DlqQuery) -> EntryFilter {
    EntryFilter { pipeline: q.pipeline.clone(), category: q.category.clone() }
}

/// `GET /v1/dlq`: entries, oldest first per partition.
pub async fn list(State(shared): State<Arc<Shared>>, Query(q): Query<DlqQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let max_bytes = shared.config.max_http_body_bytes;
    let log = shared.ingest.log().clone();
    let replayer = shared.replayer.get().cloned();
    let listed = tokio::task::spawn_blocking(move || {
        let (mut entries, mut bytes, mut truncated) = (Vec::new(), 0usize, false);
        each_entry(&log, &filter_of(&q), q.since, |mut entry, stored| {
            if entries.len() >= limit || bytes >= max_bytes {
                truncated = true;
                return Ok(false);
            }
            bytes = bytes.saturating_add(stored.bytes.len());
            if let Some(replayed) = replayed(replayer.as_ref(), &stored)? {
                entry["replayed"] = replayed.into();
            }
            entries.push(entry);
            Ok(true)
        })
        .map(|()| (entries, truncated))
    })
    .await;
    match listed {
        Ok(Ok((entries, truncated))) => Json(json!({"entries": entries, "truncated": truncated})).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /v1/dlq/stats`: counts by pipeline, stage and category, top errors, oldest entry.
pub async fn stats(State(shared): State<Arc<Shared>>, Query(q): Query<DlqQuery>) -> Response {
    let log = shared.ingest.log().clone();
    let replayer = shared.replayer.get().cloned();
    let counted = tokio::task::spawn_blocking(move || {
        let mut stats = Stats::default();
        each_entry(&log, &filter_of(&q), q.since, |entry, stored| {
            stats.add(&entry);
            if let Some(replayed) = replayed(replayer.as_ref(), &stored)? {
                stats.add_replayed(replayed);
            }
            Ok(true)
        })
        .map(|()| stats.to_json())
    })
    .await;
    match counted {
        Ok(Ok(stats)) => Json(stats).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /v1/dlq/replay`: the filters as a JSON body (`pipeline`, `category`,
/// `dry_run`, `wait_ms`, `limit`) or, without a body, as the query.
pub async fn replay(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<ReplayRequest>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        match query {
            Ok(Query(q)) => q,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("the query is not a replay request: {e}")),
        }
    } else {
        match serde_json::from_slice::<ReplayRequest>(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body is not a replay request: {e}")),
        }
    };
    let replayer = match shared.replayer.get() {
        Some(r) if !shared.pipeline_configs.read().is_empty() => r.clone(),
        _ => return error(StatusCode::CONFLICT, "no pipeline is configured: there is nothing to replay into"),
    };
    match replayer.replay(&request).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

/// `GET /v1/dlq/replayed`: every entry marked replayed, as `{partition, offset,
/// fingerprint}` (the fingerprint tells an entry from one written at the same place
/// after a purge).
pub async fn replayed_marks(State(shared): State<Arc<Shared>>) -> Response {
    let Some(replayer) = shared.replayer.get().cloned() else {
        return Json(json!({"replayed": []})).into_response();
    };
    match tokio::task::spawn_blocking(move || replayer.replayed()).await {
        Ok(Ok(marks)) => Json(json!({"replayed": marks})).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
