//! Untrusted RFC 3339 times (reset targets over HTTP, `--from` of the CLI): the parser
//! must never panic or overflow, and whatever it accepts lies within years 0000–9999
//! (give or take a day of offset).
#![no_main]

use flowgate_core::time::parse_rfc3339_ms;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(ms) = parse_rfc3339_ms(text) {
        assert!((-62_167_305_600_000..=253_402_387_200_000).contains(&ms), "{text:?} -> {ms}");
    }
});
