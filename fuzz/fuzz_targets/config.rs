//! Fuzzes the `polylog.toml` parser, `Config::parse` of the `polylog` binary's config module
//! (crates/polylog/src/config.rs, compiled here as it is: the binary has no library target).
//!
//! Input: the config text; input that is not UTF-8 is skipped (a config file is read as UTF-8
//! text, and the artifact of a failure is then exactly the text that failed).
//!
//! Properties: parsing returns a config or an error, never panics; an error has a message; a
//! config that parses gives its log options, its Kafka client options when the backend is Kafka
//! (checked while parsing, so they must succeed again), and every rollup's options.

#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../crates/polylog/src/config.rs"]
mod config;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match config::Config::parse(text) {
        Err(e) => assert!(!format!("{e:#}").is_empty(), "an error without a message"),
        Ok(c) => {
            let _ = c.log_options();
            if c.log.backend == config::Backend::Kafka {
                c.kafka_options().unwrap_or_else(|e| {
                    panic!("Kafka options of a config that parsed fail: {e:#}\n{text}")
                });
            }
            for (name, r) in &c.rollups {
                let _ = r.options(name);
            }
        }
    }
});
