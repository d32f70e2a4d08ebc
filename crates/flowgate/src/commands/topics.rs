//! `flowgate topics list|create|delete`.

use std::process::ExitCode;

use flowgate_client::Client;

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
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
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
            Command::Create { name, partitions, addr } => {
                connect(&addr).await?.create_topic(&name, partitions).await?;
                println!("created topic '{name}' with {partitions} partitions");
            }
            Command::Delete { name, addr } => {
                connect(&addr).await?.delete_topic(&name).await?;
                println!("deleted topic '{name}'");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
