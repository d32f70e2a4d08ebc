//! Untrusted HTTP produce bodies: the body parser must never panic, allocate nothing per
//! event, hand out only JSON objects, and never more events than the bound the listener
//! charges memory for.
#![no_main]

#[path = "../../crates/flowgate-server/src/parse.rs"]
#[allow(dead_code)]
mod parse;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut events = 0usize;
    let mut payload = 0usize;
    if let Ok(n) = parse::parse_body(data, |e| {
        assert_eq!(e.first(), Some(&b'{'), "every event is an object");
        events += 1;
        payload += e.len();
        Ok::<(), std::convert::Infallible>(())
    }) {
        assert_eq!(n, events);
        assert!(n > 0);
        assert!(n <= parse::max_events(data), "{n} events, bound {}", parse::max_events(data));
        assert!(payload <= data.len());
    }
});
