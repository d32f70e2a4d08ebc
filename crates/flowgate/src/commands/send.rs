//! `flowgate send`: NDJSON lines in, acknowledged events counted.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use flowgate_client::{Producer, ProducerConfig};
use flowgate_core::{Event, FieldPath, FieldSpec, TimestampUnit};

/// Arguments of `flowgate send`.
#[derive(clap::Args)]
pub struct Args {
    /// Topic to send to.
    #[arg(long)]
    topic: String,
    /// Key for every event that gets none from --key-field (picks the partition).
    #[arg(long)]
    key: Option<String>,
    /// Take each event's key from this JSON field (a dotted path such as `device.id`
    /// reaches into objects): a string, or a number's text as written; events without it
    /// (or with null) get `--key`, or none.
    #[arg(long)]
    key_field: Option<String>,
    /// Take each event's time from this JSON field, written as --timestamp-unit says;
    /// events without it (or with null) get the ingest time. A time before 1970 or after
    /// 9999 is an error.
    #[arg(long, alias = "time-field")]
    timestamp_field: Option<String>,
    /// How --timestamp-field is written: ms, s or us (a JSON number since the epoch; a
    /// fraction keeps its milliseconds) or rfc3339 (a string such as
    /// 2026-11-24T10:00:00.5+02:00).
    #[arg(long, default_value = "ms")]
    timestamp_unit: TimestampUnit,
    /// Take each event's client id (what a dedup `by = "@client_id"` compares) from this
    /// JSON field: a string, or a number's text.
    #[arg(long)]
    client_id_field: Option<String>,
    /// Engine address (binary protocol).
    #[arg(long, default_value = super::DEFAULT_ADDR)]
    addr: String,
    /// NDJSON file; `-` or nothing reads stdin.
    file: Option<PathBuf>,
}

impl Args {
    /// The fields read from each line, the same way the engine reads them from NDJSON
    /// and HTTP events.
    fn fields(&self) -> anyhow::Result<FieldSpec> {
        let path = |flag: &str, value: &Option<String>| {
            value.as_deref().map(|p| FieldPath::parse(p).map_err(|e| anyhow::anyhow!("{flag} `{p}` {e}"))).transpose()
        };
        Ok(FieldSpec {
            key: path("--key-field", &self.key_field)?,
            timestamp: path("--timestamp-field", &self.timestamp_field)?,
            timestamp_unit: self.timestamp_unit,
            client_id: path("--client-id-field", &self.client_id_field)?,
        })
    }
}

/// Sends every non-blank line as one event and prints how many were acknowledged, also
/// when it fails midway.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let fields = args.fields()?;
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
                let mut event = Event::from_payload(Bytes::copy_from_slice(trimmed.as_bytes()));
                event.key = key.clone();
                if fields.is_empty() {
                    if serde_json::from_str::<serde::de::IgnoredAny>(trimmed).is_err() {
                        anyhow::bail!("line {} is not valid JSON", n + 1);
                    }
                } else {
                    let found =
                        fields.extract(trimmed.as_bytes()).map_err(|e| anyhow::anyhow!("line {}: {e}", n + 1))?;
                    if let Some(k) = found.key {
                        event.key = Some(Bytes::copy_from_slice(&k));
                    }
                    event.timestamp = found.timestamp;
                    event.client_id = found.client_id.map(|c| Bytes::copy_from_slice(&c));
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
