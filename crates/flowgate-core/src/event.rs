//! The event model: what a client sends and what a reader gets back.

use bytes::Bytes;

/// A header: a name and an opaque value, carried alongside the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Header name (UTF-8).
    pub name: String,
    /// Header value (opaque bytes).
    pub value: Bytes,
}

/// An owned event, as a client builds it before sending.
///
/// The topic is not part of the event: a batch belongs to one topic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// Picks the partition; events of one key keep their order.
    pub key: Option<Bytes>,
    /// The client's own id for the event, used by dedup processors.
    pub client_id: Option<Bytes>,
    /// Event time in ms since the epoch; the ingest time when `None`.
    pub timestamp: Option<i64>,
    /// Optional headers.
    pub headers: Vec<Header>,
    /// The payload; JSON when processors need fields.
    pub payload: Bytes,
}

impl Event {
    /// An event with only a payload.
    pub fn from_payload(payload: impl Into<Bytes>) -> Event {
        Event { payload: payload.into(), ..Event::default() }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Event {
        self.key = Some(key.into());
        self
    }

    /// Sets the event time.
    pub fn with_timestamp(mut self, timestamp_ms: i64) -> Event {
        self.timestamp = Some(timestamp_ms);
        self
    }
}

/// A record decoded from a batch, borrowing every byte from the batch's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Position in its batch; the record's offset is the batch's base offset plus this.
    pub offset_delta: u32,
    /// Event time, ms since the epoch.
    pub timestamp: i64,
    /// The key, if any.
    pub key: Option<&'a [u8]>,
    /// The client id, if any.
    pub client_id: Option<&'a [u8]>,
    /// The headers, still encoded; iterate them with [`RecordRef::headers`].
    pub(crate) headers_raw: &'a [u8],
    /// Number of headers in `headers_raw`.
    pub header_count: u32,
    /// The payload.
    pub payload: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// The record's headers as (name, value) pairs. Names were checked to be UTF-8 when
    /// the record was decoded.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let raw = self.headers_raw;
        let mut pos = 0usize;
        (0..self.header_count).map_while(move |_| {
            let (name, value) = crate::batch::read_header(raw, &mut pos)?;
            Some((std::str::from_utf8(name).ok()?, value))
        })
    }

    /// Copies the record into an owned [`Event`].
    pub fn to_event(&self) -> Event {
        Event {
            key: self.key.map(Bytes::copy_from_slice),
            client_id: self.client_id.map(Bytes::copy_from_slice),
            timestamp: Some(self.timestamp),
            headers: self
                .headers()
                .map(|(n, v)| Header { name: n.to_owned(), value: Bytes::copy_from_slice(v) })
                .collect(),
            payload: Bytes::copy_from_slice(self.payload),
        }
    }
}
