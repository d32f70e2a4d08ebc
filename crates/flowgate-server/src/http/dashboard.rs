//! The dashboard at `/`: a page, its script and styles and the vendored uPlot charting
//! library, embedded in the binary and served with a strong `ETag`; and the `flow` field
//! of the stats document (per pipeline, processor and sink counters and histograms) the
//! page draws its rates, latencies and graph from.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::shared::Shared;

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    etag: String,
}

const FILES: &[(&str, &str, &[u8])] = &[
    ("index.html", "text/html; charset=utf-8", include_bytes!("../../assets/dashboard/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../../assets/dashboard/app.js")),
    ("style.css", "text/css; charset=utf-8", include_bytes!("../../assets/dashboard/style.css")),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/dashboard/vendor/uPlot.iife.min.js"),
    ),
    ("uPlot.min.css", "text/css; charset=utf-8", include_bytes!("../../assets/dashboard/vendor/uPlot.min.css")),
    ("uPlot.LICENSE", "text/plain; charset=utf-8", include_bytes!("../../assets/dashboard/vendor/uPlot.LICENSE")),
];

static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    FILES
        .iter()
        .map(|&(name, content_type, body)| Asset {
            name,
            content_type,
            body,
            etag: format!("\"{:016x}\"", fnv1a(body)),
        })
        .collect()
});

/// FNV-1a, 64 bits: the files' strong validator (they change only with the binary).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Only the engine's own address: the page loads nothing from elsewhere.
const CSP: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'";

/// `GET /`: the dashboard page.
pub(super) async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// `GET /dashboard/{file}`: the page's script, styles and charting library.
pub(super) async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve(&file, &headers)
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, "no such dashboard file").into_response();
    };
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == asset.etag || t.trim() == "*"));
    let common = [
        (header::ETAG, asset.etag.clone()),
        (header::CACHE_CONTROL, "no-cache".to_owned()),
        (header::CONTENT_SECURITY_POLICY, CSP.to_owned()),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
    ];
    if cached {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (common, [(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
}

/// One sample of the metrics text: its name, labels and value.
struct Sample<'a> {
    name: &'a str,
    labels: BTreeMap<&'a str, String>,
    value: f64,
}

/// The samples of an OpenMetrics or Prometheus text exposition, comments skipped.
fn parse_samples(text: &str) -> Vec<Sample<'_>> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices();
            let mut key_start = 0;
            let mut close = body.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        close = i;
                        break;
                    }
                    '"' => {
                        let key = body[key_start..i].trim().trim_end_matches('=').trim_start_matches(',');
                        let mut value = String::new();
                        while let Some((_, c)) = chars.next() {
                            match c {
                                '\\' => match chars.next().map(|(_, c)| c) {
                                    Some('n') => value.push('\n'),
                                    Some(other) => value.push(other),
                                    None => {}
                                },
                                '"' => break,
                                c => value.push(c),
                            }
                        }
                        labels.insert(key, value);
                        key_start = chars.clone().next().map_or(body.len(), |(j, _)| j);
                    }
                    _ => {}
                }
            }
            rest = body.get(close + 1..).unwrap_or("");
        }
        let value = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value {
            out.push(Sample { name, labels, value });
        }
    }
    out
}

/// Sums the samples named `name` whose labels include every pair of `with`.
fn sum(samples: &[Sample<'_>], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && with.iter().all(|(k, v)| s.labels.get(k).is_some_and(|l| l == v)))
        .fold(0.0, |a, s| a + s.value)
}

/// A number as JSON: whole numbers (counters, bucket counts) without a fraction.
fn num(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

/// A histogram's count, sum and cumulative finite buckets (`[upper bound, count]`).
fn histogram(samples: &[Sample<'_>], name: &str, with: &[(&str, &str)]) -> Value {
    let matches = |s: &&Sample<'_>| with.iter().all(|(k, v)| s.labels.get(k).is_some_and(|l| l == v));
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == bucket)
        .filter(matches)
        .filter_map(|s| s.labels.get("le").and_then(|le| le.parse::<f64>().ok()).map(|le| (le, s.value)))
        .filter(|(le, _)| le.is_finite())
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    json!({
        "count": num(sum(samples, &format!("{name}_count"), with)),
        "sum": sum(samples, &format!("{name}_sum"), with),
        "buckets": buckets.iter().map(|&(le, n)| json!([le, num(n)])).collect::<Vec<_>>(),
    })
}

/// The `flow` field of `/v1/stats`: the configured sources and the topics they write,
/// events accepted by ingest, and for each configured pipeline its topics, events read, lag, dead letters, end-to-end latency histogram,
/// processors in order (events in, out, dropped, failed) and sinks (events, errors, dead
/// letters, batch sizes, write time histogram). Counters are cumulative since start.
pub(super) fn flow_json(shared: &Shared) -> Value {
    let text = shared.ingest.metrics().render(shared.ingest.log());
    let samples = parse_samples(&text);
    let mut by_topic = BTreeMap::<String, f64>::new();
    for s in samples.iter().filter(|s| s.name == "flowgate_ingest_events_total") {
        *by_topic.entry(s.labels.get("topic").cloned().unwrap_or_default()).or_insert(0.0) += s.value;
    }
    let configs = shared.pipeline_configs.read().clone();
    let pipelines: Vec<Value> = configs
        .iter()
        .map(|p| {
            let pl = [("pipeline", p.name.as_str())];
            let processors: Vec<Value> = p
                .processor_ids()
                .iter()
                .zip(&p.processors)
                .map(|(id, c)| {
                    let l = [("pipeline", p.name.as_str()), ("processor", id.as_str())];
                    json!({
                        "id": id,
                        "type": c.kind.type_name(),
                        "events_in": num(sum(&samples, "flowgate_processor_events_in_total", &l)),
                        "events_out": num(sum(&samples, "flowgate_processor_events_out_total", &l)),
                        "dropped": num(sum(&samples, "flowgate_processor_events_dropped_total", &l)),
                        "failed": num(sum(&samples, "flowgate_processor_events_failed_total", &l)),
                    })
                })
                .collect();
            let sinks: Vec<Value> = p
                .sinks
                .iter()
                .map(|s| {
                    let l = [("pipeline", p.name.as_str()), ("sink", s.name.as_str())];
                    json!({
                        "name": s.name,
                        "type": s.kind,
                        "events": num(sum(&samples, "flowgate_sink_events_total", &l)),
                        "errors": num(sum(&samples, "flowgate_sink_errors_total", &l)),
                        "dead_letters": num(sum(&samples, "flowgate_sink_dead_letters_total", &l)),
                        "batches": num(sum(&samples, "flowgate_sink_batch_events_count", &l)),
                        "batch_events": num(sum(&samples, "flowgate_sink_batch_events_sum", &l)),
                        "write_seconds": histogram(&samples, "flowgate_sink_write_duration_seconds", &l),
                    })
                })
                .collect();
            json!({
                "name": p.name,
                "topics": p.topics,
                "events_read": num(sum(&samples, "flowgate_pipeline_events_read_total", &pl)),
                "lag": num(sum(&samples, "flowgate_pipeline_lag", &pl)),
                "dead_letters": num(sum(&samples, "flowgate_dlq_events_total", &pl)),
                "end_to_end_seconds": histogram(&samples, "flowgate_pipeline_end_to_end_latency_seconds", &pl),
                "processors": processors,
                "sinks": sinks,
            })
        })
        .collect();
    let sources: Vec<Value> = shared
        .source_configs
        .read()
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "type": s.kind,
                "topic": s.options.get("topic"),
                "topic_prefix": s.options.get("topic_prefix"),
            })
        })
        .collect();
    json!({
        "sources": sources,
        "ingest": {
            "events": num(by_topic.values().fold(0.0, |a, b| a + b)),
            "events_by_topic": by_topic.into_iter().map(|(t, n)| (t, num(n))).collect::<serde_json::Map<_, _>>(),
            "bytes": num(sum(&samples, "flowgate_ingest_bytes_total", &[])),
            "rejected": num(sum(&samples, "flowgate_ingest_rejected_total", &[])),
        },
        "pipelines": pipelines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_labels_with_escapes_and_values() {
        let text =
            "# TYPE x counter\nx_total{a=\"1\",b=\"q\\\"u,o}te\"} 5\ny 2.5\nz{le=\"+Inf\"} 3 1700000000\n# EOF\n";
        let s = parse_samples(text);
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[0].name, s[0].labels["a"].as_str(), s[0].labels["b"].as_str(), s[0].value),
            ("x_total", "1", "q\"u,o}te", 5.0)
        );
        assert_eq!((s[1].name, s[1].labels.len(), s[1].value), ("y", 0, 2.5));
        assert_eq!((s[2].labels["le"].as_str(), s[2].value), ("+Inf", 3.0));
        assert_eq!(sum(&s, "x_total", &[("a", "1")]), 5.0);
        assert_eq!(sum(&s, "x_total", &[("a", "2")]), 0.0);
    }

    #[test]
    fn histograms_keep_finite_buckets_in_order() {
        let text = "h_bucket{le=\"+Inf\",p=\"a\"} 4\nh_bucket{le=\"0.5\",p=\"a\"} 3\nh_bucket{le=\"0.1\",p=\"a\"} 1\n\
                    h_bucket{le=\"0.1\",p=\"b\"} 9\nh_count{p=\"a\"} 4\nh_sum{p=\"a\"} 1.5\n";
        let s = parse_samples(text);
        assert_eq!(histogram(&s, "h", &[("p", "a")]), json!({"count": 4, "sum": 1.5, "buckets": [[0.1, 1], [0.5, 3]]}));
    }

    #[test]
    fn every_asset_has_a_type_and_a_quoted_etag() {
        for a in ASSETS.iter() {
            assert!(!a.body.is_empty() && a.content_type.contains('/'), "{}", a.name);
            assert!(a.etag.starts_with('"') && a.etag.ends_with('"') && a.etag.len() == 18, "{}", a.etag);
        }
    }
}
