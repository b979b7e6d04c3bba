//! The collector over HTTP: good events stored anonymized and durable, bad input answered
//! with a 4xx and its reason, no raw IP or user id on disk.

mod collector;
mod geo;
mod rollup;
