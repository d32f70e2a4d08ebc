//! Decoding log reads into pipeline events.

use bytes::Bytes;
use flowgate_core::{BatchView, Codec};

use crate::event::PipelineEvent;

/// Decodes whole batches into events at or after `from`, sharing the buffer's bytes
/// (a compressed batch is decompressed once into its own shared buffer). Returns the
/// events and the next offset to read.
pub(super) fn decode(
    buffer: &Bytes,
    partition: u32,
    from: u64,
    scratch: &mut Vec<u8>,
) -> anyhow::Result<(Vec<PipelineEvent>, u64)> {
    let mut events = Vec::new();
    let mut next = from;
    let mut rest = &buffer[..];
    while !rest.is_empty() {
        let (view, tail) = BatchView::parse(rest)?;
        let base = view.base_offset();
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
            let offset = base + u64::from(record.offset_delta);
            if offset >= from {
                events.push(PipelineEvent::from_record_in(Some(shared), partition, offset, &record));
            }
        }
        next = next.max(view.last_offset() + 1);
        rest = tail;
    }
    Ok((events, next))
}
