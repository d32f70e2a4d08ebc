//! Delivery of alert notifications to a webhook: a JSON POST per notification, in order,
//! retried a few times; a queue of bounded length: when it is full a new `firing`
//! notification is dropped (with a log line), a `resolved` one waits for room (so a
//! receiver never keeps an alert that ended). The log names the webhook's host only:
//! its URL may hold a secret.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Notifications waiting to be sent at most.
const QUEUE: usize = 256;

/// Tries per notification.
const ATTEMPTS: u32 = 3;

/// The sending side of a webhook's queue.
pub struct Webhook {
    queue: mpsc::Sender<Value>,
}

impl Webhook {
    /// Starts the delivery task for `url`.
    pub fn start(url: String, timeout: Duration, shutdown: CancellationToken) -> Webhook {
        let (queue, mut rx) = mpsc::channel::<Value>(QUEUE);
        let host = reqwest::Url::parse(&url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
        tokio::spawn(async move {
            let client = match reqwest::Client::builder().timeout(timeout).build() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "the alert webhook client could not be built; alerts are not delivered");
                    return;
                }
            };
            while let Some(n) = tokio::select! { n = rx.recv() => n, _ = shutdown.cancelled() => None } {
                let mut backoff = Duration::from_millis(500);
                for attempt in 1..=ATTEMPTS {
                    match client.post(&url).header("content-type", "application/json").body(n.to_string()).send().await
                    {
                        Ok(r) if r.status().is_success() => break,
                        outcome => {
                            let why = match outcome {
                                Ok(r) => format!("status {}", r.status()),
                                Err(e) => e.without_url().to_string(),
                            };
                            if attempt == ATTEMPTS {
                                tracing::warn!(webhook_host = %host, error = %why, alert = %n["alert"]["name"],
                                    "an alert notification could not be delivered; it is dropped");
                            } else {
                                tokio::select! {
                                    _ = tokio::time::sleep(backoff) => {}
                                    _ = shutdown.cancelled() => return,
                                }
                                backoff *= 2;
                            }
                        }
                    }
                }
            }
        });
        Webhook { queue }
    }

    /// Queues a notification (dropped, with a log line, when the queue is full).
    pub fn send(&self, notification: Value) {
        if let Err(mpsc::error::TrySendError::Full(n)) = self.queue.try_send(notification) {
            if n["status"] == "resolved" {
                let queue = self.queue.clone();
                tokio::spawn(async move {
                    let _ = queue.send(n).await;
                });
            } else {
                tracing::warn!(alert = %n["alert"]["name"], "the alert webhook is behind; a notification was dropped");
            }
        }
    }
}
