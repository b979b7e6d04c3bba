//! Event collection for ad viewability measurement: the event model and its validation,
//! anonymization before anything is stored, categorization (device, browser, invalid traffic,
//! site category), the MRC viewability rule, and the HTTP collector that appends accepted
//! events durably to a topic.
//!
//! Not built yet (issue 6 goes on): rollups, reports, the load generator, country lookup.

pub mod anonymize;
pub mod categorize;
pub mod collector;
pub mod model;
pub mod server;

pub use anonymize::Anonymizer;
pub use collector::{Collector, CollectorOptions};
pub use model::{Event, EventKind, RawEvent};
