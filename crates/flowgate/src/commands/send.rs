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
                if serde_json::from_str::<serde::de::IgnoredAny>(trimmed).is_err() {
                    anyhow::bail!("line {} is not valid JSON", n + 1);
                }
                let mut event = Event::from_payload(Bytes::copy_from_slice(trimmed.as_bytes()));
                event.key = key.clone();
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
