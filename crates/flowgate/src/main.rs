//! The `flowgate` command: the engine and the tools that talk to it.

mod commands;

// Event processing allocates many small, short-lived objects across threads; mimalloc
// handles that with less CPU and less fragmentation than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// flowgate: a single-binary, high-performance event processing engine.
#[derive(Parser)]
#[command(name = "flowgate", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the engine (the embedded default config without --config).
    Run(commands::run::Args),
    /// Start an engine in-process, drive realistic IoT load through the demo pipeline,
    /// and print a report.
    Demo(commands::demo::Args),
    /// Send NDJSON lines (from FILE or stdin) as events; print how many were acknowledged.
    Send(commands::send::Args),
    /// Read events from the log, one JSON payload per line.
    Tail(commands::tail::Args),
    /// Load generator: throughput and ack latency percentiles.
    Bench(commands::bench::Args),
    /// Print the effective configuration (defaults, file and environment merged).
    Config(commands::config::Args),
    /// Check a config file; name the bad key and line.
    Validate {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage topics.
    Topics {
        #[command(subcommand)]
        command: commands::topics::Command,
    },
    /// Inspect and reprocess the dead-letter topic: entries, counts, replay, purge.
    Dlq {
        #[command(subcommand)]
        command: commands::dlq::Command,
    },
    /// Pipelines as things to manage: list, status, pause, resume, reset (rewind or skip).
    Pipelines {
        #[command(subcommand)]
        command: commands::pipelines::Command,
    },
    /// Have a running engine read its config file again (as SIGHUP does); print what
    /// changed.
    Reload(commands::reload::Args),
    /// Live terminal view of a running engine: rates, lag, errors, batches, concurrency,
    /// breakers and memory per pipeline, sink, source and topic.
    Top(commands::top::Args),
    /// Inspect the log on disk.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
}

#[derive(Subcommand)]
enum LogCommand {
    /// Verify every segment; report corrupt ranges; exit non-zero on corruption.
    Check {
        /// The data directory.
        #[arg(long, default_value = "./flowgate-data")]
        data_dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Log lines to stderr (see [`commands::init_logging`]).
fn init_logging(exporter: Option<&flowgate_server::trace::export::Exporter>) {
    use std::io::IsTerminal;
    commands::init_logging(std::io::stderr, std::io::stderr().is_terminal(), exporter);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo logs to a file of its own, so its progress and report stay readable; `run`
    // starts logging once its config says whether spans are exported.
    if !matches!(cli.command, Command::Demo(_) | Command::Run(_)) {
        init_logging(None);
    }
    let result = match cli.command {
        Command::Run(args) => commands::run::run(args),
        Command::Demo(args) => commands::demo::run(args),
        Command::Send(args) => commands::send::run(args),
        Command::Tail(args) => commands::tail::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Config(args) => commands::config::run(args),
        Command::Validate { config } => commands::validate::run(&config),
        Command::Topics { command } => commands::topics::run(command),
        Command::Dlq { command } => commands::dlq::run(command),
        Command::Pipelines { command } => commands::pipelines::run(command),
        Command::Top(args) => commands::top::run(args),
        Command::Reload(args) => commands::reload::run(args),
        Command::Log { command: LogCommand::Check { data_dir, json } } => commands::log_check::run(&data_dir, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
