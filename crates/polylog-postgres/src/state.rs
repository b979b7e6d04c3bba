//! The source's own small state file: which slot it streams from and how far the snapshot got.
//! Replaced atomically (temp file, fsync, rename, fsync of the directory).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SourceError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotStatus {
    /// No slot created by us yet.
    #[default]
    None,
    InProgress,
    Done,
    /// `snapshot = "never"`.
    Skipped,
}

/// How far one table's snapshot got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableProgress {
    /// Key of the last row stored, as text values in key order (a table read as one range).
    pub last_key: Option<Vec<String>>,
    pub rows: u64,
    pub done: bool,
    /// Key ranges read in parallel, each with its own progress.
    #[serde(default)]
    pub ranges: Vec<RangeProgress>,
}

/// One key range of a table's snapshot: keys after `lower` up to and including `upper`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeProgress {
    pub lower: Option<Vec<String>>,
    pub upper: Option<Vec<String>>,
    /// Key of the last row stored in this range.
    pub last_key: Option<Vec<String>>,
    pub rows: u64,
    pub done: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    /// The slot this state belongs to.
    pub slot: Option<String>,
    /// LSN at which the slot was created (where streaming starts after the snapshot).
    pub consistent_point: Option<String>,
    pub snapshot: SnapshotStatus,
    /// Snapshot progress by `schema.table`.
    pub tables: BTreeMap<String, TableProgress>,
    /// An incremental snapshot in progress (triggered through the signal table).
    #[serde(default)]
    pub incremental: Option<Incremental>,
    /// Ids of the signals already acted on (the last few), so a replayed signal is ignored.
    #[serde(default)]
    pub signals_done: Vec<String>,
}

/// Progress of an incremental snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incremental {
    /// Tables still to do, the current one first.
    pub queue: Vec<String>,
    /// Key of the last row of the current table already emitted.
    pub last_key: Option<Vec<String>>,
    pub rows: u64,
}

impl SourceState {
    pub fn load(path: &Path) -> Result<SourceState, SourceError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| SourceError::State {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SourceState::default()),
            Err(e) => {
                Err(SourceError::State { path: path.display().to_string(), reason: e.to_string() })
            }
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), SourceError> {
        let fail = |e: std::io::Error| SourceError::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(fail)?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        std::fs::write(&tmp, bytes).map_err(fail)?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(fail)?;
        polylog_log::failpoint::check("source.state").map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)?;
        std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(fail)
    }
}
