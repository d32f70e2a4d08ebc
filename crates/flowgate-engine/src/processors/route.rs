//! `route`: decides per event which sinks get it.

use std::sync::Arc;

use super::{DeadLetter, Outputs, Processor};
use crate::config::RouteConfig;
use crate::event::PipelineEvent;
use crate::expr::Vrl;
use crate::projection::{Projection, Reads};

/// Sets each event's sink mask by condition.
pub struct Route {
    /// What to parse events into ([`Processor::project`]).
    projection: Option<Arc<Projection>>,
    routes: Vec<(Vrl, u64)>,
    default: u64,
}

fn mask(names: &[String], sink_names: &[String]) -> anyhow::Result<u64> {
    let mut m = 0u64;
    for name in names {
        let i = sink_names
            .iter()
            .position(|s| s == name)
            .ok_or_else(|| anyhow::anyhow!("route names sink '{name}', which the pipeline does not have"))?;
        m |= 1 << i;
    }
    Ok(m)
}

impl Route {
    /// Compiles the conditions and resolves sink names.
    pub fn new(routes: &[RouteConfig], default: &[String], sink_names: &[String]) -> anyhow::Result<Route> {
        if sink_names.len() > 64 {
            anyhow::bail!("a pipeline with routes may have at most 64 sinks");
        }
        let routes = routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let cond = Vrl::compile_condition(&r.condition)
                    .map_err(|e| anyhow::anyhow!("route {}: bad condition:\n{e}", i + 1))?;
                Ok((cond, mask(&r.sinks, sink_names)?))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Route { projection: None, routes, default: mask(default, sink_names)? })
    }
}

impl Processor for Route {
    fn kind(&self) -> &'static str {
        "route"
    }

    fn project(&mut self, projection: &Arc<Projection>) {
        self.projection = Some(projection.clone());
    }

    fn reads(&self) -> Reads {
        self.routes.iter().fold(Reads::Nothing, |r, (cond, _)| r.and(Reads::vrl(cond)))
    }

    fn process(&mut self, events: Vec<PipelineEvent>, out: &mut Outputs) -> Vec<PipelineEvent> {
        let mut kept = Vec::with_capacity(events.len());
        'events: for mut event in events {
            let mut sinks = 0u64;
            for (cond, m) in &mut self.routes {
                let verdict = match event.doc_in(self.projection.as_deref()) {
                    Ok(doc) => cond.test(doc),
                    Err(e) => Err(e.to_string()),
                };
                match verdict {
                    Ok(true) => sinks |= *m,
                    Ok(false) => {}
                    Err(error) => {
                        out.dead_letters.push(DeadLetter { processor: "route".into(), error, event });
                        continue 'events;
                    }
                }
            }
            event.sinks = if sinks == 0 { self.default } else { sinks };
            if event.sinks != 0 {
                kept.push(event);
            }
        }
        kept
    }
}
