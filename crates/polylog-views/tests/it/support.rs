//! Helpers: logs, views on threads, synthetic change events, reading documents.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions, Record, StartAt, TopicConfig};
use polylog_postgres::event::Position;
use polylog_views::{View, ViewConfig, ViewError, ViewOptions};
use serde_json::{json, Value};

pub use polylog_testkit::{Rng, TempDir};

pub fn open_log(dir: &std::path::Path) -> Arc<dyn Log> {
    let o = LogOptions {
        fsync: FsyncPolicy::Never,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    Arc::new(EmbeddedLog::open(dir.join("log"), o).expect("open log"))
}

pub fn view_config(text: &str) -> ViewConfig {
    toml::from_str(text).expect("view config")
}

/// A view running on its own thread until stopped or dropped.
pub struct RunningView {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), ViewError>>>,
    pub view: Arc<View>,
}

impl RunningView {
    pub fn start(
        name: &str,
        cfg: &ViewConfig,
        log: Arc<dyn Log>,
        dir: &std::path::Path,
    ) -> RunningView {
        let mut opts = ViewOptions::new(dir.join("views").join(name));
        opts.checkpoint_interval = Duration::from_millis(50);
        let view = Arc::new(View::new(name, cfg, log, opts).expect("a valid view"));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (view, stop) = (Arc::clone(&view), Arc::clone(&stop));
            std::thread::spawn(move || view.run(&stop))
        };
        RunningView { stop, handle: Some(handle), view }
    }

    /// Waits until the view has applied everything its topics hold (its lag, refreshed at
    /// least every second, stays at zero with nothing applied in between).
    pub fn wait_caught_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut quiet_since: Option<(Instant, u64)> = None;
        loop {
            let st = self.view.status.lock().expect("status").clone();
            assert!(st.state != "failed", "the view failed: {:?}", st.last_error);
            let quiet = st.state == "running" && st.lag == 0;
            match quiet_since {
                Some((at, changes)) if quiet && changes == st.changes => {
                    if at.elapsed() > Duration::from_millis(1200) {
                        return;
                    }
                }
                _ => quiet_since = quiet.then(|| (Instant::now(), st.changes)),
            }
            assert!(Instant::now() < deadline, "the view did not catch up: {st:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(mut self) -> Result<(), ViewError> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().map_or(Ok(()), |h| h.join().expect("view thread"))
    }

    /// Waits for the view to stop on its own (an error).
    pub fn wait_failure(mut self) -> ViewError {
        let deadline = Instant::now() + Duration::from_secs(30);
        let h = self.handle.take().expect("running");
        while !h.is_finished() {
            assert!(Instant::now() < deadline, "the view did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        h.join().expect("view thread").expect_err("the view should have failed")
    }
}

impl Drop for RunningView {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Writes change events the way the Postgres source does: each transaction's changes in the
/// table topics with their positions, then BEGIN/END in `<prefix>.transaction`.
pub struct FakeSource {
    pub log: Arc<dyn Log>,
    pub prefix: String,
    pub partitions: u32,
    lsn: u64,
}

/// One row change: table (`public.videos`), key, and the row after it (`None`: deleted).
pub type RowChange = (&'static str, Value, Option<Value>);

impl FakeSource {
    pub fn new(log: Arc<dyn Log>, prefix: &str, tables: &[&str], partitions: u32) -> FakeSource {
        let _ = log.create_topic(&format!("{prefix}.transaction"), &TopicConfig::new(1));
        FakeSource::without_transaction_topic(log, prefix, tables, partitions)
    }

    /// The table topics only (`commit` fails until `<prefix>.transaction` exists).
    pub fn without_transaction_topic(
        log: Arc<dyn Log>,
        prefix: &str,
        tables: &[&str],
        partitions: u32,
    ) -> FakeSource {
        for t in tables {
            let _ = log.create_topic(&format!("{prefix}.{t}"), &TopicConfig::new(partitions));
        }
        FakeSource { log, prefix: prefix.to_string(), partitions, lsn: 1000 }
    }

    /// Over topics that exist already (a cluster that does not create topics on request).
    pub fn existing(log: Arc<dyn Log>, prefix: &str, partitions: u32) -> FakeSource {
        FakeSource { log, prefix: prefix.to_string(), partitions, lsn: 1000 }
    }

    /// The records of one transaction, by topic and partition, and its END record.
    pub fn transaction(
        &mut self,
        changes: &[RowChange],
    ) -> (BTreeMap<(String, u32), Vec<Record>>, Record) {
        self.lsn += 1000;
        let commit = self.lsn;
        let mut by_partition: BTreeMap<(String, u32), Vec<Record>> = BTreeMap::new();
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for (i, (table, key, after)) in changes.iter().enumerate() {
            let pos = Position { commit_lsn: commit, change_lsn: commit - 500 + i as u64, sub: 0 };
            let (op, before) = if after.is_some() { ("u", Value::Null) } else { ("d", json!({})) };
            let value = json!({"before": before, "after": after, "op": op, "ts_ms": 0,
                "source": {"connector": "postgresql", "lsn": commit}});
            let key_bytes = serde_json::to_vec(key).expect("json");
            let p = polylog_log::partition_for_key(&key_bytes, self.partitions);
            let mut r = Record::new(key_bytes.clone(), serde_json::to_vec(&value).expect("json"));
            r.headers.push(pos.to_header());
            let q = by_partition.entry((format!("{}.{table}", self.prefix), p)).or_default();
            q.push(r);
            if after.is_none() {
                let mut t = Record::tombstone(key_bytes);
                t.headers.push(pos.to_header());
                q.push(t);
            }
            *counts.entry(table).or_default() += 1;
        }
        let collections: Vec<Value> =
            counts.iter().map(|(t, n)| json!({"data_collection": t, "event_count": n})).collect();
        let end = json!({"status": "END", "id": format!("7:{commit}"), "event_count": changes.len(), "data_collections": collections});
        let mut end = Record::new(
            serde_json::to_vec(&json!({"id": format!("7:{commit}")})).expect("json"),
            serde_json::to_vec(&end).expect("json"),
        );
        end.headers.push(Position { commit_lsn: commit, change_lsn: u64::MAX, sub: 0 }.to_header());
        (by_partition, end)
    }

    /// Writes a whole transaction: changes first, END last.
    pub fn commit(&mut self, changes: &[RowChange]) -> u64 {
        let (records, end) = self.transaction(changes);
        for ((topic, p), batch) in records {
            self.log.append(&topic, p, &batch).expect("append");
        }
        self.log.append(&format!("{}.transaction", self.prefix), 0, &[end]).expect("append END");
        self.lsn
    }
}

/// The latest document per key of a view's output (tombstones remove keys), and how many
/// records the topic holds.
pub fn documents(log: &dyn Log, topic: &str) -> (BTreeMap<String, Value>, usize) {
    let mut docs = BTreeMap::new();
    let mut n = 0;
    let d = log.describe_topic(topic).expect("output topic");
    for p in 0..d.partitions.len() as u32 {
        let end = log.durable_offset(topic, p).expect("offset");
        let mut r = log.reader(topic, p, StartAt::Beginning).expect("reader");
        loop {
            // Records past an end reported short (tansu) come with the last batch.
            let wait = if r.position() < end { Duration::from_millis(100) } else { Duration::ZERO };
            let got = r.poll(1000, wait).expect("poll");
            if got.is_empty() && r.position() >= end {
                break;
            }
            for rec in got {
                n += 1;
                let key =
                    String::from_utf8_lossy(rec.key.as_deref().unwrap_or_default()).into_owned();
                match rec.value {
                    Some(v) => {
                        docs.insert(key, serde_json::from_slice(&v).expect("a JSON document"))
                    }
                    None => docs.remove(&key),
                };
            }
        }
    }
    (docs, n)
}

/// Polls `f` until it returns `Some`, failing after `secs`.
pub fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Postgres CDC source on its own thread (two partitions per table topic).
pub struct RunningSource {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), polylog_postgres::SourceError>>>,
    pub source: Arc<polylog_postgres::PostgresSource>,
}

impl RunningSource {
    pub fn start(
        pg: &polylog_testkit::PgCluster,
        db: &str,
        log: Arc<dyn Log>,
        dir: &std::path::Path,
    ) -> RunningSource {
        let text = format!("url = \"{}\"\nstatus_interval_ms = 50\nheartbeat_interval_ms = 200\ntopic_prefix = \"app\"", pg.url(db));
        let cfg: polylog_postgres::PostgresSourceConfig =
            toml::from_str(&text).expect("source config");
        let opts = polylog_postgres::SourceOptions {
            state_dir: dir.join("sources").join("app"),
            partitions: 2,
            progress: false,
        };
        let source =
            Arc::new(polylog_postgres::PostgresSource::new("app", cfg, log, opts).expect("source"));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (source, stop) = (Arc::clone(&source), Arc::clone(&stop));
            std::thread::spawn(move || source.run(&stop))
        };
        RunningSource { stop, handle: Some(handle), source }
    }

    /// Waits until everything Postgres wrote up to now is stored in the log.
    pub fn wait_flushed(&self, pg: &polylog_testkit::PgCluster, db: &str) {
        let now = pg.psql(db, "SELECT pg_current_wal_lsn()").expect("lsn");
        let target = polylog_postgres::pgoutput::parse_lsn(&now).expect("an LSN");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let st = self.source.status.lock().expect("status").clone();
            assert!(st.state != "failed", "the source failed: {:?}", st.last_error);
            let flushed = st.flushed_lsn.as_deref().and_then(polylog_postgres::pgoutput::parse_lsn);
            if st.state == "streaming" && flushed >= Some(target) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the source to store everything up to {now}: {st:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunningSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
