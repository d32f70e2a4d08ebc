//! Untrusted topic settings: the settings file a disk hands back (torn, damaged, edited),
//! the JSON bodies of `POST /v1/topics` and `PATCH /v1/topics/{topic}`, and the query of
//! `GET /v1/topics/{topic}/events`. None may panic; whatever is accepted stays within
//! its bounds.
#![no_main]

#[path = "../../crates/flowgate-server/src/topic_request.rs"]
#[allow(dead_code)]
mod topic_request;

use flowgate_log::settings::MAX_SETTING_VALUE;
use flowgate_log::TopicSettings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(settings) = TopicSettings::from_file(data) {
        for v in [settings.retention_ms, settings.retention_bytes].into_iter().flatten() {
            assert!(v <= MAX_SETTING_VALUE);
        }
    }
    if let Ok(create) = topic_request::parse_create(data) {
        assert!(create.settings.len() <= 3);
        if let Ok(change) = topic_request::to_change(&create.settings) {
            TopicSettings::default().apply(&change).validate().expect("a checked change is valid");
        }
    }
    if let Ok(updates) = topic_request::parse_alter(data) {
        assert!(updates.len() <= 3);
        if let Ok(change) = topic_request::to_change(&updates) {
            TopicSettings::default().apply(&change).validate().expect("a checked change is valid");
        }
    }
    // The query's five parameters, split from the input at NUL bytes.
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0').map(|p| (!p.is_empty()).then_some(p));
    let mut next = || parts.next().flatten();
    let (from, limit, partition, format, key) = (next(), next(), next(), next(), next());
    if let Ok(params) = topic_request::parse_read(from, limit, partition, format, key) {
        assert!((1..=topic_request::MAX_READ_LIMIT).contains(&params.limit));
    }
});
