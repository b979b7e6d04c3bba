//! Helpers: a cluster with a database, a log, a running source, and topic readers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions, StartAt};
use polylog_postgres::{PostgresSource, PostgresSourceConfig, SourceError, SourceOptions};
use polylog_testkit::PgCluster;
use serde_json::Value;

pub use polylog_testkit::TempDir;

/// A cluster with database `app`.
pub fn cluster() -> PgCluster {
    let pg = PgCluster::start().expect("start Postgres");
    pg.create_database("app").expect("create database");
    pg
}

pub fn config(pg: &PgCluster, extra: &str) -> PostgresSourceConfig {
    let text = format!("url = \"{}\"\nstatus_interval_ms = 100\n{extra}", pg.url("app"));
    toml::from_str(&text).expect("source config")
}

pub fn open_log(dir: &std::path::Path) -> Arc<dyn Log> {
    let o = LogOptions {
        fsync: FsyncPolicy::Never,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    Arc::new(EmbeddedLog::open(dir.join("log"), o).expect("open log"))
}

/// A source running on its own thread until dropped.
pub struct Running {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), SourceError>>>,
    pub source: Arc<PostgresSource>,
}

impl Running {
    pub fn start(
        name: &str,
        cfg: PostgresSourceConfig,
        log: Arc<dyn Log>,
        dir: &std::path::Path,
    ) -> Running {
        let opts = SourceOptions {
            state_dir: dir.join("sources").join(name),
            partitions: 2,
            progress: false,
        };
        let source = Arc::new(PostgresSource::new(name, cfg, log, opts).expect("source"));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (source, stop) = (Arc::clone(&source), Arc::clone(&stop));
            std::thread::spawn(move || source.run(&stop))
        };
        Running { stop, handle: Some(handle), source }
    }

    /// Waits until the source streams (its slot exists, so later changes are captured).
    pub fn wait_streaming(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = self.source.status.lock().expect("status").clone();
            if st.state == "streaming" {
                return;
            }
            assert!(Instant::now() < deadline, "the source is not streaming: {st:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the source and returns how it ended.
    pub fn stop(mut self) -> Result<(), SourceError> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().map_or(Ok(()), |h| h.join().expect("source thread"))
    }

    /// Waits for the source to stop on its own (a fatal error).
    pub fn wait_failure(mut self, timeout: Duration) -> SourceError {
        let deadline = Instant::now() + timeout;
        let h = self.handle.take().expect("running");
        while !h.is_finished() {
            assert!(Instant::now() < deadline, "the source did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        h.join().expect("source thread").expect_err("the source should have failed")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One record of a topic, with key and value parsed as JSON (`Value::Null` for a tombstone).
#[derive(Debug, Clone)]
pub struct Event {
    pub partition: u32,
    pub offset: u64,
    pub key: Value,
    pub value: Value,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Every record of every partition of `topic`, partition by partition.
pub fn read_topic(log: &dyn Log, topic: &str) -> Vec<Event> {
    let Ok(d) = log.describe_topic(topic) else { return Vec::new() };
    let mut out = Vec::new();
    for p in &d.partitions {
        let mut r = log.reader(topic, p.partition, StartAt::Beginning).expect("reader");
        loop {
            // Durable records are there at once in the embedded log; a Kafka reader fetches
            // (and records past an end reported short come with the last batch).
            let wait = if r.position() < p.durable_offset {
                Duration::from_secs(10)
            } else {
                Duration::ZERO
            };
            let got = r.poll(10_000, wait).expect("poll");
            if got.is_empty() {
                break;
            }
            for rec in got {
                let parse = |b: Option<Vec<u8>>| {
                    b.map_or(Value::Null, |b| serde_json::from_slice(&b).expect("JSON"))
                };
                out.push(Event {
                    partition: rec.partition,
                    offset: rec.offset,
                    key: parse(rec.key),
                    value: parse(rec.value),
                    headers: rec.headers,
                });
            }
        }
    }
    out
}

/// Waits until `cond` holds over the topic's events.
pub fn wait_for(
    log: &dyn Log,
    topic: &str,
    what: &str,
    cond: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = read_topic(log, topic);
        if cond(&events) {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} in {topic}; have {events:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The current state of a table, folded from its change events: key → `after` image.
pub fn fold(events: &[Event]) -> std::collections::BTreeMap<String, Value> {
    let mut by_partition: Vec<&Event> = events.iter().collect();
    by_partition.sort_by_key(|e| (e.partition, e.offset));
    // key → (partition, row): a TRUNCATE is written to every partition and empties its own.
    let mut state = std::collections::BTreeMap::new();
    for e in by_partition {
        if e.value.is_null() {
            continue; // tombstone
        }
        let key = e.key.to_string();
        match e.value["op"].as_str() {
            Some("c" | "u" | "r") => {
                state.insert(key, (e.partition, e.value["after"].clone()));
            }
            Some("d") => {
                state.remove(&key);
            }
            Some("t") => state.retain(|_, (p, _)| *p != e.partition),
            _ => {}
        }
    }
    state.into_iter().map(|(k, (_, v))| (k, v)).collect()
}
