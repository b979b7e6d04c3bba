//! Sinks: topics delivered to other stores. Each sink reads its topics as the consumer group
//! `sink.<name>`, applies a batch, and only then commits the batch's offsets: at least once.
//! Writers make a replay harmless (the Postgres sink never lets an older version of a row
//! overwrite a newer one), so any store can be rebuilt from the log (`polylog replay`).

pub mod config;
pub mod elasticsearch;
pub mod file;
pub mod http;
pub mod postgres;
pub mod runner;
pub mod search;

pub use config::{
    ElasticsearchSinkConfig, FileSinkConfig, PostgresSinkConfig, PostgresSinkMode, SinkConfig,
};
pub use runner::{Sink, SinkStatus, StartFrom};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The sink's definition or its target is wrong; retrying does not help.
    #[error("{0}")]
    Config(String),
    /// The target failed in a way that may pass (unreachable, restarting): retried.
    #[error("{0}")]
    Target(String),
    #[error("the log: {0}")]
    Log(#[from] polylog_log::LogError),
}

impl SinkError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Target(_))
    }
}

/// A record with the topic it came from.
#[derive(Debug, Clone)]
pub struct Item {
    pub topic: String,
    pub record: polylog_log::StoredRecord,
}

/// Where records go. `write` is called with records in each partition's order, and again
/// with the same records when it failed.
pub trait Writer: Send {
    fn write(&mut self, items: &[Item]) -> Result<(), SinkError>;
}
