//! `flowgate topics list|create|alter|describe|delete`.

use std::process::ExitCode;

use flowgate_client::{Client, Setting, SettingUpdate, SettingValue};
use flowgate_core::Codec;
use serde_json::Value;

use super::top::view::bytes as size;

/// The topic subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// List topics with partitions, offsets and sizes.
    List {
        /// Engine address (binary protocol).
        #[arg(long, default_value = super::DEFAULT_ADDR)]
        addr: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a topic, with settings of its own; the settings not given follow the
    /// engine's defaults (`[log]` retention, `ingest.compression`).
    Create {
        /// Topic name.
        name: String,
        /// Number of partitions (fixed for the topic's life: keys are routed by it).
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        #[command(flatten)]
        settings: SettingArgs,
        /// Engine address (binary protocol).
        #[arg(long, default_value = super::DEFAULT_ADDR)]
        addr: String,
    },
    /// Change a topic's settings; `default` returns one to the engine's default. The
    /// settings not given stay as they are.
    Alter {
        /// Topic name.
        name: String,
        #[command(flatten)]
        settings: SettingArgs,
        /// Refused: the partition count is fixed when a topic is created.
        #[arg(long, hide = true)]
        partitions: Option<String>,
        /// Engine address (binary protocol).
        #[arg(long, default_value = super::DEFAULT_ADDR)]
        addr: String,
    },
    /// Show a topic's settings (each effective value and whether it is the topic's own
    /// or the default), partitions with offsets, segments and sizes, and the pipelines
    /// that read it with their lag.
    Describe {
        /// Topic name.
        name: String,
        /// Print JSON (the document of `GET /v1/topics/{topic}`).
        #[arg(long)]
        json: bool,
        /// Engine address (binary protocol).
        #[arg(long, default_value = super::DEFAULT_ADDR)]
        addr: String,
    },
    /// Delete a topic and its data.
    Delete {
        /// Topic name.
        name: String,
        /// Engine address (binary protocol).
        #[arg(long, default_value = super::DEFAULT_ADDR)]
        addr: String,
    },
}

/// A topic's own settings, as `create` and `alter` take them.
#[derive(clap::Args)]
pub struct SettingArgs {
    /// Delete sealed segments last written more than this many ms ago (0: keep them
    /// forever), or `default` for `log.retention_ms`.
    #[arg(long, value_name = "MS|default", allow_hyphen_values = true)]
    retention_ms: Option<String>,
    /// Delete old sealed segments while a partition holds more than this many bytes
    /// (0: no limit), or `default` for `log.retention_bytes`.
    #[arg(long, value_name = "BYTES|default", allow_hyphen_values = true)]
    retention_bytes: Option<String>,
    /// Codec of the batches the engine encodes for the topic (from NDJSON, HTTP, sinks
    /// and dead letters; client batches keep theirs): none, lz4 or zstd, or `default`
    /// for `ingest.compression`.
    #[arg(long, value_name = "none|lz4|zstd|default")]
    compression: Option<String>,
}

impl SettingArgs {
    /// The settings given, each checked.
    fn updates(&self) -> anyhow::Result<Vec<SettingUpdate>> {
        let mut updates = Vec::new();
        for (setting, arg) in
            [(Setting::RetentionMs, &self.retention_ms), (Setting::RetentionBytes, &self.retention_bytes)]
        {
            if let Some(arg) = arg {
                updates.push(SettingUpdate { setting, value: number(setting, arg)? });
            }
        }
        if let Some(arg) = &self.compression {
            let value =
                match arg.as_str() {
                    "default" => None,
                    name => Some(Codec::parse(name).ok_or_else(|| {
                        anyhow::anyhow!("--compression must be none, lz4, zstd or default, not '{name}'")
                    })? as u64),
                };
            updates.push(SettingUpdate { setting: Setting::Compression, value });
        }
        Ok(updates)
    }
}

fn number(setting: Setting, arg: &str) -> anyhow::Result<Option<u64>> {
    let flag = format!("--{}", setting.name().replace('_', "-"));
    if arg == "default" {
        return Ok(None);
    }
    if arg.starts_with('-') && arg[1..].parse::<u64>().is_ok() {
        anyhow::bail!("{flag} must not be negative (0 means no limit), or `default`");
    }
    arg.parse()
        .map(Some)
        .map_err(|_| anyhow::anyhow!("{flag} must be a whole number (0 means no limit) or `default`, not '{arg}'"))
}

async fn connect(addr: &str) -> anyhow::Result<Client> {
    Client::connect(addr).await.map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))
}

/// Runs a topic subcommand.
pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    super::runtime()?.block_on(async move {
        match command {
            Command::List { addr, json } => {
                let topics = connect(&addr).await?.list_topics().await?;
                if json {
                    let value: Vec<_> = topics
                        .iter()
                        .map(|t| {
                            serde_json::json!({
                                "name": t.name,
                                "partitions": t.partitions.iter().enumerate().map(|(i, p)| serde_json::json!({
                                    "partition": i, "start_offset": p.start_offset, "end_offset": p.end_offset, "size_bytes": p.size_bytes,
                                })).collect::<Vec<_>>(),
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&value)?);
                } else {
                    println!("{:<32} {:>10} {:>14} {:>14}", "TOPIC", "PARTITIONS", "EVENTS", "BYTES");
                    for t in &topics {
                        let events: u64 = t.partitions.iter().map(|p| p.end_offset - p.start_offset).sum();
                        let bytes: u64 = t.partitions.iter().map(|p| p.size_bytes).sum();
                        println!("{:<32} {:>10} {:>14} {:>14}", t.name, t.partitions.len(), events, bytes);
                    }
                }
            }
            Command::Create { name, partitions, settings, addr } => {
                let updates = settings.updates()?;
                connect(&addr).await?.create_topic_with(&name, partitions, &updates).await?;
                let own: Vec<String> = updates
                    .iter()
                    .filter(|u| u.value.is_some())
                    .map(|u| format!("{}={}", u.setting.name(), shown(u.setting, u.value.unwrap_or(0))))
                    .collect();
                match own.is_empty() {
                    true => println!("created topic '{name}' with {partitions} partitions"),
                    false => println!("created topic '{name}' with {partitions} partitions ({})", own.join(", ")),
                }
            }
            Command::Alter { name, settings, partitions, addr } => {
                if partitions.is_some() {
                    anyhow::bail!("{}", flowgate_server::topic_request::PARTITIONS_FIXED);
                }
                let updates = settings.updates()?;
                if updates.is_empty() {
                    anyhow::bail!("nothing to change: give --retention-ms, --retention-bytes or --compression");
                }
                let (before, after) = connect(&addr).await?.alter_topic(&name, &updates).await?;
                print_changes(&name, &before, &after);
            }
            Command::Describe { name, json, addr } => {
                let description = connect(&addr).await?.describe_topic(&name).await?;
                let doc = flowgate_server::topic_admin::description_json(&description);
                if json {
                    println!("{}", serde_json::to_string_pretty(&doc)?);
                } else {
                    print_description(&doc);
                }
            }
            Command::Delete { name, addr } => {
                connect(&addr).await?.delete_topic(&name).await?;
                println!("deleted topic '{name}'");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// A setting's value for people: the codec's name, a duration or size beside numbers.
fn shown(setting: Setting, value: u64) -> String {
    match setting {
        Setting::Compression => {
            u8::try_from(value).ok().and_then(Codec::from_id).map_or_else(|| value.to_string(), |c| c.to_string())
        }
        _ if value == 0 => "0 (no limit)".to_owned(),
        Setting::RetentionMs => format!("{value} ({})", duration(value)),
        Setting::RetentionBytes => format!("{value} ({})", size(value)),
    }
}

fn shown_value(v: &SettingValue) -> String {
    shown(v.setting, v.value)
}

fn print_changes(name: &str, before: &[SettingValue], after: &[SettingValue]) {
    let changed: Vec<(&SettingValue, &SettingValue)> =
        before.iter().zip(after).filter(|(b, a)| b.value != a.value || b.source != a.source).collect();
    if changed.is_empty() {
        println!("topic '{name}' unchanged");
        return;
    }
    println!("changed topic '{name}':");
    for (b, a) in changed {
        println!(
            "  {:<16} {} ({}) -> {} ({})",
            a.setting.name(),
            shown_value(b),
            b.source.name(),
            shown_value(a),
            a.source.name()
        );
    }
}

/// Prints the document of [`flowgate_server::topic_admin::description_json`] as tables.
fn print_description(doc: &Value) {
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let now = flowgate_core::time::now_ms();
    let ago = |ms: &Value| match ms.as_i64() {
        Some(ms) if ms > 0 => format!("{} ago", duration(u64::try_from(now.saturating_sub(ms)).unwrap_or(0))),
        _ => "-".to_owned(),
    };
    let partitions = doc["partitions"].as_array().cloned().unwrap_or_default();
    println!(
        "topic {}: {} partitions, created {} ({})",
        doc["name"].as_str().unwrap_or(""),
        partitions.len(),
        doc["created_ms"],
        ago(&doc["created_ms"])
    );
    if let Some(error) = doc["settings_error"].as_str() {
        println!(
            "warning: the settings file is unreadable ({error}); retention deletes nothing of this topic until \
             `flowgate topics alter` writes new settings"
        );
    }
    println!();
    println!("{:<16} {:<28} SOURCE", "SETTING", "VALUE");
    for setting in Setting::ALL {
        let s = &doc["settings"][setting.name()];
        let value = match (setting, &s["value"]) {
            (Setting::Compression, v) => v.as_str().unwrap_or("").to_owned(),
            (_, v) => shown(setting, u(v)),
        };
        println!("{:<16} {:<28} {}", setting.name(), value, s["source"].as_str().unwrap_or(""));
    }
    println!();
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>9} {:>14} {:>16}",
        "PARTITION", "START_OFFSET", "END_OFFSET", "EVENTS", "SEGMENTS", "BYTES", "OLDEST_SEGMENT"
    );
    for p in &partitions {
        println!(
            "{:<10} {:>14} {:>14} {:>14} {:>9} {:>14} {:>16}",
            u(&p["partition"]),
            u(&p["start_offset"]),
            u(&p["end_offset"]),
            u(&p["events"]),
            u(&p["segments"]),
            u(&p["size_bytes"]),
            ago(&p["oldest_segment_ms"])
        );
    }
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>9} {:>14} ({})",
        "total",
        "",
        "",
        u(&doc["events"]),
        u(&doc["segments"]),
        u(&doc["size_bytes"]),
        size(u(&doc["size_bytes"]))
    );
    println!();
    let consumers = doc["consumers"].as_array().cloned().unwrap_or_default();
    if consumers.is_empty() {
        println!("no pipeline has committed offsets of this topic");
        return;
    }
    println!("{:<32} {:>10} {:>14} {:>14}", "CONSUMER", "PARTITION", "COMMITTED", "LAG");
    for p in &partitions {
        for c in p["consumers"].as_array().into_iter().flatten() {
            println!(
                "{:<32} {:>10} {:>14} {:>14}",
                c["name"].as_str().unwrap_or(""),
                u(&p["partition"]),
                u(&c["committed_offset"]),
                u(&c["lag"])
            );
        }
    }
    for c in &consumers {
        println!("{:<32} {:>10} {:>14} {:>14}", c["name"].as_str().unwrap_or(""), "total", "", u(&c["lag"]));
    }
}

/// Milliseconds for people: `250ms`, else as `flowgate top` shows durations (`1h00m`).
fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        super::top::view::duration(ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(250), "250ms");
        assert_eq!(duration(604_800_000), "7d00h");
    }

    #[test]
    fn setting_flags_are_checked() {
        let args = |ms: &str, codec: &str| SettingArgs {
            retention_ms: Some(ms.to_owned()),
            retention_bytes: None,
            compression: Some(codec.to_owned()),
        };
        let updates = args("default", "zstd").updates().unwrap();
        assert_eq!(updates[0], SettingUpdate { setting: Setting::RetentionMs, value: None });
        assert_eq!(updates[1], SettingUpdate { setting: Setting::Compression, value: Some(2) });
        assert!(args("-5", "none").updates().unwrap_err().to_string().contains("must not be negative"));
        assert!(args("1h", "none").updates().unwrap_err().to_string().contains("whole number"));
        assert!(args("5", "gzip").updates().unwrap_err().to_string().contains("none, lz4, zstd or default"));
    }
}
