//! Untrusted bytes from a PostgreSQL replication stream: the pgoutput decoder must never
//! panic or allocate for counts the message cannot hold, and whatever it decodes must
//! encode back to the same bytes (nothing is read past or around a field).
#![no_main]

#[path = "../../crates/flowgate-connectors/src/sources/postgres_cdc/pgoutput.rs"]
#[allow(dead_code)]
mod pgoutput;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = pgoutput::decode(data) {
        let mut again = Vec::new();
        pgoutput::encode(&message, &mut again);
        // Column flags other than the key bit are not kept; everything else round-trips.
        if !matches!(message, pgoutput::Message::Relation(_)) {
            assert_eq!(again, data, "{message:?}");
        }
        assert_eq!(pgoutput::decode(&again).as_ref(), Ok(&message));
    }
});
