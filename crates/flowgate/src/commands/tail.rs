//! `flowgate tail`: read events from the log, one per line: the payload, or with
//! `--format json` the whole stored event (its envelope).

use std::io::Write;
use std::process::ExitCode;

use flowgate_client::Client;
use flowgate_core::BatchView;
use flowgate_server::envelope::envelope;

/// Arguments of `flowgate tail`.
#[derive(clap::Args)]
pub struct Args {
    /// Topic to read.
    #[arg(long)]
    topic: String,
    /// Where to start: earliest, latest, an offset, or a time (RFC 3339 such as
    /// 2026-11-24T10:00:00Z, or ms since the epoch prefixed with @).
    #[arg(long, default_value = "earliest")]
    from: String,
    /// Keep waiting for new events.
    #[arg(long)]
    follow: bool,
    /// Partition to read; all partitions when omitted.
    #[arg(long)]
    partition: Option<u32>,
    /// Stop after this many events.
    #[arg(long)]
    limit: Option<u64>,
    /// `payload`: each event's payload as stored; `json`: one JSON object per event with
    /// `topic`, `partition`, `offset`, `key`, `timestamp` (ms since the epoch),
    /// `client_id`, `headers` and `payload` (bytes that are not UTF-8 as
    /// `{"base64": …}`; a payload that is JSON as itself).
    #[arg(long, value_enum, default_value = "payload")]
    format: Format,
    /// Only events with this key.
    #[arg(long)]
    key: Option<String>,
    /// Engine address (binary protocol).
    #[arg(long, default_value = super::DEFAULT_ADDR)]
    addr: String,
}

/// How `tail` prints an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The payload as stored.
    Payload,
    /// The envelope as a JSON object.
    Json,
}

enum Start {
    Earliest,
    Latest,
    Offset(u64),
    Time(i64),
}

fn parse_start(s: &str) -> anyhow::Result<Start> {
    Ok(match s {
        "earliest" => Start::Earliest,
        "latest" => Start::Latest,
        _ if s.starts_with('@') => Start::Time(s[1..].parse().map_err(|_| anyhow::anyhow!("bad --from time {s}"))?),
        _ => match s.parse::<u64>() {
            Ok(o) => Start::Offset(o),
            Err(_) => Start::Time(flowgate_core::timestamp::parse_rfc3339(s).map_err(|_| {
                anyhow::anyhow!(
                    "--from must be earliest, latest, an offset, @<ms> or a UTC time like 2026-11-24T10:00:00Z"
                )
            })?),
        },
    })
}

/// Prints events until the end of the log (or forever with --follow).
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let start = parse_start(&args.from)?;
    super::runtime()?.block_on(async move {
        let client =
            Client::connect(&args.addr).await.map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", args.addr))?;
        let topics = client.list_topics().await?;
        let Some(info) = topics.iter().find(|t| t.name == args.topic) else {
            anyhow::bail!("topic '{}' does not exist", args.topic);
        };
        let partitions: Vec<u32> = match args.partition {
            Some(p) => vec![p],
            None => (0..info.partitions.len() as u32).collect(),
        };
        let mut offsets = Vec::new();
        for &p in &partitions {
            let pi = info
                .partitions
                .get(p as usize)
                .ok_or_else(|| anyhow::anyhow!("topic '{}' has no partition {p}", args.topic))?;
            offsets.push(match start {
                Start::Earliest => pi.start_offset,
                Start::Latest => pi.end_offset,
                Start::Offset(o) => o.max(pi.start_offset),
                Start::Time(ts) => client.offset_for_time(&args.topic, p, ts).await?.unwrap_or(pi.end_offset),
            });
        }
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let mut printed = 0u64;
        let mut scratch = Vec::new();
        let limit = args.limit.unwrap_or(u64::MAX);
        loop {
            let mut progressed = false;
            for (i, &p) in partitions.iter().enumerate() {
                let wait = if args.follow && partitions.len() == 1 { 500 } else { 0 };
                let fetched = client.fetch(&args.topic, p, offsets[i], 1 << 20, wait).await?;
                let mut rest = &fetched.batches[..];
                while !rest.is_empty() {
                    let (view, tail) = BatchView::parse(rest)?;
                    for record in view.records(&mut scratch)? {
                        let record = record?;
                        let offset = view.base_offset() + u64::from(record.offset_delta);
                        if offset < offsets[i] {
                            continue;
                        }
                        offsets[i] = offset + 1;
                        progressed = true;
                        if args.key.as_ref().is_some_and(|k| record.key != Some(k.as_bytes())) {
                            continue;
                        }
                        match args.format {
                            Format::Payload => out.write_all(record.payload)?,
                            Format::Json => {
                                serde_json::to_writer(&mut out, &envelope(&args.topic, p, offset, &record))?
                            }
                        }
                        out.write_all(b"\n")?;
                        printed += 1;
                        if printed >= limit {
                            out.flush()?;
                            return Ok(ExitCode::SUCCESS);
                        }
                    }
                    rest = tail;
                }
            }
            out.flush()?;
            if !progressed {
                if !args.follow {
                    return Ok(ExitCode::SUCCESS);
                }
                if partitions.len() > 1 {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
    })
}
