//! An event inside a pipeline: the stored record plus, once a processor needs fields,
//! its parsed JSON document.

use bytes::Bytes;
use vrl::value::{KeyString, Value};

use crate::projection::Projection;

/// Sink mask meaning "every sink".
pub const ALL_SINKS: u64 = u64::MAX;

/// One event flowing through a pipeline.
#[derive(Clone, Debug)]
pub struct PipelineEvent {
    /// Source partition.
    pub partition: u32,
    /// Source offset (`u64::MAX` for events a processor created, e.g. window results).
    pub offset: u64,
    /// Event time (ms since the epoch).
    pub timestamp: i64,
    /// Key, if any.
    pub key: Option<Bytes>,
    /// Client id, if any.
    pub client_id: Option<Bytes>,
    /// Which sinks get it (bit i = sink i).
    pub sinks: u64,
    payload: Bytes,
    doc: Option<Value>,
    /// `doc` holds only the fields of a [`Projection`].
    partial: bool,
    dirty: bool,
}

/// Why an event's payload cannot be used as JSON.
#[derive(Debug, thiserror::Error)]
#[error("payload is not a JSON document: {0}")]
pub struct NotJson(String);

impl PipelineEvent {
    /// An event from a stored record (copying its bytes).
    pub fn from_record(partition: u32, offset: u64, record: &flowgate_core::RecordRef<'_>) -> PipelineEvent {
        PipelineEvent::from_record_in(None, partition, offset, record)
    }

    /// An event from a record that borrows from `buffer`: its bytes are shared with the
    /// buffer instead of copied.
    pub fn from_record_in(
        buffer: Option<&Bytes>,
        partition: u32,
        offset: u64,
        record: &flowgate_core::RecordRef<'_>,
    ) -> PipelineEvent {
        let share = |s: &[u8]| match buffer {
            Some(b) => b.slice_ref(s),
            None => Bytes::copy_from_slice(s),
        };
        PipelineEvent {
            partition,
            offset,
            timestamp: record.timestamp,
            key: record.key.map(share),
            client_id: record.client_id.map(share),
            sinks: ALL_SINKS,
            payload: share(record.payload),
            doc: None,
            partial: false,
            dirty: false,
        }
    }

    /// An event from its parts (a replayed event: the bytes it had when it failed).
    pub fn from_parts(
        partition: u32,
        offset: u64,
        timestamp: i64,
        key: Option<Bytes>,
        payload: Bytes,
    ) -> PipelineEvent {
        PipelineEvent {
            partition,
            offset,
            timestamp,
            key,
            client_id: None,
            sinks: ALL_SINKS,
            payload,
            doc: None,
            partial: false,
            dirty: false,
        }
    }

    /// Moves the event out, leaving an empty one in its place: for a processor that
    /// filters its batch in place and hands one event elsewhere (a dead letter).
    pub fn take(&mut self) -> PipelineEvent {
        std::mem::replace(self, PipelineEvent::from_parts(self.partition, self.offset, 0, None, Bytes::new()))
    }

    /// An event a processor creates from a document.
    pub fn from_document(partition: u32, timestamp: i64, key: Option<Bytes>, doc: Value) -> PipelineEvent {
        PipelineEvent {
            partition,
            offset: u64::MAX,
            timestamp,
            key,
            client_id: None,
            sinks: ALL_SINKS,
            payload: Bytes::new(),
            doc: Some(doc),
            partial: false,
            dirty: true,
        }
    }

    /// The parsed document, parsing the payload on first use.
    pub fn doc(&mut self) -> Result<&mut Value, NotJson> {
        if self.doc.is_none() {
            let value: Value = serde_json::from_slice(&self.payload).map_err(|e| NotJson(e.to_string()))?;
            self.doc = Some(value);
        }
        Ok(self.doc.as_mut().expect("just parsed"))
    }

    /// The document as [`Self::doc`] gives it, but parsed (on first use) into just the
    /// fields of `projection` when there is one. A payload that is no JSON object is
    /// parsed whole, which says what is wrong with it. Only for the processors of a
    /// pipeline whose every processor reads no more than `projection` and changes no
    /// document ([`crate::processors::Processor::project`]).
    pub fn doc_in(&mut self, projection: Option<&Projection>) -> Result<&mut Value, NotJson> {
        if let (None, Some(projection)) = (&self.doc, projection) {
            if let Some(doc) = projection.parse(&self.payload) {
                self.partial = true;
                return Ok(self.doc.insert(doc));
            }
        }
        self.doc()
    }

    /// The document for changing: the payload is re-serialized when next read. A
    /// projected document is parsed again whole first, so no field is lost.
    pub fn doc_mut(&mut self) -> Result<&mut Value, NotJson> {
        if self.partial && !self.dirty {
            self.discard_doc();
        }
        self.dirty = true;
        self.doc()
    }

    /// Replaces the document.
    pub fn set_doc(&mut self, doc: Value) {
        self.doc = Some(doc);
        self.partial = false;
        self.dirty = true;
    }

    /// Whether a processor changed the document since the payload was last written.
    pub fn is_changed(&self) -> bool {
        self.dirty
    }

    /// Forgets the parsed document and any change to it; the payload is as stored.
    pub fn discard_doc(&mut self) {
        self.doc = None;
        self.partial = false;
        self.dirty = false;
    }

    /// The JSON payload, re-serialized if a processor changed the document.
    pub fn payload(&mut self) -> &Bytes {
        if self.dirty {
            if let Some(doc) = &self.doc {
                self.payload = Bytes::from(to_json(doc));
            }
            self.dirty = false;
        }
        &self.payload
    }

    /// The payload as stored, without re-serializing (for events no processor changed).
    pub fn raw_payload(&self) -> &Bytes {
        &self.payload
    }
}

/// Reads a field by dotted path (`a.b.c`) from a document.
pub fn get_path<'v>(doc: &'v Value, path: &str) -> Option<&'v Value> {
    let mut current = doc;
    for part in path.split('.') {
        match current {
            Value::Object(map) => current = map.get(part)?,
            _ => return None,
        }
    }
    Some(current)
}

/// Sets a field by dotted path, creating objects on the way.
pub fn set_path(doc: &mut Value, path: &str, value: Value) {
    let mut current = doc;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if !matches!(current, Value::Object(_)) {
            *current = Value::Object(Default::default());
        }
        let Value::Object(map) = current else { unreachable!("made an object above") };
        if parts.peek().is_none() {
            map.insert(KeyString::from(part), value);
            return;
        }
        current = map.entry(KeyString::from(part)).or_insert_with(|| Value::Object(Default::default()));
    }
}

/// A number from a document value (integers and floats).
pub fn as_f64(value: &Value) -> Option<f64> {
    match value {
        Value::Integer(i) => Some(*i as f64),
        Value::Float(f) => Some(f.into_inner()),
        _ => None,
    }
}

/// A float as a document value (NaN becomes null).
pub fn float_value(f: f64) -> Value {
    if f.is_nan() {
        Value::Null
    } else {
        Value::from_f64_or_zero(f)
    }
}

/// A document value as a compact string key (strings without quotes), borrowed from
/// the value when it is a UTF-8 string.
pub fn key_str(value: &Value) -> std::borrow::Cow<'_, str> {
    match value.to_str_lossy() {
        Some(s) => s,
        None => std::borrow::Cow::Owned(to_json(value)),
    }
}

/// A document value as JSON text. Infallible for documents: their map keys are strings
/// and every value has a JSON form (a non-finite float is written as `null`).
pub fn to_json(value: &Value) -> String {
    serde_json::to_string(value).expect("a document value always has a JSON form")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_projected_event_keeps_its_payload_and_a_change_sees_every_field() {
        use crate::projection::Reads;
        let projection = Projection::of([Reads::path("a")]).unwrap();
        let payload = br#"{"a":1, "b":{"c":2}}"#;
        let mut e = PipelineEvent::from_parts(0, 0, 1, None, Bytes::from_static(payload));
        assert_eq!(to_json(e.doc_in(Some(&projection)).unwrap()), r#"{"a":1}"#, "only what the pipeline reads");
        assert_eq!(to_json(e.doc().unwrap()), r#"{"a":1}"#, "parsed once");
        assert_eq!(&e.payload()[..], payload, "the payload goes on as stored");
        // A change (a processor that should have said it reads everything) still sees all.
        set_path(e.doc_mut().unwrap(), "a", Value::Integer(3));
        assert_eq!(&e.payload()[..], br#"{"a":3,"b":{"c":2}}"#);
    }

    #[test]
    fn paths_read_and_write_nested_fields() {
        let mut doc: Value = serde_json::from_str(r#"{"a":{"b":1},"c":"x"}"#).unwrap();
        assert_eq!(get_path(&doc, "a.b"), Some(&Value::Integer(1)));
        assert_eq!(get_path(&doc, "a.z"), None);
        set_path(&mut doc, "a.d.e", Value::Boolean(true));
        set_path(&mut doc, "c", Value::Integer(2));
        assert_eq!(serde_json::to_string(&doc).unwrap(), r#"{"a":{"b":1,"d":{"e":true}},"c":2}"#);
        assert_eq!(key_str(get_path(&doc, "c").unwrap()), "2");
    }
}
