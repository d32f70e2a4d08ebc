//! `flowgate pipelines list|status|pause|resume|reset`: pipelines as things an operator
//! manages, over the engine's HTTP API (`/v1/pipelines…`).

use std::process::ExitCode;

use serde_json::Value;

/// The pipeline subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Every pipeline: state, topics, lag in events and seconds, last checkpoint age,
    /// worker restarts.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// One pipeline per partition: offsets, lag, checkpoint age, processor state sizes,
    /// sinks.
    Status {
        /// Pipeline name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Stop a pipeline after flushing and committing; it stays paused (across restarts
    /// too) until resumed.
    Pause {
        /// Pipeline name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Start a paused pipeline again from its checkpoints.
    Resume {
        /// Pipeline name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Move a pipeline's committed offsets in every source partition: it is paused,
    /// its checkpoints are rewritten, and it resumes if it was running. Output already
    /// written is kept; the sinks go on after it.
    Reset {
        /// Pipeline name.
        name: String,
        /// `earliest`, `latest`, or a time (RFC 3339, e.g. 2026-12-07T10:00:00Z, or ms
        /// since the epoch): the first event at or after it.
        #[arg(long)]
        to: String,
        /// What happens to the processors' state (dedup tables, open windows): `clear`
        /// starts them empty, `keep` keeps them as of the last checkpoint.
        #[arg(long, value_enum, default_value = "clear")]
        processor_state: StateChoice,
        #[command(flatten)]
        common: Common,
    },
}

/// Options every subcommand takes.
#[derive(clap::Args)]
pub struct Common {
    /// The engine's HTTP API address.
    #[arg(long, default_value = super::http::DEFAULT_HTTP_ADDR)]
    http_addr: String,
    /// Print the engine's answer as JSON.
    #[arg(long)]
    json: bool,
}

/// `--processor-state`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum StateChoice {
    /// Start the processors empty.
    Clear,
    /// Keep their state.
    Keep,
}

/// Runs a pipeline subcommand.
pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let (common, method, path, body) = match &command {
        Command::List { common } => (common, "GET", "/v1/pipelines".to_owned(), Value::Null),
        Command::Status { name, common } => (common, "GET", format!("/v1/pipelines/{name}"), Value::Null),
        Command::Pause { name, common } => (common, "POST", format!("/v1/pipelines/{name}/pause"), Value::Null),
        Command::Resume { name, common } => (common, "POST", format!("/v1/pipelines/{name}/resume"), Value::Null),
        Command::Reset { name, to, processor_state, common } => {
            let state = match processor_state {
                StateChoice::Clear => "clear",
                StateChoice::Keep => "keep",
            };
            let body = serde_json::json!({"to": to, "processor_state": state});
            (common, "POST", format!("/v1/pipelines/{name}/reset"), body)
        }
    };
    if let Command::Status { name, .. }
    | Command::Pause { name, .. }
    | Command::Resume { name, .. }
    | Command::Reset { name, .. } = &command
    {
        anyhow::ensure!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "'{name}' is not a pipeline name (letters, digits, '-', '_' or '.')"
        );
    }
    let body = if body.is_null() { Vec::new() } else { serde_json::to_vec(&body)? };
    let (status, answer) = super::runtime()?.block_on(super::http::request(&common.http_addr, method, &path, &body))?;
    let answer: Value = serde_json::from_slice(&answer)
        .map_err(|e| anyhow::anyhow!("the engine answered {status} with a body that is not JSON: {e}"))?;
    if status != 200 {
        anyhow::bail!("{}", answer["error"].as_str().unwrap_or("the engine gave no reason"));
    }
    if common.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(ExitCode::SUCCESS);
    }
    match command {
        Command::List { .. } => print_list(&answer),
        Command::Status { .. } => print_status(&answer),
        Command::Pause { .. } | Command::Resume { .. } | Command::Reset { .. } => print_report(&answer),
    }
    Ok(ExitCode::SUCCESS)
}

fn seconds(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".to_owned(), |s| format!("{s:.1}"))
}

fn print_list(answer: &Value) {
    let empty = Vec::new();
    let pipelines = answer["pipelines"].as_array().unwrap_or(&empty);
    if pipelines.is_empty() {
        println!("no pipelines are configured");
        return;
    }
    println!(
        "{:<24} {:<9} {:<24} {:>12} {:>10} {:>14} {:>9}",
        "PIPELINE", "STATE", "TOPICS", "LAG_EVENTS", "LAG_SECS", "CHECKPOINT_AGE", "RESTARTS"
    );
    for p in pipelines {
        let topics: Vec<&str> =
            p["topics"].as_array().map(|t| t.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        println!(
            "{:<24} {:<9} {:<24} {:>12} {:>10} {:>14} {:>9}",
            p["name"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            topics.join(","),
            p["lag_events"],
            seconds(&p["lag_seconds"]),
            seconds(&p["last_checkpoint_age_seconds"]),
            p["worker_restarts"],
        );
    }
}

fn print_status(p: &Value) {
    println!("pipeline   {}", p["name"].as_str().unwrap_or("?"));
    println!("state      {}", p["state"].as_str().unwrap_or("?"));
    println!(
        "lag        {} events, {} s; oldest checkpoint {} s ago; {} worker restarts",
        p["lag_events"],
        seconds(&p["lag_seconds"]),
        seconds(&p["last_checkpoint_age_seconds"]),
        p["worker_restarts"]
    );
    println!();
    println!(
        "{:<24} {:>4} {:<10} {:>12} {:>12} {:>10} {:>9} {:>10} {:>8}  PROCESSOR_STATE",
        "TOPIC", "PART", "STATE", "COMMITTED", "END", "LAG", "LAG_SECS", "CKPT_AGE", "RESTARTS"
    );
    let empty = Vec::new();
    let partitions = p["partitions"].as_array().unwrap_or(&empty);
    for w in partitions {
        let states: Vec<String> = w["processor_state_bytes"]
            .as_object()
            .map(|m| m.iter().map(|(id, bytes)| format!("{id}={bytes}B")).collect())
            .unwrap_or_default();
        println!(
            "{:<24} {:>4} {:<10} {:>12} {:>12} {:>10} {:>9} {:>10} {:>8}  {}",
            w["topic"].as_str().unwrap_or("?"),
            w["partition"],
            w["state"].as_str().unwrap_or("?"),
            w["committed_offset"],
            w["end_offset"],
            w["lag_events"],
            seconds(&w["lag_seconds"]),
            seconds(&w["last_checkpoint_age_seconds"]),
            w["restarts"],
            if states.is_empty() { "-".to_owned() } else { states.join(" ") },
        );
        if let Some(error) = w["last_error"].as_str() {
            println!("    last error: {error}");
        }
    }
    let sinks: Vec<&Value> = partitions.iter().filter_map(|w| w["sinks"].as_array()).flatten().collect();
    if !sinks.is_empty() {
        println!();
        println!(
            "{:<20} {:<24} {:>4} {:<10} {:>12} {:>9}  LAST_ERROR",
            "SINK", "TOPIC", "PART", "BREAKER", "BATCH", "RETRYING"
        );
        for s in sinks {
            println!(
                "{:<20} {:<24} {:>4} {:<10} {:>12} {:>9}  {}",
                s["sink"].as_str().unwrap_or("?"),
                s["topic"].as_str().unwrap_or("?"),
                s["partition"],
                s["breaker"].as_str().unwrap_or("?"),
                s["batch_target"],
                s["retrying_events"],
                s["last_error"].as_str().unwrap_or("-"),
            );
        }
    }
}

fn print_report(r: &Value) {
    let name = r["pipeline"].as_str().unwrap_or("?");
    let state = r["state"].as_str().unwrap_or("?");
    let empty = Vec::new();
    let partitions = r["partitions"].as_array().unwrap_or(&empty);
    for p in partitions {
        let from = p["from"].as_u64().map_or_else(|| "none".to_owned(), |o| o.to_string());
        println!("{}-{}: {} -> {}", p["topic"].as_str().unwrap_or("?"), p["partition"], from, p["to"]);
    }
    if let Some(choice) = r["processor_state"].as_str() {
        let what = if choice == "clear" { "cleared" } else { "kept" };
        println!("pipeline '{name}' reset (processor state {what}); it is {state}");
    } else if r["changed"] == Value::Bool(false) {
        println!("pipeline '{name}' was {state} already");
    } else {
        println!("pipeline '{name}' is {state}");
    }
    if r["cut_off"] == Value::Bool(true) {
        println!("its workers did not flush in time and were cut off: they resume from their last checkpoint");
    }
}
