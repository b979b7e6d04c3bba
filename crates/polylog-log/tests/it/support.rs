//! Test helpers: log constructors (temporary directories and the seeded PRNG are the testkit's).

use std::path::Path;
use std::time::Duration;

use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions, Record, StartAt, StoredRecord};

pub use polylog_testkit::{Rng, TempDir};

pub fn opts() -> LogOptions {
    LogOptions { fsync: FsyncPolicy::Never, maintenance_interval_ms: 0, ..LogOptions::default() }
}

pub fn open(dir: &Path) -> EmbeddedLog {
    EmbeddedLog::open(dir, opts()).expect("open log")
}

/// Every record of a partition from `start` up to the durable offset.
pub fn read_all(log: &dyn Log, topic: &str, partition: u32, start: StartAt) -> Vec<StoredRecord> {
    let mut r = log.reader(topic, partition, start).expect("reader");
    let end = log.durable_offset(topic, partition).expect("durable offset");
    let mut out = Vec::new();
    while r.position() < end {
        let got = r.poll(1000, Duration::from_millis(0)).expect("poll");
        if got.is_empty() {
            break;
        }
        out.extend(got);
    }
    out
}

pub fn rec(key: &str, value: &str) -> Record {
    Record::new(key.as_bytes(), value.as_bytes())
}
