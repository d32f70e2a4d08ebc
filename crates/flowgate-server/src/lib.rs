//! The flowgate engine process.
//!
//! - [`config`]: the TOML configuration, its embedded default and `FLOWGATE_*` overrides.
//! - [`server`]: [`Engine::start`] and [`Engine::shutdown`].
//! - [`ingest`]: the append path every listener shares (partition split, durability).
//! - [`binary`], [`ndjson`], [`http`]: the three listeners.
//! - [`metrics`]: Prometheus metrics.
//! - [`reload`]: changing pipelines, sources and alert rules of a running engine.
//! - [`shared`]: state shared by the listeners.
//! - [`budget`]: the ingest buffer budget connections borrow from.
//! - [`memory`]: the memory budget's limit at start, and how listeners hold back under it.
//! - [`fd_limit`]: the open-files limit, raised at start and checked against the config.
//! - [`parse`]: NDJSON line and HTTP body parsers, free of I/O (shared with `fuzz/`).
//! - [`fields`]: the key, time and client id fields read from NDJSON and HTTP events.
//! - [`trace`]: `[tracing]`, the spans of HTTP ingest, and the OTLP exporter.
//! - [`topic_admin`]: creating topics with settings, changing and describing them (binary
//!   protocol and HTTP alike); [`topic_request`] parses what those requests carry.
//! - [`envelope`]: a stored event as JSON (HTTP reads, `flowgate tail --format json`).

#![warn(missing_docs)]

pub mod alerts;
pub mod binary;
pub mod budget;
pub mod config;
pub mod envelope;
pub mod fd_limit;
pub mod fields;
pub mod http;
pub mod ingest;
pub mod memory;
pub mod metrics;
pub mod ndjson;
pub mod parse;
pub mod reload;
pub mod server;
pub mod shared;
pub mod throughput;
pub mod topic_admin;
pub mod topic_request;
pub mod trace;

pub use config::{Config, ConfigError};
pub use server::{Engine, ShutdownOutcome};
