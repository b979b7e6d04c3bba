//! `sink_search`: documents/s the `search` sink indexes from a view topic (read from the log,
//! versions checked, committed per batch), against writing the same documents straight into
//! a fresh index in one batch, in the same run.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions, Record, StoredRecord, TopicConfig};
use polylog_sinks::search::{SearchIndex, SearchIndexes, SearchWriter};
use polylog_sinks::{Item, Sink, SinkConfig, Writer};

use crate::{Opts, ScratchDir};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

const WORDS: [&str; 12] = [
    "cats", "rust", "cooking", "travel", "chess", "guitar", "robots", "space", "coffee", "garden",
    "jazz", "sailing",
];

fn document(i: u64) -> (String, String) {
    let w = |k: u64| WORDS[((i * 7 + k * 13) % 12) as usize];
    (
        format!(r#"{{"id":{i}}}"#),
        format!(
            r#"{{"id":{i},"title":"{} and {} part {}","duration_s":{},"publisher":{{"id":{},"name":"publisher {}","country":"fr"}},"tags":[{{"position":0,"tag":{{"id":1,"label":"{}"}}}},{{"position":1,"tag":{{"id":2,"label":"{}"}}}}],"_version":{}}}"#,
            w(1),
            w(2),
            i % 9,
            60 + i % 3600,
            i % 500,
            i % 500,
            w(3),
            w(4),
            1000 + i
        ),
    )
}

pub fn run(opts: &Opts) -> Result<(), String> {
    let n: u64 = opts.get("documents", if opts.quick { 50_000 } else { 500_000 })?;
    println!("sink_search: {n} video documents into the embedded search index");
    let scratch = ScratchDir::new(opts, "sink-search")?;
    let o = LogOptions {
        fsync: FsyncPolicy::Always,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(scratch.0.join("log"), o).map_err(err)?);
    log.create_topic("views.videos", &TopicConfig::new(1).compacted()).map_err(err)?;
    let mut batch = Vec::new();
    for i in 0..n {
        let (k, v) = document(i);
        batch.push(Record::new(k, v));
        if batch.len() == 5000 {
            log.append("views.videos", 0, &batch).map_err(err)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        log.append("views.videos", 0, &batch).map_err(err)?;
    }

    let cfg: SinkConfig =
        toml::from_str("kind = \"search\"\ntopic = \"views.videos\"").map_err(err)?;
    let sink = Sink::new("videos", cfg, Arc::clone(&log))
        .map_err(err)?
        .with_search(scratch.0.join("search"), SearchIndexes::default());
    let started = Instant::now();
    sink.run(&AtomicBool::new(false), true).map_err(err)?;
    let polylog_secs = started.elapsed().as_secs_f64();
    let indexed = sink.search_index().map_err(err)?.len();
    if indexed != n {
        return Err(format!("the index holds {indexed} documents, expected {n}"));
    }

    // The baseline: the same documents written straight into a fresh index, one commit.
    let items: Vec<Item> = (0..n)
        .map(|i| {
            let (k, v) = document(i);
            let record = StoredRecord {
                partition: 0,
                offset: i,
                timestamp_ms: 0,
                key: Some(k.into_bytes()),
                value: Some(v.into_bytes()),
                headers: Vec::new(),
            };
            Item { topic: "views.videos".into(), record }
        })
        .collect();
    let index = Arc::new(SearchIndex::open("baseline", &scratch.0.join("baseline")).map_err(err)?);
    let mut writer = SearchWriter::new(Arc::clone(&index));
    let started = Instant::now();
    writer.write(&items).map_err(err)?;
    let baseline_secs = started.elapsed().as_secs_f64();
    let (p, b) = (n as f64 / polylog_secs, n as f64 / baseline_secs);
    println!(
        "  polylog: {polylog_secs:.2} s from the log, in batches of 5000 (a commit each); straight into an index in one batch: {baseline_secs:.2} s"
    );
    println!("RESULT sink_search polylog={p:.0}docs/s baseline={b:.0}docs/s ratio={:.2}", p / b);
    Ok(())
}
