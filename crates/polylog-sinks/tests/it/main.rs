//! Sinks against a real Postgres.

mod postgres;
