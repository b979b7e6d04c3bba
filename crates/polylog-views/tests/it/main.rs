//! The denormalizer end to end: over topics written like a CDC source writes them, over a real
//! Postgres through the real source, and under `kill -9`.

mod crash;
mod oracle;
mod runner;
mod support;
