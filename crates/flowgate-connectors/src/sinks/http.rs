//! `http`: one HTTP(S) request per batch to any endpoint that takes NDJSON or a JSON
//! array; at least once.
//!
//! - **One request per write.** The batch's payloads go in one `POST` (or `PUT`) body,
//!   one per line (`ndjson`, `Content-Type: application/x-ndjson`) or as one JSON array
//!   (`json_array`, `application/json`), gzipped with `compression = "gzip"`. The body is
//!   built once per write into a buffer the sink keeps; a retry builds it anew from the
//!   events the runtime passes (a subset when only some were not delivered).
//! - **The status says what became of the batch.** 2xx: every event delivered (unless
//!   `per_event_results` names some). 408, 429 and 500 or more: every event retryable,
//!   with the status as code and the `Retry-After` header (seconds or an HTTP date, at
//!   most one hour) as the runtime's least wait. Any other status (3xx — redirects are
//!   not followed —, 400, 401, 403, 404, 413, 422…): every event refused for good, with
//!   the status as code and the start of the response body (at most 512 bytes) in the
//!   reason; the runtime sends refused events to the dead-letter topic at once.
//! - **A request that got no status is a failed write.** A connection that cannot be
//!   made within `connect_timeout_ms`, a request not answered within `timeout_ms`
//!   (connecting, sending and reading the body included), a connection that breaks: the
//!   write returns `Err` and the runtime retries the whole batch with backoff. The
//!   endpoint may have taken a batch whose answer was lost, so a retry may deliver
//!   events twice (at least once); endpoints that must not see duplicates dedupe by a
//!   field of the payload.
//! - **Responses are read bounded.** At most [`BODY_CAP`] bytes of a response body are
//!   read (plus [`RESULT_BYTES_PER_EVENT`] per event of the batch, up to
//!   [`RESULTS_CAP_MAX`], for per-event results); the rest is never read and the
//!   connection is closed rather than drained, so an endpoint answering with a huge or
//!   endless body costs a bounded amount of memory and time.
//! - **Per-event results** (`per_event_results = true`): a 2xx body may be
//!   `{"results": [{"index": i, "status": s, "error": "…"}, …]}` or an array of
//!   statuses (numbers, or `{"status": s, "error": "…"}`) in batch order. Events with a
//!   status of 400 or more are not delivered (408, 429 and 500 or more retryable, other
//!   statuses refused for good); every other event is delivered. An empty body means all
//!   delivered; a body that cannot be read or parsed (or exceeds its cap) is taken as all
//!   delivered, and logged once per sink instance.
//!
//! The sink keeps no state across commits: what the endpoint acknowledged is delivered,
//! so a commit has nothing to flush. One client per sink instance keeps its connections
//! (HTTP/1.1, keep-alive) across writes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{EventFailure, Sink, SinkEvent, SinkPlace, WriteOutcome};
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};

use super::registry::{BuildContext, SinkConnector};

/// `type = "http"`: an HTTP(S) endpoint, one request per batch.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `http://…` or `https://…`.
    pub url: String,
    /// `POST` or `PUT`.
    #[serde(default = "default_method")]
    pub method: String,
    /// `ndjson` (one payload per line) or `json_array` (the payloads as one JSON array).
    #[serde(default = "default_encoding")]
    pub encoding: String,
    /// Headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Credentials sent with every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<HttpAuth>,
    /// A request not answered (body included) within this long fails the write, which
    /// is retried.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// A connection (with its TLS handshake) not made within this long fails the write,
    /// which is retried.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// TLS settings beyond the built-in (webpki) roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<HttpTls>,
    /// `none` or `gzip` for request bodies.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Whether a 2xx response body may name events the endpoint did not take.
    #[serde(default)]
    pub per_event_results: bool,
}

fn default_method() -> String {
    "POST".into()
}

fn default_encoding() -> String {
    "ndjson".into()
}

fn default_timeout() -> u64 {
    30_000
}

fn default_connect_timeout() -> u64 {
    5_000
}

fn default_compression() -> String {
    "none".into()
}

/// Credentials of an HTTP sink: `bearer` alone, or `user` with `password` (basic).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuth {
    /// A bearer token (`Authorization: Bearer …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer: Option<String>,
    /// Basic auth user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Basic auth password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

// Configs are logged with `{:?}`; credentials must not be.
impl std::fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |o: &Option<String>| o.as_ref().map(|_| "<hidden>");
        f.debug_struct("HttpAuth")
            .field("bearer", &hidden(&self.bearer))
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .finish()
    }
}

/// TLS settings of an HTTP sink.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTls {
    /// A PEM file of CA certificates trusted besides the built-in roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Accept any server certificate (tests only: anyone on the path can read and
    /// change the traffic).
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

impl SinkConnector for HttpSink {
    const TYPE: &'static str = "http";
    const REMOTE: bool = true;
    type Config = HttpConfig;

    fn validate(c: &HttpConfig) -> anyhow::Result<()> {
        HttpSinkSettings::from_config(c).map(drop)
    }

    fn build(c: HttpConfig, cx: &BuildContext<'_>) -> anyhow::Result<Box<dyn Sink>> {
        Ok(Box::new(HttpSink::new(HttpSinkSettings::from_config(&c)?, cx.place, &cx.sink.name)?))
    }
}

/// Bytes of a response body read at most; the rest is not read (the connection is
/// closed instead of drained).
pub const BODY_CAP: usize = 64 * 1024;

/// Extra response bytes read per event of the batch when `per_event_results` is on: a
/// results entry such as `{"index": 1234, "status": 503, "error": "…"}` with room for a
/// short error.
pub const RESULT_BYTES_PER_EVENT: usize = 256;

/// The most bytes of a per-event results body read, whatever the batch size.
pub const RESULTS_CAP_MAX: usize = 16 << 20;

/// Bytes of a response body quoted in the reason of a failed event.
pub const REASON_BODY_BYTES: usize = 512;

/// The longest `Retry-After` honoured: a longer one (or a date further away) is taken
/// as this, so that a confused endpoint cannot park a pipeline for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How the batch's payloads make up a request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpEncoding {
    /// One payload per line, each line ended by `\n`.
    Ndjson,
    /// The payloads as the elements of one JSON array.
    JsonArray,
}

/// Credentials sent with every request.
#[derive(Clone)]
pub enum HttpCredentials {
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// `Authorization: Basic …`.
    Basic {
        /// User.
        user: String,
        /// Password.
        password: String,
    },
}

// Settings are logged with `{:?}`; credentials must not be.
impl std::fmt::Debug for HttpCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpCredentials::Bearer(_) => f.write_str("Bearer(<hidden>)"),
            HttpCredentials::Basic { user, .. } => write!(f, "Basic({user}:<hidden>)"),
        }
    }
}

/// An HTTP sink's settings, checked: [`HttpSinkSettings::from_config`] is both the
/// validation of a config and what the sink is built from.
#[derive(Clone, Debug)]
pub struct HttpSinkSettings {
    /// The endpoint (`http` or `https`, no credentials in it).
    pub url: Url,
    /// `POST` or `PUT`.
    pub method: Method,
    /// How payloads make up the body.
    pub encoding: HttpEncoding,
    /// Headers of every request (the configured ones over the sink's defaults).
    pub headers: HeaderMap,
    /// Credentials, if any.
    pub auth: Option<HttpCredentials>,
    /// Bound on a whole exchange: connecting, sending, the status and the (capped) body.
    pub timeout: Duration,
    /// Bound on connecting, TLS handshake included.
    pub connect_timeout: Duration,
    /// PEM file of CA certificates trusted besides the built-in webpki roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any server certificate.
    pub insecure_skip_verify: bool,
    /// Gzip request bodies.
    pub gzip: bool,
    /// Read per-event results from 2xx bodies.
    pub per_event_results: bool,
}

/// Headers the sink or the client sets from other settings: a configured value would
/// contradict the body actually sent.
const RESERVED_HEADERS: [&str; 5] = ["content-length", "transfer-encoding", "host", "connection", "content-encoding"];

impl HttpSinkSettings {
    /// Checks an `http` sink config and turns it into settings; touches no file and no
    /// network (the CA file is read when the sink is built).
    pub fn from_config(config: &HttpConfig) -> anyhow::Result<HttpSinkSettings> {
        let HttpConfig {
            url,
            method,
            encoding,
            headers,
            auth,
            timeout_ms,
            connect_timeout_ms,
            tls,
            compression,
            per_event_results,
        } = config;
        let url = Url::parse(url).with_context(|| format!("`url` '{url}' is not a URL"))?;
        anyhow::ensure!(
            matches!(url.scheme(), "http" | "https"),
            "`url` must start with http:// or https://, not {}://",
            url.scheme()
        );
        anyhow::ensure!(url.host_str().is_some_and(|h| !h.is_empty()), "`url` has no host");
        anyhow::ensure!(
            url.username().is_empty() && url.password().is_none(),
            "`url` holds credentials: put them in `auth = {{ user = \"…\", password = \"…\" }}` instead (URLs are \
             logged)"
        );
        let method = match method.to_ascii_uppercase().as_str() {
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            _ => anyhow::bail!("`method` must be POST or PUT, not '{method}'"),
        };
        let encoding = match encoding.as_str() {
            "ndjson" => HttpEncoding::Ndjson,
            "json_array" => HttpEncoding::JsonArray,
            _ => anyhow::bail!("`encoding` must be ndjson or json_array, not '{encoding}'"),
        };
        let gzip = match compression.as_str() {
            "none" => false,
            "gzip" => true,
            _ => anyhow::bail!("`compression` must be none or gzip, not '{compression}'"),
        };
        for (key, ms) in [("timeout_ms", timeout_ms), ("connect_timeout_ms", connect_timeout_ms)] {
            anyhow::ensure!((1..=3_600_000).contains(ms), "`{key}` must be between 1 and 3600000 (one hour)");
        }
        let auth = match auth {
            None => None,
            Some(a) => match (&a.bearer, &a.user, &a.password) {
                (Some(token), None, None) => {
                    anyhow::ensure!(!token.is_empty(), "`auth.bearer` is empty");
                    Some(HttpCredentials::Bearer(token.clone()))
                }
                (None, Some(user), Some(password)) => {
                    anyhow::ensure!(!user.contains(':'), "`auth.user` may not contain ':' (basic auth splits there)");
                    Some(HttpCredentials::Basic { user: user.clone(), password: password.clone() })
                }
                (None, Some(_), None) => anyhow::bail!("`auth` has a `user` but no `password`"),
                (None, None, Some(_)) => anyhow::bail!("`auth` has a `password` but no `user`"),
                (None, None, None) => {
                    anyhow::bail!("`auth` is empty: give `bearer`, or `user` and `password`, or leave `auth` out")
                }
                (Some(_), _, _) => anyhow::bail!("`auth` takes either `bearer` or `user` and `password`, not both"),
            },
        };
        let mut map = HeaderMap::new();
        map.insert(header::USER_AGENT, HeaderValue::from_static(concat!("flowgate/", env!("CARGO_PKG_VERSION"))));
        map.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(match encoding {
                HttpEncoding::Ndjson => "application/x-ndjson",
                HttpEncoding::JsonArray => "application/json",
            }),
        );
        if gzip {
            map.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        // The configured headers go over the defaults above (a `Content-Type` with a
        // charset, another `User-Agent`).
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| anyhow::anyhow!("`headers`: '{name}' is not a valid header name"))?;
            anyhow::ensure!(
                !RESERVED_HEADERS.contains(&name.as_str()),
                "`headers`: '{name}' is set by the sink itself (from the body and `compression`); remove it"
            );
            anyhow::ensure!(
                !(name == header::AUTHORIZATION && auth.is_some()),
                "`headers` has Authorization and `auth` is set too: keep one"
            );
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                anyhow::anyhow!("`headers`: the value of '{name}' must be visible ASCII (no control characters)")
            })?;
            if name == header::AUTHORIZATION || name == header::PROXY_AUTHORIZATION || name == header::COOKIE {
                value.set_sensitive(true);
            }
            map.insert(name, value);
        }
        if let Some(HttpCredentials::Bearer(token)) = &auth {
            // Built once here rather than per request.
            let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| anyhow::anyhow!("`auth.bearer` must be visible ASCII"))?;
            value.set_sensitive(true);
            map.insert(header::AUTHORIZATION, value);
        }
        let (ca_file, insecure_skip_verify) = match tls {
            Some(t) => {
                if let Some(path) = &t.ca_file {
                    anyhow::ensure!(!path.is_empty(), "`tls.ca_file` is empty");
                }
                (t.ca_file.as_ref().map(PathBuf::from), t.insecure_skip_verify)
            }
            None => (None, false),
        };
        anyhow::ensure!(
            (ca_file.is_none() && !insecure_skip_verify) || url.scheme() == "https",
            "`tls` is set but `url` is not https://"
        );
        Ok(HttpSinkSettings {
            url,
            method,
            encoding,
            headers: map,
            auth,
            timeout: Duration::from_millis(*timeout_ms),
            connect_timeout: Duration::from_millis(*connect_timeout_ms),
            ca_file,
            insecure_skip_verify,
            gzip,
            per_event_results: *per_event_results,
        })
    }
}

/// Sends batches to an HTTP endpoint.
pub struct HttpSink {
    settings: HttpSinkSettings,
    client: reqwest::Client,
    /// The endpoint as messages name it: no query (it may hold tokens).
    target: String,
    /// For logs.
    name: String,
    pipeline: String,
    /// The body of the write; its allocation comes back for the next write once the
    /// client lets go of the last body.
    body: BytesMut,
    /// The uncompressed body when gzipping.
    raw: Vec<u8>,
    /// The response body read (capped).
    response: Vec<u8>,
    /// Whether an unusable per-event results body was logged already.
    warned_results: bool,
}

impl HttpSink {
    /// A sink named `name` at `place` with its own client (and connection pool); reads
    /// the CA file if one is set.
    pub fn new(settings: HttpSinkSettings, place: &SinkPlace, name: &str) -> anyhow::Result<HttpSink> {
        let mut builder = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout)
            .default_headers(settings.headers.clone())
            // A batch's last segment leaves at once, not after the target's delayed ACK
            // (reqwest's default too; said here because write latency drives the limit).
            .tcp_nodelay(true)
            // Following a redirect would turn a POST into a GET (301/302/303) or send the
            // body somewhere not configured; a 3xx is reported instead.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).with_context(|| {
                format!("reading `tls.ca_file` {}: fix the path or the file's permissions", path.display())
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("`tls.ca_file` {} is not a PEM certificate bundle", path.display()))?;
            anyhow::ensure!(!certs.is_empty(), "`tls.ca_file` {} holds no PEM certificate", path.display());
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if settings.insecure_skip_verify {
            tracing::warn!(pipeline = %place.pipeline, sink = %name, "tls.insecure_skip_verify is on: the \
                endpoint's certificate is not checked");
            builder = builder.danger_accept_invalid_certs(true);
        }
        let client = builder.build().context("building the HTTP client")?;
        let mut shown = settings.url.clone();
        shown.set_query(None);
        shown.set_fragment(None);
        Ok(HttpSink {
            target: shown.to_string(),
            settings,
            client,
            name: name.to_owned(),
            pipeline: place.pipeline.clone(),
            body: BytesMut::new(),
            raw: Vec::new(),
            response: Vec::new(),
            warned_results: false,
        })
    }

    /// The request body for `events`, built once into the sink's buffer.
    fn encode(&mut self, events: &[SinkEvent]) -> anyhow::Result<Bytes> {
        let size = events.iter().map(|e| e.payload.len() + 1).fold(2usize, usize::saturating_add);
        if !self.settings.gzip {
            // Reclaims the last body's allocation when the client has dropped it.
            self.body.reserve(size);
            encode_into(events, self.settings.encoding, &mut self.body);
            return Ok(self.body.split().freeze());
        }
        self.raw.clear();
        self.raw.reserve(size);
        encode_into(events, self.settings.encoding, &mut self.raw);
        self.body.reserve(self.raw.len() / 4 + 64);
        // Level 1: JSON still shrinks several times over, for a fraction of the CPU of
        // the default level, which the pipeline's own work competes with.
        let mut gz = flate2::write::GzEncoder::new((&mut self.body).writer(), flate2::Compression::fast());
        gz.write_all(&self.raw).context("gzipping the request body")?;
        gz.finish().context("gzipping the request body")?;
        Ok(self.body.split().freeze())
    }

    async fn write_batch(&mut self, events: &[SinkEvent]) -> anyhow::Result<WriteOutcome> {
        if events.is_empty() {
            return Ok(WriteOutcome::delivered());
        }
        let body = self.encode(events)?;
        let mut request = self.client.request(self.settings.method.clone(), self.settings.url.clone()).body(body);
        if let Some(HttpCredentials::Basic { user, password }) = &self.settings.auth {
            request = request.basic_auth(user, Some(password));
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return Err(self.transport_error(e, events.len())),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let cap =
            if status.is_success() && self.settings.per_event_results { results_cap(events.len()) } else { BODY_CAP };
        // Read even when only the status counts: a body read to its end lets the
        // connection go back to the pool instead of being closed.
        let read = read_capped(response, cap, &mut self.response).await;
        if status.is_success() {
            if !self.settings.per_event_results {
                return Ok(WriteOutcome::delivered());
            }
            let failures = self.per_event_failures(status, &read, events.len());
            self.release_response();
            let retry_after = retry_after.filter(|_| failures.iter().any(|f| f.retryable));
            return Ok(WriteOutcome { failures, retry_after });
        }
        let retryable = is_retryable(status.as_u16());
        let reason = format!(
            "{} answered {}{}{}",
            self.target,
            status_text(status),
            hint(status),
            quoted_body(&self.response, read.truncated || read.error.is_some())
        );
        self.release_response();
        let code = status.as_str();
        let failures = (0..events.len())
            .map(|index| EventFailure { index, retryable, reason: reason.clone(), code: Some(code.to_owned()) })
            .collect();
        Ok(WriteOutcome { failures, retry_after: retry_after.filter(|_| retryable) })
    }

    /// Gives back what a large per-event results body grew the response buffer to, so
    /// that each instance keeps at most [`BODY_CAP`] between writes.
    fn release_response(&mut self) {
        self.response.clear();
        self.response.shrink_to(BODY_CAP);
    }

    /// The write's error for a request that got no status.
    fn transport_error(&self, e: reqwest::Error, events: usize) -> anyhow::Error {
        let what = if e.is_connect() {
            format!(
                "cannot connect to {} (connect_timeout_ms {} ms); the write is retried",
                self.target,
                self.settings.connect_timeout.as_millis()
            )
        } else if e.is_timeout() {
            format!(
                "no answer from {} within timeout_ms ({} ms) to a request of {events} events; the write is retried \
                 (the endpoint may have taken it: at least once)",
                self.target,
                self.settings.timeout.as_millis()
            )
        } else {
            format!("request of {events} events to {} failed; the write is retried", self.target)
        };
        // The error's own URL may carry a query with tokens.
        anyhow::Error::new(e.without_url()).context(what)
    }

    /// What a 2xx body's per-event results say; all delivered when it says nothing usable.
    fn per_event_failures(&mut self, status: StatusCode, read: &BodyRead, events: usize) -> Vec<EventFailure> {
        let problem = if let Some(e) = &read.error {
            format!("reading it failed: {e}")
        } else if read.truncated {
            format!("it is larger than the {} bytes read of it", results_cap(events))
        } else if self.response.iter().all(u8::is_ascii_whitespace) {
            return Vec::new();
        } else {
            match serde_json::from_slice::<Results>(&self.response) {
                Ok(results) => return self.failures_of(results, events),
                Err(e) => format!("it is not a results object or array ({e})"),
            }
        };
        if !self.warned_results {
            self.warned_results = true;
            tracing::warn!(pipeline = %self.pipeline, sink = %self.name, target = %self.target, status = %status,
                problem = %problem, "per_event_results is on but a response body gives no usable results; its \
                events are taken as delivered (logged once per sink instance)");
        }
        Vec::new()
    }

    fn failures_of(&self, results: Results, events: usize) -> Vec<EventFailure> {
        let entries: Vec<(usize, u16, Option<serde_json::Value>)> = match results {
            Results::Indexed { results } => results.into_iter().map(|r| (r.index, r.status, r.error)).collect(),
            Results::InOrder(results) => results
                .into_iter()
                .enumerate()
                .map(|(i, r)| match r {
                    InOrder::Status(s) => (i, s, None),
                    InOrder::Object { status, error } => (i, status, error),
                })
                .collect(),
        };
        entries
            .into_iter()
            .filter(|&(index, status, _)| index < events && status >= 400)
            .map(|(index, status, error)| {
                let retryable = is_retryable(status);
                let error = match error {
                    Some(serde_json::Value::String(s)) => s,
                    Some(serde_json::Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                let mut reason = format!("{} gave this event status {status}", self.target);
                if !error.is_empty() {
                    reason.push_str(": ");
                    reason.push_str(truncate_str(&error, REASON_BODY_BYTES));
                }
                EventFailure { index, retryable, reason, code: Some(status.to_string()) }
            })
            .collect()
    }
}

/// Writes the payloads of `events` as a body in `encoding`.
fn encode_into(events: &[SinkEvent], encoding: HttpEncoding, out: &mut impl BufMut) {
    match encoding {
        HttpEncoding::Ndjson => {
            for e in events {
                out.put_slice(&e.payload);
                out.put_u8(b'\n');
            }
        }
        HttpEncoding::JsonArray => {
            out.put_u8(b'[');
            for (i, e) in events.iter().enumerate() {
                if i > 0 {
                    out.put_u8(b',');
                }
                out.put_slice(&e.payload);
            }
            out.put_u8(b']');
        }
    }
}

/// Whether a failure status means "not now" rather than "never": 408 (the server timed
/// out waiting), 429 (too many requests) and 500 or more (5xx, and nonstandard ones
/// above, which are no client error).
fn is_retryable(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// `503 Service Unavailable`.
fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(r) => format!("{} {r}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// What to do about a status that refuses every event, for the reason.
fn hint(status: StatusCode) -> &'static str {
    match status.as_u16() {
        300..=399 => " (redirects are not followed: set `url` to the final address)",
        401 | 403 => " (check `auth` and `headers`)",
        404 | 405 => " (check `url` and `method`)",
        413 => " (the body is too large for the endpoint: lower `batch.max_bytes` or `batch.max_events`)",
        _ => "",
    }
}

/// `: <body start>` for a reason, at most [`REASON_BODY_BYTES`] of it; `…` when there is
/// more (or the rest could not be read).
fn quoted_body(body: &[u8], more: bool) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(REASON_BODY_BYTES)]);
    let shown = truncate_str(text.trim(), REASON_BODY_BYTES);
    if shown.is_empty() {
        return String::new();
    }
    let cut = more || body.len() > REASON_BODY_BYTES;
    format!(": {shown}{}", if cut { "…" } else { "" })
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The response bytes read for per-event results of `events` events.
fn results_cap(events: usize) -> usize {
    BODY_CAP.saturating_add(events.saturating_mul(RESULT_BYTES_PER_EVENT)).min(RESULTS_CAP_MAX)
}

/// How reading a response body ended.
struct BodyRead {
    /// More than the cap was there; the rest was not read.
    truncated: bool,
    /// Reading broke off (a timeout, a connection that closed).
    error: Option<reqwest::Error>,
}

/// Reads at most `cap` bytes of `response`'s body into `out`. The response is dropped
/// unread past that: its connection is closed, not drained.
async fn read_capped(mut response: reqwest::Response, cap: usize, out: &mut Vec<u8>) -> BodyRead {
    out.clear();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = cap - out.len();
                if chunk.len() > room {
                    out.extend_from_slice(&chunk[..room]);
                    return BodyRead { truncated: true, error: None };
                }
                out.extend_from_slice(&chunk);
            }
            Ok(None) => return BodyRead { truncated: false, error: None },
            Err(e) => return BodyRead { truncated: false, error: Some(e.without_url()) },
        }
    }
}

/// A `Retry-After` value: delay seconds or an HTTP date (as of `now`), at most
/// [`MAX_RETRY_AFTER`]; a date in the past is no wait. `None` when it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is an absurd wait, not garbage: capped like any other.
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(MAX_RETRY_AFTER))
}

/// A per-event results body.
#[derive(Deserialize)]
#[serde(untagged)]
enum Results {
    /// `{"results": [{"index": i, "status": s, "error": "…"}, …]}`; events not named
    /// were delivered.
    Indexed { results: Vec<Indexed> },
    /// One entry per event, in batch order.
    InOrder(Vec<InOrder>),
}

#[derive(Deserialize)]
struct Indexed {
    index: usize,
    status: u16,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum InOrder {
    Status(u16),
    Object {
        status: u16,
        #[serde(default)]
        error: Option<serde_json::Value>,
    },
}

impl Sink for HttpSink {
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<WriteOutcome>> {
        Box::pin(self.write_batch(events))
    }

    fn may_give_up_failed_writes(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io::Read as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use flowgate_engine::config::SinkConfig;

    use crate::sinks::registry::SinkConnector as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::*;

    /// A request as the test server saw it.
    #[derive(Debug)]
    struct Seen {
        /// Request line.
        line: String,
        /// Header names lowercased.
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
        }
    }

    /// What the test server answers a request with.
    #[derive(Clone)]
    enum Reply {
        /// These bytes, then the next request on the connection.
        Canned(Vec<u8>),
        /// Nothing, for a minute.
        Silent,
        /// A 400 whose body is `total` bytes, written until the client stops reading.
        Huge { total: usize, written: Arc<AtomicUsize> },
    }

    fn reply(status: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let mut out = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n", body.len());
        for (n, v) in headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(body);
        Reply::Canned(out.into_bytes())
    }

    /// A real HTTP/1.1 server on 127.0.0.1 answering requests with `replies` in order
    /// (the last one over and over), reporting each request it read.
    async fn server(replies: Vec<Reply>) -> (String, mpsc::UnboundedReceiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let replies = Arc::new(Mutex::new(VecDeque::from(replies)));
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, tx.clone(), replies.clone()));
            }
        });
        (format!("http://{addr}/ingest?token=secret"), rx)
    }

    async fn serve(mut conn: TcpStream, tx: mpsc::UnboundedSender<Seen>, replies: Arc<Mutex<VecDeque<Reply>>>) {
        let mut buf = Vec::new();
        loop {
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
            let mut lines = head.split("\r\n");
            let line = lines.next().unwrap().to_owned();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let len: usize = headers.iter().find(|(n, _)| n == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
            while buf.len() < head_end + len {
                let mut chunk = [0u8; 65536];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = buf[head_end..head_end + len].to_vec();
            buf.drain(..head_end + len);
            let _ = tx.send(Seen { line, headers, body });
            let next = {
                let mut r = replies.lock().unwrap();
                if r.len() > 1 {
                    r.pop_front().unwrap()
                } else {
                    r.front().unwrap().clone()
                }
            };
            match next {
                Reply::Canned(bytes) => {
                    if conn.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Reply::Silent => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return;
                }
                Reply::Huge { total, written } => {
                    let head = format!("HTTP/1.1 400 Bad Request\r\ncontent-length: {total}\r\n\r\n");
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 64 * 1024];
                    while written.load(Ordering::SeqCst) < total {
                        if conn.write_all(&chunk).await.is_err() {
                            return;
                        }
                        written.fetch_add(chunk.len(), Ordering::SeqCst);
                    }
                    return;
                }
            }
        }
    }

    fn config(url: &str, extra: &str) -> SinkConfig {
        toml::from_str(&format!("name = \"h\"\ntype = \"http\"\nurl = \"{url}\"\n{extra}")).unwrap()
    }

    fn options(c: &SinkConfig) -> HttpConfig {
        serde_json::from_value(serde_json::Value::Object(c.options.clone())).unwrap()
    }

    fn sink(url: &str, extra: &str) -> HttpSink {
        let config = config(url, extra);
        let settings = HttpSinkSettings::from_config(&options(&config)).unwrap();
        let place = SinkPlace { pipeline: "p".into(), topic: "in".into(), partition: 0 };
        HttpSink::new(settings, &place, &config.name).unwrap()
    }

    fn events(payloads: &[&str]) -> Vec<SinkEvent> {
        payloads
            .iter()
            .enumerate()
            .map(|(i, p)| SinkEvent {
                partition: 0,
                offset: i as u64,
                timestamp: 1,
                key: None,
                payload: Bytes::copy_from_slice(p.as_bytes()),
            })
            .collect()
    }

    fn all(n: usize, retryable: bool, code: &str, out: &WriteOutcome) {
        assert_eq!(out.failures.len(), n, "{out:?}");
        for (i, f) in out.failures.iter().enumerate() {
            assert_eq!((f.index, f.retryable, f.code.as_deref()), (i, retryable, Some(code)), "{f:?}");
        }
    }

    #[tokio::test]
    async fn ndjson_and_json_array_bodies_arrive_as_built_with_headers_and_auth() {
        let (url, mut seen) = server(vec![reply("200 OK", &[], "")]).await;
        let batch = events(&[r#"{"a":1}"#, r#"{"b":"x y"}"#, "[3]"]);

        let mut ndjson =
            sink(&url, "headers = { \"X-Tenant\" = \"t1\" }\nauth = { bearer = \"tok\" }\ntimeout_ms = 5000");
        assert_eq!(ndjson.write(&batch).await.unwrap(), WriteOutcome::delivered());
        let req = seen.recv().await.unwrap();
        assert_eq!(req.line, "POST /ingest?token=secret HTTP/1.1");
        assert_eq!(req.body, b"{\"a\":1}\n{\"b\":\"x y\"}\n[3]\n");
        assert_eq!(req.header("content-type"), Some("application/x-ndjson"));
        assert_eq!(req.header("authorization"), Some("Bearer tok"));
        assert_eq!(req.header("x-tenant"), Some("t1"));
        assert_eq!(req.header("content-encoding"), None);
        // The buffer is reused: a second write sends exactly its own events.
        let second = events(&[r#"{"c":2}"#]);
        assert_eq!(ndjson.write(&second).await.unwrap(), WriteOutcome::delivered());
        assert_eq!(seen.recv().await.unwrap().body, b"{\"c\":2}\n");

        let mut array = sink(
            &url,
            "method = \"PUT\"\nencoding = \"json_array\"\nauth = { user = \"u\", password = \"p:w\" }\nheaders = { \
             \"Content-Type\" = \"application/json; charset=utf-8\" }",
        );
        assert_eq!(array.write(&batch).await.unwrap(), WriteOutcome::delivered());
        let req = seen.recv().await.unwrap();
        assert_eq!(req.line, "PUT /ingest?token=secret HTTP/1.1");
        assert_eq!(req.body, br#"[{"a":1},{"b":"x y"},[3]]"#);
        assert_eq!(req.header("content-type"), Some("application/json; charset=utf-8"), "configured over default");
        // base64("u:p:w")
        assert_eq!(req.header("authorization"), Some("Basic dTpwOnc="));

        // No request for an empty batch.
        assert_eq!(array.write(&[]).await.unwrap(), WriteOutcome::delivered());
        assert!(seen.try_recv().is_err());
    }

    #[tokio::test]
    async fn gzip_bodies_inflate_to_the_ndjson() {
        let (url, mut seen) = server(vec![reply("204 No Content", &[], "")]).await;
        let mut s = sink(&url, "compression = \"gzip\"");
        let batch = events(&[r#"{"a":1}"#, r#"{"a":2}"#]);
        for _ in 0..2 {
            assert_eq!(s.write(&batch).await.unwrap(), WriteOutcome::delivered());
            let req = seen.recv().await.unwrap();
            assert_eq!(req.header("content-encoding"), Some("gzip"));
            let mut text = String::new();
            flate2::read::GzDecoder::new(&req.body[..]).read_to_string(&mut text).unwrap();
            assert_eq!(text, "{\"a\":1}\n{\"a\":2}\n");
        }
    }

    #[tokio::test]
    async fn a_503_makes_every_event_retryable_after_its_retry_after() {
        let (url, _seen) = server(vec![reply("503 Service Unavailable", &[("Retry-After", "2")], "busy")]).await;
        let out = sink(&url, "").write(&events(&["1", "2", "3"])).await.unwrap();
        all(3, true, "503", &out);
        assert_eq!(out.retry_after, Some(Duration::from_secs(2)));
        assert!(out.failures[0].reason.contains("503 Service Unavailable: busy"), "{}", out.failures[0].reason);
        assert!(!out.failures[0].reason.contains("secret"), "the query is never shown");

        let (url, _seen) = server(vec![reply("429 Too Many Requests", &[], "")]).await;
        let out = sink(&url, "").write(&events(&["1"])).await.unwrap();
        all(1, true, "429", &out);
        assert_eq!(out.retry_after, None);
    }

    #[tokio::test]
    async fn a_400_refuses_every_event_for_good_quoting_the_start_of_the_body() {
        let body = format!("bad field 'x'{}", "y".repeat(2000));
        let (url, _seen) =
            server(vec![reply("400 Bad Request", &[("Retry-After", "5")], &body), reply("404 Not Found", &[], "")])
                .await;
        let mut s = sink(&url, "");
        let out = s.write(&events(&["1", "2"])).await.unwrap();
        all(2, false, "400", &out);
        assert_eq!(out.retry_after, None, "no wait for what is never retried");
        let reason = &out.failures[0].reason;
        assert!(reason.contains("400 Bad Request: bad field 'x'yyy"), "{reason}");
        assert!(reason.ends_with('…'));
        let quoted = reason.split_once(": ").unwrap().1;
        assert!(quoted.len() <= REASON_BODY_BYTES + '…'.len_utf8(), "{}", quoted.len());

        let out = s.write(&events(&["1"])).await.unwrap();
        all(1, false, "404", &out);
        assert!(out.failures[0].reason.contains("check `url`"), "{}", out.failures[0].reason);
    }

    #[tokio::test]
    async fn a_huge_response_body_is_not_read_whole() {
        let total = 1 << 30;
        let written = Arc::new(AtomicUsize::new(0));
        let (url, _seen) = server(vec![Reply::Huge { total, written: written.clone() }]).await;
        let started = Instant::now();
        let out = sink(&url, "timeout_ms = 20000").write(&events(&["1"])).await.unwrap();
        all(1, false, "400", &out);
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        // The client stopped reading at the cap: the server got at most what the socket
        // buffers hold beyond it, nowhere near the gigabyte.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = written.load(Ordering::SeqCst);
        assert!(sent < 64 << 20, "{sent} bytes went out");
        assert!(out.failures[0].reason.len() < 1024);
    }

    #[tokio::test]
    async fn per_event_results_mark_exactly_the_events_named() {
        let indexed = r#"{"results": [{"index": 1, "status": 503, "error": "shard busy"},
            {"index": 3, "status": 422, "error": {"field": "ts"}}, {"index": 4, "status": 200},
            {"index": 99, "status": 400}]}"#;
        let (url, _seen) = server(vec![
            reply("200 OK", &[("Retry-After", "3")], indexed),
            reply("207 Multi-Status", &[], r#"[201, 429, {"status": 400, "error": "no"}, 200]"#),
            reply("200 OK", &[], "not json"),
            reply("200 OK", &[], ""),
        ])
        .await;
        let mut s = sink(&url, "per_event_results = true");
        let batch = events(&["0", "1", "2", "3", "4"]);

        let out = s.write(&batch).await.unwrap();
        let got: Vec<_> = out.failures.iter().map(|f| (f.index, f.retryable, f.code.as_deref().unwrap())).collect();
        assert_eq!(got, [(1, true, "503"), (3, false, "422")]);
        assert!(out.failures[0].reason.ends_with("status 503: shard busy"), "{}", out.failures[0].reason);
        assert!(out.failures[1].reason.contains(r#"{"field":"ts"}"#), "{}", out.failures[1].reason);
        assert_eq!(out.retry_after, Some(Duration::from_secs(3)));

        let out = s.write(&batch).await.unwrap();
        let got: Vec<_> = out.failures.iter().map(|f| (f.index, f.retryable, f.code.as_deref().unwrap())).collect();
        assert_eq!(got, [(1, true, "429"), (2, false, "400")]);
        assert_eq!(out.retry_after, None);

        // Not parseable: all delivered (and logged once).
        assert_eq!(s.write(&batch).await.unwrap(), WriteOutcome::delivered());
        assert!(s.warned_results);
        assert_eq!(s.write(&batch).await.unwrap(), WriteOutcome::delivered());
    }

    #[tokio::test]
    async fn a_server_that_never_answers_fails_the_write_within_timeout_ms() {
        let (url, _seen) = server(vec![Reply::Silent]).await;
        let started = Instant::now();
        let e = sink(&url, "timeout_ms = 300").write(&events(&["1"])).await.unwrap_err();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(5), "{took:?}");
        let text = format!("{e:#}");
        assert!(text.contains("within timeout_ms (300 ms)"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[tokio::test]
    async fn an_endpoint_that_is_not_there_fails_the_write() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = sink(&format!("http://127.0.0.1:{port}/x"), "").write(&events(&["1"])).await.unwrap_err();
        assert!(format!("{e:#}").contains("cannot connect to http://127.0.0.1"), "{e:#}");
    }

    #[test]
    fn busy_and_failing_statuses_are_retried_and_the_rest_refused() {
        for s in [408, 429, 500, 502, 503, 504, 599, 600] {
            assert!(is_retryable(s), "{s}");
        }
        for s in [300, 301, 400, 401, 403, 404, 405, 409, 413, 415, 422, 499] {
            assert!(!is_retryable(s), "{s}");
        }
    }

    #[test]
    fn retry_after_is_seconds_or_a_date_and_bounded() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(MAX_RETRY_AFTER));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(120)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(120));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        let far = httpdate::fmt_http_date(now + Duration::from_secs(10 * 86400));
        assert_eq!(parse_retry_after(&far, now), Some(MAX_RETRY_AFTER));
        for garbage in ["", "soon", "-1", "1.5", "2 s", "Wed, 99 Foo 2023 00:00:00 GMT"] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage:?}");
        }
        // Any seconds value is at most the cap and exact below it.
        for secs in (0u64..5000).step_by(7).chain([u64::MAX, u64::MAX / 2]) {
            let got = parse_retry_after(&secs.to_string(), now).unwrap();
            assert_eq!(got, Duration::from_secs(secs).min(MAX_RETRY_AFTER));
        }
    }

    #[test]
    fn configs_take_defaults_and_refuse_what_cannot_work() {
        let c = config("https://example.com/in", "");
        let HttpConfig { method, encoding, timeout_ms, connect_timeout_ms, compression, per_event_results, .. } =
            options(&c);
        assert_eq!((method.as_str(), encoding.as_str(), compression.as_str()), ("POST", "ndjson", "none"));
        assert_eq!((timeout_ms, connect_timeout_ms, per_event_results), (30_000, 5_000, false));
        crate::Connectors::validate_config(&c).unwrap();
        assert_eq!(HttpSink::TYPE, c.kind);

        let misspelt = toml::from_str::<SinkConfig>("name = \"h\"\ntype = \"http\"\nurl = \"http://x/\"\ntimeout = 5");
        let e = crate::Connectors::validate_config(&misspelt.unwrap()).unwrap_err().to_string();
        assert!(e.contains("unknown field `timeout`") && e.contains("timeout_ms"), "{e}");

        let refused = |url: &str, extra: &str, says: &str| {
            let e = crate::Connectors::validate_config(&config(url, extra)).unwrap_err().to_string();
            assert!(e.contains(says), "{url} {extra}: {e}");
        };
        let ok = "http://127.0.0.1:8080/x";
        refused("ftp://h/x", "", "http:// or https://");
        refused("not a url", "", "not a URL");
        refused("http://u:p@h/x", "", "credentials");
        refused(ok, "method = \"GET\"", "POST or PUT");
        refused(ok, "encoding = \"csv\"", "ndjson or json_array");
        refused(ok, "compression = \"zstd\"", "none or gzip");
        refused(ok, "timeout_ms = 0", "timeout_ms");
        refused(ok, "connect_timeout_ms = 3600001", "connect_timeout_ms");
        refused(ok, "headers = { \"bad name\" = \"v\" }", "not a valid header name");
        refused(ok, "headers = { \"X-A\" = \"line\\nbreak\" }", "visible ASCII");
        refused(ok, "headers = { \"Content-Length\" = \"1\" }", "set by the sink");
        refused(ok, "auth = { user = \"u\" }", "no `password`");
        refused(ok, "auth = { password = \"p\" }", "no `user`");
        refused(ok, "auth = {}", "`auth` is empty");
        refused(ok, "auth = { bearer = \"t\", user = \"u\", password = \"p\" }", "not both");
        refused(ok, "auth = { bearer = \"t\" }\nheaders = { Authorization = \"x\" }", "keep one");
        refused(ok, "tls = { insecure_skip_verify = true }", "not https://");

        // Credentials stay out of debug output.
        let c = config(ok, "auth = { user = \"u\", password = \"hunter2\" }");
        assert!(!format!("{c:?}").contains("hunter2"));
        let s = HttpSinkSettings::from_config(&options(&c)).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn a_ca_file_that_cannot_be_used_stops_the_build_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let place = SinkPlace { pipeline: "p".into(), topic: "in".into(), partition: 0 };
        let missing = dir.path().join("missing.pem");
        let c = config("https://h/x", &format!("tls = {{ ca_file = \"{}\" }}", missing.display()));
        let e = HttpSink::new(HttpSinkSettings::from_config(&options(&c)).unwrap(), &place, "h").err().unwrap();
        assert!(format!("{e:#}").contains("missing.pem"), "{e:#}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let c = config("https://h/x", &format!("tls = {{ ca_file = \"{}\" }}", empty.display()));
        let e = HttpSink::new(HttpSinkSettings::from_config(&options(&c)).unwrap(), &place, "h").err().unwrap();
        assert!(format!("{e:#}").contains("no PEM certificate"), "{e:#}");
    }
}
