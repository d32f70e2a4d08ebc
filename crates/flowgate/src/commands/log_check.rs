//! `flowgate log check`: verify a data directory without changing it.

use std::path::Path;
use std::process::ExitCode;

/// Prints every damaged range and exits non-zero when there is one.
pub fn run(data_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let report = flowgate_log::check_data_dir(data_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in &report.corrupt {
            println!(
                "CORRUPT {} bytes {}..{} ({} bytes): {}",
                c.file.display(),
                c.position,
                c.end,
                c.end - c.position,
                c.reason
            );
        }
        println!(
            "checked {} segments, {} batches, {} bytes: {}",
            report.segments,
            report.batches,
            report.bytes,
            if report.is_clean() {
                "no corruption".to_owned()
            } else {
                format!("{} corrupt ranges", report.corrupt.len())
            }
        );
    }
    Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
