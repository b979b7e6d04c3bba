//! Postgres change data capture: a blocking client of the Postgres wire protocol (including
//! logical replication), the pgoutput decoder, the type mapping to JSON, and the source that
//! turns committed row changes into Debezium-compatible change events in topics.

pub mod calendar;
pub mod config;
pub mod error;
pub mod event;
pub mod images;
pub mod pgoutput;
pub mod schema;
pub mod source;
pub mod state;
pub mod tls;
pub mod types;
pub mod wire;

pub use config::{PostgresSourceConfig, SnapshotMode};
pub use error::SourceError;
pub use source::{default_object_name, PostgresSource, SourceOptions, SourceStatus};
