//! Compaction against a model: a map of the latest record per key.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use polylog_log::{
    now_ms, EmbeddedLog, Log, LogOptions, Record, StartAt, StoredRecord, TopicConfig,
};

use crate::support::{opts, read_all, Rng, TempDir};

const GRACE_MS: u64 = 60_000;

/// Base offset of the active segment, from the documented file names.
fn active_base(root: &std::path::Path) -> u64 {
    let dir = root.join("topics").join("c").join("0");
    std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .max()
        .expect("a segment")
}

/// Checks the compacted partition against every record ever written (`history`, by offset).
/// `fully_compacted`: compaction has run to completion since the last append.
fn check(
    log: &EmbeddedLog,
    root: &std::path::Path,
    history: &[Record],
    fully_compacted: bool,
    ctx: &str,
) {
    let got = read_all(log, "c", 0, StartAt::Beginning);
    let now = now_ms();
    // Every record read is exactly the one written at its offset, in order.
    let mut last = None;
    for r in &got {
        assert!(last < Some(r.offset), "{ctx}: offsets not increasing at {}", r.offset);
        last = Some(r.offset);
        let w = &history[r.offset as usize];
        assert_eq!(
            (&r.key, &r.value, r.timestamp_ms),
            (&w.key, &w.value, w.timestamp_ms.unwrap_or(-1)),
            "{ctx}: record {} changed",
            r.offset
        );
    }
    // The model: the latest record per key.
    let mut latest: BTreeMap<&[u8], usize> = BTreeMap::new();
    for (o, w) in history.iter().enumerate() {
        latest.insert(w.key.as_deref().unwrap_or_default(), o);
    }
    let present: HashSet<u64> = got.iter().map(|r| r.offset).collect();
    let expired =
        |w: &Record| w.value.is_none() && w.timestamp_ms.unwrap_or(0) < now - GRACE_MS as i64;
    for (&key, &o) in &latest {
        let w = &history[o];
        if !expired(w) {
            assert!(
                present.contains(&(o as u64)),
                "{ctx}: latest record of key {key:?} at offset {o} is gone"
            );
        }
    }
    assert_eq!(
        log.describe_topic("c").expect("describe").partitions[0].end_offset,
        history.len() as u64
    );
    if fully_compacted {
        // Below the active segment, nothing superseded and no expired tombstone remains.
        let active = active_base(root);
        let mut latest_sealed: BTreeMap<&[u8], u64> = BTreeMap::new();
        for (o, w) in history.iter().enumerate().take(active as usize) {
            latest_sealed.insert(w.key.as_deref().unwrap_or_default(), o as u64);
        }
        for r in got.iter().filter(|r| r.offset < active) {
            let key = r.key.as_deref().unwrap_or_default();
            assert_eq!(
                latest_sealed[key], r.offset,
                "{ctx}: superseded record {} of {key:?} kept",
                r.offset
            );
            assert!(
                !expired(&history[r.offset as usize]),
                "{ctx}: expired tombstone {} kept",
                r.offset
            );
        }
    }
}

#[test]
fn compaction_keeps_the_latest_record_per_key() {
    let mut rng = Rng::from_env("compaction");
    for round in 0..6 {
        let root = TempDir::new("compaction");
        // Small key maps force several passes; large ones finish in one.
        let keys_max = [4usize, 1_000_000, 64, 1_000_000, 16, 1_000_000][round];
        let o = LogOptions { compaction_keys_max: keys_max, ..opts() };
        let cfg = TopicConfig {
            segment_bytes: 4096,
            tombstone_retention_ms: GRACE_MS,
            ..TopicConfig::new(1).compacted()
        };
        let mut log = EmbeddedLog::open(root.path(), o.clone()).expect("open");
        log.create_topic("c", &cfg).expect("create");
        let mut history: Vec<Record> = Vec::new();
        let key_space = 1 + rng.below(40);
        for step in 0..150 {
            let ctx = format!("round {round} step {step} (keys_max {keys_max})");
            match rng.below(10) {
                0..=7 => {
                    let batch: Vec<Record> = (0..1 + rng.below(10))
                        .map(|_| {
                            let key = format!("key-{}", rng.below(key_space)).into_bytes();
                            let tombstone = rng.chance(15);
                            let old = rng.chance(50);
                            Record {
                                key: Some(key),
                                value: (!tombstone).then(|| rng.bytes_below(120)),
                                headers: Vec::new(),
                                timestamp_ms: Some(if old {
                                    now_ms() - 3_600_000
                                } else {
                                    now_ms()
                                }),
                            }
                        })
                        .collect();
                    log.append("c", 0, &batch).expect("append");
                    history.extend(batch);
                }
                8 => {
                    log.maintain_now().expect("compact");
                    check(&log, root.path(), &history, true, &ctx);
                }
                _ => {
                    log.maintain_now().expect("compact");
                    drop(log);
                    log = EmbeddedLog::open(root.path(), o.clone()).expect("reopen");
                    check(&log, root.path(), &history, false, &ctx);
                }
            }
        }
    }
}

#[test]
fn compaction_runs_beside_writers_and_readers() {
    let root = TempDir::new("compaction-concurrent");
    let o = LogOptions { maintenance_interval_ms: 5, ..opts() };
    let log = Arc::new(EmbeddedLog::open(root.path(), o).expect("open"));
    let cfg = TopicConfig { segment_bytes: 4096, ..TopicConfig::new(1).compacted() };
    log.create_topic("c", &cfg).expect("create");
    const N: u64 = 20_000;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let log = Arc::clone(&log);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut r = log.reader("c", 0, StartAt::Beginning).expect("reader");
            let mut seen: Vec<StoredRecord> = Vec::new();
            while r.position() < N && !done.load(Ordering::SeqCst) {
                seen.extend(
                    r.poll(500, Duration::from_millis(100)).expect("poll during compaction"),
                );
            }
            seen
        })
    };
    for i in 0..N {
        let rec = Record::new(format!("k{}", i % 100), format!("{i}"));
        log.append("c", 0, &[rec]).expect("append");
    }
    let seen = reader.join().expect("reader thread");
    done.store(true, Ordering::SeqCst);
    // The reader saw a subsequence of what was written, in order, ending with the latest value
    // of every key.
    for w in seen.windows(2) {
        assert!(w[0].offset < w[1].offset);
    }
    for r in &seen {
        assert_eq!(r.value.as_deref(), Some(r.offset.to_string().as_bytes()));
    }
    let tail: HashSet<u64> = seen.iter().map(|r| r.offset).collect();
    for o in N - 100..N {
        assert!(tail.contains(&o), "latest value at offset {o} missed");
    }
    let before = log.describe_topic("c").expect("describe").partitions[0].size_bytes;
    log.maintain_now().expect("compact");
    let after = log.describe_topic("c").expect("describe").partitions[0].clone();
    assert!(after.size_bytes <= before);
    let all = read_all(&*log, "c", 0, StartAt::Beginning);
    assert!(all.len() < 1000, "compaction shrank the topic: {} records left", all.len());
}
