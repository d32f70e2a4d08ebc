//! The aligned checkpoint: every sink flushes and commits, then the offset and the
//! processors' and sinks' state are stored together.

use tokio::sync::{mpsc, oneshot};

use super::fan_out::SinkMsg;
use super::worker::Worker;
use crate::checkpoint::Checkpoint;

impl Worker {
    pub(super) async fn commit(&mut self, offset: u64, sinks: &[mpsc::Sender<SinkMsg>]) -> anyhow::Result<()> {
        let mut replies = Vec::with_capacity(sinks.len());
        for tx in sinks {
            let (reply, rx) = oneshot::channel();
            tx.send(SinkMsg::Commit(reply)).await.map_err(|_| anyhow::anyhow!("a sink task stopped"))?;
            replies.push(rx);
        }
        let mut sink_states = Vec::with_capacity(replies.len());
        for rx in replies {
            sink_states.push(rx.await.map_err(|_| anyhow::anyhow!("a sink task stopped"))??);
        }
        let checkpoint = Checkpoint {
            offset,
            processors: self.processors.iter().map(|p| p.snapshot()).collect(),
            sinks: sink_states,
        };
        let file = self.checkpoint.clone();
        tokio::task::spawn_blocking(move || file.store(&checkpoint)).await??;
        self.committed.store(offset, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}
