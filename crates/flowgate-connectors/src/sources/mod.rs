//! Sources: `[[sources]]` read external systems into topics of this engine.
//!
//! Each source type is a module implementing [`SourceConnector`] (its options as a serde
//! struct refusing unknown keys, their checks, how it is built) and one line in
//! [`SOURCES`]; the server and `flowgate validate` know sources only as `name`, `type`
//! and options, as they know sinks.
//!
//! A source appends through the engine's append path (the [`Appender`] the server hands
//! it, with the listeners' metrics) and acknowledges upstream only once what it appended
//! meets the configured durability.

pub mod postgres_cdc;
mod status;

use std::path::PathBuf;
use std::sync::Arc;

use flowgate_log::append::Appender;
use flowgate_log::Log;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use postgres_cdc::PostgresCdcSource;
pub use status::{SourceState, SourceStatus};

/// A future a source runs as.
pub type SourceFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// One `[[sources]]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceConfig {
    /// Unique among sources: metrics, stats and producer ids name it.
    pub name: String,
    /// The source type (`postgres_cdc`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Every other key: the options of its type, checked by its connector.
    #[serde(flatten)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

/// What building a source may use besides its options.
#[derive(Clone, Debug)]
pub struct SourceContext {
    /// The engine's log.
    pub log: Log,
    /// The append path of the engine's ingest (its metrics and codec); a source sets
    /// its own producer rule.
    pub appender: Appender,
    /// The data directory (for relative paths and a source's own small state).
    pub data_dir: PathBuf,
    /// Where the source reports its state, position and counters.
    pub status: Arc<SourceStatus>,
    /// The engine's memory budget: a source stops reading upstream while it is under
    /// pressure, as the listeners stop reading their sockets.
    pub memory: flowgate_memory::MemoryGovernor,
}

/// A source type. Implemented by each source and listed once in [`SOURCES`].
pub trait SourceConnector {
    /// The `type` users write in the config.
    const TYPE: &'static str;

    /// The type's own options: every key of a source's table besides `name` and `type`.
    /// Must refuse unknown keys (`#[serde(deny_unknown_fields)]`).
    type Config: DeserializeOwned + Serialize;

    /// Checks what parsing cannot; touches no file and no network.
    fn validate(_config: &Self::Config) -> anyhow::Result<()> {
        Ok(())
    }

    /// Builds the running source: a future that runs until `shutdown` is cancelled,
    /// reconnecting on its own and reporting through `cx.status`.
    fn build(
        name: &str,
        config: Self::Config,
        cx: SourceContext,
        shutdown: CancellationToken,
    ) -> anyhow::Result<SourceFuture>;
}

/// A source type with its types erased, as listed in [`SOURCES`].
#[derive(Clone, Copy)]
pub struct Registration {
    /// The `type` it answers to.
    pub kind: &'static str,
    validate: fn(&SourceConfig) -> anyhow::Result<()>,
    build: fn(&SourceConfig, SourceContext, CancellationToken) -> anyhow::Result<SourceFuture>,
    complete: fn(&SourceConfig) -> anyhow::Result<serde_json::Map<String, serde_json::Value>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Registration {
    /// The registration of connector `C`.
    pub const fn of<C: SourceConnector>() -> Registration {
        Registration { kind: C::TYPE, validate: validate_as::<C>, build: build_as::<C>, complete: complete_as::<C> }
    }
}

fn parse<C: SourceConnector>(config: &SourceConfig) -> anyhow::Result<C::Config> {
    serde_json::from_value(serde_json::Value::Object(config.options.clone())).map_err(|e| anyhow::anyhow!("{e}"))
}

fn validate_as<C: SourceConnector>(config: &SourceConfig) -> anyhow::Result<()> {
    C::validate(&parse::<C>(config)?)
}

fn build_as<C: SourceConnector>(
    config: &SourceConfig,
    cx: SourceContext,
    shutdown: CancellationToken,
) -> anyhow::Result<SourceFuture> {
    let options = parse::<C>(config)?;
    C::validate(&options)?;
    C::build(&config.name, options, cx, shutdown)
}

fn complete_as<C: SourceConnector>(
    config: &SourceConfig,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    match serde_json::to_value(parse::<C>(config)?)? {
        serde_json::Value::Object(map) => Ok(map),
        other => anyhow::bail!("the options of a {} source serialize as {other}, not a table", C::TYPE),
    }
}

/// Every source type.
pub static SOURCES: &[Registration] = &[Registration::of::<PostgresCdcSource>()];

/// The registration of source type `kind`; the error lists the known types.
pub fn registration(kind: &str) -> anyhow::Result<&'static Registration> {
    SOURCES.iter().find(|r| r.kind == kind).ok_or_else(|| {
        let known: Vec<&str> = SOURCES.iter().map(|r| r.kind).collect();
        anyhow::anyhow!("unknown source type '{kind}'; the source types are {}", known.join(", "))
    })
}

/// Checks every source config without an engine (for `flowgate validate` and at
/// start): known types, well-formed options, unique names.
pub fn validate_configs(configs: &[SourceConfig]) -> anyhow::Result<()> {
    let mut names = std::collections::HashSet::new();
    for (i, c) in configs.iter().enumerate() {
        let place = || format!("source {} ('{}')", i + 1, c.name);
        anyhow::ensure!(
            (1..=100).contains(&c.name.len())
                && !c.name.starts_with('.')
                && c.name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
            "{}: `name` must be 1 to 100 of letters, digits, '.', '_' and '-', not starting with '.'",
            place()
        );
        anyhow::ensure!(names.insert(c.name.as_str()), "{}: another source has the name '{}'", place(), c.name);
        (registration(&c.kind).and_then(|r| (r.validate)(c))).map_err(|e| anyhow::anyhow!("{}: {e:#}", place()))?;
    }
    Ok(())
}

/// `config` with every option its type defaults filled in (for `flowgate config`).
pub fn complete_config(config: &SourceConfig) -> anyhow::Result<SourceConfig> {
    let options = (registration(&config.kind)?.complete)(config)?;
    Ok(SourceConfig { options, ..config.clone() })
}

/// The running sources of one engine; change them with [`Sources::reload`].
#[derive(Debug)]
pub struct Sources {
    /// In configuration order.
    running: Vec<RunningSource>,
    shutdown: CancellationToken,
    log: Log,
    appender: Appender,
    data_dir: PathBuf,
    memory: flowgate_memory::MemoryGovernor,
}

/// One running source.
#[derive(Debug)]
struct RunningSource {
    config: SourceConfig,
    status: Arc<SourceStatus>,
    /// A child of the engine's token: cancelling it stops this source alone.
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Sources {
    /// Starts every source (on the current tokio runtime). Sources can be added later by
    /// [`Sources::reload`], so `configs` may be empty.
    pub fn start(
        configs: &[SourceConfig],
        log: &Log,
        appender: &Appender,
        data_dir: &std::path::Path,
        memory: &flowgate_memory::MemoryGovernor,
    ) -> anyhow::Result<Sources> {
        validate_configs(configs)?;
        let mut sources = Sources {
            running: Vec::new(),
            shutdown: CancellationToken::new(),
            log: log.clone(),
            appender: appender.clone(),
            data_dir: data_dir.to_path_buf(),
            memory: memory.clone(),
        };
        for c in configs {
            if let Err(e) = sources.launch(c) {
                sources.shutdown.cancel();
                return Err(e);
            }
        }
        Ok(sources)
    }

    /// Each source's status, in configuration order.
    pub fn statuses(&self) -> Vec<Arc<SourceStatus>> {
        self.running.iter().map(|r| r.status.clone()).collect()
    }

    /// Makes the running sources those of `configs`: validates them all first and
    /// changes nothing when that fails; then stops the removed and changed sources
    /// (what they appended is in the log; what they did not confirm upstream is sent
    /// again), waiting `within` for them, and starts the new and changed ones. A
    /// source that did not stop in time is aborted before its replacement starts.
    pub async fn reload(
        &mut self,
        configs: &[SourceConfig],
        within: std::time::Duration,
    ) -> anyhow::Result<flowgate_engine::Changes> {
        validate_configs(configs)?;
        let mut changes = flowgate_engine::Changes::default();
        let (keep, stopping) = changes.sort_running(
            std::mem::take(&mut self.running),
            |r| &r.config.name,
            |r| configs.iter().find(|c| c.name == r.config.name).map(|c| *c == r.config),
        );
        self.running = keep;
        for running in &stopping {
            running.cancel.cancel();
        }
        let deadline = tokio::time::Instant::now() + within;
        for mut running in stopping {
            if tokio::time::timeout_at(deadline, &mut running.task).await.is_err() {
                tracing::warn!(source = %running.config.name, "reload: the source did not stop in time; aborted");
                changes.cut_off.push(running.config.name.clone());
                running.task.abort();
                let _ = running.task.await;
            }
        }
        for c in configs {
            if self.running.iter().any(|r| r.config.name == c.name) {
                changes.unchanged.push(c.name.clone());
                continue;
            }
            changes.starting(&c.name);
            self.launch(c)?;
        }
        self.running.sort_by_key(|r| configs.iter().position(|c| c.name == r.config.name));
        Ok(changes)
    }

    /// Stops every source (what they appended is in the log; what they did not confirm
    /// upstream is sent again at the next start) and waits for them, within `within`.
    pub async fn shutdown(&mut self, within: std::time::Duration) {
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + within;
        for running in &mut self.running {
            let _ = tokio::time::timeout_at(deadline, &mut running.task).await;
        }
    }

    fn launch(&mut self, c: &SourceConfig) -> anyhow::Result<()> {
        let status = Arc::new(SourceStatus::new(&c.name, &c.kind));
        let cx = SourceContext {
            log: self.log.clone(),
            appender: self.appender.clone(),
            data_dir: self.data_dir.clone(),
            status: status.clone(),
            memory: self.memory.clone(),
        };
        let cancel = self.shutdown.child_token();
        let run = (registration(&c.kind)?.build)(c, cx, cancel.clone())
            .map_err(|e| anyhow::anyhow!("source '{}': {e:#}", c.name))?;
        self.running.push(RunningSource { config: c.clone(), status, cancel, task: tokio::spawn(run) });
        Ok(())
    }
}

impl Drop for Sources {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> SourceConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn unknown_types_misspelt_options_and_duplicate_names_are_refused() {
        let e = validate_configs(&[source("name = \"s\"\ntype = \"kafka\"")]).unwrap_err().to_string();
        assert!(e.contains("'kafka'") && e.contains("postgres_cdc"), "{e}");
        let ok = "name = \"s\"\ntype = \"postgres_cdc\"\nurl = \"postgres://u@h/db\"\ntables = [\"t\"]\ntopic = \"x\"";
        validate_configs(&[source(ok)]).unwrap();
        let e = validate_configs(&[source(&format!("{ok}\nslott = \"x\""))]).unwrap_err().to_string();
        assert!(e.contains("unknown field `slott`"), "{e}");
        let e = validate_configs(&[source(ok), source(ok)]).unwrap_err().to_string();
        assert!(e.contains("another source has the name 's'"), "{e}");
    }

    #[test]
    fn every_type_is_registered_once() {
        let mut kinds: Vec<&str> = SOURCES.iter().map(|r| r.kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), SOURCES.len());
    }
}
