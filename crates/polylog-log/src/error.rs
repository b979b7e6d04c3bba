use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the log can refuse or fail at, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopicName { name: String, reason: &'static str },

    #[error("invalid consumer group name {name:?}: use 1-249 letters, digits, `.`, `_` or `-`")]
    InvalidGroupName { name: String },

    #[error("invalid topic configuration: {0}")]
    InvalidTopicConfig(String),

    #[error("topic {0:?} does not exist (create it with `polylog topics create {0}`)")]
    UnknownTopic(String),

    #[error("topic {0:?} already exists")]
    TopicExists(String),

    #[error("topic {topic:?} has {partitions} partition(s); there is no partition {partition}")]
    UnknownPartition { topic: String, partition: u32, partitions: u32 },

    #[error(
        "offset {requested} of {topic}/{partition} is no longer held: the partition starts at \
         offset {start} (older records were removed by retention or compaction)"
    )]
    OffsetOutOfRange { topic: String, partition: u32, requested: u64, start: u64 },

    #[error("invalid append: {0}")]
    InvalidAppend(String),

    #[error("{} is not a Polylog data directory: {reason}", path.display())]
    NotADataDir { path: PathBuf, reason: String },

    #[error("there is no Polylog data directory at {} yet: nothing has been written there", path.display())]
    NoDataDir { path: PathBuf },

    #[error(
        "data directory {} is in use by another polylog process{}; stop it or point this one \
         at another data_dir",
        path.display(),
        holder.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
    )]
    Locked { path: PathBuf, holder: Option<String> },

    #[error(
        "writes to {partition} stopped after an I/O error: {cause}. Every record acknowledged as \
         durable before it is safe; fix the cause{hint} and restart polylog"
    )]
    Poisoned { partition: String, cause: String, hint: &'static str },

    #[error("{context} {}: {source}{}", path.display(), hint(source))]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("corrupt data in {} at byte {position}: {reason}", path.display())]
    Corrupt { path: PathBuf, position: u64, reason: String },

    #[error("timed out after {0:?} waiting for records to become durable")]
    Timeout(Duration),

    #[error("the log is open read-only (another polylog process owns the data directory)")]
    ReadOnly,

    /// A backend other than the embedded log (Kafka) failed; the message names it.
    #[error("{0}")]
    Backend(String),
}

fn hint(e: &io::Error) -> &'static str {
    if is_disk_full(e) {
        " (the disk is full: free space, then restart; nothing acknowledged was lost)"
    } else {
        ""
    }
}

pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    e.raw_os_error() == Some(28) || e.kind() == io::ErrorKind::StorageFull
}

impl LogError {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| LogError::Io { context, path, source }
    }
}
