//! `filter`: keeps the events for which a VRL condition is true.

use std::sync::Arc;

use super::{DeadLetter, Outputs, Processor};
use crate::event::PipelineEvent;
use crate::expr::Vrl;
use crate::projection::{Projection, Reads};

/// Keeps events matching a condition.
#[derive(Debug)]
pub struct Filter {
    /// What to parse events into ([`Processor::project`]).
    projection: Option<Arc<Projection>>,
    condition: Vrl,
}

impl Filter {
    /// Compiles the condition.
    pub fn new(condition: &str) -> anyhow::Result<Filter> {
        let condition = Vrl::compile_condition(condition).map_err(|e| anyhow::anyhow!("bad condition:\n{e}"))?;
        Ok(Filter { projection: None, condition })
    }
}

impl Processor for Filter {
    fn kind(&self) -> &'static str {
        "filter"
    }

    fn project(&mut self, projection: &Arc<Projection>) {
        self.projection = Some(projection.clone());
    }

    fn reads(&self) -> Reads {
        Reads::vrl(&self.condition)
    }

    fn process(&mut self, mut events: Vec<PipelineEvent>, out: &mut Outputs) -> Vec<PipelineEvent> {
        // In place: the events before the first one dropped never move.
        events.retain_mut(|event| {
            let verdict = match event.doc_in(self.projection.as_deref()) {
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
