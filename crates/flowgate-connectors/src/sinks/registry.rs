//! How a sink type plugs in: a [`SinkConnector`] owns its options (a serde struct that
//! refuses unknown keys), their checks, its exclusive output and how it is built; a
//! [`Registration`] erases its types so that one list (`SINKS` in `sinks/mod.rs`)
//! names every sink type, and the engine, `flowgate validate` and the server never do.

use std::path::Path;

use flowgate_engine::config::SinkConfig;
use flowgate_engine::{Sink, SinkPlace};
use flowgate_log::Log;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What building a sink may use besides its options.
#[derive(Clone, Copy, Debug)]
pub struct BuildContext<'a> {
    /// The engine's log (a topic sink writes into it).
    pub log: &'a Log,
    /// The data directory: relative paths of options are under it.
    pub data_dir: &'a Path,
    /// The whole sink config: its name, batching, retries and breaker.
    pub sink: &'a SinkConfig,
    /// Where the instance runs: pipeline, source topic and partition.
    pub place: &'a SinkPlace,
}

/// A sink type. Implemented by each sink, and listed once in `SINKS`.
pub trait SinkConnector {
    /// The `type` users write in the config.
    const TYPE: &'static str;

    /// Whether the sink writes to another system, whose capacity its controller learns
    /// (adaptive concurrency by default), rather than to local storage.
    const REMOTE: bool = false;

    /// The type's own options: every key of a sink's table besides `name`, `type`,
    /// `batch`, `retry`, `breaker` and `concurrency`. Must refuse unknown keys
    /// (`#[serde(deny_unknown_fields)]`), so that a misspelt option is an error naming it.
    type Config: DeserializeOwned + Serialize;

    /// Checks what parsing cannot (ranges, formats); touches no file and no network.
    fn validate(_config: &Self::Config) -> anyhow::Result<()> {
        Ok(())
    }

    /// What the sink writes to exclusively (see
    /// [`flowgate_engine::SinkFactory::output_claim`]), with relative paths under
    /// `data_dir`; `None` when sinks may share their output.
    fn output_claim(_config: &Self::Config, _data_dir: &Path) -> Option<String> {
        None
    }

    /// Builds the instance for one place (called at pipeline start, after `validate`).
    fn build(config: Self::Config, cx: &BuildContext<'_>) -> anyhow::Result<Box<dyn Sink>>;
}

/// A sink type with its types erased, as listed in `SINKS`.
#[derive(Clone, Copy)]
pub struct Registration {
    /// The `type` it answers to.
    pub kind: &'static str,
    /// Whether it writes to another system ([`SinkConnector::REMOTE`]).
    pub remote: bool,
    validate: fn(&SinkConfig) -> anyhow::Result<()>,
    output_claim: fn(&SinkConfig, &Path) -> Option<String>,
    build: fn(&SinkConfig, &BuildContext<'_>) -> anyhow::Result<Box<dyn Sink>>,
    complete: fn(&SinkConfig) -> anyhow::Result<serde_json::Map<String, serde_json::Value>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Registration {
    /// The registration of connector `C`.
    pub const fn of<C: SinkConnector>() -> Registration {
        Registration {
            kind: C::TYPE,
            remote: C::REMOTE,
            validate: validate_as::<C>,
            output_claim: output_claim_as::<C>,
            build: build_as::<C>,
            complete: complete_as::<C>,
        }
    }

    /// Parses and checks a sink's options.
    pub fn validate(&self, config: &SinkConfig) -> anyhow::Result<()> {
        (self.validate)(config)
    }

    /// The output the sink claims (`None` too when its options do not parse: validation
    /// reports that).
    pub fn output_claim(&self, config: &SinkConfig, data_dir: &Path) -> Option<String> {
        (self.output_claim)(config, data_dir)
    }

    /// Builds an instance.
    pub fn build(&self, config: &SinkConfig, cx: &BuildContext<'_>) -> anyhow::Result<Box<dyn Sink>> {
        (self.build)(config, cx)
    }

    /// The options with every default filled in, as the sink will use them.
    pub fn complete(&self, config: &SinkConfig) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
        (self.complete)(config)
    }
}

fn parse<C: SinkConnector>(config: &SinkConfig) -> anyhow::Result<C::Config> {
    // serde_json's message names the key ("unknown field `timeout`, expected one of …")
    // and has no position to add: the caller names the pipeline and sink.
    serde_json::from_value(serde_json::Value::Object(config.options.clone())).map_err(|e| anyhow::anyhow!("{e}"))
}

fn validate_as<C: SinkConnector>(config: &SinkConfig) -> anyhow::Result<()> {
    C::validate(&parse::<C>(config)?)
}

fn output_claim_as<C: SinkConnector>(config: &SinkConfig, data_dir: &Path) -> Option<String> {
    C::output_claim(&parse::<C>(config).ok()?, data_dir)
}

fn build_as<C: SinkConnector>(config: &SinkConfig, cx: &BuildContext<'_>) -> anyhow::Result<Box<dyn Sink>> {
    let options = parse::<C>(config)?;
    C::validate(&options)?;
    C::build(options, cx)
}

fn complete_as<C: SinkConnector>(config: &SinkConfig) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    match serde_json::to_value(parse::<C>(config)?)? {
        serde_json::Value::Object(map) => Ok(map),
        other => anyhow::bail!("the options of a {} sink serialize as {other}, not a table", C::TYPE),
    }
}
