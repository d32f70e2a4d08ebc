//! One module per subcommand.

pub mod bench;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod log_check;
pub mod run;
pub mod send;
pub mod tail;
pub mod topics;
pub mod validate;

pub use flowgate::http;
pub use flowgate::top;

/// A multi-threaded runtime for commands that talk to an engine.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// `filter` for log lines, leaving out the spans flowgate exports: a log line looks the
/// same whether tracing is on or off, whatever `RUST_LOG` says.
pub fn without_spans(filter: tracing_subscriber::EnvFilter) -> tracing_subscriber::EnvFilter {
    let off = format!("{}=off", flowgate_engine::trace::TARGET).parse().expect("a valid directive");
    filter.add_directive(off)
}

/// The default engine address for client commands.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7070";
