//! Test helpers: temporary directories, a seeded PRNG, and log constructors.

use std::path::Path;
use std::time::Duration;

use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions, Record, StartAt, StoredRecord};

pub use polylog_testkit::TempDir;

/// SplitMix64: small, seeded, good enough to drive randomized tests reproducibly.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `POLYLOG_TEST_SEED` when set, else from the clock; the seed is printed so a
    /// failure can be replayed.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("POLYLOG_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{test}: POLYLOG_TEST_SEED={seed}");
        Rng(seed)
    }
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// Random bytes, fewer than `n` of them.
    pub fn bytes_below(&mut self, n: u64) -> Vec<u8> {
        let len = self.below(n) as usize;
        self.bytes(len)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

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
