//! The `file` sink: one JSON line per record (as `polylog topics tail` prints them), a file
//! per topic, rotated by size, fsynced before the offsets are committed.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use polylog_log::StoredRecord;

use crate::config::FileSinkConfig;
use crate::{Item, SinkError, Writer};

/// One output line, as DESIGN 3.7 specifies: key and value are embedded as JSON when they
/// are JSON, else as strings; a tombstone's value is null.
pub fn record_json(topic: &str, r: &StoredRecord) -> serde_json::Value {
    fn field(b: Option<&[u8]>) -> serde_json::Value {
        match b {
            None => serde_json::Value::Null,
            Some(b) => serde_json::from_slice(b).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
            }),
        }
    }
    serde_json::json!({
        "topic": topic,
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp_ms,
        "key": field(r.key.as_deref()),
        "value": field(r.value.as_deref()),
    })
}

struct Open {
    file: std::fs::File,
    n: u64,
    bytes: u64,
}

pub struct FileWriter {
    cfg: FileSinkConfig,
    open: HashMap<String, Open>,
}

fn io(path: &std::path::Path, e: std::io::Error) -> SinkError {
    SinkError::Target(format!("{}: {e}", path.display()))
}

impl FileWriter {
    pub fn new(cfg: FileSinkConfig) -> FileWriter {
        FileWriter { cfg, open: HashMap::new() }
    }

    /// Makes a new file's name durable before anything in it counts as written.
    fn sync_dir(&self) -> Result<(), SinkError> {
        std::fs::File::open(&self.cfg.path)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.cfg.path, e))
    }

    fn path(&self, topic: &str, n: u64) -> PathBuf {
        self.cfg.path.join(format!("{topic}.{n:06}.jsonl"))
    }

    /// Opens (creating) file `n` of a topic, its name made durable.
    fn open_file(&self, topic: &str, n: u64) -> Result<Open, SinkError> {
        let path = self.path(topic, n);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        let bytes = file.metadata().map_err(|e| io(&path, e))?.len();
        self.sync_dir()?;
        Ok(Open { file, n, bytes })
    }

    /// The file a topic's lines go to now: the newest one, or the next when it is full.
    fn file(&mut self, topic: &str) -> Result<&mut Open, SinkError> {
        if !self.open.contains_key(topic) {
            std::fs::create_dir_all(&self.cfg.path).map_err(|e| io(&self.cfg.path, e))?;
            let mut n = 0;
            while self.path(topic, n + 1).exists() {
                n += 1;
            }
            let open = self.open_file(topic, n)?;
            self.open.insert(topic.to_string(), open);
        }
        let max = self.cfg.max_bytes;
        let full = self.open.get(topic).is_some_and(|o| o.bytes >= max);
        if full {
            // The full file's last lines are made durable before the next file takes over.
            if let Some(old) = self.open.get(topic) {
                old.file.sync_data().map_err(|e| io(&self.cfg.path, e))?;
            }
            let n = self.open.get(topic).map_or(0, |o| o.n) + 1;
            let open = self.open_file(topic, n)?;
            self.open.insert(topic.to_string(), open);
        }
        self.open.get_mut(topic).ok_or_else(|| SinkError::Target("no file".into()))
    }
}

impl Writer for FileWriter {
    fn write(&mut self, items: &[Item]) -> Result<(), SinkError> {
        // Where each open file ended: a failed batch is cut back to it, so its retry does not
        // leave a partial line behind.
        let ends: Vec<(String, u64)> =
            self.open.iter().map(|(t, o)| (t.clone(), o.bytes)).collect();
        let r = self.write_lines(items);
        if r.is_err() {
            for (topic, bytes) in ends {
                if let Some(o) = self.open.get_mut(&topic) {
                    let _ = o.file.set_len(bytes);
                    o.bytes = bytes;
                }
            }
        }
        r
    }
}

impl FileWriter {
    fn write_lines(&mut self, items: &[Item]) -> Result<(), SinkError> {
        let mut touched: Vec<String> = Vec::new();
        for item in items {
            let mut line =
                serde_json::to_vec(&record_json(&item.topic, &item.record)).unwrap_or_default();
            line.push(b'\n');
            let path = self.path(&item.topic, 0);
            let open = self.file(&item.topic)?;
            open.file.write_all(&line).map_err(|e| io(&path, e))?;
            open.bytes += line.len() as u64;
            if !touched.contains(&item.topic) {
                touched.push(item.topic.clone());
            }
        }
        for topic in touched {
            if let Some(o) = self.open.get(&topic) {
                o.file.sync_data().map_err(|e| io(&self.cfg.path, e))?;
            }
        }
        Ok(())
    }
}
