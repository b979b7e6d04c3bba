//! The search sink: documents indexed by key, newer versions winning, tombstones removing.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions, Record, TopicConfig};
use polylog_sinks::search::SearchIndexes;
use polylog_sinks::{Sink, SinkConfig, StartFrom};
use polylog_testkit::TempDir;

fn doc(id: u64, title: &str, publisher: &str, version: u64) -> Record {
    Record::new(
        format!("{{\"id\":{id}}}"),
        format!("{{\"id\":{id},\"title\":\"{title}\",\"publisher\":{{\"name\":\"{publisher}\"}},\"_version\":{version}}}"),
    )
}

#[test]
fn documents_are_searchable_by_field_and_key_and_replays_change_nothing() {
    let dir = TempDir::new("sink-search");
    let o = LogOptions {
        fsync: FsyncPolicy::Never,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.path().join("log"), o).expect("log"));
    log.create_topic("views.videos", &TopicConfig::new(1).compacted()).expect("topic");
    log.append(
        "views.videos",
        0,
        &[
            doc(1, "learning rust", "acme", 10),
            doc(2, "cooking pasta", "acme", 11),
            doc(3, "rust for cooks", "globex", 12),
            doc(2, "cooking risotto", "acme", 20),
            // An older document of 3 arriving late does not replace the newer one.
            doc(3, "stale title", "globex", 5),
            Record::tombstone("{\"id\":1}"),
        ],
    )
    .expect("append");
    let cfg: SinkConfig =
        toml::from_str("kind = \"search\"\ntopic = \"views.videos\"").expect("config");
    let indexes = SearchIndexes::default();
    let sink = Sink::new("videos", cfg.clone(), Arc::clone(&log))
        .expect("sink")
        .with_search(dir.path().join("search"), Arc::clone(&indexes));
    sink.run(&AtomicBool::new(false), true).expect("indexes");
    let ix = sink.search_index().expect("index");
    assert_eq!(ix.len(), 2, "document 1 was deleted");
    let hits = ix.search("title:rust", 10).expect("search");
    assert_eq!(hits["total"], 1);
    assert_eq!(hits["hits"][0]["doc"]["title"], "rust for cooks");
    let hits = ix.search("publisher.name:acme", 10).expect("search");
    assert_eq!(hits["hits"][0]["doc"]["title"], "cooking risotto");
    assert_eq!(hits["hits"][0]["version"], 20);
    let got = ix.get("{\"id\":3}").expect("get").expect("document 3");
    assert_eq!(got["doc"]["title"], "rust for cooks");
    assert!(ix.get("{\"id\":1}").expect("get").is_none());
    assert!(ix.search("title:(", 10).is_err(), "a bad query is an error, not a crash");

    // Replaying the whole topic leaves the index as it is.
    sink.reset(StartFrom::Beginning).expect("reset");
    sink.run(&AtomicBool::new(false), true).expect("replays");
    assert_eq!(ix.len(), 2);
    assert_eq!(ix.get("{\"id\":3}").expect("get").expect("3")["doc"]["title"], "rust for cooks");
}
