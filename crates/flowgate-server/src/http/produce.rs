//! What a produce request (`POST /v1/topics/{topic}/events`) stores besides its events'
//! payloads (docs/http.md): each event's key, time and client id read from its JSON
//! (`[ingest]` `key_field`, `timestamp_field`, `timestamp_unit`, `client_id_field`, which
//! the request's query may override), the request's `key` for events without one, and
//! the request headers kept as event headers (`ingest.http_keep_headers`); and the
//! answer, one part per partition written.
//!
//! The first event whose fields cannot be read refuses the request, naming the event,
//! and nothing of it is stored. A request written to one partition is stored whole or
//! not at all; a keyed one split across partitions may, should a write fail after
//! another partition's part was stored, be stored in part (answered 500
//! `partially_stored`, naming the parts stored).

use std::borrow::Cow;
use std::convert::Infallible;

use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use flowgate_core::fields::{FieldError, Fields};
use flowgate_core::{partition_for_key, BatchBuilder, FieldPath, FieldSpec};
use serde::Deserialize;
use serde_json::json;

use crate::fields::IngestFields;
use crate::ingest::{Route, Written};
use crate::metrics::Metrics;
use crate::parse::{parse_body, BodyError};

/// Longest `key` query parameter, in bytes.
pub const MAX_KEY_PARAM_BYTES: usize = 1024;

/// Most bytes the kept headers of one request may hold, names and values.
pub const MAX_KEPT_HEADER_BYTES: usize = 8192;

/// Most kept header values of one request (a header may come several times).
pub const MAX_KEPT_HEADER_VALUES: usize = 64;

/// Bytes a record's header list may add besides its names and values: the count, and
/// each name's and value's length (varints of at most 5 bytes).
const HEADER_LIST_BYTES: usize = 5;
const HEADER_LENGTH_BYTES: usize = 10;

/// The query a produce request may carry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProduceQuery {
    key_field: Option<String>,
    timestamp_field: Option<String>,
    timestamp_unit: Option<String>,
    client_id_field: Option<String>,
    key: Option<String>,
}

/// Why a request is refused: its status, metric reason and message.
#[derive(Debug)]
pub(super) struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn bad_query(message: String) -> Refusal {
        Refusal { status: StatusCode::BAD_REQUEST, reason: "invalid_query", message }
    }

    /// Counts the refusal and answers it: `{"error": …, "reason": …}`.
    pub(super) fn respond(self, metrics: &Metrics) -> Response {
        super::refuse(metrics, self.status, self.reason, self.message)
    }
}

/// What one request stores with each of its events.
#[derive(Debug)]
pub(super) struct Plan<'r> {
    spec: Cow<'r, FieldSpec>,
    key: Option<String>,
    headers: Vec<(&'r str, &'r [u8])>,
}

/// A field path from the query: absent keeps the config's, empty turns the field off.
fn path_param(name: &str, value: Option<String>, configured: &mut Option<FieldPath>) -> Result<(), Refusal> {
    let Some(value) = value else { return Ok(()) };
    *configured = if value.is_empty() {
        None
    } else {
        let shown: String = value.chars().take(64).collect();
        Some(
            FieldPath::parse(&value)
                .map_err(|e| Refusal::bad_query(format!("query parameter {name}: `{shown}` {e}")))?,
        )
    };
    Ok(())
}

impl<'r> Plan<'r> {
    /// The plan of a request with this URI and these headers under `fields` (the config).
    pub(super) fn new(fields: &'r IngestFields, uri: &Uri, headers: &'r HeaderMap) -> Result<Plan<'r>, Refusal> {
        let query = axum::extract::Query::<ProduceQuery>::try_from_uri(uri)
            .map_err(|e| {
                Refusal::bad_query(format!(
                    "{}; a produce request takes key, key_field, timestamp_field, timestamp_unit and client_id_field",
                    e.body_text()
                ))
            })?
            .0;
        let mut spec = Cow::Borrowed(&fields.spec);
        if query.key_field.is_some()
            || query.timestamp_field.is_some()
            || query.timestamp_unit.is_some()
            || query.client_id_field.is_some()
        {
            let own = spec.to_mut();
            path_param("key_field", query.key_field, &mut own.key)?;
            path_param("timestamp_field", query.timestamp_field, &mut own.timestamp)?;
            path_param("client_id_field", query.client_id_field, &mut own.client_id)?;
            if let Some(unit) = query.timestamp_unit {
                own.timestamp_unit =
                    unit.parse().map_err(|e| Refusal::bad_query(format!("query parameter timestamp_unit: {e}")))?;
            }
        }
        if let Some(key) = &query.key {
            if key.is_empty() {
                return Err(Refusal::bad_query("query parameter key is empty; leave it out for no key".into()));
            }
            if key.len() > MAX_KEY_PARAM_BYTES {
                return Err(Refusal::bad_query(format!(
                    "query parameter key is {} bytes long; at most {MAX_KEY_PARAM_BYTES}",
                    key.len()
                )));
            }
        }
        let mut kept = Vec::new();
        let mut kept_bytes = 0usize;
        for name in &fields.keep_headers {
            for value in headers.get_all(name) {
                kept_bytes = kept_bytes.saturating_add(name.as_str().len() + value.len());
                if kept.len() == MAX_KEPT_HEADER_VALUES || kept_bytes > MAX_KEPT_HEADER_BYTES {
                    return Err(Refusal {
                        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        reason: "kept_headers_too_large",
                        message: format!(
                            "the headers kept as event headers (ingest.http_keep_headers) hold more than \
                             {MAX_KEPT_HEADER_BYTES} bytes or {MAX_KEPT_HEADER_VALUES} values; send fewer or shorter ones"
                        ),
                    });
                }
                kept.push((name.as_str(), value.as_bytes()));
            }
        }
        Ok(Plan { spec, key: query.key, headers: kept })
    }

    /// True when the request's events may carry keys, so its batch may be split across
    /// partitions.
    pub(super) fn may_split(&self) -> bool {
        self.spec.key.is_some() || self.key.is_some()
    }

    /// True when events are stored as their payloads alone.
    fn is_plain(&self) -> bool {
        self.spec.is_empty() && self.key.is_none() && self.headers.is_empty()
    }

    /// Most bytes the records of a body of `payload_bytes` bytes holding at most
    /// `events` events take; with `traced`, the `traceparent` header is on up to one
    /// record per partition of the topic's `partitions` (see [`Plan::fill`]).
    pub(super) fn records_len(&self, payload_bytes: usize, events: usize, traced: Option<u32>) -> usize {
        let mut per_event = self.key.as_ref().map_or(0, |k| k.len() + 5);
        if !self.headers.is_empty() {
            per_event += HEADER_LIST_BYTES
                + self.headers.iter().map(|(n, v)| HEADER_LENGTH_BYTES + n.len() + v.len()).sum::<usize>();
        }
        let records = crate::fields::records_len(&self.spec, payload_bytes, events, per_event);
        let headed = match traced {
            None => 0,
            Some(_) if self.is_plain() => 1,
            Some(partitions) => events.min(partitions as usize + 1),
        };
        records.saturating_add(headed.saturating_mul(crate::trace::RECORD_HEADER_BYTES))
    }

    /// Puts every event of `body` into `builder` with what the plan says, stamped `now`
    /// unless it has a time of its own. With `traced` (the `traceparent` header and the
    /// topic's partition count), the first event of each partition carries the header:
    /// a pipeline reads the context from a stored batch's first record, and a keyed
    /// request is split into one batch per partition.
    pub(super) fn fill(
        &self,
        body: &[u8],
        builder: &mut BatchBuilder,
        now: i64,
        traced: Option<((&str, &[u8]), u32)>,
    ) -> Result<Filled, Refusal> {
        let mut filled = Filled { events: 0, bytes: 0, keyed: false };
        let parsed: Result<usize, BodyError<FieldError>> = if self.is_plain() {
            // Two loops rather than a check per event: an untraced request pays nothing.
            // Their handlers cannot fail, so the parse has no error to check per event.
            let plain: Result<usize, BodyError<Infallible>> = match traced {
                None => parse_body(body, |e| {
                    builder.push_payload(now, None, e);
                    filled.bytes += e.len() as u64;
                    Ok(())
                }),
                Some((header, _)) => {
                    // Unkeyed, the request is stored as one batch: its first event speaks for it.
                    let mut header = Some(header);
                    parse_body(body, |e| {
                        match header.take() {
                            Some(h) => builder.push(now, None, None, std::iter::once(h), e),
                            None => builder.push_payload(now, None, e),
                        }
                        filled.bytes += e.len() as u64;
                        Ok(())
                    })
                }
            };
            plain.map_err(|e| match e {
                BodyError::Invalid(message) => BodyError::Invalid(message),
                BodyError::Event { error, .. } => match error {},
            })
        } else {
            let mut marked = self.headers.clone();
            let mut firsts = traced.map(|(header, partitions)| {
                marked.push(header);
                FirstPerPartition::new(partitions)
            });
            let request_key = self.key.as_deref().map(str::as_bytes);
            let read_fields = !self.spec.is_empty();
            parse_body(body, |e| {
                let fields = if read_fields { self.spec.extract(e)? } else { Fields::default() };
                let key = fields.key.as_deref().or(request_key);
                filled.keyed |= key.is_some();
                let headers = if firsts.as_mut().is_some_and(|f| f.first(key)) { &marked } else { &self.headers };
                let (timestamp, client_id) = (fields.timestamp.unwrap_or(now), fields.client_id.as_deref());
                builder.push(timestamp, key, client_id, headers.iter().copied(), e);
                filled.bytes += e.len() as u64;
                Ok(())
            })
        };
        match parsed {
            Ok(n) => {
                filled.events = n as u64;
                Ok(filled)
            }
            Err(BodyError::Invalid(message)) => {
                Err(Refusal { status: StatusCode::BAD_REQUEST, reason: "invalid_body", message })
            }
            Err(BodyError::Event { at, error }) => Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                // A body's broken JSON has one reason, whichever parser found it.
                reason: if error.reason() == "invalid_json" { "invalid_body" } else { error.reason() },
                message: format!("{at}: {error}; nothing of this request was stored"),
            }),
        }
    }
}

/// What [`Plan::fill`] put into the batch.
#[derive(Debug)]
pub(super) struct Filled {
    /// Events.
    pub events: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Whether any has a key.
    keyed: bool,
}

impl Filled {
    /// Keyed events go to their keys' partitions; otherwise the request is one batch.
    pub(super) fn route(&self) -> Route {
        if self.keyed {
            Route::ByKey
        } else {
            Route::RoundRobin
        }
    }
}

/// Which partitions have had their first event (the keyless ones counting as one more).
struct FirstPerPartition {
    partitions: u32,
    seen: Vec<u64>,
    keyless_seen: bool,
}

impl FirstPerPartition {
    fn new(partitions: u32) -> FirstPerPartition {
        let partitions = partitions.max(1);
        FirstPerPartition { partitions, seen: vec![0; (partitions as usize).div_ceil(64)], keyless_seen: false }
    }

    /// True for the first event of its partition.
    fn first(&mut self, key: Option<&[u8]>) -> bool {
        let Some(key) = key else { return !std::mem::replace(&mut self.keyless_seen, true) };
        let p = partition_for_key(key, self.partitions) as usize;
        let (word, bit) = (p / 64, 1u64 << (p % 64));
        let first = self.seen[word] & bit == 0;
        self.seen[word] |= bit;
        first
    }
}

/// Copies of a batch's records that compressing it for `topic` needs besides the
/// builder and the encoded output: the codec's scratch (lz4 up to 1.1 times the records,
/// zstd one bound's worth) and the output reserved before compressing.
pub(crate) fn compression_copies(shared: &crate::shared::Shared, topic: &str) -> usize {
    let appender = shared.ingest.appender();
    let codec = shared.ingest.log().topic(topic).map_or(appender.codec(), |t| appender.codec_for(&t));
    if codec == flowgate_core::Codec::None {
        0
    } else {
        3
    }
}

/// The partitions of `topic`, or those it will be created with.
pub(super) fn partitions_of(shared: &crate::shared::Shared, topic: &str) -> u32 {
    let log = shared.ingest.log();
    log.topic(topic).map_or(log.config().default_partitions, |t| t.partition_count())
}

/// The answer to a stored request: `accepted` events in all, and per partition written
/// its first and last offset; `partition` and `offsets` at the top as well when the
/// request went to one partition.
pub(super) fn answer(written: &Written) -> serde_json::Value {
    let acks = written.acks();
    let last = |a: &crate::ingest::Ack| a.first_offset + u64::from(a.record_count).saturating_sub(1);
    let parts: Vec<serde_json::Value> = acks
        .iter()
        .map(|a| json!({"partition": a.partition, "offsets": [a.first_offset, last(a)], "accepted": a.record_count}))
        .collect();
    let mut answer = json!({"accepted": written.events(), "partitions": parts});
    if let [one] = acks[..] {
        answer["partition"] = one.partition.into();
        answer["offsets"] = json!([one.first_offset, last(&one)]);
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan<'r>(fields: &'r IngestFields, uri: &str, headers: &'r HeaderMap) -> Result<Plan<'r>, String> {
        Plan::new(fields, &uri.parse().unwrap(), headers)
            .map_err(|r| format!("{} {}: {}", r.status, r.reason, r.message))
    }

    fn fields(key_field: Option<&str>, keep: &[&str]) -> IngestFields {
        let config = crate::config::IngestConfig {
            key_field: key_field.map(str::to_owned),
            http_keep_headers: keep.iter().map(|h| h.to_string()).collect(),
            ..Default::default()
        };
        IngestFields::from_config(&config).unwrap()
    }

    #[test]
    fn the_query_overrides_the_config_for_one_request() {
        let none = HeaderMap::new();
        let config = fields(Some("device"), &[]);
        let p = plan(&config, "/v1/topics/t/events", &none).unwrap();
        assert!(matches!(p.spec, Cow::Borrowed(_)), "no override, no copy");
        let p = plan(&config, "/x?key_field=meta.id&timestamp_field=ts&timestamp_unit=%C2%B5s", &none).unwrap();
        assert_eq!(p.spec.key.as_ref().unwrap().as_str(), "meta.id");
        assert_eq!(p.spec.timestamp_unit, flowgate_core::TimestampUnit::Us);
        let p = plan(&config, "/x?key_field=&key=k1", &none).unwrap();
        assert_eq!((p.spec.key.is_none(), p.key.as_deref()), (true, Some("k1")));
        for (uri, says) in [
            ("/x?keyfield=a", "unknown field `keyfield`"),
            ("/x?key_field=a&key_field=b", "duplicate field"),
            ("/x?key_field=a..b", "key_field: `a..b` has an empty name"),
            ("/x?timestamp_unit=ns", "unknown timestamp unit 'ns'"),
            ("/x?key=", "key is empty"),
        ] {
            let err = plan(&config, uri, &none).unwrap_err();
            assert!(err.starts_with("400 Bad Request invalid_query") && err.contains(says), "{uri}: {err}");
        }
        let long = format!("/x?key={}", "k".repeat(MAX_KEY_PARAM_BYTES + 1));
        assert!(plan(&config, &long, &none).unwrap_err().contains("at most 1024"));
        let long = format!("/x?key_field={}", "k".repeat(10_000));
        let err = plan(&config, &long, &none).unwrap_err();
        assert!(err.contains("at most 256") && err.len() < 300, "{err}");
    }

    #[test]
    fn kept_headers_are_bounded() {
        let config = fields(None, &["x-request-id", "x-tenant"]);
        let mut headers = HeaderMap::new();
        headers.insert("X-Request-Id", "r1".parse().unwrap());
        headers.append("x-tenant", "a".parse().unwrap());
        headers.append("x-tenant", "b".parse().unwrap());
        headers.insert("x-other", "no".parse().unwrap());
        let p = plan(&config, "/x", &headers).unwrap();
        assert_eq!(p.headers, vec![("x-request-id", &b"r1"[..]), ("x-tenant", b"a"), ("x-tenant", b"b")]);
        headers.insert("x-request-id", "v".repeat(MAX_KEPT_HEADER_BYTES).parse().unwrap());
        let err = plan(&config, "/x", &headers).unwrap_err();
        assert!(err.starts_with("431") && err.contains("kept_headers_too_large"), "{err}");
        let mut many = HeaderMap::new();
        for _ in 0..=MAX_KEPT_HEADER_VALUES {
            many.append("x-tenant", "t".parse().unwrap());
        }
        assert!(plan(&config, "/x", &many).unwrap_err().contains("kept_headers_too_large"));
    }

    #[test]
    fn a_traced_keyed_request_marks_the_first_event_of_each_partition() {
        let config = fields(Some("k"), &[]);
        let none = HeaderMap::new();
        let p = plan(&config, "/x", &none).unwrap();
        let body = br#"[{"k":"a"},{"k":"a"},{"k":"b"},{},{"k":"b"},{}]"#;
        let partitions = 4;
        let mut builder = BatchBuilder::new();
        let header = ("traceparent", &b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..]);
        let filled = p.fill(body, &mut builder, 1, Some((header, partitions))).unwrap();
        assert_eq!((filled.events, filled.route()), (6, Route::ByKey));
        assert!(builder.records_len() <= p.records_len(body.len(), crate::parse::max_events(body), Some(partitions)));
        let batch = builder.finish(flowgate_core::Codec::None, Default::default()).unwrap().bytes;
        let (view, _) = flowgate_core::BatchView::parse(&batch).unwrap();
        let mut scratch = Vec::new();
        let marked: Vec<bool> = view.records(&mut scratch).unwrap().map(|r| r.unwrap().header_count == 1).collect();
        let mut expected = vec![true, false, true, true, false, false];
        if partition_for_key(b"a", partitions) == partition_for_key(b"b", partitions) {
            expected[2] = false;
        }
        assert_eq!(marked, expected);
    }

    #[test]
    fn a_bad_event_refuses_the_request_and_names_it() {
        let config = fields(Some("k"), &[]);
        let none = HeaderMap::new();
        let p = plan(&config, "/x?timestamp_field=t&timestamp_unit=rfc3339", &none).unwrap();
        let mut builder = BatchBuilder::new();
        let refusal = p.fill(b"{\"k\":1}\n{\"k\":2,\"t\":\"not a date\"}\n", &mut builder, 1, None).err().unwrap();
        assert_eq!((refusal.status, refusal.reason), (StatusCode::BAD_REQUEST, "bad_timestamp"));
        assert!(refusal.message.starts_with("line 2: timestamp field `t` (\"not a date\")"), "{}", refusal.message);
        let refusal = p.fill(br#"[{"k":1},{"k":[2]}]"#, &mut builder, 1, None).err().unwrap();
        assert_eq!(refusal.reason, "bad_key");
        assert!(refusal.message.starts_with("element 1: key field `k` is an array"), "{}", refusal.message);
        let refusal = p.fill(b"[{\"k\":1}", &mut builder, 1, None).err().unwrap();
        assert_eq!(refusal.reason, "invalid_body");
    }
}
