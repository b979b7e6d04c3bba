//! The denormalizer end to end: over topics written like a CDC source writes them, over a real
//! Postgres through the real source, under `kill -9`, and shared by two processes on Kafka.

mod crash;
mod oracle;
mod runner;
mod scale_out;
mod support;
