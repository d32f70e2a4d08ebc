//! What the NDJSON and HTTP listeners store beyond each event's payload: the key, event
//! time and client id read from the event's own JSON (`[ingest]` `key_field`,
//! `timestamp_field`, `timestamp_unit`, `client_id_field`), and the HTTP request headers
//! kept as event headers (`http_keep_headers`). Checked once, when the config loads.

use axum::http::HeaderName;
use flowgate_core::{FieldPath, FieldSpec};

use crate::config::IngestConfig;
use crate::parse::{max_field_records_len, max_records_len};

/// Most names `ingest.http_keep_headers` may hold.
pub const MAX_KEPT_HEADER_NAMES: usize = 16;

/// The listeners' settings for event fields, parsed from `[ingest]`.
#[derive(Clone, Debug, Default)]
pub struct IngestFields {
    /// The fields read from every event (empty when none is configured).
    pub spec: FieldSpec,
    /// HTTP request headers kept as headers of each event of the request (lowercase).
    pub keep_headers: Vec<HeaderName>,
}

impl IngestFields {
    /// The settings of `config`, or the bad key and why.
    pub fn from_config(config: &IngestConfig) -> Result<IngestFields, (&'static str, String)> {
        let path = |key: &'static str, value: &Option<String>| {
            value.as_deref().map(FieldPath::parse).transpose().map_err(|e| (key, format!("`{}` {e}", value_of(value))))
        };
        let spec = FieldSpec {
            key: path("ingest.key_field", &config.key_field)?,
            timestamp: path("ingest.timestamp_field", &config.timestamp_field)?,
            timestamp_unit: config.timestamp_unit,
            client_id: path("ingest.client_id_field", &config.client_id_field)?,
        };
        const KEY: &str = "ingest.http_keep_headers";
        if config.http_keep_headers.len() > MAX_KEPT_HEADER_NAMES {
            return Err((
                KEY,
                format!("names {} headers; at most {MAX_KEPT_HEADER_NAMES}", config.http_keep_headers.len()),
            ));
        }
        let mut keep_headers: Vec<HeaderName> = Vec::with_capacity(config.http_keep_headers.len());
        for name in &config.http_keep_headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| (KEY, format!("`{name}` is not an HTTP header name")))?;
            if header.as_str() == flowgate_core::traceparent::HEADER {
                return Err((
                    KEY,
                    "`traceparent` is stored by tracing when it is on (docs/tracing.md); remove it".into(),
                ));
            }
            if keep_headers.contains(&header) {
                return Err((KEY, format!("`{name}` is named twice (names are case-insensitive)")));
            }
            keep_headers.push(header);
        }
        Ok(IngestFields { spec, keep_headers })
    }
}

fn value_of(value: &Option<String>) -> &str {
    value.as_deref().unwrap_or_default()
}

/// Most bytes the records of `events` events with `payload_bytes` of payload in all take
/// when `spec`'s fields are read from them and each record carries `per_event` bytes more
/// (a key given per request, headers): what a listener charges before it builds them.
pub fn records_len(spec: &FieldSpec, payload_bytes: usize, events: usize, per_event: usize) -> usize {
    if spec.is_empty() && per_event == 0 {
        return max_records_len(payload_bytes, events);
    }
    let copied = usize::from(spec.key.is_some()) + usize::from(spec.client_id.is_some());
    max_field_records_len(payload_bytes, events, copied, per_event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_core::{BatchBuilder, TimestampUnit};
    use proptest::prelude::*;

    fn config(edit: impl FnOnce(&mut IngestConfig)) -> Result<IngestFields, (&'static str, String)> {
        let mut c = IngestConfig::default();
        edit(&mut c);
        IngestFields::from_config(&c)
    }

    #[test]
    fn bad_settings_name_their_key() {
        assert!(config(|_| {}).unwrap().spec.is_empty());
        let ok = config(|c| {
            c.key_field = Some("device.id".into());
            c.http_keep_headers = vec!["X-Request-Id".into()];
        })
        .unwrap();
        assert_eq!(ok.spec.key.unwrap().as_str(), "device.id");
        assert_eq!(ok.keep_headers[0].as_str(), "x-request-id");
        for (edit, key, says) in [
            (
                Box::new(|c: &mut IngestConfig| c.key_field = Some("a..b".into())) as Box<dyn FnOnce(&mut _)>,
                "ingest.key_field",
                "empty name",
            ),
            (
                Box::new(|c: &mut IngestConfig| c.timestamp_field = Some(String::new())),
                "ingest.timestamp_field",
                "is empty",
            ),
            (
                Box::new(|c: &mut IngestConfig| c.client_id_field = Some("x".repeat(300))),
                "ingest.client_id_field",
                "256",
            ),
            (
                Box::new(|c: &mut IngestConfig| c.http_keep_headers = vec!["bad name".into()]),
                "ingest.http_keep_headers",
                "not an HTTP header",
            ),
            (
                Box::new(|c: &mut IngestConfig| c.http_keep_headers = vec!["a".into(), "A".into()]),
                "ingest.http_keep_headers",
                "twice",
            ),
            (
                Box::new(|c: &mut IngestConfig| c.http_keep_headers = vec!["TraceParent".into()]),
                "ingest.http_keep_headers",
                "tracing",
            ),
            (
                Box::new(|c: &mut IngestConfig| c.http_keep_headers = (0..17).map(|i| format!("h{i}")).collect()),
                "ingest.http_keep_headers",
                "at most 16",
            ),
        ] {
            let (bad_key, message) = config(edit).unwrap_err();
            assert_eq!(bad_key, key);
            assert!(message.contains(says), "{message}");
        }
    }

    proptest! {
        #[test]
        fn the_records_bound_holds_for_any_fields(
            events in proptest::collection::vec(
                ("[a-z\"\\\\]{0,30}", proptest::option::of(0i64..=flowgate_core::timestamp::MAX_TIMESTAMP_MS), any::<bool>()),
                1..40,
            ),
            per_request_key in proptest::option::of("[a-z]{0,20}"),
            headers in proptest::collection::vec(("[a-z]{1,10}", "[ -~]{0,40}"), 0..4),
        ) {
            let spec = FieldSpec {
                key: Some(FieldPath::parse("k").unwrap()),
                timestamp: Some(FieldPath::parse("t").unwrap()),
                timestamp_unit: TimestampUnit::Ms,
                client_id: Some(FieldPath::parse("c").unwrap()),
            };
            let payloads: Vec<String> = events
                .iter()
                .map(|(text, t, number)| {
                    let v = if *number { format!("{}", text.len()) } else { serde_json::to_string(text).unwrap() };
                    let t = t.map_or("null".to_owned(), |t| t.to_string());
                    format!(r#"{{"k":{v},"c":{v},"t":{t}}}"#)
                })
                .collect();
            let header_bytes: usize = 5 + headers.iter().map(|(n, v): &(String, String)| 10 + n.len() + v.len()).sum::<usize>();
            let key_bytes = per_request_key.as_ref().map_or(0, |k| k.len() + 5);
            let mut builder = BatchBuilder::new();
            for p in &payloads {
                let f = spec.extract(p.as_bytes()).unwrap();
                let key = f.key.as_deref().or(per_request_key.as_deref().map(str::as_bytes));
                let headers = headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
                builder.push(f.timestamp.unwrap_or(0), key, f.client_id.as_deref(), headers, p.as_bytes());
            }
            let payload_bytes = payloads.iter().map(String::len).sum();
            let bound = records_len(&spec, payload_bytes, payloads.len(), header_bytes + key_bytes);
            prop_assert!(builder.records_len() <= bound, "{} > {}", builder.records_len(), bound);
        }
    }
}
