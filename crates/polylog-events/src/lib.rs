//! Event collection for ad viewability measurement: the event model and its validation,
//! anonymization before anything is stored, categorization (device, browser, invalid traffic,
//! site category), the MRC viewability rule, and the HTTP collector that appends accepted
//! events durably to a topic.
//!
//! Rollups count the events into per-minute buckets flushed exactly once into Postgres (hours
//! and days derived); reports combine them with the open buckets.

pub mod anonymize;
pub mod categorize;
pub mod collector;
pub mod gen;
pub mod geo;
pub mod hll;
pub mod model;
pub mod report;
pub mod rollup;
pub mod server;
pub mod time;

pub use anonymize::Anonymizer;
pub use collector::{Collector, CollectorOptions};
pub use model::{Event, EventKind, RawEvent};
pub use report::{Report, ReportError, ReportQuery};
pub use rollup::{Rollup, RollupError, RollupOptions, RollupStatus};
