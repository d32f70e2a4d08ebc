//! `numeric`: statistics over an array of numbers inside each event, computed by the
//! SIMD kernels of `flowgate-kernels` (AVX-512, AVX2 or scalar, chosen at run time).

use vrl::value::{KeyString, ObjectMap, Value};

use super::{DeadLetter, Outputs, Processor};
use crate::config::NumericConfig;
use crate::event::{as_f64, float_value, get_path, set_path, PipelineEvent};

/// Adds statistics of a numeric array field.
pub struct Numeric {
    field: String,
    stats: Vec<String>,
    scale: Option<(f64, f64)>,
    count_above: Option<f64>,
    output: String,
    values: Vec<f64>,
    scaled: Vec<f64>,
}

impl Numeric {
    /// Validates the config.
    pub fn new(c: &NumericConfig) -> anyhow::Result<Numeric> {
        for s in &c.stats {
            if !["count", "sum", "min", "max", "mean"].contains(&s.as_str()) {
                anyhow::bail!("unknown statistic '{s}' (count, sum, min, max, mean)");
            }
        }
        let scale = match (c.scale, c.offset) {
            (None, None) => None,
            (s, o) => Some((s.unwrap_or(1.0), o.unwrap_or(0.0))),
        };
        Ok(Numeric {
            field: c.field.clone(),
            stats: c.stats.clone(),
            scale,
            count_above: c.count_above,
            output: c.output.clone().unwrap_or_else(|| format!("{}_stats", c.field)),
            values: Vec::new(),
            scaled: Vec::new(),
        })
    }

    fn apply(&mut self, event: &mut PipelineEvent) -> Result<(), String> {
        self.values.clear();
        // Read first: an event refused here leaves as it came (its dead letter holds it
        // as this processor got it, earlier processors' changes included).
        match get_path(event.doc().map_err(|e| e.to_string())?, &self.field) {
            Some(Value::Array(items)) => {
                for item in items.iter() {
                    self.values.push(as_f64(item).ok_or_else(|| format!("{} holds a non-number", self.field))?);
                }
            }
            Some(_) => return Err(format!("{} is not an array", self.field)),
            None => return Err(format!("{} is missing", self.field)),
        }
        let doc = event.doc_mut().map_err(|e| e.to_string())?;
        let data: &[f64] = if let Some((scale, offset)) = self.scale {
            flowgate_kernels::scale_offset(&self.values, scale, offset, &mut self.scaled);
            let array = self.scaled.iter().map(|&x| float_value(x)).collect();
            set_path(doc, &self.field, Value::Array(array));
            &self.scaled
        } else {
            &self.values
        };
        let stats = flowgate_kernels::stats(data);
        let mut out = ObjectMap::new();
        for s in &self.stats {
            let v = match s.as_str() {
                "count" => Value::Integer(stats.count as i64),
                "sum" => float_value(stats.sum),
                "min" => stats.min.map_or(Value::Null, float_value),
                "max" => stats.max.map_or(Value::Null, float_value),
                "mean" => stats.mean.map_or(Value::Null, float_value),
                _ => continue,
            };
            out.insert(KeyString::from(s.as_str()), v);
        }
        if let Some(threshold) = self.count_above {
            let n = flowgate_kernels::count_where(data, flowgate_kernels::Cmp::Gt, threshold);
            out.insert("count_above".into(), Value::Integer(n as i64));
        }
        set_path(doc, &self.output, Value::Object(out));
        Ok(())
    }
}

impl Processor for Numeric {
    fn kind(&self) -> &'static str {
        "numeric"
    }

    fn process(&mut self, events: Vec<PipelineEvent>, out: &mut Outputs) -> Vec<PipelineEvent> {
        let mut kept = Vec::with_capacity(events.len());
        for mut event in events {
            match self.apply(&mut event) {
                Ok(()) => kept.push(event),
                Err(error) => out.dead_letters.push(DeadLetter { processor: "numeric".into(), error, event }),
            }
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_statistics_and_sends_bad_arrays_to_the_dead_letters() {
        let config = NumericConfig {
            field: "r".into(),
            stats: vec!["count".into(), "sum".into(), "min".into(), "max".into(), "mean".into()],
            scale: Some(2.0),
            offset: Some(1.0),
            count_above: Some(4.0),
            output: None,
        };
        let mut n = Numeric::new(&config).unwrap();
        let mut out = Outputs::default();
        let mut kept = n.process(
            super::super::dedup::tests::events(&[
                (0, r#"{"r":[1,2,3.5]}"#),
                (0, r#"{"r":"x"}"#),
                (0, r#"{"r":[1,"a"]}"#),
            ]),
            &mut out,
        );
        assert_eq!(kept.len(), 1);
        assert_eq!(out.dead_letters.len(), 2);
        let v: serde_json::Value = serde_json::from_slice(kept[0].payload()).unwrap();
        assert_eq!(v["r"], serde_json::json!([3.0, 5.0, 8.0]));
        assert_eq!(
            v["r_stats"],
            serde_json::json!({"count":3,"sum":16.0,"min":3.0,"max":8.0,"mean":16.0/3.0,"count_above":2})
        );
    }
}
