//! The Postgres source against a real Postgres 15.

mod stream;
mod types;
mod support;
