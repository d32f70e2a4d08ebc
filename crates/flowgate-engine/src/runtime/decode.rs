//! Decoding log reads into pipeline events. A stored batch that cannot be decoded (its
//! checksum fails, its records do not parse) is reported and skipped, so one bad batch
//! never stops its partition; only a batch whose extent is unknown stops the read.

use bytes::Bytes;
use flowgate_core::batch::BatchHeader;
use flowgate_core::{traceparent, BatchView, Codec};

use crate::event::PipelineEvent;
use crate::trace::Contexts;

/// A stored batch that could not be decoded.
#[derive(Debug)]
pub(super) struct UnreadableBatch {
    /// Offset of its first record, as its header says.
    pub(super) first_offset: u64,
    /// Offset of its last record, as its header says.
    pub(super) last_offset: u64,
    /// Why it cannot be read.
    pub(super) error: String,
}

/// What one log read decodes to.
#[derive(Debug, Default)]
pub(super) struct Decoded {
    /// Events at or after the requested offset.
    pub(super) events: Vec<PipelineEvent>,
    /// Batches skipped because they cannot be decoded.
    pub(super) unreadable: Vec<UnreadableBatch>,
    /// The next offset to read.
    pub(super) next: u64,
}

/// Decodes whole batches into events at or after `from`, sharing the buffer's bytes
/// (a compressed batch is decompressed once into its own shared buffer). With
/// `contexts` (tracing is on), notes the trace context of each stored batch: the
/// `traceparent` header of its first record, the one record per batch looked at.
pub(super) fn decode(
    buffer: &Bytes,
    partition: u32,
    from: u64,
    scratch: &mut Vec<u8>,
    mut contexts: Option<&mut Contexts>,
) -> anyhow::Result<Decoded> {
    let mut out = Decoded { next: from, ..Decoded::default() };
    let mut rest = &buffer[..];
    while !rest.is_empty() {
        let batch_start = out.events.len();
        match decode_batch(buffer, rest, partition, from, scratch, &mut out.events, contexts.as_deref_mut()) {
            Ok((last, tail)) => {
                out.next = out.next.max(last.saturating_add(1));
                rest = tail;
            }
            Err(error) => {
                out.events.truncate(batch_start);
                // The header gives the batch's extent: skip exactly that batch.
                let extent = BatchHeader::parse(rest)
                    .ok()
                    .filter(|h| h.total_len() > 0 && h.total_len() <= rest.len())
                    .and_then(|h| Some((h.base_offset, last_offset(&h)?, h.total_len())));
                let Some((first_offset, last_offset, len)) = extent.filter(|&(_, last, _)| last >= out.next) else {
                    anyhow::bail!(
                        "the stored batch at offset {} of partition {partition} is unreadable and its extent \
                         is unknown ({error}); `flowgate log check` reports the damage",
                        out.next
                    );
                };
                out.unreadable.push(UnreadableBatch { first_offset, last_offset, error: error.to_string() });
                out.next = last_offset.saturating_add(1);
                rest = &rest[len..];
            }
        }
    }
    Ok(out)
}

/// Decodes one batch at the start of `rest`, appending its events at or after `from`.
/// Returns its last offset and the bytes after it.
fn decode_batch<'b>(
    buffer: &Bytes,
    rest: &'b [u8],
    partition: u32,
    from: u64,
    scratch: &mut Vec<u8>,
    events: &mut Vec<PipelineEvent>,
    mut contexts: Option<&mut Contexts>,
) -> anyhow::Result<(u64, &'b [u8])> {
    let (view, tail) = BatchView::parse(rest)?;
    let base = view.base_offset();
    // The base offset is not covered by the checksum: check it before adding to it.
    let last = last_offset(&view.header).ok_or_else(|| anyhow::anyhow!("batch offsets overflow"))?;
    let owned;
    let (shared, section) = if view.header.codec()? == Codec::None {
        (buffer, view.raw_records())
    } else {
        owned = Bytes::copy_from_slice(view.records_section(scratch)?);
        (&owned, &owned[..])
    };
    let records =
        flowgate_core::batch::RecordIter::over(section, view.header.first_timestamp, view.header.record_count);
    for record in records {
        let record = record?;
        // The first record speaks for its batch: HTTP ingest sets the header on the first
        // record of a batch it traces, and looking further would cost a check per event.
        if let Some(contexts) = contexts.take() {
            if record.header_count > 0 {
                if let Some((_, value)) = record.headers().find(|(name, _)| *name == traceparent::HEADER) {
                    contexts.push_header(value);
                }
            }
        }
        let offset = base
            .checked_add(u64::from(record.offset_delta))
            .filter(|&o| o <= last)
            .ok_or_else(|| anyhow::anyhow!("record offset delta {} is outside its batch", record.offset_delta))?;
        if offset >= from {
            events.push(PipelineEvent::from_record_in(Some(shared), partition, offset, &record));
        }
    }
    Ok((last, tail))
}

/// The offset of a batch's last record, if its header's numbers make sense.
fn last_offset(header: &BatchHeader) -> Option<u64> {
    header.base_offset.checked_add(u64::from(header.record_count))?.checked_sub(1)
}
