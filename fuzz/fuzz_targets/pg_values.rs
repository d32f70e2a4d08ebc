//! Untrusted text of column values from a PostgreSQL replication stream or snapshot: the
//! conversion to JSON (arrays parsed element by element, nested) must never panic, and
//! an array it converts must hold as many top-level elements as the text names.
#![no_main]

#[path = "../../crates/flowgate-connectors/src/sources/postgres_cdc/pgoutput.rs"]
#[allow(dead_code)]
mod pgoutput;
#[path = "../../crates/flowgate-connectors/src/sources/postgres_cdc/value.rs"]
#[allow(dead_code)]
mod value;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for type_oid in [16, 17, 20, 114, 701, 1007, 1009, 1185, 3807, 25] {
        let _ = value::to_json(type_oid, &pgoutput::Datum::Text(data));
    }
    if let Some(serde_json::Value::Array(items)) = value::array_to_json(25, data) {
        assert!(items.len() <= data.len());
    }
});
