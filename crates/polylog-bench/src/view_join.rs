//! `view_join`: input changes/s through a three-table view (videos, each with its publisher and
//! its tags), fed from topics written the way the CDC source writes them, against the naive
//! approach in the same run: for each change, asking Postgres (holding the same tables, indexed)
//! for the affected documents with the equivalent SQL.
//!
//! The view first backfills from snapshot records of every row (reported, not the figure), then
//! the measured part: a backlog of transactions of row changes, applied until every document is
//! current. State is kept larger than the view's cache, and the peak memory is reported.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use polylog_log::{
    partition_for_key, EmbeddedLog, FsyncPolicy, Log, LogOptions, Record, TopicConfig,
};
use polylog_postgres::event::Position;
use polylog_postgres::wire::{ConnectParams, Connection};
use polylog_testkit::{PgCluster, Rng};
use polylog_views::{View, ViewConfig, ViewOptions};

use crate::{Opts, ScratchDir};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

const VIEW: &str = r#"
root = "app.public.videos"
joins = [
  { name = "publisher", topic = "app.public.publishers", on = { publisher_id = "id" }, kind = "one" },
  { name = "tags", topic = "app.public.tags", on = { id = "video_id" }, kind = "many", fields = ["label"] },
]
"#;

const PARTITIONS: u32 = 2;
const TAGS_PER_VIDEO: u64 = 2;

struct Shape {
    videos: u64,
    publishers: u64,
}

impl Shape {
    fn video(&self, id: u64, title: &str, publisher: u64) -> String {
        format!(
            r#"{{"id":{id},"title":"{title}","publisher_id":{publisher},"views":{}}}"#,
            id * 7 % 1000
        )
    }
    fn publisher_of(&self, id: u64) -> u64 {
        id % self.publishers + 1
    }
}

/// One row change: table, key, row (`None`: deleted).
struct Change {
    table: &'static str,
    key: String,
    row: Option<String>,
}

fn changes(shape: &Shape, n: u64) -> Vec<Change> {
    // Seeded: the same changes for Polylog and the baseline.
    let mut rng = Rng::new(7);
    let tags = shape.videos * TAGS_PER_VIDEO;
    (0..n)
        .map(|i| match rng.below(1000) {
            // A video's title or publisher.
            0..=599 => {
                let id = rng.below(shape.videos) + 1;
                let publisher = if rng.below(10) == 0 {
                    rng.below(shape.publishers) + 1
                } else {
                    shape.publisher_of(id)
                };
                Change {
                    table: "videos",
                    key: format!(r#"{{"id":{id}}}"#),
                    row: Some(shape.video(id, &format!("v{id}-{i}"), publisher)),
                }
            }
            // A tag relabelled, added or removed.
            600..=989 => {
                let id = rng.below(tags + n / 10) + 1;
                let video = (id - 1) / TAGS_PER_VIDEO % shape.videos + 1;
                let row = (rng.below(5) != 0).then(|| {
                    format!(r#"{{"id":{id},"video_id":{video},"label":"l{}"}}"#, rng.below(100))
                });
                Change { table: "tags", key: format!(r#"{{"id":{id}}}"#), row }
            }
            // A publisher renamed: every one of its videos changes.
            _ => {
                let id = rng.below(shape.publishers) + 1;
                Change {
                    table: "publishers",
                    key: format!(r#"{{"id":{id}}}"#),
                    row: Some(format!(r#"{{"id":{id},"name":"p{id}-{i}"}}"#)),
                }
            }
        })
        .collect()
}

/// Appends records in batches per partition.
struct Writer {
    log: Arc<dyn Log>,
    pending: BTreeMap<(String, u32), Vec<Record>>,
    n: usize,
}

impl Writer {
    fn push(&mut self, topic: &str, record: Record) -> Result<(), String> {
        let p = record.key.as_deref().map_or(0, |k| partition_for_key(k, PARTITIONS));
        let p = if topic.ends_with(".transaction") { 0 } else { p };
        self.pending.entry((topic.to_string(), p)).or_default().push(record);
        self.n += 1;
        if self.n >= 5000 {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), String> {
        for ((topic, p), batch) in &mut self.pending {
            if !batch.is_empty() {
                self.log.append(topic, *p, batch).map_err(err)?;
                batch.clear();
            }
        }
        self.n = 0;
        Ok(())
    }
}

fn envelope(op: &str, after: Option<&str>, lsn: u64) -> Vec<u8> {
    format!(
        r#"{{"before":null,"after":{},"op":"{op}","ts_ms":0,"source":{{"connector":"postgresql","name":"app","db":"app","schema":"public","table":"t","lsn":{lsn},"txId":null,"ts_ms":0,"snapshot":"{}"}}}}"#,
        after.unwrap_or("null"),
        if op == "r" { "true" } else { "false" }
    )
    .into_bytes()
}

fn run_view(
    view: &Arc<View>,
    done: impl Fn(&polylog_views::ViewStatus) -> bool,
) -> Result<f64, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handle = {
        let (view, stop) = (Arc::clone(view), Arc::clone(&stop));
        std::thread::spawn(move || view.run(&stop))
    };
    let secs = loop {
        let st = view.status.lock().map_err(err)?.clone();
        if done(&st) {
            break started.elapsed().as_secs_f64();
        }
        if handle.is_finished() {
            return Err(format!("the view stopped: {:?}", st.last_error));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    stop.store(true, Ordering::SeqCst);
    handle.join().map_err(|_| "view thread panicked".to_string())?.map_err(err)?;
    Ok(secs)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn run(opts: &Opts) -> Result<(), String> {
    let videos: u64 = opts.get("videos", if opts.quick { 50_000 } else { 1_000_000 })?;
    let n: u64 = opts.get("changes", if opts.quick { 50_000 } else { 1_000_000 })?;
    let sample: u64 = opts.get("baseline-changes", if opts.quick { 2_000 } else { 20_000 })?;
    let shape = Shape { videos, publishers: (videos / 100).max(1) };
    println!(
        "view_join: videos ({videos}) with their publisher ({}) and tags ({}); {n} changes",
        shape.publishers,
        videos * TAGS_PER_VIDEO
    );
    let scratch = ScratchDir::new(opts, "view-join")?;
    let o = LogOptions {
        fsync: FsyncPolicy::Always,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(scratch.0.join("log"), o).map_err(err)?);
    for t in ["videos", "publishers", "tags"] {
        log.create_topic(&format!("app.public.{t}"), &TopicConfig::new(PARTITIONS)).map_err(err)?;
    }
    log.create_topic("app.transaction", &TopicConfig::new(1)).map_err(err)?;
    let mut w = Writer { log: Arc::clone(&log), pending: BTreeMap::new(), n: 0 };

    // The snapshot: every row as a read.
    for id in 1..=shape.publishers {
        let row = format!(r#"{{"id":{id},"name":"p{id}"}}"#);
        w.push(
            "app.public.publishers",
            Record::new(format!(r#"{{"id":{id}}}"#), envelope("r", Some(&row), 1)),
        )?;
    }
    for id in 1..=videos {
        let row = shape.video(id, &format!("v{id}"), shape.publisher_of(id));
        w.push(
            "app.public.videos",
            Record::new(format!(r#"{{"id":{id}}}"#), envelope("r", Some(&row), 1)),
        )?;
    }
    for id in 1..=videos * TAGS_PER_VIDEO {
        let row = format!(
            r#"{{"id":{id},"video_id":{},"label":"l{}"}}"#,
            (id - 1) / TAGS_PER_VIDEO + 1,
            id % 100
        );
        w.push(
            "app.public.tags",
            Record::new(format!(r#"{{"id":{id}}}"#), envelope("r", Some(&row), 1)),
        )?;
    }
    w.flush()?;
    let snapshot_rows = shape.publishers + videos + videos * TAGS_PER_VIDEO;
    let mut cfg: ViewConfig = toml::from_str(VIEW).map_err(err)?;
    cfg.cache_mb = opts.get("cache-mb", 64)?;
    let state_dir = scratch.0.join("view");
    let mut vo = ViewOptions::new(state_dir.clone());
    vo.checkpoint_interval = Duration::from_millis(opts.get("checkpoint-ms", 500)?);
    let view = Arc::new(View::new("videos", &cfg, Arc::clone(&log), vo).map_err(err)?);
    println!("  backfilling the view from {snapshot_rows} snapshot rows ...");
    let backfill = run_view(&view, |st| st.changes >= snapshot_rows && st.documents >= videos)?;
    println!("  backfill: {backfill:.1} s ({:.0} rows/s)", snapshot_rows as f64 / backfill);

    // The backlog: transactions of ten changes, as the source writes them.
    let all = changes(&shape, n);
    for (t, tx) in all.chunks(10).enumerate() {
        let commit = 1_000_000 + t as u64 * 100;
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for (i, c) in tx.iter().enumerate() {
            let pos = Position { commit_lsn: commit, change_lsn: commit + i as u64, sub: 0 };
            let (op, value) = match &c.row {
                Some(r) => ("u", envelope("u", Some(r), commit)),
                None => ("d", envelope("d", None, commit)),
            };
            let mut r = Record::new(c.key.clone(), value);
            r.headers.push(pos.to_header());
            let topic = format!("app.public.{}", c.table);
            w.push(&topic, r)?;
            if op == "d" {
                let mut t = Record::tombstone(c.key.clone());
                t.headers.push(pos.to_header());
                w.push(&topic, t)?;
            }
            *counts.entry(c.table).or_default() += 1;
        }
        let collections: Vec<String> = counts
            .iter()
            .map(|(t, n)| format!(r#"{{"data_collection":"public.{t}","event_count":{n}}}"#))
            .collect();
        let end = format!(
            r#"{{"status":"END","id":"1:{commit}","event_count":{},"data_collections":[{}]}}"#,
            tx.len(),
            collections.join(",")
        );
        let mut r = Record::new(format!(r#"{{"id":"1:{commit}"}}"#), end);
        r.headers.push(Position { commit_lsn: commit, change_lsn: u64::MAX, sub: 0 }.to_header());
        w.push("app.transaction", r)?;
    }
    w.flush()?;
    let mut vo = ViewOptions::new(state_dir.clone());
    vo.checkpoint_interval = Duration::from_millis(opts.get("checkpoint-ms", 500)?);
    let view = Arc::new(View::new("videos", &cfg, Arc::clone(&log), vo).map_err(err)?);
    let transactions = all.len().div_ceil(10) as u64;
    let polylog_secs = run_view(&view, |st| st.transactions >= transactions)?;
    let st = view.status.lock().map_err(err)?.clone();
    let state_mib =
        std::fs::metadata(state_dir.join("state.redb")).map_or(0, |m| m.len()) as f64 / 1048576.0;
    let peak = peak_rss_mib();
    println!(
        "  polylog: {n} changes in {polylog_secs:.2} s ({} transactions, {} documents emitted); state {state_mib:.0} MiB with a {} MiB cache; peak RSS {peak:.0} MiB",
        st.transactions, st.documents, cfg.cache_mb
    );

    // The baseline: the same tables in Postgres; for each change, the affected documents.
    println!("  loading the same tables into Postgres ...");
    let pg = PgCluster::start().map_err(err)?;
    pg.create_database("bench").map_err(err)?;
    pg.psql(
        "bench",
        &format!(
            "CREATE TABLE publishers (id int PRIMARY KEY, name text);
             CREATE TABLE videos (id int PRIMARY KEY, title text, publisher_id int, views int);
             CREATE TABLE tags (id int PRIMARY KEY, video_id int, label text);
             INSERT INTO publishers SELECT g, 'p' || g FROM generate_series(1, {p}) g;
             INSERT INTO videos SELECT g, 'v' || g, g % {p} + 1, g * 7 % 1000 FROM generate_series(1, {videos}) g;
             INSERT INTO tags SELECT g, (g - 1) / {TAGS_PER_VIDEO} + 1, 'l' || (g % 100) FROM generate_series(1, {tags}) g;
             CREATE INDEX ON videos (publisher_id);
             CREATE INDEX ON tags (video_id);",
            p = shape.publishers,
            tags = videos * TAGS_PER_VIDEO
        ),
    )
    .map_err(err)?;
    pg.psql("bench", "VACUUM ANALYZE").map_err(err)?;
    let mut conn =
        Connection::connect(&ConnectParams::parse(&pg.url("bench")).map_err(err)?, false)
            .map_err(err)?;
    let doc_sql = |filter: &str| {
        format!(
            "SELECT v.id, jsonb_build_object('id', v.id, 'title', v.title, 'publisher_id', v.publisher_id, 'views', v.views,
               'publisher', (SELECT jsonb_build_object('id', p.id, 'name', p.name) FROM publishers p WHERE p.id = v.publisher_id),
               'tags', COALESCE((SELECT jsonb_agg(jsonb_build_object('label', t.label) ORDER BY t.id) FROM tags t WHERE t.video_id = v.id), '[]'))
             FROM videos v WHERE {filter}"
        )
    };
    let started = Instant::now();
    let mut docs = 0;
    for c in all.iter().take(sample as usize) {
        let id: u64 =
            c.key.trim_start_matches(r#"{"id":"#).trim_end_matches('}').parse().map_err(err)?;
        let filter = match c.table {
            "videos" => format!("v.id = {id}"),
            "publishers" => format!("v.publisher_id = {id}"),
            _ => format!("v.id = (SELECT video_id FROM tags WHERE id = {id})"),
        };
        docs += conn.query(&doc_sql(&filter)).map_err(err)?.len();
    }
    let baseline_secs = started.elapsed().as_secs_f64();
    let (p, b) = (n as f64 / polylog_secs, sample as f64 / baseline_secs);
    println!("  naive: {sample} changes in {baseline_secs:.2} s, {docs} documents queried");
    println!(
        "RESULT view_join polylog={p:.0}changes/s baseline={b:.0}changes/s ratio={:.2}",
        p / b
    );
    Ok(())
}
