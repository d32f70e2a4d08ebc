//! The record batch: flowgate's unit of storage, transfer and processing.
//!
//! A batch is a fixed 59-byte header followed by a records section, optionally
//! compressed. All integers in the header are little-endian. The layout (also in
//! `docs/log-format.md`):
//!
//! | offset | size | field | meaning |
//! |---|---|---|---|
//! | 0 | 8 | base_offset | offset of the first record; assigned by the log at append |
//! | 8 | 4 | batch_length | bytes that follow this field (header rest + records) |
//! | 12 | 1 | magic | format version, 1 |
//! | 13 | 4 | crc | CRC32C (Castagnoli) of every byte from offset 17 to the end |
//! | 17 | 2 | attributes | bits 0–2: codec (0 none, 1 lz4, 2 zstd); others 0 |
//! | 19 | 4 | record_count | number of records, at least 1 |
//! | 23 | 8 | first_timestamp | timestamp of the first record, ms since the epoch |
//! | 31 | 8 | max_timestamp | largest record timestamp in the batch |
//! | 39 | 8 | producer_id | idempotent producer id; 0 = none |
//! | 47 | 8 | sequence | the producer's sequence number for this batch |
//! | 55 | 4 | records_length | uncompressed length of the records section |
//! | 59 | … | records | `record_count` records, compressed as the codec says |
//!
//! The CRC leaves out `base_offset`, `batch_length` and `magic`, so a batch is encoded
//! and checksummed once, outside any lock, and the log only patches its offset in.
//!
//! Each record:
//!
//! | field | encoding |
//! |---|---|
//! | body_length | varint: bytes after this field |
//! | attributes | u8: bit 0 key present, bit 1 client id present, bit 2 headers present |
//! | timestamp_delta | zig-zag varint: timestamp − first_timestamp |
//! | key | if present: varint length, bytes |
//! | client_id | if present: varint length, bytes |
//! | headers | if present: varint count, then per header varint name length, name (UTF-8), varint value length, value |
//! | payload | the rest of the body |

use crate::codec::Codec;
use crate::event::{Event, RecordRef};
use crate::varint;

/// Size of the fixed batch header.
pub const HEADER_LEN: usize = 59;
/// The only batch format version so far.
pub const MAGIC: u8 = 1;
/// Bytes of header counted by `batch_length`'s prefix (base offset and the length itself).
pub const LENGTH_PREFIX: usize = 12;
/// Where the CRC-covered bytes start.
const CRC_START: usize = 17;
/// The largest batch a decoder accepts (256 MiB): a length beyond it is corruption.
pub const MAX_BATCH_LEN: usize = 256 << 20;

const REC_KEY: u8 = 1;
const REC_CLIENT_ID: u8 = 2;
const REC_HEADERS: u8 = 4;

/// Why bytes are not a valid batch. Every variant names what to look at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Fewer bytes than the header or the stated length need.
    #[error("batch truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// The stated length is impossible.
    #[error("batch length {0} is out of range")]
    BadLength(u64),
    /// Unknown format version.
    #[error("unknown batch format version {0}")]
    BadMagic(u8),
    /// Checksum mismatch: the bytes were damaged.
    #[error("batch checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// Unknown codec or attribute bits.
    #[error("batch attributes {0:#06x} name an unknown codec or flag")]
    BadAttributes(u16),
    /// The records section did not decompress.
    #[error("records section does not decompress: {0}")]
    Decompress(String),
    /// A record is malformed.
    #[error("record {index} is malformed: {reason}")]
    BadRecord {
        /// Index of the record in the batch.
        index: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// The records section holds a different number of records than the header says.
    #[error("batch says {stated} records but holds {found}")]
    CountMismatch {
        /// From the header.
        stated: u32,
        /// Actually decoded.
        found: u32,
    },
    /// A batch must hold at least one record.
    #[error("batch holds no records")]
    Empty,
}

/// Identifies a batch sent by an idempotent producer, so a retry is stored once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProducerStamp {
    /// Producer id; 0 means the batch is not idempotent.
    pub producer_id: u64,
    /// Sequence number of the request that carried the batch.
    pub sequence: u64,
}

/// The decoded fixed header of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Bytes after the length prefix.
    pub batch_length: u32,
    /// Format version.
    pub magic: u8,
    /// Stored CRC32C.
    pub crc: u32,
    /// Attribute bits.
    pub attributes: u16,
    /// Number of records.
    pub record_count: u32,
    /// First record's timestamp.
    pub first_timestamp: i64,
    /// Largest record timestamp.
    pub max_timestamp: i64,
    /// Producer identity.
    pub producer: ProducerStamp,
    /// Uncompressed records length.
    pub records_length: u32,
}

#[inline]
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
#[inline]
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
#[inline]
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl BatchHeader {
    /// Reads the total size of the batch starting at `buf[0]` from its first 12 bytes,
    /// without validating anything else. `None` if fewer than 12 bytes are present.
    pub fn peek_total_len(buf: &[u8]) -> Option<u64> {
        if buf.len() < LENGTH_PREFIX {
            return None;
        }
        Some(LENGTH_PREFIX as u64 + u64::from(u32_at(buf, 8)))
    }

    /// Parses the fixed header and checks that the stated length is plausible.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < HEADER_LEN {
            return Err(BatchError::Truncated { need: HEADER_LEN, have: buf.len() });
        }
        let header = BatchHeader {
            base_offset: u64_at(buf, 0),
            batch_length: u32_at(buf, 8),
            magic: buf[12],
            crc: u32_at(buf, 13),
            attributes: u16_at(buf, 17),
            record_count: u32_at(buf, 19),
            first_timestamp: u64_at(buf, 23) as i64,
            max_timestamp: u64_at(buf, 31) as i64,
            producer: ProducerStamp { producer_id: u64_at(buf, 39), sequence: u64_at(buf, 47) },
            records_length: u32_at(buf, 55),
        };
        if header.magic != MAGIC {
            return Err(BatchError::BadMagic(header.magic));
        }
        let total = header.total_len();
        if !(HEADER_LEN..=MAX_BATCH_LEN).contains(&total) {
            return Err(BatchError::BadLength(total as u64));
        }
        if header.record_count == 0 {
            return Err(BatchError::Empty);
        }
        Ok(header)
    }

    /// The whole batch's size in bytes.
    pub fn total_len(&self) -> usize {
        LENGTH_PREFIX + self.batch_length as usize
    }

    /// The codec, if the attributes name a known one and no unknown bit is set.
    pub fn codec(&self) -> Result<Codec, BatchError> {
        if self.attributes & !0b111 != 0 {
            return Err(BatchError::BadAttributes(self.attributes));
        }
        Codec::from_id((self.attributes & 0b111) as u8).ok_or(BatchError::BadAttributes(self.attributes))
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        // Both fields come from untrusted bytes: saturate rather than wrap or panic.
        self.base_offset.saturating_add(u64::from(self.record_count).saturating_sub(1))
    }
}

/// Patches the base offset of an encoded batch in place.
#[inline]
pub fn set_base_offset(batch: &mut [u8], base_offset: u64) {
    batch[0..8].copy_from_slice(&base_offset.to_le_bytes());
}

/// CRC32C (Castagnoli) of arbitrary bytes; the checksum used everywhere in flowgate.
pub fn crc32c_bytes(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Moves every record timestamp of an encoded batch so the first is `first_timestamp`
/// (record timestamps are deltas from the header's), and re-seals the checksum. Lets a
/// load generator resend prebuilt batches with current event times.
pub fn restamp(batch: &mut [u8], first_timestamp: i64) -> Result<(), BatchError> {
    let header = BatchHeader::parse(batch)?;
    let shift = first_timestamp.wrapping_sub(header.first_timestamp);
    batch[23..31].copy_from_slice(&first_timestamp.to_le_bytes());
    batch[31..39].copy_from_slice(&header.max_timestamp.wrapping_add(shift).to_le_bytes());
    let crc = compute_crc(batch);
    batch[13..17].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Computes the CRC32C that covers `batch` (a whole encoded batch).
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[CRC_START..])
}

/// A complete encoded batch, ready to append (its base offset still 0).
#[derive(Clone, Debug, Default)]
pub struct EncodedBatch {
    /// The batch bytes.
    pub bytes: Vec<u8>,
    /// Number of records.
    pub record_count: u32,
    /// First record's timestamp.
    pub first_timestamp: i64,
    /// Largest timestamp.
    pub max_timestamp: i64,
    /// Producer identity stamped into the header.
    pub producer: ProducerStamp,
}

/// Builds batches. Reuse one builder: its buffers keep their capacity, so steady-state
/// encoding allocates nothing per record and nothing per batch beyond the output.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    records: Vec<u8>,
    count: u32,
    first_timestamp: i64,
    max_timestamp: i64,
    scratch: Vec<u8>,
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> BatchBuilder {
        BatchBuilder::default()
    }

    /// An empty builder with room for `bytes` of records.
    pub fn with_capacity(bytes: usize) -> BatchBuilder {
        BatchBuilder { records: Vec::with_capacity(bytes), ..BatchBuilder::default() }
    }

    /// Records pushed so far.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// True when nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded size of the records pushed so far (uncompressed).
    pub fn records_len(&self) -> usize {
        self.records.len()
    }

    /// Gives back buffer capacity above `bytes`, so one large batch does not pin its size
    /// for as long as the builder lives.
    pub fn shrink_to(&mut self, bytes: usize) {
        self.records.shrink_to(bytes);
        self.scratch.shrink_to(bytes);
    }

    /// Bytes of buffer capacity the builder holds.
    pub fn capacity_bytes(&self) -> usize {
        self.records.capacity().saturating_add(self.scratch.capacity())
    }

    /// Forgets the pushed records, keeping capacity.
    pub fn clear(&mut self) {
        self.records.clear();
        self.count = 0;
    }

    /// Appends one record.
    #[inline]
    pub fn push<'h>(
        &mut self,
        timestamp: i64,
        key: Option<&[u8]>,
        client_id: Option<&[u8]>,
        headers: impl ExactSizeIterator<Item = (&'h str, &'h [u8])> + Clone,
        payload: &[u8],
    ) {
        if self.count == 0 {
            self.first_timestamp = timestamp;
            self.max_timestamp = timestamp;
        } else if timestamp > self.max_timestamp {
            self.max_timestamp = timestamp;
        }
        let delta = timestamp.wrapping_sub(self.first_timestamp);
        let zigzag = ((delta << 1) ^ (delta >> 63)) as u64;
        let mut attrs = 0u8;
        let mut body = 1 + varint::len_u64(zigzag) + payload.len();
        if let Some(k) = key {
            attrs |= REC_KEY;
            body += varint::len_u64(k.len() as u64) + k.len();
        }
        if let Some(c) = client_id {
            attrs |= REC_CLIENT_ID;
            body += varint::len_u64(c.len() as u64) + c.len();
        }
        let header_count = headers.len();
        if header_count > 0 {
            attrs |= REC_HEADERS;
            body += varint::len_u64(header_count as u64);
            for (n, v) in headers.clone() {
                body += varint::len_u64(n.len() as u64) + n.len() + varint::len_u64(v.len() as u64) + v.len();
            }
        }
        let out = &mut self.records;
        out.reserve(body + 10);
        varint::put_u64(out, body as u64);
        out.push(attrs);
        varint::put_u64(out, zigzag);
        if let Some(k) = key {
            varint::put_u64(out, k.len() as u64);
            out.extend_from_slice(k);
        }
        if let Some(c) = client_id {
            varint::put_u64(out, c.len() as u64);
            out.extend_from_slice(c);
        }
        if header_count > 0 {
            varint::put_u64(out, header_count as u64);
            for (n, v) in headers {
                varint::put_u64(out, n.len() as u64);
                out.extend_from_slice(n.as_bytes());
                varint::put_u64(out, v.len() as u64);
                out.extend_from_slice(v);
            }
        }
        out.extend_from_slice(payload);
        self.count += 1;
    }

    /// Appends an owned event; `default_timestamp` stands in when it has none.
    pub fn push_event(&mut self, event: &Event, default_timestamp: i64) {
        self.push(
            event.timestamp.unwrap_or(default_timestamp),
            event.key.as_deref(),
            event.client_id.as_deref(),
            event.headers.iter().map(|h| (h.name.as_str(), &h.value[..])),
            &event.payload,
        );
    }

    /// Appends a decoded record unchanged (timestamp included).
    pub fn push_record(&mut self, record: &RecordRef<'_>) {
        let headers: Vec<(&str, &[u8])> =
            if record.header_count == 0 { Vec::new() } else { record.headers().collect() };
        self.push(record.timestamp, record.key, record.client_id, headers.into_iter(), record.payload);
    }

    /// Appends a record with only a payload.
    #[inline]
    pub fn push_payload(&mut self, timestamp: i64, key: Option<&[u8]>, payload: &[u8]) {
        self.push(timestamp, key, None, std::iter::empty(), payload);
    }

    /// Encodes the pushed records as one batch into `out` (replacing its contents) and
    /// clears the builder. Fails only if compression fails or the builder is empty.
    pub fn finish_into(
        &mut self,
        codec: Codec,
        producer: ProducerStamp,
        out: &mut Vec<u8>,
    ) -> Result<EncodedBatch, BatchError> {
        if self.count == 0 {
            return Err(BatchError::Empty);
        }
        out.clear();
        out.reserve(HEADER_LEN + self.records.len());
        out.resize(HEADER_LEN, 0);
        match codec {
            Codec::None => out.extend_from_slice(&self.records),
            other => {
                self.scratch.clear();
                other.compress(&self.records, &mut self.scratch).map_err(|e| BatchError::Decompress(e.to_string()))?;
                out.extend_from_slice(&self.scratch);
            }
        }
        let batch_length = (out.len() - LENGTH_PREFIX) as u32;
        out[8..12].copy_from_slice(&batch_length.to_le_bytes());
        out[12] = MAGIC;
        out[17..19].copy_from_slice(&(codec as u16).to_le_bytes());
        out[19..23].copy_from_slice(&self.count.to_le_bytes());
        out[23..31].copy_from_slice(&self.first_timestamp.to_le_bytes());
        out[31..39].copy_from_slice(&self.max_timestamp.to_le_bytes());
        out[39..47].copy_from_slice(&producer.producer_id.to_le_bytes());
        out[47..55].copy_from_slice(&producer.sequence.to_le_bytes());
        out[55..59].copy_from_slice(&(self.records.len() as u32).to_le_bytes());
        let crc = compute_crc(out);
        out[13..17].copy_from_slice(&crc.to_le_bytes());
        let encoded = EncodedBatch {
            bytes: Vec::new(),
            record_count: self.count,
            first_timestamp: self.first_timestamp,
            max_timestamp: self.max_timestamp,
            producer,
        };
        self.clear();
        Ok(encoded)
    }

    /// Encodes the pushed records into a new [`EncodedBatch`] and clears the builder.
    pub fn finish(&mut self, codec: Codec, producer: ProducerStamp) -> Result<EncodedBatch, BatchError> {
        let mut bytes = Vec::new();
        let mut batch = self.finish_into(codec, producer, &mut bytes)?;
        batch.bytes = bytes;
        Ok(batch)
    }
}

/// A validated batch borrowed from a buffer.
#[derive(Clone, Copy, Debug)]
pub struct BatchView<'a> {
    /// The decoded header.
    pub header: BatchHeader,
    /// The whole batch, header included.
    pub bytes: &'a [u8],
}

impl<'a> BatchView<'a> {
    /// Parses the batch at the start of `buf` and verifies its CRC. Returns the batch and
    /// the bytes after it. Never panics, whatever `buf` holds.
    pub fn parse(buf: &'a [u8]) -> Result<(BatchView<'a>, &'a [u8]), BatchError> {
        let header = BatchHeader::parse(buf)?;
        let total = header.total_len();
        if buf.len() < total {
            return Err(BatchError::Truncated { need: total, have: buf.len() });
        }
        let bytes = &buf[..total];
        let computed = compute_crc(bytes);
        if computed != header.crc {
            return Err(BatchError::BadCrc { stored: header.crc, computed });
        }
        header.codec()?;
        Ok((BatchView { header, bytes }, &buf[total..]))
    }

    /// Offset of the first record.
    pub fn base_offset(&self) -> u64 {
        self.header.base_offset
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        self.header.last_offset()
    }

    /// The records section as stored (maybe compressed).
    pub fn raw_records(&self) -> &'a [u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// The uncompressed records section: borrowed when the batch is not compressed,
    /// otherwise decompressed into `scratch`.
    pub fn records_section<'s>(&self, scratch: &'s mut Vec<u8>) -> Result<&'s [u8], BatchError>
    where
        'a: 's,
    {
        let codec = self.header.codec()?;
        if codec == Codec::None {
            if self.raw_records().len() != self.header.records_length as usize {
                return Err(BatchError::BadLength(self.header.records_length as u64));
            }
            return Ok(self.raw_records());
        }
        if self.header.records_length as usize > MAX_BATCH_LEN {
            return Err(BatchError::BadLength(self.header.records_length as u64));
        }
        codec
            .decompress(self.raw_records(), self.header.records_length as usize, scratch)
            .map_err(|e| BatchError::Decompress(e.to_string()))?;
        Ok(&scratch[..])
    }

    /// Iterates the records. `scratch` holds decompressed bytes when the batch is
    /// compressed; reuse it across batches.
    pub fn records<'s>(&self, scratch: &'s mut Vec<u8>) -> Result<RecordIter<'s>, BatchError>
    where
        'a: 's,
    {
        let first_timestamp = self.header.first_timestamp;
        let stated = self.header.record_count;
        let section = self.records_section(scratch)?;
        Ok(RecordIter { buf: section, pos: 0, index: 0, stated, first_timestamp })
    }

    /// Decodes every record, checking that the count matches the header. Useful where
    /// a whole batch must be known good before it is stored.
    pub fn validate_records(&self, scratch: &mut Vec<u8>) -> Result<(), BatchError> {
        for record in self.records(scratch)? {
            record?;
        }
        Ok(())
    }
}

/// Iterator over the records of a batch; yields an error and stops at the first
/// malformed record or on a count mismatch.
#[derive(Debug)]
pub struct RecordIter<'s> {
    buf: &'s [u8],
    pos: usize,
    index: u32,
    stated: u32,
    first_timestamp: i64,
}

fn bad(index: u32, reason: &'static str) -> BatchError {
    BatchError::BadRecord { index, reason }
}

fn read_len_prefixed<'b>(buf: &'b [u8], pos: &mut usize) -> Option<&'b [u8]> {
    let len = varint::get_u64(buf, pos)?;
    let end = pos.checked_add(usize::try_from(len).ok()?)?;
    let slice = buf.get(*pos..end)?;
    *pos = end;
    Some(slice)
}

pub(crate) fn read_header<'b>(buf: &'b [u8], pos: &mut usize) -> Option<(&'b [u8], &'b [u8])> {
    let name = read_len_prefixed(buf, pos)?;
    let value = read_len_prefixed(buf, pos)?;
    Some((name, value))
}

impl<'s> RecordIter<'s> {
    /// Iterates an uncompressed records section directly (as [`BatchView::records`]
    /// does), for callers that hold the section in a buffer of their own.
    pub fn over(section: &'s [u8], first_timestamp: i64, record_count: u32) -> RecordIter<'s> {
        RecordIter { buf: section, pos: 0, index: 0, stated: record_count, first_timestamp }
    }

    fn decode_one(&mut self) -> Result<RecordRef<'s>, BatchError> {
        let index = self.index;
        let body =
            read_len_prefixed(self.buf, &mut self.pos).ok_or_else(|| bad(index, "length runs past the batch"))?;
        let mut p = 0usize;
        let attrs = *body.first().ok_or_else(|| bad(index, "empty body"))?;
        p += 1;
        if attrs & !(REC_KEY | REC_CLIENT_ID | REC_HEADERS) != 0 {
            return Err(bad(index, "unknown attribute bits"));
        }
        let delta = varint::get_i64(body, &mut p).ok_or_else(|| bad(index, "bad timestamp delta"))?;
        let key = if attrs & REC_KEY != 0 {
            Some(read_len_prefixed(body, &mut p).ok_or_else(|| bad(index, "bad key length"))?)
        } else {
            None
        };
        let client_id = if attrs & REC_CLIENT_ID != 0 {
            Some(read_len_prefixed(body, &mut p).ok_or_else(|| bad(index, "bad client id length"))?)
        } else {
            None
        };
        let (headers_raw, header_count) = if attrs & REC_HEADERS != 0 {
            let count = varint::get_u64(body, &mut p).ok_or_else(|| bad(index, "bad header count"))?;
            let count = u32::try_from(count).map_err(|_| bad(index, "header count too large"))?;
            let start = p;
            for _ in 0..count {
                let (name, _) = read_header(body, &mut p).ok_or_else(|| bad(index, "bad header"))?;
                std::str::from_utf8(name).map_err(|_| bad(index, "header name is not UTF-8"))?;
            }
            (&body[start..p], count)
        } else {
            (&body[0..0], 0)
        };
        Ok(RecordRef {
            offset_delta: index,
            timestamp: self.first_timestamp.wrapping_add(delta),
            key,
            client_id,
            headers_raw,
            header_count,
            payload: &body[p..],
        })
    }
}

impl<'s> Iterator for RecordIter<'s> {
    type Item = Result<RecordRef<'s>, BatchError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.stated {
            if self.pos < self.buf.len() {
                self.pos = self.buf.len();
                return Some(Err(BatchError::CountMismatch {
                    stated: self.stated,
                    found: self.index.saturating_add(1),
                }));
            }
            return None;
        }
        if self.pos >= self.buf.len() {
            let found = self.index;
            self.index = self.stated;
            return Some(Err(BatchError::CountMismatch { stated: self.stated, found }));
        }
        match self.decode_one() {
            Ok(record) => {
                self.index += 1;
                Some(Ok(record))
            }
            Err(e) => {
                self.index = self.stated;
                self.pos = self.buf.len();
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_event() -> impl Strategy<Value = Event> {
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
            proptest::option::of(any::<i64>()),
            proptest::collection::vec(("[a-z]{0,8}", proptest::collection::vec(any::<u8>(), 0..8)), 0..3),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(key, id, ts, headers, payload)| Event {
                key: key.map(Into::into),
                client_id: id.map(Into::into),
                timestamp: ts,
                headers: headers.into_iter().map(|(n, v)| crate::event::Header { name: n, value: v.into() }).collect(),
                payload: payload.into(),
            })
    }

    fn codec() -> impl Strategy<Value = Codec> {
        prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd)]
    }

    proptest! {
        #[test]
        fn round_trip(events in proptest::collection::vec(arb_event(), 1..40), codec in codec(), base in any::<u32>(), pid in any::<u64>(), seq in any::<u64>()) {
            let mut builder = BatchBuilder::new();
            for e in &events {
                builder.push_event(e, 1_700_000_000_000);
            }
            let mut batch = builder.finish(codec, ProducerStamp { producer_id: pid, sequence: seq }).unwrap();
            set_base_offset(&mut batch.bytes, u64::from(base));
            let (view, rest) = BatchView::parse(&batch.bytes).unwrap();
            prop_assert!(rest.is_empty());
            prop_assert_eq!(view.header.record_count as usize, events.len());
            prop_assert_eq!(view.base_offset(), u64::from(base));
            prop_assert_eq!(view.header.producer, ProducerStamp { producer_id: pid, sequence: seq });
            let mut scratch = Vec::new();
            let decoded: Vec<Event> = view.records(&mut scratch).unwrap().map(|r| r.unwrap().to_event()).collect();
            let expected: Vec<Event> = events.iter().map(|e| Event { timestamp: Some(e.timestamp.unwrap_or(1_700_000_000_000)), ..e.clone() }).collect();
            prop_assert_eq!(decoded, expected);
        }

        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut scratch = Vec::new();
            if let Ok((view, _)) = BatchView::parse(&bytes) {
                if let Ok(iter) = view.records(&mut scratch) {
                    for r in iter { let _ = r; }
                }
            }
        }

        #[test]
        fn any_flipped_bit_is_detected(events in proptest::collection::vec(arb_event(), 1..5), bit in any::<proptest::sample::Index>()) {
            let mut builder = BatchBuilder::new();
            for e in &events { builder.push_event(e, 0); }
            let mut batch = builder.finish(Codec::None, ProducerStamp::default()).unwrap();
            // Bits outside the CRC's reach (base offset) are checked by the log instead.
            let nbits = (batch.bytes.len() - 8) * 8;
            let b = 64 + bit.index(nbits);
            batch.bytes[b / 8] ^= 1 << (b % 8);
            let mut scratch = Vec::new();
            let ok = match BatchView::parse(&batch.bytes) {
                Ok((view, rest)) => rest.is_empty() && view.validate_records(&mut scratch).is_ok(),
                Err(_) => false,
            };
            prop_assert!(!ok, "flipped bit {} went unnoticed", b);
        }
    }

    #[test]
    fn restamping_shifts_every_record_and_keeps_the_batch_valid() {
        let mut builder = BatchBuilder::new();
        for ts in [100, 90, 130] {
            builder.push_payload(ts, None, b"{}");
        }
        let mut batch = builder.finish(Codec::Lz4, ProducerStamp::default()).unwrap();
        restamp(&mut batch.bytes, 1000).unwrap();
        let (view, _) = BatchView::parse(&batch.bytes).unwrap();
        assert_eq!((view.header.first_timestamp, view.header.max_timestamp), (1000, 1030));
        let mut scratch = Vec::new();
        let times: Vec<i64> = view.records(&mut scratch).unwrap().map(|r| r.unwrap().timestamp).collect();
        assert_eq!(times, vec![1000, 990, 1030]);
    }

    #[test]
    fn a_records_length_no_input_could_inflate_to_is_refused_before_allocating() {
        for codec in [Codec::Lz4, Codec::Zstd] {
            let mut builder = BatchBuilder::new();
            builder.push_payload(1, None, b"{\"a\":1}");
            let mut batch = builder.finish(codec, ProducerStamp::default()).unwrap();
            // The header claims 256 MiB; the checksum is made to match, as an attacker would.
            batch.bytes[55..59].copy_from_slice(&(256u32 << 20).to_le_bytes());
            let crc = compute_crc(&batch.bytes);
            batch.bytes[13..17].copy_from_slice(&crc.to_le_bytes());
            let (view, _) = BatchView::parse(&batch.bytes).unwrap();
            let mut scratch = Vec::new();
            let err = view.records(&mut scratch).unwrap_err();
            assert!(matches!(err, BatchError::Decompress(_)), "{codec}: {err}");
            assert!(scratch.capacity() < 1 << 20, "{codec}: allocated {} bytes", scratch.capacity());
        }
    }

    #[test]
    fn offsets_near_the_end_of_the_range_saturate_instead_of_overflowing() {
        let mut builder = BatchBuilder::new();
        for i in 0..3 {
            builder.push_payload(i, None, b"x");
        }
        let mut batch = builder.finish(Codec::None, ProducerStamp::default()).unwrap();
        set_base_offset(&mut batch.bytes, u64::MAX - 1);
        let (view, _) = BatchView::parse(&batch.bytes).unwrap();
        assert_eq!(view.last_offset(), u64::MAX);
    }

    #[test]
    fn truncated_batches_are_rejected_at_every_length() {
        let mut builder = BatchBuilder::new();
        for i in 0..10u8 {
            builder.push_payload(i64::from(i), Some(&[i]), &[i; 30]);
        }
        let batch = builder.finish(Codec::Lz4, ProducerStamp::default()).unwrap();
        for len in 0..batch.bytes.len() {
            assert!(BatchView::parse(&batch.bytes[..len]).is_err(), "accepted {len} bytes");
        }
        assert!(BatchView::parse(&batch.bytes).is_ok());
    }
}
