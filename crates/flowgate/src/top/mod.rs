//! `flowgate top`: a live terminal view of a running engine. It samples the engine's HTTP
//! API (`/v1/stats` and `/metrics`) every `--interval-ms`, computes rates from
//! successive counters, and draws one row per pipeline, sink, source and topic.
//!
//! [`sample`] reads the engine, [`view`] turns samples and key presses into a frame
//! (pure, tested with ratatui's `TestBackend`); this module runs the terminal: a thread
//! samples, the main thread reads keys and draws. The terminal is restored on every
//! exit, including a panic.

pub mod sample;
pub mod view;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use ratatui::crossterm::event::{self, Event};

use sample::Sample;
use view::{Action, Link, Screen, UiState};

/// The default address of the engine's HTTP API, which `top` reads.
pub const DEFAULT_ADDR: &str = crate::http::DEFAULT_HTTP_ADDR;

/// `flowgate top` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// The engine's HTTP API: host:port, or http://host:port (top reads /v1/stats and
    /// /metrics there).
    #[arg(long, default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// Milliseconds between samples; rates are per second whatever it is (100 to 60000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
}

/// `host:port` from `--addr`: a scheme and a trailing slash are dropped.
pub fn host_port(addr: &str) -> anyhow::Result<String> {
    let trimmed = addr.trim();
    let rest = trimmed.strip_prefix("http://").unwrap_or(trimmed);
    if rest.starts_with("https://") {
        anyhow::bail!("--addr {addr}: top speaks plain HTTP to the engine; give host:port (e.g. 127.0.0.1:7071)");
    }
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || !rest.contains(':') {
        anyhow::bail!("--addr {addr}: give the engine's HTTP API as host:port (e.g. 127.0.0.1:7071)");
    }
    Ok(rest.to_owned())
}

/// What the sampling thread tells the main thread.
type Reading = Result<Sample, String>;

/// Samples `addr` every `interval` until `stop`, sending each reading.
fn sample_forever(addr: String, interval: Duration, tx: mpsc::Sender<Reading>, stop: Arc<AtomicBool>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        let _ = tx.send(Err("cannot start the sampling runtime".to_owned()));
        return;
    };
    rt.block_on(async {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            ticks.tick().await;
            let reading = sample::fetch(&addr).await.map_err(|e| format!("{e:#}"));
            if tx.send(reading).is_err() {
                return;
            }
        }
    });
}

/// Runs `flowgate top` until `q`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let addr = host_port(&args.addr)?;
    if !std::io::stdout().is_terminal() {
        anyhow::bail!(
            "flowgate top draws on a terminal and stdout is not one; for the numbers as JSON read \
             http://{addr}/v1/stats (e.g. with curl)"
        );
    }
    let interval = Duration::from_millis(args.interval_ms);
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (addr, stop) = (addr.clone(), stop.clone());
        std::thread::Builder::new()
            .name("top-sampler".into())
            .spawn(move || sample_forever(addr, interval, tx, stop))?;
    }
    // Raw mode, the alternate screen, and a panic hook that restores both.
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            ratatui::restore();
            anyhow::bail!("cannot set up the terminal: {e}");
        }
    };
    let result = event_loop(&mut terminal, &addr, interval, &rx);
    stop.store(true, Ordering::Relaxed);
    let _ = terminal.show_cursor();
    ratatui::restore();
    result.map(|()| ExitCode::SUCCESS)
}

fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    addr: &str,
    interval: Duration,
    rx: &mpsc::Receiver<Reading>,
) -> anyhow::Result<()> {
    let mut ui = UiState::default();
    let mut link = Link::Connecting;
    // The two latest samples, and the two on screen (frozen while paused).
    let (mut prev, mut cur): (Option<Sample>, Option<Sample>) = (None, None);
    let (mut shown_prev, mut shown_cur): (Option<Sample>, Option<Sample>) = (None, None);
    let mut dirty = true;
    loop {
        if dirty {
            let screen =
                Screen { addr, interval, prev: shown_prev.as_ref(), cur: shown_cur.as_ref(), ui: &ui, link: &link };
            terminal.draw(|frame| view::draw(frame, &screen))?;
            dirty = false;
        }
        if event::poll(Duration::from_millis(50))? {
            match event::read()? {
                Event::Key(key) => {
                    let was_paused = ui.paused;
                    if ui.handle_key(key) == Action::Quit {
                        return Ok(());
                    }
                    if was_paused && !ui.paused {
                        (shown_prev, shown_cur) = (prev.clone(), cur.clone());
                    }
                    dirty = true;
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Ok(sample)) => {
                    prev = cur.take();
                    cur = Some(sample);
                    link = Link::Up;
                    if !ui.paused {
                        (shown_prev, shown_cur) = (prev.clone(), cur.clone());
                    }
                    dirty = true;
                }
                Ok(Err(error)) => {
                    let attempts = match &link {
                        Link::Down { attempts, .. } => attempts + 1,
                        _ => 1,
                    };
                    link = Link::Down { error, attempts };
                    dirty = true;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => anyhow::bail!("the sampling thread stopped"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn addr_takes_host_port_or_an_http_url() {
        assert_eq!(super::host_port("127.0.0.1:7071").unwrap(), "127.0.0.1:7071");
        assert_eq!(super::host_port("http://10.0.0.2:8080/").unwrap(), "10.0.0.2:8080");
        assert!(super::host_port("https://x:1").is_err());
        assert!(super::host_port("localhost").is_err());
        assert!(super::host_port("http://x:1/v1/stats").is_err());
    }
}
