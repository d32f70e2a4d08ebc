//! `flowgate validate --config F`.

use std::path::Path;
use std::process::ExitCode;

use flowgate_server::Config;

/// Checks a config file and says what is wrong, or that it is fine.
pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    match Config::load(Some(path)) {
        Ok(_) => {
            println!("{}: ok", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
