//! The source's small state file: what it created upstream (so a slot or publication
//! that disappears is known to be dropped, not new) and the snapshot's progress.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::Target;
use super::coverage;

/// Where the source's marker is: named after the stream (server, database and slot), as
/// the producer ids are, so a source renamed keeps it while two sources reading slots
/// of the same name on different servers do not share one. A marker of an earlier
/// version, named after the source, is moved there.
pub(super) fn marker_path(data_dir: &Path, name: &str, target: &Target, slot: &str) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let server = format!("{}\0{}\0{}", target.host, target.port, target.database);
    for b in server.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let dir = data_dir.join("sources");
    let path = dir.join(format!("postgres_cdc.{slot}.{h:016x}.json"));
    let old = dir.join(format!("{name}.json"));
    if !path.exists() && old.exists() {
        let _ = std::fs::rename(&old, &path);
    }
    path
}

/// What this source has used before: a slot or publication named here that is missing
/// now was dropped, not never created.
/// It also holds the initial snapshot's progress.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Marker {
    pub(super) slot: Option<String>,
    pub(super) publication: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) snapshot: Option<coverage::Progress>,
}

impl Marker {
    /// The marker at `path`; none yet is an empty one, a damaged one an error (it may
    /// hold a snapshot's progress, which must not be silently forgotten).
    pub(super) fn read(path: &Path) -> anyhow::Result<Marker> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{} is damaged ({e}); repair or delete it", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Marker::default()),
            Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        }
    }

    pub(super) fn write(&self, path: &Path) -> anyhow::Result<()> {
        Self::write_bytes(&serde_json::to_vec(self)?, path)
    }

    pub(super) fn write_bytes(bytes: &[u8], path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().expect("the marker is in a directory");
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}
