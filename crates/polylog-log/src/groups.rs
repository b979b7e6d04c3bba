//! Committed consumer-group offsets: one JSON file per group under `groups/`, replaced
//! atomically (temp file, fsync, rename, fsync of the directory) on every commit.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::partition::sync_dir;
use crate::{LogError, Result};

type Offsets = BTreeMap<String, BTreeMap<u32, u64>>;

pub(crate) struct Groups {
    dir: PathBuf,
    durable: bool,
    cache: Mutex<HashMap<String, Offsets>>,
}

/// Group names follow the topic-name rules (they name a file under `groups/`).
pub(crate) fn validate_group_name(name: &str) -> Result<()> {
    crate::validate_topic_name(name).map_err(|_| LogError::InvalidGroupName { name: name.into() })
}

impl Groups {
    pub fn new(dir: PathBuf, durable: bool) -> Self {
        Groups { dir, durable, cache: Mutex::new(HashMap::new()) }
    }

    fn path(&self, group: &str) -> PathBuf {
        self.dir.join(format!("{group}.json"))
    }

    fn load(path: &Path) -> Result<Offsets> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| LogError::Corrupt {
                path: path.to_path_buf(),
                position: 0,
                reason: format!("committed offsets do not parse: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Offsets::new()),
            Err(e) => Err(LogError::io("reading committed offsets", path)(e)),
        }
    }

    pub fn commit(&self, group: &str, offsets: &[(String, u32, u64)]) -> Result<()> {
        validate_group_name(group)?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.path(group);
        let mut current = match cache.get(group) {
            Some(c) => c.clone(),
            None => Self::load(&path)?,
        };
        for (topic, partition, offset) in offsets {
            current.entry(topic.clone()).or_default().insert(*partition, *offset);
        }
        let io = |what| LogError::io(what, path.clone());
        fs::create_dir_all(&self.dir).map_err(io("creating the groups directory"))?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&current)
            .map_err(|e| LogError::InvalidAppend(e.to_string()))?;
        fs::write(&tmp, bytes).map_err(io("writing committed offsets"))?;
        if self.durable {
            fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io("syncing committed offsets"))?;
        }
        fs::rename(&tmp, &path).map_err(io("installing committed offsets"))?;
        if self.durable {
            sync_dir(&self.dir).map_err(io("syncing the groups directory"))?;
        }
        cache.insert(group.to_string(), current);
        Ok(())
    }

    pub fn committed(&self, group: &str, topic: &str) -> Result<BTreeMap<u32, u64>> {
        validate_group_name(group)?;
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let all = match cache.get(group) {
            Some(c) => c.clone(),
            None => Self::load(&self.path(group))?,
        };
        Ok(all.get(topic).cloned().unwrap_or_default())
    }
}
