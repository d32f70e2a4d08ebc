//! A stored event as JSON — its envelope: topic, partition, offset, key, timestamp,
//! client id, headers and payload. `GET /v1/topics/{topic}/events?format=envelope` and
//! `flowgate tail --format json` answer exactly this.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

/// Bytes as JSON: a string when they are UTF-8, else `{"base64": …}` (standard
/// alphabet, padded).
pub fn bytes_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => {
            use base64::Engine as _;
            json!({ "base64": base64::engine::general_purpose::STANDARD.encode(bytes) })
        }
    }
}

/// A payload as JSON: its own text when it is a JSON document (as stored, never parsed
/// into a tree, so a large payload costs no more than its bytes), else [`bytes_json`].
pub enum PayloadJson<'a> {
    /// The payload's JSON text.
    Json(&'a RawValue),
    /// A payload that is not JSON.
    Bytes(Value),
}

impl<'a> PayloadJson<'a> {
    /// `payload` as JSON.
    pub fn of(payload: &'a [u8]) -> PayloadJson<'a> {
        match serde_json::from_slice::<&RawValue>(payload) {
            Ok(raw) => PayloadJson::Json(raw),
            Err(_) => PayloadJson::Bytes(bytes_json(payload)),
        }
    }
}

impl Serialize for PayloadJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            PayloadJson::Json(raw) => raw.serialize(serializer),
            PayloadJson::Bytes(value) => value.serialize(serializer),
        }
    }
}

/// One stored event, serialized as `{"topic", "partition", "offset", "key", "timestamp",
/// "client_id", "headers", "payload"}`: `key` and `client_id` null when absent, header
/// values and non-JSON payloads as [`bytes_json`], a JSON payload as itself. A header
/// stored more than once shows as an array of its values in stored order (a single
/// value is never an array).
#[derive(Serialize)]
pub struct Envelope<'a> {
    topic: &'a str,
    partition: u32,
    offset: u64,
    key: Option<Value>,
    timestamp: i64,
    client_id: Option<Value>,
    headers: Map<String, Value>,
    payload: PayloadJson<'a>,
}

/// The envelope of `record`, stored at `offset` of `topic`'s `partition`.
pub fn envelope<'a>(
    topic: &'a str,
    partition: u32,
    offset: u64,
    record: &flowgate_core::RecordRef<'a>,
) -> Envelope<'a> {
    let mut headers = Map::new();
    for (name, value) in record.headers() {
        let value = bytes_json(value);
        match headers.get_mut(name) {
            None => {
                headers.insert(name.to_owned(), value);
            }
            Some(Value::Array(values)) => values.push(value),
            Some(first) => *first = Value::Array(vec![first.take(), value]),
        }
    }
    Envelope {
        topic,
        partition,
        offset,
        key: record.key.map(bytes_json),
        timestamp: record.timestamp,
        client_id: record.client_id.map(bytes_json),
        headers,
        payload: PayloadJson::of(record.payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_text_when_they_can_be() {
        assert_eq!(bytes_json(b"abc"), json!("abc"));
        assert_eq!(bytes_json(&[0xff, 0x00]), json!({"base64": "/wA="}));
    }

    #[test]
    fn an_envelope_holds_every_field() {
        let mut b = flowgate_core::BatchBuilder::new();
        b.push(7, Some(b"k"), Some(&[0xfe][..]), std::iter::once(("h", &b"v"[..])), br#"{"a":1}"#);
        b.push(8, None, None, std::iter::empty::<(&str, &[u8])>(), b"not json");
        let batch = b.finish(flowgate_core::Codec::None, flowgate_core::ProducerStamp::default()).unwrap();
        let (view, _) = flowgate_core::BatchView::parse(&batch.bytes).unwrap();
        let mut scratch = Vec::new();
        let records: Vec<_> = view.records(&mut scratch).unwrap().map(Result::unwrap).collect();
        assert_eq!(
            serde_json::to_value(envelope("t", 2, 40, &records[0])).unwrap(),
            json!({"topic": "t", "partition": 2, "offset": 40, "key": "k", "timestamp": 7,
                   "client_id": {"base64": "/g=="}, "headers": {"h": "v"}, "payload": {"a": 1}})
        );
        let second = serde_json::to_value(envelope("t", 2, 41, &records[1])).unwrap();
        assert_eq!(second["headers"], json!({}));
        assert_eq!((second["key"].clone(), second["payload"].clone()), (Value::Null, json!("not json")));
    }

    #[test]
    fn a_header_stored_several_times_shows_every_value_in_order() {
        let mut b = flowgate_core::BatchBuilder::new();
        let headers = [("x", &b"1"[..]), ("y", &b"only"[..]), ("x", &[0xff][..]), ("x", &b"3"[..])];
        b.push(1, None, None, headers.into_iter(), b"{}");
        let batch = b.finish(flowgate_core::Codec::None, flowgate_core::ProducerStamp::default()).unwrap();
        let (view, _) = flowgate_core::BatchView::parse(&batch.bytes).unwrap();
        let mut scratch = Vec::new();
        let record = view.records(&mut scratch).unwrap().next().unwrap().unwrap();
        assert_eq!(
            serde_json::to_value(envelope("t", 0, 0, &record)).unwrap()["headers"],
            json!({"x": ["1", {"base64": "/w=="}, "3"], "y": "only"})
        );
    }
}
