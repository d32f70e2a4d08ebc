//! `remap`: rewrites each event with a VRL program.

use super::{DeadLetter, Outputs, Processor};
use crate::event::PipelineEvent;
use crate::expr::Vrl;

/// Rewrites events.
#[derive(Debug)]
pub struct Remap {
    program: Vrl,
}

impl Remap {
    /// Compiles the program.
    pub fn new(source: &str) -> anyhow::Result<Remap> {
        Ok(Remap { program: Vrl::compile(source).map_err(|e| anyhow::anyhow!("bad program:\n{e}"))? })
    }
}

impl Processor for Remap {
    fn kind(&self) -> &'static str {
        "remap"
    }

    fn process(&mut self, events: Vec<PipelineEvent>, out: &mut Outputs) -> Vec<PipelineEvent> {
        let mut kept = Vec::with_capacity(events.len());
        for mut event in events {
            let doc = match event.doc() {
                Ok(doc) => std::mem::replace(doc, vrl::value::Value::Null),
                Err(e) => {
                    out.dead_letters.push(DeadLetter { processor: "remap".into(), error: e.to_string(), event });
                    continue;
                }
            };
            match self.program.run(doc) {
                Ok(result) => {
                    event.set_doc(result.document);
                    kept.push(event);
                }
                Err(error) => {
                    // The payload still holds the event as it came in.
                    event.discard_doc();
                    out.dead_letters.push(DeadLetter { processor: "remap".into(), error, event });
                }
            }
        }
        kept
    }
}
