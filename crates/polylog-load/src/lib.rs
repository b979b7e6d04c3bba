//! Bulk loading of wide rows into Postgres and Parquet at once.
//!
//! A load reads its input once: each record is parsed on our side into the exact value
//! Postgres will store, and the rows go, in chunks, through binary `COPY` into the table (or
//! straight into the partition that holds them) and into Parquet files with the same schema.
//! Each chunk commits in one Postgres transaction together with its entry in
//! `polylog_load_chunks`, and its Parquet file is in place before that commit: a killed load
//! run again skips the committed chunks (checking that their input did not change) and loads
//! the rest, with no duplicate and no gap.

pub mod encode;
pub mod gen;
pub mod load;
pub mod output;
pub mod source;
pub mod target;
pub mod types;

pub use load::{load, LoadOptions, Summary};
/// The Parquet crate this loader writes with, for reading its files back.
pub use parquet;

/// Why a load stopped.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Options, schema or input that cannot work; nothing was loaded.
    #[error("{0}")]
    Setup(String),
    #[error("Postgres: {0}")]
    Postgres(String),
    /// A bad row (or a failed chunk): everything before it that committed stays, the rest
    /// did not go in. The message says where and how to go on.
    #[error("{0}")]
    Stopped(String),
}
