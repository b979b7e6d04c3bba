//! Sinks against a real Postgres, an OpenSearch stand-in, and sharing partitions on Kafka.

mod elasticsearch;
mod file;
mod postgres;
mod search;
mod shared;
