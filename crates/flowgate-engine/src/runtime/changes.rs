//! What a config reload did to a set of named components (pipelines, sources, alert
//! rules), and the sorting every reload of them shares.

use serde::Serialize;

/// What a reload did to a set of named components (pipelines, sources), by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    /// Not running before: started.
    pub added: Vec<String>,
    /// No longer configured: stopped (a pipeline after flushing and committing).
    pub removed: Vec<String>,
    /// Config changed: stopped (a pipeline after flushing and committing), then
    /// started again with the new config, from where it stopped.
    pub restarted: Vec<String>,
    /// Config unchanged: still running, untouched.
    pub unchanged: Vec<String>,
    /// Of the removed and restarted ones, those that did not stop within the deadline
    /// (a stalled sink or upstream): cut off; they resume from their last checkpoint.
    pub cut_off: Vec<String>,
}

impl Changes {
    /// Sorts the `running` components against a new config: `config_is_same` says, of
    /// one, whether the new config has it unchanged (`Some(true)`), changed
    /// (`Some(false)`) or not at all (`None`). Returns those to keep running and those
    /// to stop, in their order, and records the changed as restarted and the missing as
    /// removed.
    pub fn sort_running<R>(
        &mut self,
        running: Vec<R>,
        name: impl Fn(&R) -> &str,
        config_is_same: impl Fn(&R) -> Option<bool>,
    ) -> (Vec<R>, Vec<R>) {
        let (mut keep, mut stop) = (Vec::new(), Vec::new());
        for r in running {
            match config_is_same(&r) {
                Some(true) => keep.push(r),
                Some(false) => {
                    self.restarted.push(name(&r).to_owned());
                    stop.push(r);
                }
                None => {
                    self.removed.push(name(&r).to_owned());
                    stop.push(r);
                }
            }
        }
        (keep, stop)
    }

    /// Records that `name` starts: added, unless it is restarted.
    pub fn starting(&mut self, name: &str) {
        if !self.restarted.iter().any(|r| r == name) {
            self.added.push(name.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_components_are_kept_restarted_or_removed_and_new_ones_added() {
        let mut changes = Changes::default();
        let running = vec![("a", 1), ("b", 1), ("c", 1)];
        let new = [("a", 1), ("b", 2), ("d", 1)];
        let same = |r: &(&str, i32)| new.iter().find(|n| n.0 == r.0).map(|n| n.1 == r.1);
        let (keep, stop) = changes.sort_running(running, |r| r.0, same);
        assert_eq!((keep, stop), (vec![("a", 1)], vec![("b", 1), ("c", 1)]));
        changes.starting("b");
        changes.starting("d");
        assert_eq!(
            changes,
            Changes {
                added: vec!["d".into()],
                removed: vec!["c".into()],
                restarted: vec!["b".into()],
                ..Changes::default()
            }
        );
    }
}
