//! `flowgate send`: NDJSON lines in, acknowledged events counted.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use flowgate_client::{Producer, ProducerConfig};
use flowgate_core::Event;

/// Arguments of `flowgate send`.
#[derive(clap::Args)]
pub struct Args {
    /// Topic to send to.
    #[arg(long)]
    topic: String,
    /// Key for every event (picks the partition).
    #[arg(long)]
    key: Option<String>,
    /// Take each event's key from this top-level JSON field (a string, or a number's
    /// text); events without it get `--key`, or none.
    #[arg(long)]
    key_field: Option<String>,
    /// Take each event's time from this top-level JSON field (milliseconds since the
    /// epoch, an integer); events without it get the ingest time.
    #[arg(long)]
    time_field: Option<String>,
    /// Engine address (binary protocol).
    #[arg(long, default_value = super::DEFAULT_ADDR)]
    addr: String,
    /// NDJSON file; `-` or nothing reads stdin.
    file: Option<PathBuf>,
}

/// Sends every non-blank line as one event and prints how many were acknowledged, also
/// when it fails midway.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let input: Box<dyn BufRead> = match args.file.as_deref() {
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
        Some(p) if p.as_os_str() == "-" => Box::new(std::io::BufReader::new(std::io::stdin())),
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", p.display()))?,
        )),
    };
    super::runtime()?.block_on(async move {
        let mut producer = match Producer::new(&args.addr, &args.topic, ProducerConfig::default()).await {
            Ok(p) => p,
            Err(e) => {
                println!("acknowledged 0 events");
                anyhow::bail!("cannot connect to {}: {e}", args.addr);
            }
        };
        let key = args.key.map(Bytes::from);
        let mut sent = 0u64;
        let outcome: anyhow::Result<()> = async {
            for (n, line) in input.lines().enumerate() {
                let line = line.map_err(|e| anyhow::anyhow!("reading line {}: {e}", n + 1))?;
                let trimmed = line.trim();
                if trimmed.is_empty() {
                    continue;
                }
                let fields = if args.key_field.is_some() || args.time_field.is_some() {
                    let Ok(serde_json::Value::Object(fields)) = serde_json::from_str::<serde_json::Value>(trimmed)
                    else {
                        anyhow::bail!("line {} is not a JSON object", n + 1);
                    };
                    Some(fields)
                } else {
                    if serde_json::from_str::<serde::de::IgnoredAny>(trimmed).is_err() {
                        anyhow::bail!("line {} is not valid JSON", n + 1);
                    }
                    None
                };
                let mut event = Event::from_payload(Bytes::copy_from_slice(trimmed.as_bytes()));
                event.key = key.clone();
                if let Some(fields) = &fields {
                    if let Some(value) = args.key_field.as_deref().and_then(|f| fields.get(f)) {
                        event.key = Some(match value {
                            serde_json::Value::String(s) => Bytes::copy_from_slice(s.as_bytes()),
                            serde_json::Value::Number(number) => Bytes::from(number.to_string()),
                            _ => anyhow::bail!("line {}: key field is neither a string nor a number", n + 1),
                        });
                    }
                    if let Some(value) = args.time_field.as_deref().and_then(|f| fields.get(f)) {
                        event.timestamp = Some(value.as_i64().ok_or_else(|| {
                            anyhow::anyhow!("line {}: time field is not an integer of milliseconds", n + 1)
                        })?);
                    }
                }
                producer.send(&event).await?;
                sent += 1;
            }
            producer.flush().await?;
            Ok(())
        }
        .await;
        let acked = producer.acked();
        println!("acknowledged {acked} events");
        match outcome {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("error: {e:#} ({sent} read, {acked} acknowledged)");
                Ok(ExitCode::FAILURE)
            }
        }
    })
}
