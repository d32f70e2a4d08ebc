//! `flowgate config [--config F] [--data-dir D]`: the effective configuration — the
//! embedded default or the file, with `FLOWGATE_*` overrides applied and each sink's
//! options completed by its type's defaults — as TOML.

use std::path::PathBuf;
use std::process::ExitCode;

use flowgate_server::Config;

/// Arguments of `flowgate config`.
#[derive(clap::Args)]
pub struct Args {
    /// TOML config file; the embedded default without it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (overrides server.data_dir, as for `flowgate run`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of TOML.
    #[arg(long)]
    json: bool,
}

/// Prints the configuration `flowgate run` would use with the same arguments.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(args.config.as_deref())?.with_sink_defaults();
    if let Some(dir) = args.data_dir {
        config.server.data_dir = dir;
    }
    let text = if args.json { serde_json::to_string_pretty(&config)? } else { toml::to_string_pretty(&config)? };
    println!("{}", text.trim_end());
    Ok(ExitCode::SUCCESS)
}
