//! `flowgate reload`: asks a running engine to read its config file again
//! (`POST /v1/reload`, as SIGHUP does) and prints what changed.

use std::process::ExitCode;

/// Arguments of `flowgate reload`.
#[derive(clap::Args)]
pub struct Args {
    /// The engine's HTTP API address.
    #[arg(long, default_value = super::http::DEFAULT_HTTP_ADDR)]
    http_addr: String,
    /// Print the engine's answer as JSON.
    #[arg(long)]
    json: bool,
}

/// Exit codes: 0 when the config was applied; 1 when it was refused (the old one stays)
/// or the engine could not be reached.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (status, body) =
        super::runtime()?.block_on(super::http::request(&args.http_addr, "POST", "/v1/reload", b""))?;
    let answer: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| anyhow::anyhow!("the engine answered {status} with a body that is not JSON: {e}"))?;
    if status != 200 {
        let error = answer["error"].as_str().unwrap_or("no reason given");
        anyhow::bail!("the engine refused the reload ({status}): {error}");
    }
    if args.json {
        println!("{answer}");
        return Ok(ExitCode::SUCCESS);
    }
    for part in ["pipelines", "sources", "alerts"] {
        let changes = &answer[part];
        let names = |key: &str| -> String {
            let list: Vec<&str> =
                changes[key].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
            if list.is_empty() {
                "-".to_owned()
            } else {
                list.join(", ")
            }
        };
        println!(
            "{part:<9}  added: {}  removed: {}  restarted: {}  unchanged: {}",
            names("added"),
            names("removed"),
            names("restarted"),
            names("unchanged")
        );
        if changes["cut_off"].as_array().is_some_and(|a| !a.is_empty()) {
            println!("{:<9}  cut off (resume from their last checkpoint): {}", "", names("cut_off"));
        }
    }
    if let Some(sections) = answer["restart_required"].as_array().filter(|a| !a.is_empty()) {
        let sections: Vec<&str> = sections.iter().filter_map(|v| v.as_str()).collect();
        println!("changed, taking effect at the next restart: {}", sections.join(", "));
    }
    println!("reloaded in {} ms", answer["took_ms"]);
    Ok(ExitCode::SUCCESS)
}
