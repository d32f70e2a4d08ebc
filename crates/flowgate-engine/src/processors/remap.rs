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
            // An event an earlier processor changed exists only as its document, which
            // the program consumes: its dead letter must hold it as it came here (a
            // replay resumes at this processor), so it is kept aside when the program
            // can fail. Unchanged events need no copy: their payload is what came in.
            let changed = event.is_changed() && self.program.can_fail();
            let doc = match event.doc() {
                Ok(doc) => std::mem::replace(doc, vrl::value::Value::Null),
                Err(e) => {
                    out.dead_letters.push(DeadLetter { processor: "remap".into(), error: e.to_string(), event });
                    continue;
                }
            };
            let came_in = changed.then(|| doc.clone());
            match self.program.run(doc) {
                Ok(result) => {
                    event.set_doc(result.document);
                    kept.push(event);
                }
                Err(error) => {
                    match came_in {
                        Some(doc) => event.set_doc(doc),
                        None => event.discard_doc(),
                    }
                    out.dead_letters.push(DeadLetter { processor: "remap".into(), error, event });
                }
            }
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> PipelineEvent {
        PipelineEvent::from_parts(0, 0, 0, None, bytes::Bytes::copy_from_slice(json.as_bytes()))
    }

    #[test]
    fn a_dead_letter_holds_the_event_as_it_came_to_the_failing_program() {
        let mut tag = Remap::new(".n = to_int!(.n) + 1000").unwrap();
        let mut fail = Remap::new(".seen = true\n.q = to_int!(.d)").unwrap();
        let mut out = Outputs::default();
        let tagged = tag.process(vec![event(r#"{"n":2,"d":"x"}"#), event(r#"{"n":3,"d":1}"#)], &mut out);
        let mut kept = fail.process(tagged, &mut out);
        assert_eq!(kept.len(), 1);
        let kept: serde_json::Value = serde_json::from_slice(kept[0].payload()).unwrap();
        assert_eq!(kept, serde_json::json!({"n": 1003, "d": 1, "seen": true, "q": 1}));
        let mut dead = out.dead_letters;
        assert_eq!(dead.len(), 1);
        // The earlier program's change is kept; the failing one's partial change is not.
        let held: serde_json::Value = serde_json::from_slice(dead[0].event.payload()).unwrap();
        assert_eq!(held, serde_json::json!({"n": 1002, "d": "x"}));

        // An unchanged event's dead letter is its stored payload, byte for byte.
        let mut out = Outputs::default();
        fail.process(vec![event(r#"{"d": "x",  "n":1}"#)], &mut out);
        assert_eq!(&out.dead_letters[0].event.payload()[..], br#"{"d": "x",  "n":1}"#);
    }

    #[test]
    fn a_filter_or_numeric_that_fails_after_a_remap_dead_letters_the_changed_event() {
        let mut tag = Remap::new(".n = to_int!(.n) + 1000").unwrap();
        let mut filter = super::super::filter::Filter::new("to_int!(.d) > 0").unwrap();
        let config = crate::config::NumericConfig {
            field: "r".into(),
            stats: vec!["sum".into()],
            scale: None,
            offset: None,
            count_above: None,
            output: None,
        };
        let mut numeric = super::super::numeric::Numeric::new(&config).unwrap();
        let mut out = Outputs::default();
        let tagged =
            tag.process(vec![event(r#"{"n":1,"d":"x","r":[1]}"#), event(r#"{"n":2,"d":1,"r":"x"}"#)], &mut out);
        let passed = filter.process(tagged, &mut out);
        numeric.process(passed, &mut out);
        let held: Vec<serde_json::Value> =
            out.dead_letters.iter_mut().map(|d| serde_json::from_slice(d.event.payload()).unwrap()).collect();
        assert_eq!(
            held,
            vec![serde_json::json!({"n": 1001, "d": "x", "r": [1]}), serde_json::json!({"n": 1002, "d": 1, "r": "x"})]
        );
    }
}
