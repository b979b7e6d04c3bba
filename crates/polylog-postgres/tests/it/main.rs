//! The Postgres source against a real Postgres 15.

mod bad_input;
mod crash;
mod incremental;
mod slot;
mod stream;
mod support;
mod tls;
mod toast;
mod types;
