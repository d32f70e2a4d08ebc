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

    fn process(&mut self, events: Vec<PipelineEvent>, out: &mut Outputs) -> Vec<PipelineEvent> {
        let mut kept = Vec::with_capacity(events.len());
        for mut event in events {
            let verdict = match event.doc() {
                Ok(doc) => self.condition.test(doc),
                Err(e) => Err(e.to_string()),
            };
            match verdict {
                Ok(true) => kept.push(event),
                Ok(false) => {}
                Err(error) => out.dead_letters.push(DeadLetter { processor: "filter".into(), error, event }),
            }
        }
        kept
    }
}
