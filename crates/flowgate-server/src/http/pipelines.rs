//! `/v1/pipelines…`: pipelines as things an operator manages (docs/pipelines.md,
//! "Operating pipelines").
//!
//! - `GET /v1/pipelines`: every pipeline's state, lag, checkpoint age and restarts;
//! - `GET /v1/pipelines/{name}`: the same, and each partition's offsets, lag, processor
//!   state sizes and sinks;
//! - `POST /v1/pipelines/{name}/pause`, `…/resume`;
//! - `POST /v1/pipelines/{name}/reset` with `{"to": "earliest"|"latest"|<ms>|"<RFC 3339>",
//!   "processor_state": "clear"|"keep"}`.
//!
//! A control runs as a task of its own (a client that hangs up does not stop it half
//! way), one at a time with reloads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flowgate_engine::runtime::status;
use flowgate_engine::{ControlError, ControlReport, ProcessorStateChoice, ResetTo};
use serde::Deserialize;
use serde_json::json;

use crate::shared::Shared;

/// Status reports built at once at most: each reads a checkpoint header and a batch
/// header per partition, on a blocking thread.
static REPORTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// `GET /v1/pipelines`.
pub(super) async fn list(State(shared): State<Arc<Shared>>) -> Response {
    let Ok(_turn) = REPORTS.acquire().await else { return unknown("") };
    let pipelines = match shared.pipelines.get() {
        Some(health) => {
            let (health, log) = (health.clone(), shared.ingest.log().clone());
            let listed = tokio::task::spawn_blocking(move || status::list(&health, &log, log.dir())).await;
            listed.unwrap_or_default()
        }
        None => Vec::new(),
    };
    Json(json!({ "pipelines": pipelines })).into_response()
}

/// `GET /v1/pipelines/{name}`.
pub(super) async fn show(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let Ok(_turn) = REPORTS.acquire().await else { return unknown(&name) };
    let found = match shared.pipelines.get() {
        Some(health) => {
            let (health, log) = (health.clone(), shared.ingest.log().clone());
            let name = name.clone();
            tokio::task::spawn_blocking(move || status::status(&health, &log, log.dir(), &name)).await.ok().flatten()
        }
        None => None,
    };
    match found {
        Some(status) => Json(status).into_response(),
        None => unknown(&name),
    }
}

fn unknown(name: &str) -> Response {
    let error = ControlError::UnknownPipeline(name.to_owned());
    (StatusCode::NOT_FOUND, Json(json!({"error": error.to_string()}))).into_response()
}

/// `POST /v1/pipelines/{name}/pause`.
pub(super) async fn pause(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    control(&shared, name, Control::Pause).await
}

/// `POST /v1/pipelines/{name}/resume`.
pub(super) async fn resume(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    control(&shared, name, Control::Resume).await
}

/// The body of a reset.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResetRequest {
    to: serde_json::Value,
    #[serde(default = "clear")]
    processor_state: ProcessorStateChoice,
}

fn clear() -> ProcessorStateChoice {
    ProcessorStateChoice::Clear
}

/// `POST /v1/pipelines/{name}/reset`.
pub(super) async fn reset(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Result<Json<ResetRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let bad = |message: String| (StatusCode::BAD_REQUEST, Json(json!({"error": message}))).into_response();
    let Json(request) = match body {
        Ok(body) => body,
        Err(e) => {
            return bad(format!(
                "the body must be {{\"to\": \"earliest\"|\"latest\"|<ms since the epoch>|\"<RFC 3339 time>\", \
                 \"processor_state\": \"clear\"|\"keep\"}}: {e}"
            ))
        }
    };
    let to = match parse_reset_to(&request.to) {
        Ok(to) => to,
        Err(message) => return bad(message),
    };
    control(&shared, name, Control::Reset(to, request.processor_state)).await
}

/// `to` of a reset: `earliest`, `latest`, ms since the epoch (a number, or its text) or
/// an RFC 3339 time.
pub fn parse_reset_to(to: &serde_json::Value) -> Result<ResetTo, String> {
    let time = match to {
        serde_json::Value::String(s) if s == "earliest" => return Ok(ResetTo::Earliest),
        serde_json::Value::String(s) if s == "latest" => return Ok(ResetTo::Latest),
        serde_json::Value::String(s) => {
            s.parse::<i64>().ok().or_else(|| flowgate_core::timestamp::parse_rfc3339(s).ok())
        }
        serde_json::Value::Number(n) => n.as_i64(),
        _ => None,
    };
    time.ok_or_else(|| {
        format!("`to` is {to}: it must be \"earliest\", \"latest\", ms since the epoch or an RFC 3339 time")
    })
    .map(ResetTo::Time)
}

enum Control {
    Pause,
    Resume,
    Reset(ResetTo, ProcessorStateChoice),
}

async fn control(shared: &Arc<Shared>, name: String, control: Control) -> Response {
    let shared = shared.clone();
    let task = tokio::spawn(async move {
        let mut components = shared.reloader.lock().await;
        if shared.shutdown.is_cancelled() {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "the engine is shutting down".to_owned()));
        }
        let grace = components
            .config
            .as_ref()
            .map_or(Duration::from_secs(30), |c| Duration::from_millis(c.server.shutdown_grace_ms));
        let Some(pipelines) = components.pipelines.as_mut() else {
            return Err((StatusCode::NOT_FOUND, ControlError::UnknownPipeline(name).to_string()));
        };
        let deadline = Instant::now() + grace;
        let done: Result<ControlReport, ControlError> = match control {
            Control::Pause => pipelines.pause(&name, deadline, &shared.shutdown).await,
            Control::Resume => pipelines.resume(&name),
            Control::Reset(to, state) => pipelines.reset(&name, to, state, deadline, &shared.shutdown).await,
        };
        done.map_err(|e| {
            let status = match e {
                ControlError::UnknownPipeline(_) => StatusCode::NOT_FOUND,
                ControlError::NotStopped(_) | ControlError::NotAccounted(_) => StatusCode::CONFLICT,
                ControlError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                ControlError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, e.to_string())
        })
    });
    match task.await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err((status, error))) => (status, Json(json!({"error": error}))).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": format!("the control task failed: {e}")})))
            .into_response(),
    }
}
