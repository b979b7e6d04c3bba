//! Polylog's log: the [`Log`] interface every component reads and writes topics through, and
//! [`EmbeddedLog`], the default backend that keeps topics in segment files under the data
//! directory.
//!
//! The interface is Kafka's model, one to one: topics with a fixed number of partitions, records
//! of (key, value or tombstone, headers, timestamp) at per-partition offsets, compacted topics,
//! and committed consumer-group offsets. A Kafka backend implements the same trait.
//!
//! # Guarantees
//! - A record is *durable* once [`Log::wait_durable`] returned for its offset (or
//!   [`Log::durable_offset`] passed it). Durable records survive a crash of the process and, with
//!   `fsync = "always" | "interval"`, of the machine.
//! - Readers see only durable records (Kafka's high watermark), in offset order, each exactly as
//!   written: every batch is checksummed and a batch that fails its check is never served.
//! - After a failed write or fsync a partition accepts no more writes ([`LogError::Poisoned`]):
//!   an error is never swallowed and retried into a hole.

mod compaction;
mod embedded;
mod error;
pub mod failpoint;
mod format;
mod groups;
mod index;
pub mod metrics;
mod partition;
mod partitioner;
mod reader;
mod segment;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub use compaction::CompactionStats;
pub use embedded::{EmbeddedLog, Faults, FsyncPolicy, LogOptions, MaintenanceReport};
pub use error::LogError;
pub use partitioner::partition_for_key;

/// Result type of this crate.
pub type Result<T, E = LogError> = std::result::Result<T, E>;

/// A record as a producer writes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// The key; compacted topics require one.
    pub key: Option<Vec<u8>>,
    /// The value; `None` is a tombstone, which deletes the key in a compacted topic.
    pub value: Option<Vec<u8>>,
    /// Headers, in order; keys may repeat, as in Kafka.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Create time in ms since the Unix epoch; `None` takes the append time.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    /// A record with a key and a value, stamped at append time.
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Record { key: Some(key.into()), value: Some(value.into()), ..Record::default() }
    }
    /// A tombstone for `key`.
    pub fn tombstone(key: impl Into<Vec<u8>>) -> Self {
        Record { key: Some(key.into()), ..Record::default() }
    }
}

/// A record as a reader receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// How a topic is laid out and cleaned up. Mirrors Kafka's topic configs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Number of partitions (Kafka: `num.partitions`); fixed at creation.
    pub partitions: u32,
    /// Keep at least the latest record per key (Kafka: `cleanup.policy=compact`).
    #[serde(default)]
    pub compacted: bool,
    /// Delete whole segments whose newest record is older than this (`retention.ms`).
    #[serde(default)]
    pub retention_ms: Option<u64>,
    /// Delete the oldest segments while a partition is larger than this (`retention.bytes`).
    #[serde(default)]
    pub retention_bytes: Option<u64>,
    /// Roll to a new segment file at this size (`segment.bytes`).
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// How long after its segment was written a tombstone survives compaction, so readers see
    /// the delete (`delete.retention.ms`).
    #[serde(default = "default_tombstone_retention_ms")]
    pub tombstone_retention_ms: u64,
}

fn default_segment_bytes() -> u64 {
    128 * 1024 * 1024
}
fn default_tombstone_retention_ms() -> u64 {
    24 * 60 * 60 * 1000
}

/// Largest `segment_bytes`: positions within a segment are 32-bit.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 31;
/// Smallest `segment_bytes`.
pub const SEGMENT_BYTES_MIN: u64 = 4096;

impl TopicConfig {
    /// A topic with `partitions` partitions and default settings.
    pub fn new(partitions: u32) -> Self {
        TopicConfig {
            partitions,
            compacted: false,
            retention_ms: None,
            retention_bytes: None,
            segment_bytes: default_segment_bytes(),
            tombstone_retention_ms: default_tombstone_retention_ms(),
        }
    }
    /// The same, compacted.
    pub fn compacted(mut self) -> Self {
        self.compacted = true;
        self
    }

    /// Checks the settings, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(LogError::InvalidTopicConfig(why));
        if self.partitions == 0 || self.partitions > 10_000 {
            return bad(format!("partitions must be between 1 and 10000, got {}", self.partitions));
        }
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return bad(format!(
                "segment_bytes must be between {SEGMENT_BYTES_MIN} and {SEGMENT_BYTES_MAX}, got {}",
                self.segment_bytes
            ));
        }
        Ok(())
    }
}

/// Where a reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record still held (Kafka: `earliest`).
    Beginning,
    /// After the last durable record: only new records (Kafka: `latest`).
    End,
    /// A given offset; below the log start it is an [`LogError::OffsetOutOfRange`].
    Offset(u64),
    /// The first record whose timestamp is at or after this (ms since the epoch).
    Timestamp(i64),
}

/// What an append was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub partition: u32,
    pub base_offset: u64,
    pub last_offset: u64,
}

/// One partition's positions and size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionDescription {
    pub partition: u32,
    /// Offset of the oldest record held (records below were removed by retention).
    pub start_offset: u64,
    /// Offset the next appended record gets.
    pub end_offset: u64,
    /// Records below this offset are durable and visible to readers (the high watermark).
    pub durable_offset: u64,
    pub segments: usize,
    pub size_bytes: u64,
}

/// A topic's configuration and partitions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopicDescription {
    pub name: String,
    pub config: TopicConfig,
    pub partitions: Vec<PartitionDescription>,
}

/// Reads one partition in offset order.
pub trait LogReader: Send {
    /// Returns up to `max_records` records, waiting up to `timeout` for new durable records when
    /// none are available (an empty result means none arrived in time).
    fn poll(&mut self, max_records: usize, timeout: Duration) -> Result<Vec<StoredRecord>>;
    /// Offset of the next record this reader returns.
    fn position(&self) -> u64;
}

/// The log every Polylog component reads and writes topics through.
///
/// Maps one to one onto Kafka: `append` is a produce of one batch to one partition,
/// `wait_durable` is awaiting its delivery report with `acks=all`, readers are fetches, and
/// `commit_offsets`/`committed_offsets` are a consumer group's offset commits.
pub trait Log: Send + Sync {
    /// Creates a topic; [`LogError::TopicExists`] if it exists.
    fn create_topic(&self, name: &str, config: &TopicConfig) -> Result<()>;
    /// Names of all topics, sorted.
    fn topics(&self) -> Result<Vec<String>>;
    /// A topic's configuration and per-partition positions.
    fn describe_topic(&self, name: &str) -> Result<TopicDescription>;
    /// Appends `records` to one partition as one batch and returns their offsets. The records
    /// are not yet durable: await [`Log::wait_durable`] before acknowledging them to anyone.
    fn append(&self, topic: &str, partition: u32, records: &[Record]) -> Result<Appended>;
    /// Offset below which every record of the partition is durable.
    fn durable_offset(&self, topic: &str, partition: u32) -> Result<u64>;
    /// Blocks until every record below `offset` is durable; [`LogError::Timeout`] after
    /// `timeout`, or the write error that makes it impossible.
    fn wait_durable(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        timeout: Duration,
    ) -> Result<()>;
    /// A reader of one partition starting at `start`.
    fn reader(&self, topic: &str, partition: u32, start: StartAt) -> Result<Box<dyn LogReader>>;
    /// Durably records a consumer group's next offsets to read.
    fn commit_offsets(&self, group: &str, offsets: &[(String, u32, u64)]) -> Result<()>;
    /// A consumer group's committed next offsets for a topic, by partition.
    fn committed_offsets(&self, group: &str, topic: &str) -> Result<BTreeMap<u32, u64>>;
    /// Joins `group` to share the partitions of `topics` with the other processes that join
    /// it (Kafka's group membership). A log that only one process uses (the embedded log)
    /// gives every partition to its one member.
    fn join_group(&self, group: &str, topics: &[String]) -> Result<Box<dyn GroupMember>> {
        let _ = group;
        Ok(Box::new(SoleMember { topics: topics.to_vec() }))
    }
}

/// A process's place in a group sharing partitions: which ones it owns now.
pub trait GroupMember: Send {
    /// The (topic, partition)s this member owns; `None` while the group is rebalancing, when
    /// a member must act on none of them. Call it often (every few seconds at least): it also
    /// keeps the membership alive.
    fn owned(&mut self, log: &dyn Log) -> Result<Option<BTreeSet<(String, u32)>>>;
}

/// The only member of its group: owns every partition.
struct SoleMember {
    topics: Vec<String>,
}

impl GroupMember for SoleMember {
    fn owned(&mut self, log: &dyn Log) -> Result<Option<BTreeSet<(String, u32)>>> {
        let mut out = BTreeSet::new();
        for t in &self.topics {
            for p in log.describe_topic(t)?.partitions {
                out.insert((t.clone(), p.partition));
            }
        }
        Ok(Some(out))
    }
}

/// Checks a topic name against Kafka's rules (so every topic can move to Kafka unchanged):
/// 1–249 characters of `[A-Za-z0-9._-]`, and not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let bad = |reason: &'static str| Err(LogError::InvalidTopicName { name: name.into(), reason });
    if name.is_empty() {
        return bad("a topic name cannot be empty");
    }
    if name.len() > 249 {
        return bad("a topic name is at most 249 characters");
    }
    if name == "." || name == ".." {
        return bad("`.` and `..` are not topic names");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return bad("use only letters, digits, `.`, `_` and `-`");
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    d.map_or(0, |d| d.as_millis() as i64)
}
