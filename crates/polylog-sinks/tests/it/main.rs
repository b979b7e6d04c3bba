//! Sinks against a real Postgres.

mod file;
mod postgres;
mod search;
