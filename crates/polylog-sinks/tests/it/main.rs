//! Sinks against a real Postgres.

mod elasticsearch;
mod file;
mod postgres;
mod search;
