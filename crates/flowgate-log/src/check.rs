//! Read-only verification of a whole data directory, behind `flowgate log check`.
//! It opens nothing for writing and can run beside a live engine.

use std::path::{Path, PathBuf};

use crate::error::{LogError, Result};
use crate::scan::{scan_segment, ScanMode};

/// One damaged byte range in one segment file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CorruptRange {
    /// The segment file.
    pub file: PathBuf,
    /// First damaged byte.
    pub position: u64,
    /// One past the last damaged byte.
    pub end: u64,
    /// What is wrong.
    pub reason: String,
}

/// What a check found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CheckReport {
    /// Segment files read.
    pub segments: u64,
    /// Good batches.
    pub batches: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Damage found, in file order.
    pub corrupt: Vec<CorruptRange>,
}

impl CheckReport {
    /// True when nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty()
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(LogError::io("list", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect::<Vec<_>>();
    entries.sort();
    Ok(entries)
}

/// Verifies every batch of every segment under `data_dir`, going past damage where the
/// damaged batch's length still frames it, so every damaged range is listed.
pub fn check_data_dir(data_dir: &Path) -> Result<CheckReport> {
    let topics = data_dir.join("topics");
    if !topics.is_dir() {
        return Err(LogError::Io {
            action: "find topics in",
            path: data_dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a flowgate data directory"),
        });
    }
    let mut report = CheckReport::default();
    for topic in sorted_entries(&topics)?.into_iter().filter(|p| p.is_dir()) {
        for partition in sorted_entries(&topic)?.into_iter().filter(|p| p.is_dir()) {
            for file in sorted_entries(&partition)? {
                let Some(base) = file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".log"))
                    .and_then(|s| s.parse::<u64>().ok())
                else {
                    continue;
                };
                let outcome = scan_segment(&file, base, ScanMode::ContinuePastDamage, |_| {})?;
                report.segments += 1;
                report.batches += outcome.batches;
                report.bytes += outcome.file_len;
                report.corrupt.extend(outcome.damage.into_iter().map(|d| CorruptRange {
                    file: file.clone(),
                    position: d.position,
                    end: d.end,
                    reason: d.reason,
                }));
            }
        }
    }
    Ok(report)
}
