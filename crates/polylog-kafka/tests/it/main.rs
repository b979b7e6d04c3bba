//! The Kafka backend against a real Kafka-protocol broker (`tansu`, started per test) and
//! against librdkafka's mock cluster (an in-process broker, where errors can be injected).

#![allow(clippy::unwrap_used)] // a test stops at its first failure

mod broker;
mod mock;
