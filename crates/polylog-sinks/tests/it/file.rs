//! The file sink: JSON lines per topic, rotated by size, picked up where it stopped.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions, Record, TopicConfig};
use polylog_sinks::{Sink, SinkConfig};
use polylog_testkit::TempDir;

#[test]
fn records_become_json_lines_in_rotated_files() {
    let dir = TempDir::new("sink-file");
    let o = LogOptions {
        fsync: FsyncPolicy::Never,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.path().join("log"), o).expect("log"));
    log.create_topic("events", &TopicConfig::new(2)).expect("topic");
    log.create_topic("other", &TopicConfig::new(1)).expect("topic");
    let append = |from: u32, to: u32| {
        for i in from..to {
            let r = Record::new(
                format!("k{i}"),
                format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(100)),
            );
            log.append("events", i % 2, &[r]).expect("append");
        }
        log.append("events", 0, &[Record::tombstone("k0")]).expect("tombstone");
    };
    append(0, 100);
    let out = dir.path().join("out");
    let text = format!(
        "kind = \"file\"\ntopics = [\"ev*\"]\npath = \"{}\"\nmax_bytes = 4096",
        out.display()
    );
    let cfg: SinkConfig = toml::from_str(&text).expect("config");
    let sink = Sink::new("f", cfg.clone(), Arc::clone(&log)).expect("sink");
    sink.run(&AtomicBool::new(false), true).expect("writes");
    append(100, 150);
    let again = Sink::new("f", cfg, Arc::clone(&log)).expect("sink");
    again.run(&AtomicBool::new(false), true).expect("writes the rest");
    let mut files: Vec<_> =
        std::fs::read_dir(&out).expect("out dir").map(|e| e.expect("entry").path()).collect();
    files.sort();
    assert!(files.len() > 3, "rotated into several files: {files:?}");
    assert!(files
        .iter()
        .all(|f| f.file_name().is_some_and(|n| n.to_string_lossy().starts_with("events."))));
    let mut ns = Vec::new();
    let mut tombstones = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read");
        assert!(text.len() <= 4096 + 300, "{f:?} is {} bytes", text.len());
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            assert_eq!(v["topic"], "events");
            match v["value"]["n"].as_u64() {
                Some(n) => ns.push(n),
                None => tombstones += 1,
            }
        }
    }
    ns.sort_unstable();
    assert_eq!(ns, (0..150).collect::<Vec<u64>>(), "every record once");
    assert_eq!(tombstones, 2);
}
