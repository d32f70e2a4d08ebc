//! Untrusted events whose key, time and client id are read from their JSON (HTTP and
//! NDJSON ingest with `[ingest]` key_field and friends, `flowgate send`): the reader must
//! never panic, refuse whatever is not a JSON object, copy no more than the event holds,
//! and give only times in range; the time parsers must do the same for any text.
#![no_main]

use flowgate_core::fields::FieldProblem;
use flowgate_core::timestamp::{number_to_ms, parse_rfc3339, MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS};
use flowgate_core::{FieldPath, FieldSpec, TimestampUnit};
use libfuzzer_sys::fuzz_target;

const UNITS: [TimestampUnit; 4] = [TimestampUnit::Ms, TimestampUnit::S, TimestampUnit::Us, TimestampUnit::Rfc3339];
const PATHS: [&str; 6] = ["a", "b", "a.b", "a.b.c", "c", "b.a"];

fn in_range(ms: i64) -> bool {
    (MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(&ms)
}

fuzz_target!(|data: &[u8]| {
    // The first two bytes pick the paths and the unit; the rest is the event.
    let (Some(&a), Some(&b)) = (data.first(), data.get(1)) else { return };
    let event = &data[2..];
    let path = |n: u8| (n % 7 != 6).then(|| FieldPath::parse(PATHS[usize::from(n % 7)]).unwrap());
    let spec = FieldSpec {
        key: path(a),
        timestamp: path(a / 7),
        timestamp_unit: UNITS[usize::from(b % 4)],
        client_id: path(b / 4),
    };
    let object = event.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'{');
    match spec.extract(event) {
        Ok(fields) => {
            assert!(object && serde_json::from_slice::<serde::de::IgnoredAny>(event).is_ok(), "only objects are read");
            assert!(fields.timestamp.is_none_or(in_range));
            assert!(fields.key.is_none_or(|k| k.len() <= event.len()));
            assert!(fields.client_id.is_none_or(|c| c.len() <= event.len()));
        }
        Err(e) if e.problem == FieldProblem::NotAnObject => {
            let whole = serde_json::from_slice::<serde_json::Value>(event);
            assert!(!whole.is_ok_and(|v| v.is_object()), "a valid object was refused: {e}");
        }
        Err(e) => assert!(!e.message.is_empty() && e.message.len() < 400, "{}", e.message),
    }
    if let Ok(text) = std::str::from_utf8(event) {
        for unit in UNITS {
            assert!(number_to_ms(text, unit).map_or(true, in_range));
        }
        assert!(parse_rfc3339(text).map_or(true, in_range));
    }
});
