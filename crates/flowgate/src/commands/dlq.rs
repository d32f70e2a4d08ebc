//! `flowgate dlq`: the dead-letter topic `_dlq`, read through the binary protocol.
//!
//! Entries are read partition by partition, oldest first; `--since` starts each
//! partition at the first entry written at or after that time (entries are stamped with
//! when they failed, and the log's time index finds them).

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use flowgate_client::Client;
use flowgate_core::BatchView;
use flowgate_engine::DLQ_TOPIC;

/// `flowgate dlq` subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Print dead-letter entries, one JSON object per line, oldest first.
    List {
        #[command(flatten)]
        filter: Filter,
        /// Stop after this many entries.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Count entries by pipeline, stage and category; the most frequent errors; the
    /// oldest entry.
    Stats {
        #[command(flatten)]
        filter: Filter,
        /// Print the counts as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Which entries to look at.
#[derive(clap::Args)]
pub struct Filter {
    /// Only entries of this pipeline.
    #[arg(long)]
    pipeline: Option<String>,
    /// Only entries of this category (processing_error, panicked, unreadable, rejected,
    /// retries_exhausted).
    #[arg(long)]
    category: Option<String>,
    /// Only entries written at or after this time: RFC 3339 UTC (2026-11-24T10:00:00Z)
    /// or ms since the epoch prefixed with @.
    #[arg(long)]
    since: Option<String>,
    /// Engine address (binary protocol).
    #[arg(long, default_value = super::DEFAULT_ADDR)]
    addr: String,
}

impl Filter {
    fn matches(&self, entry: &serde_json::Value) -> bool {
        self.pipeline.as_deref().is_none_or(|p| entry["pipeline"] == p)
            && self.category.as_deref().is_none_or(|c| entry["category"] == c)
    }

    fn since_ms(&self) -> anyhow::Result<Option<i64>> {
        self.since
            .as_deref()
            .map(|s| {
                s.strip_prefix('@')
                    .and_then(|ms| ms.parse().ok())
                    .or_else(|| super::tail::parse_rfc3339_utc(s))
                    .ok_or_else(|| anyhow::anyhow!("--since must be @<ms> or a UTC time like 2026-11-24T10:00:00Z"))
            })
            .transpose()
    }
}

/// Calls `visit` with every entry that passes `filter`, until it returns false.
async fn each_entry(filter: &Filter, mut visit: impl FnMut(serde_json::Value) -> bool) -> anyhow::Result<()> {
    let client =
        Client::connect(&filter.addr).await.map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", filter.addr))?;
    let topics = client.list_topics().await?;
    let Some(info) = topics.into_iter().find(|t| t.name == DLQ_TOPIC) else {
        // No pipeline ever ran on this engine: no dead letters.
        return Ok(());
    };
    let since = filter.since_ms()?;
    let mut scratch = Vec::new();
    for (p, partition) in info.partitions.iter().enumerate() {
        let p = p as u32;
        let mut offset = match since {
            Some(ts) => match client.offset_for_time(DLQ_TOPIC, p, ts).await? {
                Some(o) => o,
                None => continue,
            },
            None => partition.start_offset,
        };
        loop {
            let fetched = client.fetch(DLQ_TOPIC, p, offset, 1 << 20, 0).await?;
            if fetched.batches.is_empty() {
                break;
            }
            let mut rest = &fetched.batches[..];
            while !rest.is_empty() {
                let (view, tail) = BatchView::parse(rest)?;
                for record in view.records(&mut scratch)? {
                    let record = record?;
                    let at = view.base_offset() + u64::from(record.offset_delta);
                    if at < offset {
                        continue;
                    }
                    offset = at + 1;
                    let Ok(entry) = serde_json::from_slice::<serde_json::Value>(record.payload) else { continue };
                    if filter.matches(&entry) && !visit(entry) {
                        return Ok(());
                    }
                }
                rest = tail;
            }
        }
    }
    Ok(())
}

/// Runs a `flowgate dlq` subcommand.
pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    super::runtime()?.block_on(async move {
        match command {
            Command::List { filter, limit } => {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                let (mut printed, limit) = (0u64, limit.unwrap_or(u64::MAX));
                if limit == 0 {
                    return Ok(ExitCode::SUCCESS);
                }
                let mut failed = None;
                each_entry(&filter, |entry| {
                    if let Err(e) = serde_json::to_writer(&mut out, &entry)
                        .map_err(std::io::Error::from)
                        .and_then(|()| out.write_all(b"\n"))
                    {
                        failed = Some(e);
                        return false;
                    }
                    printed += 1;
                    printed < limit
                })
                .await?;
                if let Some(e) = failed {
                    return Err(e.into());
                }
                out.flush()?;
            }
            Command::Stats { filter, json } => {
                let mut stats = Stats::default();
                each_entry(&filter, |entry| {
                    stats.add(&entry);
                    true
                })
                .await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&stats.to_json())?);
                } else {
                    print!("{}", stats.to_text());
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Messages are grouped by their first characters: the rest often carries an offset or
/// a value that differs per event.
const MESSAGE_KEY_CHARS: usize = 120;

#[derive(Default)]
struct Stats {
    total: u64,
    by_group: HashMap<(String, String, String), u64>,
    by_error: HashMap<String, u64>,
    oldest_ms: Option<i64>,
}

impl Stats {
    fn add(&mut self, entry: &serde_json::Value) {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
        let stage = match (entry["processor"].as_str(), entry["sink"].as_str()) {
            (Some(p), _) => format!("processor {p}"),
            (None, Some(s)) => format!("sink {s}"),
            (None, None) => "source".to_owned(),
        };
        let category = entry["category"].as_str().unwrap_or("processing_error").to_owned();
        self.total += 1;
        *self.by_group.entry((text(&entry["pipeline"]), stage, category)).or_default() += 1;
        let error: String = text(&entry["error"]).chars().take(MESSAGE_KEY_CHARS).collect();
        *self.by_error.entry(error).or_default() += 1;
        let at = entry["first_failure_ms"].as_i64().or_else(|| entry["timestamp"].as_i64());
        if let Some(at) = at {
            self.oldest_ms = Some(self.oldest_ms.map_or(at, |o| o.min(at)));
        }
    }

    fn top_errors(&self) -> Vec<(&String, u64)> {
        let mut errors: Vec<(&String, u64)> = self.by_error.iter().map(|(e, n)| (e, *n)).collect();
        errors.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        errors.truncate(5);
        errors
    }

    fn groups(&self) -> Vec<(&(String, String, String), u64)> {
        let mut groups: Vec<_> = self.by_group.iter().map(|(k, n)| (k, *n)).collect();
        groups.sort();
        groups
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "total": self.total,
            "oldest_ms": self.oldest_ms,
            "groups": self.groups().into_iter().map(|((pipeline, stage, category), n)| serde_json::json!({
                "pipeline": pipeline, "stage": stage, "category": category, "entries": n,
            })).collect::<Vec<_>>(),
            "top_errors": self.top_errors().into_iter().map(|(e, n)| serde_json::json!({"error": e, "entries": n}))
                .collect::<Vec<_>>(),
        })
    }

    fn to_text(&self) -> String {
        let mut out = format!("{} dead-letter entries", self.total);
        if let Some(oldest) = self.oldest_ms {
            out.push_str(&format!(", the oldest from {oldest} (ms since the epoch)"));
        }
        out.push('\n');
        for ((pipeline, stage, category), n) in self.groups() {
            out.push_str(&format!("{n:>10}  pipeline {pipeline}, {stage}, {category}\n"));
        }
        if !self.by_error.is_empty() {
            out.push_str("most frequent errors:\n");
            for (error, n) in self.top_errors() {
                out.push_str(&format!("{n:>10}  {error}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_by_group_and_error_and_find_the_oldest() {
        let mut stats = Stats::default();
        let entry = |pipeline: &str, sink: Option<&str>, category: &str, error: &str, at: i64| {
            serde_json::json!({"pipeline": pipeline, "processor": if sink.is_none() { serde_json::json!("dedup-1") } else { serde_json::Value::Null },
                "sink": sink, "category": category, "error": error, "first_failure_ms": at})
        };
        stats.add(&entry("p", Some("out"), "rejected", "400 bad", 30));
        stats.add(&entry("p", Some("out"), "rejected", "400 bad", 10));
        stats.add(&entry("p", None, "processing_error", "not JSON", 20));
        let v = stats.to_json();
        assert_eq!(v["total"], 3);
        assert_eq!(v["oldest_ms"], 10);
        assert_eq!(v["top_errors"][0], serde_json::json!({"error": "400 bad", "entries": 2}));
        assert_eq!(v["groups"].as_array().unwrap().len(), 2);
        assert!(stats.to_text().contains("pipeline p, sink out, rejected"), "{}", stats.to_text());
        let filter =
            Filter { pipeline: Some("p".into()), category: Some("rejected".into()), since: None, addr: String::new() };
        assert!(filter.matches(&entry("p", Some("out"), "rejected", "x", 1)));
        assert!(!filter.matches(&entry("q", Some("out"), "rejected", "x", 1)));
        assert!(!filter.matches(&entry("p", None, "processing_error", "x", 1)));
    }
}
