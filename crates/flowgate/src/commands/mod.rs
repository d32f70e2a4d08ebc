//! One module per subcommand.

pub mod bench;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod log_check;
pub mod pipelines;
pub mod reload;
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

/// Log lines to `writer`, filtered by `RUST_LOG` (default `info`); with an exporter, its
/// OpenTelemetry layer beside them (docs/tracing.md). Without one the subscriber is the
/// plain formatter it always was; with one, log lines leave the exported spans out, so
/// they look the same whether tracing is on or off, whatever `RUST_LOG` says.
pub fn init_logging<W>(writer: W, ansi: bool, exporter: Option<&flowgate_server::trace::export::Exporter>)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let Some(exporter) = exporter else {
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(writer).init();
        return;
    };
    let off = format!("{}=off", flowgate_engine::trace::TARGET).parse().expect("a valid directive");
    let logs =
        tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer).with_filter(filter.add_directive(off));
    tracing_subscriber::registry().with(logs).with(exporter.layer()).init();
}

/// The default engine address for client commands.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7070";
