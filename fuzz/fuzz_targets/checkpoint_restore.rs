//! Arbitrary bytes as a checkpoint file, and as the state of every stateful processor:
//! decoding refuses what is damaged without panicking or allocating by a claimed length,
//! and whatever it accepts writes back and restores to exactly the same state.
#![no_main]

use flowgate_engine::checkpoint::Checkpoint;
use flowgate_engine::config::{AggregateConfig, AggregateFunction, ProcessorConfig, ProcessorKind, WindowConfig};
use flowgate_engine::processors::{self, Processor};
use libfuzzer_sys::fuzz_target;

fn function(name: &str, field: Option<&str>, q: Option<f64>) -> AggregateFunction {
    AggregateFunction { function: name.into(), field: field.map(Into::into), q, output: None }
}

fn aggregate(window: WindowConfig) -> ProcessorConfig {
    ProcessorKind::Aggregate(AggregateConfig {
        group_by: Some("k".into()),
        time_field: None,
        window,
        max_out_of_orderness_ms: 0,
        allowed_lateness_ms: 0,
        late_topic: None,
        idle_advance_ms: 0,
        max_groups: 1000,
        max_open_windows: 10_000,
        sketch_max_buckets: 64,
        functions: vec![
            function("count", None, None),
            function("sum", Some("v"), None),
            function("min", Some("v"), None),
            function("max", Some("v"), None),
            function("avg", Some("v"), None),
            function("first", Some("v"), None),
            function("last", Some("v"), None),
            function("quantile", Some("v"), Some(0.5)),
        ],
    })
    .into()
}

fn stateful() -> Vec<Box<dyn Processor>> {
    let configs = [
        ProcessorKind::Dedup { by: "id".into(), ttl_ms: 60_000, max_entries: 1000 }.into(),
        aggregate(WindowConfig::Tumbling { size_ms: 10 }),
        aggregate(WindowConfig::Session { gap_ms: 10 }),
    ];
    processors::build(&configs, &[]).expect("valid processor configs")
}

fn restore_all(state: &[u8]) {
    for (i, mut p) in stateful().into_iter().enumerate() {
        if p.restore(state).is_ok() {
            let written = p.snapshot();
            let mut again = stateful().swap_remove(i);
            again.restore(&written).expect("state a processor wrote restores");
            assert_eq!(again.snapshot(), written, "{} state changed through a checkpoint", p.kind());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(checkpoint) = Checkpoint::from_bytes(data) {
        let back = Checkpoint::from_bytes(&checkpoint.to_bytes()).expect("a checkpoint written reads back");
        assert_eq!(back, checkpoint);
        for p in &checkpoint.processors {
            restore_all(&p.state);
        }
    }
    restore_all(data);
});
