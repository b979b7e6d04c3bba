//! Polylog's denormalizer: a view is a root topic with nested LEFT JOINs, kept as one document
//! per root row in the compacted topic `views.<name>`, current as any participating row
//! changes. See `runner` for transactions and checkpoints, `core` for the state and the
//! incremental maintenance.

pub mod change;
pub mod config;
mod core;
pub mod json;
pub mod runner;
pub mod spec;

pub use crate::core::cmp_values;
pub use config::{JoinConfig, JoinKind, ViewConfig};
pub use runner::{View, ViewOptions, ViewStatus};
pub use spec::ViewSpec;

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The view's definition is wrong; the message names the field.
    #[error("{0}")]
    Config(String),
    /// A topic the view reads does not exist (yet: a source may be about to create it).
    #[error("{0}")]
    MissingTopic(String),
    #[error("the log: {0}")]
    Log(#[from] polylog_log::LogError),
    #[error("the view's state store: {0}")]
    State(String),
}
