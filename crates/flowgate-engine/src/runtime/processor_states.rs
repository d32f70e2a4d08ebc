//! Processor state from a checkpoint, matched to the configured processors by id
//! (`name`, or `<type>-<n>`) and type, never by position alone.
//!
//! State of a processor that is no longer configured is carried into every later
//! checkpoint (and reported at start), never dropped: configuring the processor again
//! under its id finds it. State under an id that now names a processor of another type
//! stops the partition, with an error that says how to resolve it.

use crate::checkpoint::{Checkpoint, CheckpointFile, ProcessorState, StateOwner};
use crate::config::PipelineConfig;
use crate::processors::Processor;

/// Where one checkpointed state goes.
enum Placement {
    /// To the configured processor at this index.
    To(usize),
    /// Nowhere now: carried forward for when its processor returns.
    Carry,
    /// Dropped, as `discard_processor_state` asks.
    Discard,
}

/// Whether the processors of `config` can take the state in `saved` (the checks a
/// restart makes before it restores anything), so that a config reload can refuse a
/// change that would stop the partition. `ids` are `config.processor_ids()`.
pub(super) fn check(
    saved: &Checkpoint,
    config: &PipelineConfig,
    ids: &[String],
    file: &CheckpointFile,
) -> anyhow::Result<()> {
    plan(saved, config, ids, file).map(|_| ())
}

/// Where each state of `saved` goes, or the error that stops the partition.
fn plan(
    saved: &Checkpoint,
    config: &PipelineConfig,
    ids: &[String],
    file: &CheckpointFile,
) -> anyhow::Result<Vec<Placement>> {
    let mut placements = Vec::with_capacity(saved.processors.len());
    for entry in &saved.processors {
        let kind_at = |i: usize| config.processors[i].kind.type_name();
        let placement = match &entry.owner {
            StateOwner::Id { id, .. } if config.discard_processor_state.contains(id) => Placement::Discard,
            StateOwner::Id { id, kind, settings } => match ids.iter().position(|i| i == id) {
                Some(i) if kind_at(i) != kind => {
                    return Err(file.restore_error(
                        &format!("processor '{id}' ({})", kind_at(i)),
                        anyhow::anyhow!(
                            "the checkpoint holds state of a {kind} processor under this id: give the {} another \
                             `name`, or list '{id}' under discard_processor_state to drop the {kind}'s state",
                            kind_at(i)
                        ),
                    ))
                }
                Some(i) => {
                    let now = config.processors[i].kind.state_settings();
                    if let (Some(then), Some(now)) = (settings, &now) {
                        if then != now {
                            return Err(file.restore_error(
                                &format!("processor '{id}' ({kind})"),
                                anyhow::anyhow!(
                                    "its state was checkpointed under the settings {then} and it is now configured \
                                     with {now}, under which that state means something else: restore the settings, \
                                     or list '{id}' under discard_processor_state to start it empty"
                                ),
                            ));
                        }
                    }
                    Placement::To(i)
                }
                None => Placement::Carry,
            },
            // An older checkpoint: state by position, which only the same config can read.
            StateOwner::Position(i) if *i < config.processors.len() => Placement::To(*i),
            StateOwner::Position(i) => {
                return Err(file.restore_error(
                    &format!("processor {}", i.saturating_add(1)),
                    anyhow::anyhow!(
                        "the checkpoint (an older format, state by position) holds state for processor {} and the \
                         config has {}: restore the config it was written with once, so it is rewritten by id",
                        i.saturating_add(1),
                        config.processors.len()
                    ),
                ))
            }
        };
        placements.push(placement);
    }
    // A stateful processor without state, next to unclaimed state of its type, was most
    // likely renamed (or its `<type>-<n>` id moved): starting it empty would forget what
    // it knew, so the operator says which it is.
    for (i, p) in config.processors.iter().enumerate() {
        if placements.iter().any(|pl| matches!(pl, Placement::To(j) if *j == i)) || p.kind.state_settings().is_none() {
            continue;
        }
        let kind = p.kind.type_name();
        let orphan = saved.processors.iter().zip(&placements).find_map(|(s, pl)| match (&s.owner, pl) {
            (StateOwner::Id { id, kind: k, .. }, Placement::Carry) if k == kind => Some(id),
            _ => None,
        });
        if let Some(orphan) = orphan {
            return Err(file.restore_error(
                &format!("processor '{}' ({kind})", ids[i]),
                anyhow::anyhow!(
                    "it has no state in the checkpoint, which holds state of the {kind} '{orphan}' that no \
                     configured processor claims. If '{}' is '{orphan}' under a new id, set `name = \"{orphan}\"` \
                     on it; if '{orphan}' is gone, list it under discard_processor_state",
                    ids[i]
                ),
            ));
        }
    }
    Ok(placements)
}

/// Restores each processor's state from `saved`; returns the states that belong to no
/// configured processor, to carry forward. `ids` are `config.processor_ids()`.
pub(super) fn restore(
    saved: &Checkpoint,
    processors: &mut [Box<dyn Processor>],
    config: &PipelineConfig,
    ids: &[String],
    file: &CheckpointFile,
) -> anyhow::Result<Vec<ProcessorState>> {
    let pipeline = config.name.as_str();
    let mut unconfigured = Vec::new();
    for (entry, placement) in saved.processors.iter().zip(plan(saved, config, ids, file)?) {
        match placement {
            Placement::Discard => {
                if let StateOwner::Id { id, .. } = &entry.owner {
                    tracing::warn!(pipeline, processor = %id, bytes = entry.state.len(),
                        "dropping the checkpointed state of this processor, as discard_processor_state asks");
                }
            }
            Placement::To(i) => {
                processors[i].restore(&entry.state).map_err(|e| {
                    file.restore_error(&format!("processor '{}' ({})", ids[i], processors[i].kind()), e)
                })?;
            }
            Placement::Carry => {
                if let StateOwner::Id { id, kind, .. } = &entry.owner {
                    tracing::warn!(pipeline, processor = %id, kind = %kind, bytes = entry.state.len(),
                        "the checkpoint holds state of a processor that is not configured; it is kept for when the \
                         processor returns (list it under discard_processor_state to drop it)");
                }
                unconfigured.push(entry.clone());
            }
        }
    }
    Ok(unconfigured)
}

/// The state to checkpoint: every configured processor that holds state, with the
/// settings it depends on, then the carried-forward states of processors that are not
/// configured.
pub(super) fn snapshot(
    processors: &mut [Box<dyn Processor>],
    config: &PipelineConfig,
    ids: &[String],
    unconfigured: &[ProcessorState],
) -> anyhow::Result<Vec<ProcessorState>> {
    let mut states = Vec::new();
    for ((p, id), c) in processors.iter_mut().zip(ids).zip(&config.processors) {
        let state =
            p.checkpoint().map_err(|e| anyhow::anyhow!("processor '{id}' ({}): checkpoint: {e:#}", p.kind()))?;
        if !state.is_empty() {
            let owner = StateOwner::Id { id: id.clone(), kind: p.kind().to_owned(), settings: c.kind.state_settings() };
            states.push(ProcessorState { owner, state });
        }
    }
    states.extend(unconfigured.iter().cloned());
    Ok(states)
}

/// Deletes the state directories beside `file` of processors whose state the stored
/// checkpoint no longer holds: ids neither configured (`ids`) nor carried forward
/// (`unconfigured`), such as a discarded or renamed processor's. Called once a
/// checkpoint is stored, so nothing a stored checkpoint names is deleted.
pub(super) fn sweep_state_dirs(file: &CheckpointFile, ids: &[String], unconfigured: &[ProcessorState]) {
    let carried = unconfigured.iter().filter_map(|s| match &s.owner {
        StateOwner::Id { id, .. } => Some(id),
        StateOwner::Position(_) => None,
    });
    let keep: Vec<std::path::PathBuf> = ids.iter().chain(carried).map(|id| file.processor_dir(id)).collect();
    let Ok(entries) = std::fs::read_dir(file.state_dir()) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if !keep.contains(&path) {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "deleted the state files of a processor whose state is gone")
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot delete old processor state files"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::processors::{self, Outputs};

    struct Built {
        config: PipelineConfig,
        processors: Vec<Box<dyn Processor>>,
        ids: Vec<String>,
    }

    fn build(json: &str) -> Built {
        build_with(json, "[]")
    }

    fn build_with(json: &str, discard: &str) -> Built {
        let config: PipelineConfig = serde_json::from_str(&format!(
            r#"{{"name": "p", "topics": ["t"], "sinks": [], "processors": {json}, "discard_processor_state": {discard}}}"#
        ))
        .unwrap();
        let processors = processors::build_pipeline(&config).unwrap();
        let ids = config.processor_ids();
        Built { config, processors, ids }
    }

    fn feed(p: &mut Box<dyn Processor>, ids: &[&str]) {
        let now = flowgate_core::time::now_ms();
        let docs: Vec<String> = ids.iter().map(|id| format!(r#"{{"id":"{id}","user":"u","v":1}}"#)).collect();
        let items: Vec<(i64, &str)> = docs.iter().map(|d| (now, d.as_str())).collect();
        p.process(crate::processors::dedup_test_events(&items), &mut Outputs::default());
    }

    #[test]
    fn state_dirs_of_processors_whose_state_is_gone_are_swept_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let file = CheckpointFile::new(dir.path(), "p", "t", 0);
        let carried = ProcessorState {
            owner: StateOwner::Id { id: "old".into(), kind: "dedup".into(), settings: None },
            state: vec![1],
        };
        for id in ["dedup-1", "old", "discarded", "a/b"] {
            std::fs::create_dir_all(file.processor_dir(id)).unwrap();
            std::fs::write(file.processor_dir(id).join("g1.journal"), b"x").unwrap();
        }
        assert_ne!(file.processor_dir("a/b"), file.processor_dir("a_b"), "ids that look alike have their own");
        sweep_state_dirs(&file, &["dedup-1".into(), "a_b".into()], &[carried]);
        assert!(file.processor_dir("dedup-1").join("g1.journal").exists(), "configured");
        assert!(file.processor_dir("old").join("g1.journal").exists(), "carried forward");
        assert!(!file.processor_dir("discarded").exists());
        assert!(!file.processor_dir("a/b").exists());
    }

    fn checkpoint(b: &mut Built, carried: &[ProcessorState]) -> Checkpoint {
        let processors = snapshot(&mut b.processors, &b.config, &b.ids, carried).unwrap();
        let c = Checkpoint { offset: 1, processors, sinks: vec![] };
        Checkpoint::from_bytes(&c.to_bytes()).unwrap()
    }

    fn restore_into(saved: &Checkpoint, b: &mut Built) -> anyhow::Result<Vec<ProcessorState>> {
        let file = CheckpointFile::new(Path::new("/d"), "p", "t", 0);
        restore(saved, &mut b.processors, &b.config, &b.ids, &file)
    }

    const DEDUP: &str = r#"{"type": "dedup", "by": "id"}"#;
    const FILTER: &str = r#"{"type": "filter", "condition": "true"}"#;

    #[test]
    fn reordered_processors_each_get_their_own_state_back() {
        let mut before = build(&format!("[{FILTER}, {DEDUP}]"));
        assert_eq!(before.ids, ["filter-1", "dedup-1"]);
        feed(&mut before.processors[1], &["a", "b"]);
        let saved = checkpoint(&mut before, &[]);
        let mut after = build(&format!("[{DEDUP}, {FILTER}]"));
        assert!(restore_into(&saved, &mut after).unwrap().is_empty());
        assert_eq!(after.processors[0].snapshot(), before.processors[1].snapshot(), "the dedup got its table back");
    }

    #[test]
    fn default_ids_count_only_unnamed_processors() {
        let b = build(&format!(r#"[{{"name": "first", "type": "dedup", "by": "x"}}, {DEDUP}, {FILTER}]"#));
        assert_eq!(b.ids, ["first", "dedup-1", "filter-1"], "naming another dedup does not renumber this one");
    }

    #[test]
    fn a_removed_processors_state_is_carried_forward_found_again_and_dropped_only_when_asked() {
        let mut before = build(&format!(r#"[{FILTER}, {{"name": "seen", "type": "dedup", "by": "id"}}]"#));
        feed(&mut before.processors[1], &["a"]);
        let saved = checkpoint(&mut before, &[]);
        let mut without = build(&format!("[{FILTER}]"));
        let kept = restore_into(&saved, &mut without).unwrap();
        assert_eq!(kept.len(), 1);
        let carried = checkpoint(&mut without, &kept);
        let mut back = build(r#"[{"name": "seen", "type": "dedup", "by": "id"}]"#);
        assert!(restore_into(&carried, &mut back).unwrap().is_empty());
        assert_eq!(back.processors[0].snapshot(), before.processors[1].snapshot());
        let mut discarding = build_with(&format!("[{FILTER}]"), r#"["seen"]"#);
        assert!(restore_into(&carried, &mut discarding).unwrap().is_empty(), "dropped as asked");
    }

    #[test]
    fn a_renamed_stateful_processor_is_refused_rather_than_started_empty() {
        let mut before = build(&format!("[{DEDUP}]"));
        feed(&mut before.processors[0], &["a"]);
        let saved = checkpoint(&mut before, &[]);
        let mut renamed = build(r#"[{"name": "seen-ids", "type": "dedup", "by": "id"}]"#);
        let err = restore_into(&saved, &mut renamed).unwrap_err().to_string();
        assert!(err.contains("'seen-ids'") && err.contains("name = \"dedup-1\""), "{err}");
        let mut named_back = build(r#"[{"name": "dedup-1", "type": "dedup", "by": "id"}]"#);
        restore_into(&saved, &mut named_back).unwrap();
        assert_eq!(named_back.processors[0].snapshot(), before.processors[0].snapshot());
    }

    #[test]
    fn state_under_other_settings_or_another_type_stops_the_partition() {
        let mut before = build(r#"[{"name": "x", "type": "dedup", "by": "id"}, {"type": "dedup", "by": "user"}]"#);
        feed(&mut before.processors[0], &["a"]);
        feed(&mut before.processors[1], &["a"]);
        let saved = checkpoint(&mut before, &[]);
        // The first dedup removed: the second's id is unchanged, but the by="id" table
        // must never be restored into a by="user" dedup.
        let mut other_settings =
            build(r#"[{"name": "x", "type": "dedup", "by": "user"}, {"type": "dedup", "by": "user"}]"#);
        let err = restore_into(&saved, &mut other_settings).unwrap_err().to_string();
        assert!(err.contains("processor 'x' (dedup)") && err.contains("settings"), "{err}");
        let mut other_type =
            build(r#"[{"name": "x", "type": "filter", "condition": "true"}, {"type": "dedup", "by": "user"}]"#);
        let err = restore_into(&saved, &mut other_type).unwrap_err().to_string();
        assert!(err.contains("processor 'x' (filter)") && err.contains("dedup"), "{err}");
    }

    #[test]
    fn position_state_beyond_the_configured_processors_stops_the_partition() {
        let mut b = build(&format!("[{DEDUP}]"));
        let saved = Checkpoint {
            offset: 1,
            processors: vec![ProcessorState { owner: StateOwner::Position(1), state: vec![1] }],
            sinks: vec![],
        };
        let err = restore_into(&saved, &mut b).unwrap_err().to_string();
        assert!(err.contains("processor 2") && err.contains("config has 1"), "{err}");
    }
}
