//! Reloading the config of a running engine: `SIGHUP`, `POST /v1/reload` and
//! `flowgate run --watch-config` all come here.
//!
//! Pipelines, sources and alert rules change while the engine runs: unchanged ones keep
//! running untouched, changed ones stop (a pipeline after flushing and committing) and
//! start again from where they stopped, removed ones stop, new ones start. Every part
//! of the new config is validated before anything changes, so an invalid config is
//! refused with its error and the old one stays. The sections that shape the process
//! itself (`[server]`, `[log]`, `[ingest]`, `[alerting]`, `[tracing]`) take effect at the next
//! restart; a reload that changes them says so and keeps the old values.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Config;
use crate::shared::Shared;

/// Reads the config anew (the file the engine was started with, with the same command
/// line overrides).
pub type ConfigLoader = Arc<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// What a reload may change, and where the config comes from.
#[derive(Default)]
pub struct Reloader {
    /// One reload at a time; shutdown takes what is running from here.
    components: tokio::sync::Mutex<Components>,
    loader: parking_lot::Mutex<Option<ConfigLoader>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

/// The running parts of an engine a reload changes.
#[derive(Default)]
pub(crate) struct Components {
    /// Started with the first pipeline (at start or by a reload).
    pub(crate) pipelines: Option<flowgate_engine::Pipelines>,
    /// Started with the first source.
    pub(crate) sources: Option<flowgate_connectors::sources::Sources>,
    /// The config in force: the sections that need a restart keep their values from
    /// the start.
    pub(crate) config: Option<Config>,
}

/// What a reload did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReloadReport {
    /// Pipelines added, removed, restarted (changed), unchanged, cut off.
    pub pipelines: flowgate_engine::Changes,
    /// Sources, likewise.
    pub sources: flowgate_engine::Changes,
    /// Alert rules, likewise (`cut_off` is always empty).
    pub alerts: flowgate_engine::Changes,
    /// Sections that changed but take effect only at a restart (their old values stay).
    pub restart_required: Vec<String>,
    /// How long the reload took.
    pub took_ms: u64,
}

/// Why a reload changed nothing (or not everything).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config is invalid; the old one stays.
    #[error("the new config is refused, the old one stays: {0}")]
    Invalid(String),
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// Nothing says where the config comes from (an engine started from a `Config`
    /// value, not by `flowgate run`).
    #[error("this engine was not started from a config file; there is nothing to read again")]
    NoSource,
    /// The new config was valid but a part of it did not start: what the report would
    /// have said is lost, and the error names the part.
    #[error("the reload failed part way: {0}")]
    Failed(String),
}

impl Reloader {
    /// Sets where [`Reloader::reload_from_source`] reads the config.
    pub fn set_loader(&self, loader: ConfigLoader) {
        *self.loader.lock() = Some(loader);
    }

    /// Whether a config source was set.
    pub fn has_source(&self) -> bool {
        self.loader.lock().is_some()
    }

    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, Components> {
        self.components.lock().await
    }
}

/// Reads the config from its source again and applies it ([`reload`]).
pub async fn reload_from_source(shared: &Arc<Shared>) -> Result<ReloadReport, ReloadError> {
    let shared = shared.clone();
    finish(tokio::spawn(async move {
        let loader = shared.reloader.loader.lock().clone().ok_or(ReloadError::NoSource);
        let loaded = match loader {
            Ok(loader) => tokio::task::spawn_blocking(move || loader())
                .await
                .map_err(|e| ReloadError::Failed(e.to_string()))
                .and_then(|c| c.map_err(|e| ReloadError::Invalid(format!("{e:#}")))),
            Err(e) => Err(e),
        };
        let result = match loaded {
            Ok(config) => apply(&shared, config).await,
            Err(e) => Err(e),
        };
        count(&shared, &result);
        result
    }))
    .await
}

/// Applies `new` to the running engine (see the module doc). The reload runs as a task
/// of its own: a caller that goes away (an HTTP client that hangs up) does not stop it
/// half way.
pub async fn reload(shared: &Arc<Shared>, new: Config) -> Result<ReloadReport, ReloadError> {
    let shared = shared.clone();
    finish(tokio::spawn(async move {
        let result = apply(&shared, new).await;
        count(&shared, &result);
        result
    }))
    .await
}

async fn finish(task: tokio::task::JoinHandle<Result<ReloadReport, ReloadError>>) -> Result<ReloadReport, ReloadError> {
    task.await.unwrap_or_else(|e| Err(ReloadError::Failed(format!("the reload task failed: {e}"))))
}

fn count(shared: &Shared, result: &Result<ReloadReport, ReloadError>) {
    let outcome = match result {
        Ok(_) => "applied",
        Err(ReloadError::Failed(_)) => "failed",
        Err(_) => "refused",
    };
    shared.ingest.metrics().reloaded(outcome);
}

async fn apply(shared: &Arc<Shared>, new: Config) -> Result<ReloadReport, ReloadError> {
    let started = Instant::now();
    let mut components = shared.reloader.lock().await;
    if shared.shutdown.is_cancelled() {
        return Err(ReloadError::ShuttingDown);
    }
    let Some(current) = components.config.clone() else { return Err(ReloadError::ShuttingDown) };
    let invalid = |e: String| ReloadError::Invalid(e);
    new.validate("the new config").map_err(|e| invalid(e.to_string()))?;
    flowgate_connectors::sources::validate_configs(&new.sources).map_err(|e| invalid(format!("{e:#}")))?;
    match &components.pipelines {
        // Everything a restart of each new or changed pipeline would check.
        Some(running) => running.check(&new.pipelines).map_err(|e| invalid(format!("{e:#}")))?,
        // Sinks' outputs are checked against the data directory in force, which a
        // reload does not change.
        None => {
            let mut checked = new.clone();
            checked.server = current.server.clone();
            checked.validate_pipelines("the new config").map_err(|e| invalid(e.to_string()))?;
        }
    }
    tracing::info!("applying the new config");
    let mut report = ReloadReport { restart_required: restart_required(&current, &new), ..Default::default() };
    let grace = Duration::from_millis(current.server.shutdown_grace_ms);
    let pipelines = match components.pipelines.as_mut() {
        Some(running) => {
            let changed = running.reload(new.pipelines.clone(), Instant::now() + grace, &shared.shutdown).await;
            let configs: Vec<_> = running.configs().iter().map(|c| (**c).clone()).collect();
            *shared.pipeline_configs.write() = configs;
            changed.map_err(|e| ReloadError::Failed(format!("{e:#}")))
        }
        None if new.pipelines.is_empty() => Ok(flowgate_engine::Changes::default()),
        None => match start_pipelines(shared, &current, &new.pipelines) {
            Ok(p) => {
                components.pipelines = Some(p);
                Ok(flowgate_engine::Changes {
                    added: new.pipelines.iter().map(|p| p.name.clone()).collect(),
                    ..Default::default()
                })
            }
            Err(e) => Err(ReloadError::Failed(format!("{e:#}"))),
        },
    };
    let sources = match components.sources.as_mut() {
        // At shutdown, what is still stopping is left to its cancel token.
        Some(running) => tokio::select! {
            changed = running.reload(&new.sources, grace) => changed,
            _ = shared.shutdown.cancelled() => Err(anyhow::anyhow!("the engine is shutting down")),
        },
        None if new.sources.is_empty() => Ok(flowgate_engine::Changes::default()),
        None => start_sources(shared, &current, &new.sources).map(|s| {
            components.sources = Some(s);
            flowgate_engine::Changes {
                added: new.sources.iter().map(|s| s.name.clone()).collect(),
                ..Default::default()
            }
        }),
    };
    if let Some(running) = &components.sources {
        *shared.sources.write() = running.statuses();
    }
    *shared.source_configs.write() = new.sources.clone();
    if let Some(alerts) = shared.alerts.get() {
        report.alerts = alerts.reload(&new.alerts);
    }
    // What runs now, whatever failed: the next reload compares with it.
    let running_pipelines = shared.pipeline_configs.read().clone();
    components.config =
        Some(Config { pipelines: running_pipelines, sources: new.sources, alerts: new.alerts, ..current });
    report.pipelines = pipelines?;
    report.sources = sources.map_err(|e| ReloadError::Failed(format!("{e:#}")))?;
    report.took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::info!(
        pipelines = %summary(&report.pipelines), sources = %summary(&report.sources), alerts = %summary(&report.alerts),
        took_ms = report.took_ms, "config reloaded"
    );
    if !report.restart_required.is_empty() {
        tracing::warn!(sections = %report.restart_required.join(", "),
            "these sections changed; they take effect at the next restart");
    }
    Ok(report)
}

/// Starts a reload from the config source and returns at once; the outcome is logged
/// (and counted). For the triggers that have no one to answer: SIGHUP, a watched file.
pub fn spawn_and_log(shared: &Arc<Shared>, trigger: &'static str) {
    let shared = shared.clone();
    tokio::spawn(async move {
        tracing::info!(trigger, "reloading the config");
        if let Err(e) = reload_from_source(&shared).await {
            tracing::error!(trigger, error = %e, "config reload refused");
        }
    });
}

fn summary(c: &flowgate_engine::Changes) -> String {
    format!(
        "+{} -{} ~{} ={}{}",
        c.added.len(),
        c.removed.len(),
        c.restarted.len(),
        c.unchanged.len(),
        if c.cut_off.is_empty() { String::new() } else { format!(" cut off: {}", c.cut_off.join(",")) }
    )
}

/// The sections of `new` that differ from `current` and take effect only at a restart.
fn restart_required(current: &Config, new: &Config) -> Vec<String> {
    let json = |v: Result<serde_json::Value, serde_json::Error>| v.ok();
    [
        ("server", json(serde_json::to_value(&current.server)) != json(serde_json::to_value(&new.server))),
        ("log", json(serde_json::to_value(&current.log)) != json(serde_json::to_value(&new.log))),
        ("ingest", json(serde_json::to_value(&current.ingest)) != json(serde_json::to_value(&new.ingest))),
        ("alerting", json(serde_json::to_value(&current.alerting)) != json(serde_json::to_value(&new.alerting))),
        ("tracing", json(serde_json::to_value(&current.tracing)) != json(serde_json::to_value(&new.tracing))),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(section, _)| section.to_owned())
    .collect()
}

/// Starts `pipelines` (the first ones of this engine).
pub(crate) fn start_pipelines(
    shared: &Arc<Shared>,
    config: &Config,
    pipelines: &[flowgate_engine::PipelineConfig],
) -> anyhow::Result<flowgate_engine::Pipelines> {
    let log = shared.ingest.log().clone();
    let factory = Arc::new(flowgate_connectors::Connectors::new(log.clone(), config.server.data_dir.clone()));
    let running = flowgate_engine::Pipelines::start(
        log,
        config.server.data_dir.clone(),
        pipelines.to_vec(),
        factory,
        shared.ingest.metrics().pipelines.clone(),
        shared.memory.clone(),
    )?;
    let _ = shared.pipelines.set(running.health());
    let _ = shared.replayer.set(running.replayer());
    *shared.pipeline_configs.write() = pipelines.to_vec();
    Ok(running)
}

/// Starts `sources` (the first ones of this engine).
pub(crate) fn start_sources(
    shared: &Arc<Shared>,
    config: &Config,
    sources: &[flowgate_connectors::sources::SourceConfig],
) -> anyhow::Result<flowgate_connectors::sources::Sources> {
    let running = flowgate_connectors::sources::Sources::start(
        sources,
        shared.ingest.log(),
        shared.ingest.appender(),
        &config.server.data_dir,
        &shared.memory,
    )?;
    *shared.sources.write() = running.statuses();
    *shared.source_configs.write() = sources.to_vec();
    Ok(running)
}
