//! `filter`: keeps the events for which a VRL condition is true.

use super::{DeadLetter, Outputs, Processor};
use crate::event::PipelineEvent;
use crate::expr::Vrl;
use crate::projection::Reads;

/// Keeps events matching a condition.
#[derive(Debug)]
pub struct Filter {
    condition: Vrl,
}

impl Filter {
    /// Compiles the condition.
    pub fn new(condition: &str) -> anyhow::Result<Filter> {
        Ok(Filter { condition: Vrl::compile_condition(condition).map_err(|e| anyhow::anyhow!("bad condition:\n{e}"))? })
    }
}

impl Processor for Filter {
    fn kind(&self) -> &'static str {
        "filter"
    }

    fn reads(&self) -> Reads {
        Reads::vrl(&self.condition)
    }

    fn process(&mut self, mut events: Vec<PipelineEvent>, out: &mut Outputs) -> Vec<PipelineEvent> {
        // In place: the events before the first one dropped never move.
        events.retain_mut(|event| {
            let verdict = match event.doc() {
                Ok(doc) => self.condition.test(doc),
                Err(e) => Err(e.to_string()),
            };
            match verdict {
                Ok(keep) => keep,
                Err(error) => {
                    out.dead_letters.push(DeadLetter { processor: "filter".into(), error, event: event.take() });
                    false
                }
            }
        });
        events
    }
}
