//! Walking a segment file batch by batch, verifying each batch's length, checksum and
//! offset. Recovery uses it to find where a torn or damaged tail starts; index rebuilds
//! use it to find batch positions; `flowgate log check` uses it to list damage.
//!
//! A scan streams the file through a fixed buffer, so memory stays small whatever the
//! segment's size.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use flowgate_core::batch::{BatchHeader, BatchView, HEADER_LEN, LENGTH_PREFIX, MAX_BATCH_LEN};

use crate::error::{LogError, Result};

/// One damaged byte range of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// First damaged byte.
    pub position: u64,
    /// One past the last damaged byte.
    pub end: u64,
    /// What is wrong.
    pub reason: String,
}

/// A valid batch found by a scan.
#[derive(Clone, Copy, Debug)]
pub struct ScannedBatch<'a> {
    /// Where the batch starts in the file.
    pub position: u64,
    /// The batch.
    pub view: BatchView<'a>,
}

/// What a scan found.
#[derive(Clone, Debug, Default)]
pub struct ScanOutcome {
    /// Length of the file.
    pub file_len: u64,
    /// Bytes from the start up to the end of the last good batch before any damage.
    pub valid_len: u64,
    /// Offset after the last good batch of the valid prefix.
    pub next_offset: u64,
    /// Good batches seen.
    pub batches: u64,
    /// Damaged ranges, in file order. A scan that stops at the first damage lists one.
    pub damage: Vec<Damage>,
}

/// Whether a scan stops at the first damage (recovery) or goes on past damage whose
/// length prefix is still believable (checking).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanMode {
    /// Stop at the first damaged batch.
    StopAtDamage,
    /// Record damage and go on when the batch's length still frames it.
    ContinuePastDamage,
}

/// Scans the segment at `path`, whose first batch must start at `base_offset`, calling
/// `on_batch` for every good batch of the valid prefix (in `ContinuePastDamage` mode, for
/// good batches after damage too).
pub fn scan_segment(
    path: &Path,
    base_offset: u64,
    mode: ScanMode,
    mut on_batch: impl FnMut(ScannedBatch<'_>),
) -> Result<ScanOutcome> {
    let file = File::open(path).map_err(LogError::io("open", path))?;
    let file_len = file.metadata().map_err(LogError::io("stat", path))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut out = ScanOutcome { file_len, next_offset: base_offset, ..ScanOutcome::default() };
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut pos = 0u64;
    let mut expected_offset = Some(base_offset);
    let mut damaged = false;

    while pos < file_len {
        let remaining = file_len - pos;
        if remaining < LENGTH_PREFIX as u64 {
            out.damage.push(Damage {
                position: pos,
                end: file_len,
                reason: format!("torn tail: {remaining} bytes, too short for a batch header"),
            });
            break;
        }
        buf.clear();
        buf.resize(LENGTH_PREFIX, 0);
        reader.read_exact(&mut buf).map_err(LogError::io("read", path))?;
        let total = BatchHeader::peek_total_len(&buf).unwrap_or(0);
        if total < HEADER_LEN as u64 || total > MAX_BATCH_LEN as u64 {
            out.damage.push(Damage {
                position: pos,
                end: file_len,
                reason: format!("impossible batch length {total}; the rest of the segment cannot be framed"),
            });
            break;
        }
        if total > remaining {
            out.damage.push(Damage {
                position: pos,
                end: file_len,
                reason: format!("torn tail: batch of {total} bytes but only {remaining} remain"),
            });
            break;
        }
        buf.resize(total as usize, 0);
        reader.read_exact(&mut buf[LENGTH_PREFIX..]).map_err(LogError::io("read", path))?;
        let problem = match BatchView::parse(&buf) {
            Ok((view, _)) => match expected_offset {
                Some(expected) if view.base_offset() != expected => {
                    Some(format!("batch base offset {} where {} was expected", view.base_offset(), expected))
                }
                _ => {
                    // Base offsets are not covered by the checksum: no arithmetic on them
                    // may overflow, whatever a damaged file holds.
                    let next = view.base_offset().saturating_add(u64::from(view.header.record_count));
                    expected_offset = Some(next);
                    if !damaged {
                        out.valid_len = pos + total;
                        out.next_offset = next;
                    }
                    out.batches += 1;
                    on_batch(ScannedBatch { position: pos, view });
                    None
                }
            },
            Err(e) => Some(e.to_string()),
        };
        if let Some(reason) = problem {
            damaged = true;
            if mode == ScanMode::StopAtDamage {
                out.damage.push(Damage { position: pos, end: file_len, reason });
                break;
            }
            out.damage.push(Damage { position: pos, end: pos + total, reason });
            // Offsets after damage cannot be checked for continuity.
            expected_offset = None;
        }
        pos += total;
    }
    Ok(out)
}
