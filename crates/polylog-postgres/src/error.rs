//! The source's errors, and the one place that decides which are worth retrying.

use crate::wire::PgError;

/// Why the source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Something a person must fix in Postgres or the config; retrying will not help.
    #[error("{0}")]
    Setup(String),
    #[error("postgres: {0}")]
    Pg(#[from] PgError),
    #[error("log: {0}")]
    Log(#[from] polylog_log::LogError),
    /// The slot is gone or its WAL was removed: changes were lost to us.
    #[error(
        "replication slot {slot:?} {why}; changes made since it was last read cannot be captured. \
         Take a new snapshot: stop polylog, drop the slot if it exists \
         (SELECT pg_drop_replication_slot('{slot}')), delete {state} and start again"
    )]
    SlotLost { slot: String, why: String, state: String },
    #[error("malformed replication data: {0}")]
    Decode(String),
    #[error("state file {path}: {reason}")]
    State { path: String, reason: String },
}

impl SourceError {
    /// Retry with backoff (network trouble, Postgres restarting), or stop and report.
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Pg(e) => e.is_retryable(),
            // A log slow to make records durable (a busy disk) may catch up.
            SourceError::Log(polylog_log::LogError::Timeout(_)) => true,
            _ => false,
        }
    }
}
