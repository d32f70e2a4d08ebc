//! Alerts: rules in the config (`[[alerts]]`) evaluated every `alerting.interval_ms`
//! against the engine's own metrics and stats, active and recent alerts at
//! `GET /v1/alerts` and in `/v1/stats`, transitions logged, and delivery to a webhook
//! (`webhook.rs`) with a repeat interval and escalation by age.
//!
//! A rule samples one number: the sum of a metric's series whose labels include the
//! rule's `labels`, or a field of `/v1/stats` (a JSON pointer); with `rate = true`, its
//! change per second. It then applies one test (`detect.rs`): a threshold, an anomaly
//! against a learned baseline, or a predicted crossing of a limit. A rule whose test
//! holds is *pending*, and *firing* once it has held for `for_ms`.

pub mod detect;
mod webhook;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use detect::{AnomalyConfig, Baseline, PredictConfig, Threshold, Trend};

/// How serious an alert is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For information.
    Info,
    /// Needs attention.
    #[default]
    Warning,
    /// Needs action now.
    Critical,
}

impl Severity {
    fn raised(self) -> Severity {
        match self {
            Severity::Info => Severity::Warning,
            _ => Severity::Critical,
        }
    }
}

/// One `[[alerts]]` table.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// Unique among rules.
    pub name: String,
    /// A metric sample name as `/metrics` writes it (`flowgate_sink_errors_total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Or a field of `GET /v1/stats`, as a JSON pointer (`/memory/used_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<String>,
    /// Only the metric's series with these labels (all of them) are summed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The value's change per second instead of the value (for counters).
    #[serde(default)]
    pub rate: bool,
    /// A threshold: `> 100`, `<= 0`, `== 0`…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Or a deviation from a learned baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<AnomalyConfig>,
    /// Or a trend reaching a limit within a horizon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predict: Option<PredictConfig>,
    /// How long the test must hold before the alert fires (ms).
    #[serde(default)]
    pub for_ms: u64,
    /// `info`, `warning` (default) or `critical`.
    #[serde(default)]
    pub severity: Severity,
    /// What it means and what to do; sent with the alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `[alerting]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertingConfig {
    /// How often rules are evaluated (ms, 100 to 60000).
    pub interval_ms: u64,
    /// Where firing and resolved alerts are POSTed as JSON (`http://` or `https://`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// A firing alert is sent again this often (ms).
    pub repeat_interval_ms: u64,
    /// A firing alert older than this is escalated one severity and sent again (ms; 0:
    /// never).
    pub escalate_after_ms: u64,
    /// How long one webhook request may take (ms).
    pub webhook_timeout_ms: u64,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        AlertingConfig {
            interval_ms: 1000,
            webhook_url: None,
            repeat_interval_ms: 3_600_000,
            escalate_after_ms: 0,
            webhook_timeout_ms: 5000,
        }
    }
}

/// Checks the rules and the alerting settings.
pub fn validate(rules: &[AlertRule], alerting: &AlertingConfig) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for r in rules {
        let place = format!("alert '{}'", r.name);
        if r.name.is_empty() || r.name.len() > 100 || r.name.chars().any(char::is_control) {
            return Err(format!("{place}: `name` must be 1 to 100 printable characters"));
        }
        if !names.insert(&r.name) {
            return Err(format!("{place}: another alert has this name"));
        }
        match (&r.metric, &r.stat) {
            (Some(m), None) if m.starts_with("flowgate_") => {}
            (Some(m), None) => return Err(format!("{place}: `metric` '{m}' is not a flowgate metric (flowgate_…)")),
            (None, Some(s)) if s.starts_with('/') => {}
            (None, Some(s)) => {
                return Err(format!("{place}: `stat` '{s}' must be a JSON pointer (/memory/used_bytes)"))
            }
            _ => return Err(format!("{place}: set exactly one of `metric` and `stat`")),
        }
        match (&r.condition, &r.anomaly, &r.predict) {
            (Some(c), None, None) => {
                Threshold::parse(c).map_err(|e| format!("{place}: {e}"))?;
            }
            (None, Some(a), None) => a.validate().map_err(|e| format!("{place}: {e}"))?,
            (None, None, Some(p)) => p.validate().map_err(|e| format!("{place}: {e}"))?,
            _ => return Err(format!("{place}: set exactly one of `condition`, `anomaly` and `predict`")),
        }
    }
    if !(100..=60_000).contains(&alerting.interval_ms) {
        return Err("alerting.interval_ms must be from 100 to 60000".to_owned());
    }
    if let Some(url) = &alerting.webhook_url {
        let parsed = reqwest::Url::parse(url).ok().filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
        if parsed.is_none() {
            return Err("alerting.webhook_url must be an http:// or https:// URL with a host".to_owned());
        }
    }
    if alerting.repeat_interval_ms < 1000 || !(100..=60_000).contains(&alerting.webhook_timeout_ms) {
        return Err(
            "alerting.repeat_interval_ms must be at least 1000, webhook_timeout_ms from 100 to 60000".to_owned()
        );
    }
    Ok(())
}

/// A moment: wall-clock milliseconds (shown) and monotonic seconds (measured with, so
/// a step of the system clock moves no alert).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stamp {
    ms: i64,
    t: f64,
}

/// Where a rule is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Inactive,
    Pending {
        since: Stamp,
    },
    /// `clearing`: since when the test has not held (a firing alert resolves once it
    /// has not held for `for_ms`, as it fired once it had held that long).
    Firing {
        since: Stamp,
        clearing: Option<Stamp>,
    },
}

/// Whether two rules are the same, every field counted.
fn same_rule(a: &AlertRule, b: &AlertRule) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

impl RuleState {
    /// A rule not evaluated yet; `last` is the rate's starting sample, if known.
    fn new(r: &AlertRule, last: Option<(f64, f64)>) -> RuleState {
        RuleState {
            threshold: r.condition.as_deref().and_then(|c| Threshold::parse(c).ok()),
            rule: r.clone(),
            baseline: Baseline::default(),
            trend: Trend::default(),
            last,
            seen_t: None,
            phase: Phase::Inactive,
            value: None,
            severity: r.severity,
            last_sent: None,
            eta_secs: None,
        }
    }
}

struct RuleState {
    rule: AlertRule,
    threshold: Option<Threshold>,
    baseline: Baseline,
    trend: Trend,
    last: Option<(f64, f64)>,
    /// When the last sample was taken (monotonic seconds).
    seen_t: Option<f64>,
    phase: Phase,
    value: Option<f64>,
    severity: Severity,
    last_sent: Option<Instant>,
    /// Seconds to the limit, for a prediction.
    eta_secs: Option<f64>,
}

/// What is recorded of an alert that resolved.
#[derive(Clone, Debug)]
struct Resolved {
    view: Value,
}

/// The rules and their states, shared with the HTTP API.
pub struct Alerts {
    rules: Mutex<Vec<RuleState>>,
    recent: Mutex<VecDeque<Resolved>>,
    alerting: AlertingConfig,
    /// Notifications made outside an evaluation (a reload resolving the alerts of rules
    /// it removed), sent with the next evaluation's.
    outbox: Mutex<Vec<Value>>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts").field("rules", &self.rules.lock().len()).finish_non_exhaustive()
    }
}

/// Resolved alerts kept for `GET /v1/alerts`.
const RECENT: usize = 100;

impl Alerts {
    /// The rules, none active.
    pub fn new(rules: &[AlertRule], alerting: &AlertingConfig) -> Alerts {
        // The engine's counters start at 0 with it (time 0 of the rule loop): a burst
        // before the first evaluation counts.
        let states = rules.iter().map(|r| RuleState::new(r, r.rate.then_some((0.0, 0.0)))).collect();
        Alerts {
            rules: Mutex::new(states),
            recent: Mutex::new(VecDeque::new()),
            alerting: alerting.clone(),
            outbox: Mutex::new(Vec::new()),
        }
    }

    /// Replaces the rules (a config reload): a rule whose definition did not change
    /// keeps its state (its phase, baseline and trend); a new or changed one starts
    /// afresh, a rate from its first sample on; an active alert of a rule removed or
    /// changed is resolved (recorded, and sent to the webhook) as such.
    pub fn reload(&self, rules: &[AlertRule]) -> flowgate_engine::Changes {
        let mut changes = flowgate_engine::Changes::default();
        let mut states = self.rules.lock();
        let mut old: Vec<RuleState> = std::mem::take(&mut *states);
        for r in rules {
            let kept = old.iter().position(|s| s.rule.name == r.name && same_rule(&s.rule, r));
            match kept {
                Some(i) => {
                    changes.unchanged.push(r.name.clone());
                    states.push(old.swap_remove(i));
                }
                None => {
                    if old.iter().any(|s| s.rule.name == r.name) {
                        changes.restarted.push(r.name.clone());
                    } else {
                        changes.added.push(r.name.clone());
                    }
                    states.push(RuleState::new(r, None));
                }
            }
        }
        let now_ms = flowgate_core::time::now_ms();
        for s in old {
            if !rules.iter().any(|r| r.name == s.rule.name) {
                changes.removed.push(s.rule.name.clone());
            }
            if s.phase == Phase::Inactive {
                continue;
            }
            let mut v = view(&s);
            v["state"] = json!("resolved");
            v["resolved_ms"] = json!(now_ms);
            v["resolved_by"] = json!("reload");
            tracing::info!(alert = %s.rule.name, "alert resolved: its rule was removed or changed by a reload");
            self.record_resolved(v.clone());
            if matches!(s.phase, Phase::Firing { .. }) {
                self.outbox.lock().push(json!({"status": "resolved", "alert": v}));
            }
        }
        changes
    }

    fn record_resolved(&self, view: Value) {
        let mut recent = self.recent.lock();
        if recent.len() >= RECENT {
            recent.pop_front();
        }
        recent.push_back(Resolved { view });
    }

    /// The active alerts (pending and firing), as `/v1/stats` and `/v1/alerts` show them.
    pub fn active(&self) -> Vec<Value> {
        self.rules.lock().iter().filter(|s| s.phase != Phase::Inactive).map(view).collect()
    }

    /// `GET /v1/alerts`: active alerts and recently resolved ones, newest first.
    pub fn to_json(&self) -> Value {
        let recent: Vec<Value> = self.recent.lock().iter().rev().map(|r| r.view.clone()).collect();
        let rules = self.rules.lock().len();
        json!({"active": self.active(), "resolved": recent, "rules": rules})
    }

    /// Evaluates every rule once at `now_ms` (`t_secs` on a monotonic clock) with
    /// `sample` giving a rule's raw value; returns the notifications to send.
    fn evaluate(&self, now_ms: i64, t_secs: f64, sample: impl Fn(&AlertRule) -> Option<f64>) -> Vec<Value> {
        let now = Stamp { ms: now_ms, t: t_secs };
        let mut out = Vec::new();
        let mut rules = self.rules.lock();
        for s in rules.iter_mut() {
            let raw = sample(&s.rule);
            let value = match (raw, s.rule.rate) {
                (Some(v), true) => {
                    let rate = s.last.and_then(|(t0, v0)| (t_secs > t0).then(|| (v - v0) / (t_secs - t0)));
                    s.last = Some((t_secs, v));
                    // A counter that went down was reset (a restart): no rate this time.
                    rate.filter(|r| *r >= 0.0)
                }
                (v, false) => v,
                (None, true) => None,
            };
            let dt = s.seen_t.map_or(0.0, |t0| (t_secs - t0).max(0.0));
            if value.is_some() {
                s.seen_t = Some(t_secs);
            }
            let holds = match value {
                None => false,
                Some(v) => {
                    if let Some(t) = &s.threshold {
                        t.holds(v)
                    } else if let Some(a) = &s.rule.anomaly {
                        s.baseline.observe(a, v, dt)
                    } else if let Some(p) = &s.rule.predict {
                        s.eta_secs = s.trend.observe(p, t_secs, v);
                        s.eta_secs.is_some()
                    } else {
                        false
                    }
                }
            };
            s.value = value;
            let for_secs = s.rule.for_ms as f64 / 1000.0;
            let before = s.phase;
            s.phase = match (s.phase, value.is_some(), holds) {
                // No sample (a missing series, a reset counter): nothing changes.
                (p, false, _) => p,
                (Phase::Inactive, _, true) if for_secs <= 0.0 => Phase::Firing { since: now, clearing: None },
                (Phase::Inactive, _, true) => Phase::Pending { since: now },
                (Phase::Pending { since }, _, true) if t_secs - since.t >= for_secs => {
                    Phase::Firing { since: now, clearing: None }
                }
                (p @ Phase::Pending { .. }, _, true) => p,
                (Phase::Firing { since, .. }, _, true) => Phase::Firing { since, clearing: None },
                (Phase::Firing { since, clearing }, _, false) => {
                    let clearing = clearing.unwrap_or(now);
                    if t_secs - clearing.t >= for_secs {
                        Phase::Inactive
                    } else {
                        Phase::Firing { since, clearing: Some(clearing) }
                    }
                }
                (Phase::Inactive | Phase::Pending { .. }, _, false) => Phase::Inactive,
            };
            match (before, s.phase) {
                (Phase::Firing { .. }, Phase::Firing { since, .. }) => {
                    let age_ms = ((t_secs - since.t) * 1000.0).max(0.0) as u64;
                    let escalate = self.alerting.escalate_after_ms > 0
                        && age_ms >= self.alerting.escalate_after_ms
                        && s.severity == s.rule.severity
                        && s.severity != Severity::Critical;
                    let repeat = s
                        .last_sent
                        .is_some_and(|t| t.elapsed() >= Duration::from_millis(self.alerting.repeat_interval_ms));
                    if escalate {
                        s.severity = s.severity.raised();
                        tracing::warn!(alert = %s.rule.name, severity = ?s.severity, "alert escalated");
                    }
                    if escalate || repeat {
                        s.last_sent = Some(Instant::now());
                        out.push(notification("firing", s));
                    }
                }
                (_, Phase::Firing { .. }) => {
                    tracing::warn!(alert = %s.rule.name, severity = ?s.severity, value = ?s.value,
                        description = s.rule.description.as_deref().unwrap_or(""), "alert firing");
                    s.last_sent = Some(Instant::now());
                    out.push(notification("firing", s));
                }
                (Phase::Firing { since, .. }, Phase::Inactive) => {
                    tracing::info!(alert = %s.rule.name, value = ?s.value, "alert resolved");
                    let mut v = view(s);
                    v["state"] = json!("resolved");
                    v["resolved_ms"] = json!(now_ms);
                    v["since_ms"] = json!(since.ms);
                    self.record_resolved(v.clone());
                    out.push(json!({"status": "resolved", "alert": v}));
                    s.severity = s.rule.severity;
                    s.last_sent = None;
                }
                _ => {}
            }
        }
        out
    }
}

fn view(s: &RuleState) -> Value {
    let (state, since) = match s.phase {
        Phase::Inactive => ("inactive", None),
        Phase::Pending { since } => ("pending", Some(since.ms)),
        Phase::Firing { since, .. } => ("firing", Some(since.ms)),
    };
    let kind = if s.rule.anomaly.is_some() {
        "anomaly"
    } else if s.rule.predict.is_some() {
        "predict"
    } else {
        "threshold"
    };
    let mut v = json!({
        "name": s.rule.name,
        "state": state,
        "since_ms": since,
        "severity": s.severity,
        "kind": kind,
        "value": s.value.filter(|v| v.is_finite()),
        "source": s.rule.metric.as_ref().or(s.rule.stat.as_ref()),
        "labels": s.rule.labels,
        "description": s.rule.description,
    });
    if let Some(c) = &s.rule.condition {
        v["condition"] = json!(c);
    }
    if s.rule.anomaly.is_some() {
        let (mean, sd) = s.baseline.mean_and_sd();
        v["baseline"] = json!({"mean": mean, "sd": sd});
    }
    if let Some(p) = &s.rule.predict {
        v["limit"] = json!(p.limit);
        v["eta_secs"] = json!(s.eta_secs);
    }
    v
}

fn notification(status: &str, s: &RuleState) -> Value {
    json!({"status": status, "alert": view(s)})
}

/// The sum of the samples named `name` whose labels include `labels`, from the text
/// `/metrics` writes; `None` when there is none.
pub fn metric_value(text: &str, name: &str, labels: &BTreeMap<String, String>) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (label_text, value) = match rest.as_bytes().first() {
            Some(b'{') => match rest.rfind('}') {
                Some(end) => (&rest[1..end], rest[end + 1..].trim()),
                None => continue,
            },
            Some(b' ') => ("", rest.trim()),
            _ => continue,
        };
        // Each wanted pair, whole: after the opening brace or a comma, so `pipeline="a"`
        // matches neither `xpipeline="a"` nor `pipeline="ab"`.
        let framed = format!(",{label_text},");
        let matches = labels
            .iter()
            .all(|(k, v)| framed.contains(&format!(",{k}=\"{}\",", v.replace('\\', "\\\\").replace('"', "\\\""))));
        let Some(value) = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        if matches {
            sum = Some(sum.unwrap_or(0.0) + value);
        }
    }
    sum
}

/// True when the metrics text declares the family of sample `name` (`# TYPE`).
fn declared(text: &str, name: &str) -> bool {
    let family = name.strip_suffix("_total").unwrap_or(name);
    [name, family].iter().any(|f| text.contains(&format!("# TYPE {f} ")))
}

/// Evaluates the rules until shutdown, sending notifications to the webhook if set.
pub async fn run(shared: Arc<crate::shared::Shared>, alerts: Arc<Alerts>) {
    let webhook = alerts.alerting.webhook_url.clone().map(|url| {
        webhook::Webhook::start(url, Duration::from_millis(alerts.alerting.webhook_timeout_ms), shared.shutdown.clone())
    });
    let mut ticks = tokio::time::interval(Duration::from_millis(alerts.alerting.interval_ms));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let unknown = Mutex::new(std::collections::HashSet::new());
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let needs_metrics = alerts.rules.lock().iter().any(|s| s.rule.metric.is_some());
        let needs_stats = alerts.rules.lock().iter().any(|s| s.rule.stat.is_some());
        let text = if needs_metrics { crate::http::metrics_text(&shared) } else { String::new() };
        let stats = if needs_stats { crate::http::stats_document(&shared, false) } else { Value::Null };
        let mut sent = std::mem::take(&mut *alerts.outbox.lock());
        sent.extend(alerts.evaluate(flowgate_core::time::now_ms(), start.elapsed().as_secs_f64(), |r| {
            match (&r.metric, &r.stat) {
                // A counter the engine declares but has no series of yet is 0; a name it
                // does not declare at all gives nothing (said once in the log).
                (Some(m), _) => metric_value(&text, m, &r.labels).or_else(|| {
                    if declared(&text, m) {
                        r.rate.then_some(0.0)
                    } else {
                        if unknown.lock().insert(r.name.clone()) {
                            tracing::warn!(alert = %r.name, metric = %m,
                                "the alert's metric is not one /metrics exports: the rule cannot fire (see docs/metrics.md)");
                        }
                        None
                    }
                }),
                (_, Some(p)) => stats.pointer(p).and_then(Value::as_f64),
                _ => None,
            }
        }));
        if let Some(w) = &webhook {
            for n in sent {
                w.send(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> AlertRule {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn metric_samples_are_summed_over_the_series_with_the_labels() {
        let text =
            "# TYPE x counter\nflowgate_x_total{pipeline=\"a\",sink=\"s\"} 3\nflowgate_x_total{pipeline=\"b\"} 4\n\
                    flowgate_x_total_other 100\nflowgate_y 7\n";
        assert_eq!(metric_value(text, "flowgate_x_total", &BTreeMap::new()), Some(7.0));
        let only_a = BTreeMap::from([("pipeline".to_owned(), "a".to_owned())]);
        assert_eq!(metric_value(text, "flowgate_x_total", &only_a), Some(3.0));
        let tricky =
            "flowgate_q{xpipeline=\"a\"} 1\nflowgate_q{pipeline=\"ab\"} 2\nflowgate_q{pipeline=\"a\",n=\"1\"} 4\n";
        assert_eq!(metric_value(tricky, "flowgate_q", &only_a), Some(4.0));
        assert_eq!(metric_value(text, "flowgate_y", &BTreeMap::new()), Some(7.0));
        assert_eq!(metric_value(text, "flowgate_z", &BTreeMap::new()), None);
    }

    #[test]
    fn a_rule_is_pending_then_firing_after_its_for_then_resolved_and_escalated_on_age() {
        let r = rule("name = \"big\"\nstat = \"/v\"\ncondition = \"> 10\"\nfor_ms = 2000\nseverity = \"info\"");
        let alerting = AlertingConfig { escalate_after_ms: 5000, ..AlertingConfig::default() };
        validate(std::slice::from_ref(&r), &alerting).unwrap();
        let alerts = Alerts::new(&[r], &alerting);
        let at = |ms: i64, v: f64| alerts.evaluate(ms, ms as f64 / 1000.0, |_| Some(v));
        assert!(at(0, 5.0).is_empty());
        assert!(at(1000, 50.0).is_empty());
        assert_eq!(alerts.active()[0]["state"], "pending");
        let sent = at(3000, 50.0);
        assert_eq!(sent[0]["status"], "firing");
        assert_eq!(sent[0]["alert"]["severity"], "info");
        assert!(at(4000, 50.0).is_empty(), "no repeat before the interval");
        let sent = at(8000, 50.0);
        assert_eq!(sent[0]["alert"]["severity"], "warning", "escalated after 5 s of firing");
        // Back under the line: it resolves once that has held for `for_ms` too, so a
        // value hovering at the line does not flap.
        assert!(at(9000, 1.0).is_empty());
        assert!(at(10000, 50.0).is_empty(), "over again: still firing, nothing sent");
        assert!(at(10500, 1.0).is_empty());
        assert!(at(12000, 1.0).is_empty());
        let sent = at(12500, 1.0);
        assert_eq!(sent[0]["status"], "resolved");
        assert!(alerts.active().is_empty());
        assert_eq!(alerts.to_json()["resolved"][0]["name"], "big");
        // A step of the wall clock moves nothing: timing is by the monotonic clock.
        assert!(alerts.evaluate(-50_000_000, 13.0, |_| Some(50.0)).is_empty(), "pending, not fired early");
    }

    #[test]
    fn rates_are_per_second_and_a_reset_counter_gives_none() {
        let r = rule("name = \"fast\"\nmetric = \"flowgate_x_total\"\nrate = true\ncondition = \"> 100\"");
        let alerts = Alerts::new(&[r], &AlertingConfig::default());
        assert!(alerts.evaluate(0, 0.0, |_| Some(0.0)).is_empty());
        assert!(alerts.evaluate(1000, 1.0, |_| Some(50.0)).is_empty());
        assert_eq!(alerts.evaluate(2000, 2.0, |_| Some(500.0))[0]["status"], "firing");
        assert!(alerts.evaluate(3000, 3.0, |_| Some(10.0)).is_empty(), "a reset gives no rate: no change");
        assert_eq!(alerts.evaluate(4000, 4.0, |_| Some(20.0))[0]["status"], "resolved");
    }

    #[test]
    fn bad_rules_are_refused_with_their_name() {
        let alerting = AlertingConfig::default();
        for (text, want) in [
            ("name = \"a\"\ncondition = \"> 1\"", "exactly one of `metric` and `stat`"),
            ("name = \"a\"\nmetric = \"up\"\ncondition = \"> 1\"", "not a flowgate metric"),
            ("name = \"a\"\nstat = \"memory\"\ncondition = \"> 1\"", "JSON pointer"),
            ("name = \"a\"\nstat = \"/m\"", "exactly one of `condition`"),
            ("name = \"a\"\nstat = \"/m\"\ncondition = \"about 3\"", "operator"),
            ("name = \"a\"\nstat = \"/m\"\nanomaly = { sigmas = -1 }", "sigmas > 0"),
        ] {
            let e = validate(&[rule(text)], &alerting).unwrap_err();
            assert!(e.contains(want) && e.contains("alert 'a'"), "{e}");
        }
        let bad_url = AlertingConfig { webhook_url: Some("ftp://x".into()), ..AlertingConfig::default() };
        assert!(validate(&[], &bad_url).unwrap_err().contains("http://"));
        let no_host = AlertingConfig { webhook_url: Some("http://".into()), ..AlertingConfig::default() };
        assert!(validate(&[], &no_host).is_err());
    }
}
