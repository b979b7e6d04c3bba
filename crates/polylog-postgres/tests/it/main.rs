//! The Postgres source against a real Postgres 15.

mod crash;
mod stream;
mod support;
mod types;
