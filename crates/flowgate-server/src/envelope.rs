//! A stored event as JSON — its envelope: topic, partition, offset, key, timestamp,
//! client id, headers and payload. `GET /v1/topics/{topic}/events?format=envelope` and
//! `flowgate tail --format json` answer exactly this.

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

/// One stored event: `key` and `client_id` null when absent, header values and
/// non-JSON payloads as [`bytes_json`], a JSON payload as itself. A header stored more
/// than once shows as an array of its values in stored order (a single value is never
/// an array).
pub fn envelope(topic: &str, partition: u32, offset: u64, record: &flowgate_core::RecordRef<'_>) -> Value {
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
    let payload = serde_json::from_slice::<Value>(record.payload).unwrap_or_else(|_| bytes_json(record.payload));
    json!({
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": record.key.map(bytes_json),
        "timestamp": record.timestamp,
        "client_id": record.client_id.map(bytes_json),
        "headers": headers,
        "payload": payload,
    })
}

/// About how many bytes an event adds to an answer: its key, client id, header and
/// payload bytes (the JSON around them is not counted).
pub fn approx_len(record: &flowgate_core::RecordRef<'_>) -> usize {
    let headers: usize = record.headers().map(|(n, v)| n.len().saturating_add(v.len())).sum();
    record
        .payload
        .len()
        .saturating_add(record.key.map_or(0, <[u8]>::len))
        .saturating_add(record.client_id.map_or(0, <[u8]>::len))
        .saturating_add(headers)
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
            envelope("t", 2, 40, &records[0]),
            json!({"topic": "t", "partition": 2, "offset": 40, "key": "k", "timestamp": 7,
                   "client_id": {"base64": "/g=="}, "headers": {"h": "v"}, "payload": {"a": 1}})
        );
        let second = envelope("t", 2, 41, &records[1]);
        assert_eq!(second["headers"], json!({}));
        assert_eq!((second["key"].clone(), second["payload"].clone()), (Value::Null, json!("not json")));
        assert_eq!(approx_len(&records[0]), 7 + 1 + 1 + 2);
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
        assert_eq!(envelope("t", 0, 0, &record)["headers"], json!({"x": ["1", {"base64": "/w=="}, "3"], "y": "only"}));
    }
}
