//! `flowgate dlq`: the dead-letter topic `_dlq`, read through the binary protocol;
//! which entries were replayed, and `replay`, through the HTTP API.
//!
//! Entries are read partition by partition, oldest first; `--since` starts each
//! partition at the first entry written at or after that time (entries are stamped with
//! when they failed, and the log's time index finds them).

use std::collections::HashSet;
use std::io::Write;
use std::process::ExitCode;

use flowgate_client::Client;
use flowgate_core::BatchView;
use flowgate_engine::runtime::dead_letters::{EntryFilter, Stats};
use flowgate_engine::runtime::replay_record::{fingerprint, EntryRef};
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
    /// Delete every dead-letter entry (the `_dlq` topic is deleted and made again, empty,
    /// with as many partitions). Entries written while it runs may go too.
    Purge {
        /// Really delete them.
        #[arg(long)]
        yes: bool,
        /// Engine address (binary protocol).
        #[arg(long, default_value = super::DEFAULT_ADDR)]
        addr: String,
    },
    /// Send entries' events through their pipeline again: an entry a sink failed goes to
    /// that sink alone, one a processor failed re-enters at that processor. Each entry is
    /// replayed once (later replays skip it); `unreadable` entries cannot be. Prints how
    /// many matched, were re-injected and skipped, and — once the pipelines have
    /// processed them — how many were delivered and how many failed again (their new
    /// entries name the entry they replay in `replay_of`).
    Replay {
        /// Only entries of this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Only entries of this category (processing_error, panicked, rejected,
        /// retries_exhausted).
        #[arg(long)]
        category: Option<String>,
        /// Report what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the pipelines to process the replay (0: do not wait).
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
        /// Entries to replay at most (default 10,000); run again for the rest.
        #[arg(long)]
        limit: Option<usize>,
        /// The engine's HTTP API.
        #[arg(long, default_value = super::http::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// Count entries by pipeline, stage and category; the most frequent errors; the
    /// oldest entry; how many were replayed.
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
    /// The engine's HTTP API, which knows which entries were replayed (default: the
    /// host of --addr, port 7071).
    #[arg(long)]
    http_addr: Option<String>,
}

impl Filter {
    fn matches(&self, entry: &serde_json::Value) -> bool {
        EntryFilter { pipeline: self.pipeline.clone(), category: self.category.clone() }.matches(entry)
    }

    fn since_ms(&self) -> anyhow::Result<Option<i64>> {
        self.since
            .as_deref()
            .map(|s| {
                s.strip_prefix('@')
                    .and_then(|ms| ms.parse().ok())
                    .or_else(|| flowgate_core::timestamp::parse_rfc3339(s).ok())
                    .ok_or_else(|| anyhow::anyhow!("--since must be @<ms> or a UTC time like 2026-11-24T10:00:00Z"))
            })
            .transpose()
    }
}

/// The entries marked replayed; `None` (with a note) when the HTTP API does not answer.
async fn replayed_marks(http_addr: &str) -> Option<HashSet<EntryRef>> {
    let fetched = async {
        let (status, body) = super::http::request(http_addr, "GET", "/v1/dlq/replayed", b"").await?;
        anyhow::ensure!(status == 200, "HTTP {status}");
        #[derive(serde::Deserialize)]
        struct Marks {
            replayed: Vec<EntryRef>,
        }
        Ok(serde_json::from_slice::<Marks>(&body)?.replayed.into_iter().collect())
    };
    match fetched.await {
        Ok(marks) => Some(marks),
        Err(e) => {
            eprintln!("which entries were replayed is not shown ({http_addr}: {e:#}; see --http-addr)");
            None
        }
    }
}

/// Calls `visit` with every entry that passes `filter` and whether it was replayed (if
/// known), until it returns false.
async fn each_entry(
    filter: &Filter,
    mut visit: impl FnMut(serde_json::Value, Option<bool>) -> bool,
) -> anyhow::Result<()> {
    let client =
        Client::connect(&filter.addr).await.map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", filter.addr))?;
    let topics = client.list_topics().await?;
    let Some(info) = topics.into_iter().find(|t| t.name == DLQ_TOPIC) else {
        // No pipeline ever ran on this engine: no dead letters.
        return Ok(());
    };
    let since = filter.since_ms()?;
    let http_addr = filter.http_addr.clone().unwrap_or_else(|| match filter.addr.rsplit_once(':') {
        Some((host, _)) => format!("{host}:7071"),
        None => super::http::DEFAULT_HTTP_ADDR.to_owned(),
    });
    let marks = replayed_marks(&http_addr).await;
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
                    let replayed = marks.as_ref().map(|m| {
                        m.contains(&EntryRef { partition: p, offset: at, fingerprint: fingerprint(record.payload) })
                    });
                    if filter.matches(&entry) && !visit(entry, replayed) {
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
                each_entry(&filter, |mut entry, replayed| {
                    if let Some(replayed) = replayed {
                        entry["replayed"] = replayed.into();
                    }
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
            Command::Purge { yes, addr } => {
                anyhow::ensure!(yes, "`flowgate dlq purge` deletes every dead-letter entry; add --yes to do it");
                let client =
                    Client::connect(&addr).await.map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))?;
                let topics = client.list_topics().await?;
                let Some(info) = topics.into_iter().find(|t| t.name == DLQ_TOPIC) else {
                    println!("no dead-letter topic: nothing to purge");
                    return Ok(ExitCode::SUCCESS);
                };
                let entries: u64 = info.partitions.iter().map(|p| p.end_offset.saturating_sub(p.start_offset)).sum();
                client.delete_topic(DLQ_TOPIC).await?;
                // Pipelines make it again when they next write a dead letter (their worker
                // restarts from its last checkpoint if one was written in between).
                match client.create_topic(DLQ_TOPIC, info.partitions.len() as u32).await {
                    Ok(())
                    | Err(flowgate_client::ClientError::Server {
                        code: flowgate_client::ErrorCode::TopicExists, ..
                    }) => {}
                    Err(e) => return Err(e.into()),
                }
                println!("purged {entries} dead-letter entries");
            }
            Command::Replay { pipeline, category, dry_run, json, wait_secs, limit, http_addr } => {
                let request = serde_json::json!({
                    "pipeline": pipeline, "category": category, "dry_run": dry_run,
                    "wait_ms": wait_secs.saturating_mul(1000), "limit": limit,
                });
                let (status, body) =
                    super::http::request(&http_addr, "POST", "/v1/dlq/replay", &serde_json::to_vec(&request)?).await?;
                let report: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| anyhow::anyhow!("{http_addr} answered {status} with something else than JSON: {e}"))?;
                anyhow::ensure!(
                    status == 200,
                    "replay failed: {}",
                    report["error"].as_str().unwrap_or("(no reason given)")
                );
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", replay_text(&report, wait_secs));
                }
            }
            Command::Stats { filter, json } => {
                let mut stats = Stats::default();
                each_entry(&filter, |entry, replayed| {
                    stats.add(&entry);
                    if let Some(replayed) = replayed {
                        stats.add_replayed(replayed);
                    }
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

/// A replay report as text for a terminal.
fn replay_text(report: &serde_json::Value, wait_secs: u64) -> String {
    let n = |key: &str| report[key].as_u64().unwrap_or(0);
    let skipped: Vec<String> = report["skipped"]
        .as_object()
        .map(|m| m.iter().map(|(why, k)| format!("{} {}", k, why.replace('_', " "))).collect())
        .unwrap_or_default();
    let skipped_n: u64 = report["skipped"].as_object().map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum());
    let mut out = if report["dry_run"] == true {
        format!("dry run: {} of {} matching entries would be replayed", n("reinjected"), n("matched"))
    } else {
        format!("replayed {} of {} matching entries", n("reinjected"), n("matched"))
    };
    if skipped_n > 0 {
        out.push_str(&format!("; skipped {skipped_n}: {}", skipped.join(", ")));
    }
    out.push('\n');
    if report["more"] == true {
        out.push_str("more entries match: run it again for the rest\n");
    }
    if report["dry_run"] != true && n("reinjected") > 0 {
        if report["completed"] == true {
            out.push_str(&format!("delivered {}, failed again {}\n", n("delivered"), n("failed")));
        } else if wait_secs > 0 {
            out.push_str(&format!(
                "not yet processed within {wait_secs} s; `flowgate dlq list` shows what fails again\n"
            ));
        }
    }
    out
}
