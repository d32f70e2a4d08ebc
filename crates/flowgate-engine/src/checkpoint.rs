//! Checkpoints: a pipeline's committed offset for one source partition, with the state
//! of its processors and sinks as of that offset, in
//! `<data_dir>/pipelines/<pipeline>/<topic>-<partition>.ckpt`, replaced atomically
//! (write, fsync, rename, fsync directory).
//!
//! Format: one line of JSON — `{"version":2,"offset":N,"sinks":[…],"processors":[{"id":…,
//! "type":…,"settings":{…},"bytes":N},…]}` — then the state of each processor listed, as raw bytes,
//! back to back, of the lengths listed, then a CRC32C (u32, little-endian) of everything
//! before it. Processor state is keyed by processor id (its `name`, or `<type>-<n>`) and
//! type, so reordering processors keeps each one's state; only processors that hold
//! state are listed. Version 1 (`"processor_bytes":[N,…]`, state by position) is still
//! read, and rewritten as version 2 at the next checkpoint.
//!
//! A checkpoint that cannot be read is never treated as absent: the partition refuses to
//! start with an error that names the file and what to do (put back what was there, or
//! move the file away to restart the partition from the pipeline's `start`), because
//! starting over silently would lose processor state and re-deliver or skip events.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The format version this build writes.
const VERSION: u32 = 2;
/// The older format this build still reads: processor state by position.
const VERSION_BY_POSITION: u32 = 1;

/// What is committed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    /// The next offset to read.
    pub offset: u64,
    /// State of the processors that hold any.
    pub processors: Vec<ProcessorState>,
    /// State of each sink (`{"sink": <name>, "state": <state>}`).
    pub sinks: Vec<serde_json::Value>,
}

/// One processor's checkpointed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessorState {
    /// Whose it is.
    pub owner: StateOwner,
    /// The state, as the processor wrote it.
    pub state: Vec<u8>,
}

/// Which processor a checkpointed state belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateOwner {
    /// The processor with this id and type.
    Id {
        /// Processor id (`name`, or `<type>-<n>`).
        id: String,
        /// Processor type.
        kind: String,
        /// The settings the state depends on
        /// ([`crate::config::ProcessorKind::state_settings`]), when recorded.
        settings: Option<serde_json::Value>,
    },
    /// The processor at this position (0-based), as checkpoints of version 1 stored it.
    Position(usize),
}

#[derive(Serialize, Deserialize)]
struct Header {
    version: u32,
    offset: u64,
    sinks: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    processors: Option<Vec<StateEntry>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    processor_bytes: Option<Vec<usize>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateEntry {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    settings: Option<serde_json::Value>,
    bytes: usize,
}

impl Checkpoint {
    /// Writes the checkpoint in its file format, piece by piece (processor state can be
    /// large; it is not copied into one buffer first). State by position is written by
    /// position as `#<n>` ids, which no configured processor has.
    pub fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let entries = self
            .processors
            .iter()
            .map(|p| {
                let (id, kind, settings) = match &p.owner {
                    StateOwner::Id { id, kind, settings } => (id.clone(), kind.clone(), settings.clone()),
                    StateOwner::Position(i) => (format!("#{}", i.saturating_add(1)), String::new(), None),
                };
                StateEntry { id, kind, settings, bytes: p.state.len() }
            })
            .collect();
        let header = Header {
            version: VERSION,
            offset: self.offset,
            sinks: self.sinks.clone(),
            processors: Some(entries),
            processor_bytes: None,
        };
        let mut head = serde_json::to_vec(&header).expect("header serializes");
        head.push(b'\n');
        out.write_all(&head)?;
        let mut crc = crc32c::crc32c(&head);
        for p in &self.processors {
            out.write_all(&p.state)?;
            crc = crc32c::crc32c_append(crc, &p.state);
        }
        out.write_all(&crc.to_le_bytes())
    }

    /// Serializes the checkpoint in its file format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Parses the file format (this version or version 1); the error says what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint, String> {
        if bytes.len() < 5 {
            return Err("too short".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err("checksum mismatch".into());
        }
        let newline = body.iter().position(|&b| b == b'\n').ok_or("no header line")?;
        let header: Header = serde_json::from_slice(&body[..newline]).map_err(|e| format!("header: {e}"))?;
        let owners: Vec<(StateOwner, usize)> = match (header.version, header.processors, header.processor_bytes) {
            (VERSION, Some(entries), None) => entries
                .into_iter()
                .map(|e| {
                    let owner = match e.id.strip_prefix('#').and_then(|n| n.parse::<usize>().ok()) {
                        Some(n) if e.kind.is_empty() && e.settings.is_none() && n > 0 => StateOwner::Position(n - 1),
                        _ => StateOwner::Id { id: e.id, kind: e.kind, settings: e.settings },
                    };
                    (owner, e.bytes)
                })
                .collect(),
            (VERSION_BY_POSITION, None, Some(lengths)) => lengths
                .into_iter()
                .enumerate()
                .filter(|(_, len)| *len > 0)
                .map(|(i, len)| (StateOwner::Position(i), len))
                .collect(),
            (VERSION | VERSION_BY_POSITION, _, _) => {
                return Err(format!("header of version {} lists processor state wrongly", header.version))
            }
            (other, _, _) => {
                return Err(format!(
                    "format version {other} is not a version this build reads ({VERSION_BY_POSITION} or {VERSION}); \
                     was it written by another flowgate release?"
                ))
            }
        };
        let mut rest = &body[newline + 1..];
        let mut processors = Vec::with_capacity(owners.len().min(rest.len()));
        for (owner, len) in owners {
            if rest.len() < len {
                return Err("processor state truncated".into());
            }
            processors.push(ProcessorState { owner, state: rest[..len].to_vec() });
            rest = &rest[len..];
        }
        if !rest.is_empty() {
            return Err(format!("{} bytes after the last processor state", rest.len()));
        }
        Ok(Checkpoint { offset: header.offset, processors, sinks: header.sinks })
    }
}

/// What a checkpoint's header line says, for status reports: read without the state
/// that follows it and without checking the checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointSummary {
    /// The committed offset: the next offset to read.
    pub offset: u64,
    /// Processor id and the size of its state in bytes, for the processors that hold any.
    pub processor_state_bytes: Vec<(String, u64)>,
    /// When the file was written (ms since the epoch), if the file system says.
    pub written_ms: Option<i64>,
}

/// Bytes of the files in `dir` (0 when there is none).
fn files_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).fold(0, u64::saturating_add)
}

/// The longest header line a summary reads: sink states are small JSON values.
const MAX_SUMMARY_HEADER: u64 = 16 << 20;

/// The checkpoint file of one (pipeline, topic, partition).
#[derive(Clone, Debug)]
pub struct CheckpointFile {
    path: PathBuf,
}

impl CheckpointFile {
    /// The file for this place.
    pub fn new(data_dir: &Path, pipeline: &str, topic: &str, partition: u32) -> CheckpointFile {
        CheckpointFile { path: data_dir.join("pipelines").join(pipeline).join(format!("{topic}-{partition}.ckpt")) }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory of files the processor `processor_id` keeps its state in beside
    /// this checkpoint (`<topic>-<partition>.state/<id>`): the id with every byte but
    /// ASCII letters, digits, `-` and `_` made `_`, then a hash of the id, so any two ids
    /// have their own directory.
    pub fn processor_dir(&self, processor_id: &str) -> PathBuf {
        let safe: String = processor_id
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let hash = xxhash_rust::xxh3::xxh3_64(processor_id.as_bytes());
        self.state_dir().join(format!("{safe}-{hash:016x}"))
    }

    /// The directory of every processor's [`CheckpointFile::processor_dir`].
    pub fn state_dir(&self) -> PathBuf {
        self.path.with_extension("state")
    }

    /// The error for state in this checkpoint that `what` (a processor or sink, e.g.
    /// `processor 2 (aggregate)`) could not restore: it names the file and what to do,
    /// so the partition stops instead of starting over without its state.
    pub fn restore_error(&self, what: &str, error: anyhow::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "checkpoint {}: {what} cannot restore its state: {error:#}; this partition does not start without \
             it. Fix the config to match the checkpoint, or move the file away to restart the partition from \
             the pipeline's `start` (that state is then lost)",
            self.path.display()
        )
    }

    /// The last committed checkpoint, if any.
    pub fn load(&self) -> anyhow::Result<Option<Checkpoint>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(Some(Checkpoint::from_bytes(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "checkpoint {} is unreadable ({e}); move it away to restart from the start policy",
                    self.path.display()
                )
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("cannot read checkpoint {}: {e}", self.path.display())),
        }
    }

    /// The header of the last committed checkpoint, if any ([`CheckpointSummary`]).
    pub fn summary(&self) -> anyhow::Result<Option<CheckpointSummary>> {
        use std::io::{BufRead, Read};
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow::anyhow!("cannot read checkpoint {}: {e}", self.path.display())),
        };
        let written_ms = file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_millis()).ok());
        let mut line = Vec::new();
        std::io::BufReader::new(file).take(MAX_SUMMARY_HEADER).read_until(b'\n', &mut line)?;
        let header: Header = serde_json::from_slice(line.strip_suffix(b"\n").unwrap_or(&line))
            .map_err(|e| anyhow::anyhow!("checkpoint {} has an unreadable header: {e}", self.path.display()))?;
        let processor_state_bytes = match (header.processors, header.processor_bytes) {
            (Some(entries), _) => entries
                .into_iter()
                .map(|e| {
                    let beside = files_bytes(&self.processor_dir(&e.id));
                    (e.id, (e.bytes as u64).saturating_add(beside))
                })
                .collect(),
            (None, Some(lengths)) => lengths
                .into_iter()
                .enumerate()
                .filter(|(_, len)| *len > 0)
                .map(|(i, len)| (format!("#{}", i + 1), len as u64))
                .collect(),
            (None, None) => Vec::new(),
        };
        Ok(Some(CheckpointSummary { offset: header.offset, processor_state_bytes, written_ms }))
    }

    /// Commits a checkpoint durably.
    pub fn store(&self, checkpoint: &Checkpoint) -> anyhow::Result<()> {
        let dir = self.path.parent().expect("checkpoint path has a parent");
        std::fs::create_dir_all(dir)?;
        let tmp = self.path.with_extension("ckpt.tmp");
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        checkpoint.write_to(&mut f)?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_data()?;
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(id: &str, kind: &str, state: &[u8]) -> ProcessorState {
        ProcessorState {
            owner: StateOwner::Id { id: id.into(), kind: kind.into(), settings: Some(serde_json::json!({"by": "id"})) },
            state: state.to_vec(),
        }
    }

    #[test]
    fn round_trips_and_detects_damage() {
        let c = Checkpoint {
            offset: 42,
            processors: vec![
                named("dedup-1", "dedup", &[1, 2, 3, b'\n']),
                named("hourly", "aggregate", &[9; 100]),
                ProcessorState { owner: StateOwner::Position(2), state: vec![7] },
            ],
            sinks: vec![serde_json::json!({"seq": 1, "len": 10}), serde_json::Value::Null],
        };
        let bytes = c.to_bytes();
        assert_eq!(Checkpoint::from_bytes(&bytes).unwrap(), c);
        let mut damaged = bytes.clone();
        damaged[bytes.len() / 2] ^= 1;
        assert!(Checkpoint::from_bytes(&damaged).is_err());
        assert!(Checkpoint::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    }

    fn sealed(body: &[u8]) -> Vec<u8> {
        let mut out = body.to_vec();
        out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        out
    }

    #[test]
    fn a_summary_reads_the_header_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = CheckpointFile::new(dir.path(), "p", "t", 0);
        assert_eq!(file.summary().unwrap(), None);
        let c = Checkpoint { offset: 9, processors: vec![named("d", "dedup", &[b'\n'; 10])], sinks: vec![] };
        file.store(&c).unwrap();
        let summary = file.summary().unwrap().unwrap();
        assert_eq!((summary.offset, summary.processor_state_bytes), (9, vec![("d".to_owned(), 10)]));
        assert!(summary.written_ms.is_some_and(|ms| ms > 0));
        std::fs::write(file.path(), b"not json\n").unwrap();
        assert!(file.summary().unwrap_err().to_string().contains("unreadable header"));
    }

    #[test]
    fn version_1_state_by_position_is_read_as_positions() {
        let v1 = sealed(b"{\"version\":1,\"offset\":7,\"sinks\":[],\"processor_bytes\":[0,2,1]}\nabc");
        let c = Checkpoint::from_bytes(&v1).unwrap();
        assert_eq!(c.offset, 7);
        assert_eq!(
            c.processors,
            vec![
                ProcessorState { owner: StateOwner::Position(1), state: b"ab".to_vec() },
                ProcessorState { owner: StateOwner::Position(2), state: b"c".to_vec() },
            ]
        );
    }

    #[test]
    fn another_version_or_trailing_bytes_are_refused() {
        let newer = sealed(b"{\"version\":3,\"offset\":1,\"sinks\":[],\"processors\":[]}\n");
        assert!(Checkpoint::from_bytes(&newer).unwrap_err().contains("version 3"));
        let mixed = sealed(b"{\"version\":2,\"offset\":1,\"sinks\":[],\"processor_bytes\":[]}\n");
        assert!(Checkpoint::from_bytes(&mixed).unwrap_err().contains("wrongly"));
        let trailing = sealed(b"{\"version\":1,\"offset\":1,\"sinks\":[],\"processor_bytes\":[1]}\nab");
        assert!(Checkpoint::from_bytes(&trailing).unwrap_err().contains("after the last"));
        let huge = sealed(
            b"{\"version\":2,\"offset\":1,\"sinks\":[],\"processors\":[{\"id\":\"a\",\"type\":\"dedup\",\"bytes\":18446744073709551615}]}\n",
        );
        assert!(Checkpoint::from_bytes(&huge).unwrap_err().contains("truncated"));
        let file = CheckpointFile::new(Path::new("/data"), "p", "t", 3);
        let e = file.restore_error("processor 'agg' (aggregate)", anyhow::anyhow!("boom")).to_string();
        assert!(e.contains("/data/pipelines/p/t-3.ckpt") && e.contains("move the file away"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn any_checkpoint_round_trips(
            offset in proptest::prelude::any::<u64>(),
            states in proptest::collection::vec(
                ("[a-z#0-9-]{0,8}", "[a-z]{0,6}", proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)),
                0..5,
            ),
        ) {
            let processors = states
                .into_iter()
                .map(|(id, kind, state)| ProcessorState { owner: StateOwner::Id { id, kind, settings: None }, state })
                .filter(|p| !matches!(&p.owner, StateOwner::Id { id, kind, .. } if id.starts_with('#') && kind.is_empty()))
                .collect();
            let c = Checkpoint { offset, processors, sinks: vec![serde_json::json!({"len": u64::MAX})] };
            proptest::prop_assert_eq!(Checkpoint::from_bytes(&c.to_bytes()).unwrap(), c);
        }
    }
}
