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

/// Makes every sealed segment look last written two hours ago (past the tombstone grace).
/// Returns the offset below which every record is in such a segment.
fn age_sealed_segments(root: &std::path::Path) -> u64 {
    let dir = root.join("topics").join("c").join("0");
    let active = active_base(root);
    let old = std::time::SystemTime::now() - Duration::from_secs(7200);
    for e in std::fs::read_dir(dir).expect("list") {
        let path = e.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let Some(base) = name.strip_suffix(".log").and_then(|b| b.parse::<u64>().ok()) else {
            continue;
        };
        if base < active {
            let f = std::fs::File::options().write(true).open(&path).expect("open segment");
            f.set_modified(old).expect("set mtime");
        }
    }
    active
}

/// Checks the compacted partition against every record ever written (`history`, by offset).
/// `fully_compacted`: compaction has run to completion since the last append. Tombstones below
/// `aged_below` sit in segments older than the grace period.
fn check(
    log: &EmbeddedLog,
    root: &std::path::Path,
    history: &[Record],
    fully_compacted: bool,
    aged_below: u64,
    ctx: &str,
) {
    let got = read_all(log, "c", 0, StartAt::Beginning);
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
    // Record timestamps do not matter (half are two hours old, like a backfill's): only the age
    // of the segment a tombstone sits in does.
    let expired = |o: u64| history[o as usize].value.is_none() && o < aged_below;
    for (&key, &o) in &latest {
        if !expired(o as u64) {
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
            assert!(!expired(r.offset), "{ctx}: expired tombstone {} kept", r.offset);
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
        let mut aged_below = 0;
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
                    if rng.chance(50) {
                        aged_below = aged_below.max(age_sealed_segments(root.path()));
                    }
                    log.maintain_now().expect("compact");
                    check(&log, root.path(), &history, true, aged_below, &ctx);
                }
                _ => {
                    log.maintain_now().expect("compact");
                    drop(log);
                    log = EmbeddedLog::open(root.path(), o.clone()).expect("reopen");
                    check(&log, root.path(), &history, false, aged_below, &ctx);
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

#[test]
fn a_reader_in_a_segment_that_rolls_and_is_compacted_misses_nothing() {
    let root = TempDir::new("compaction-reader");
    let log = EmbeddedLog::open(root.path(), opts()).expect("open");
    let cfg = TopicConfig { segment_bytes: 4096, ..TopicConfig::new(1).compacted() };
    log.create_topic("c", &cfg).expect("create");
    let mut history = Vec::new();
    let mut append = |i: u64| {
        // Keys 20..40 are never updated: they survive compaction of the first segment, behind
        // records that do not.
        let key = if (20..40).contains(&i) { format!("u{i}") } else { format!("k{}", i % 10) };
        let r = Record::new(key, format!("value {i:>60}"));
        log.append("c", 0, std::slice::from_ref(&r)).expect("append");
        history.push(r);
    };
    append(0);
    // The reader opens the first segment while it is still the active one.
    let mut reader = log.reader("c", 0, StartAt::Beginning).expect("reader");
    let first = reader.poll(1, Duration::ZERO).expect("poll");
    assert_eq!(first.len(), 1);
    // The segment fills, rolls, and compaction shrinks it under the reader.
    for i in 1..400 {
        append(i);
    }
    let report = log.maintain_now().expect("compact");
    assert!(report.compaction.records_removed > 0);
    let mut seen = first;
    loop {
        let got = reader.poll(7, Duration::ZERO).expect("poll after compaction");
        if got.is_empty() {
            break;
        }
        seen.extend(got);
    }
    for w in seen.windows(2) {
        assert!(w[0].offset < w[1].offset, "offsets increase");
    }
    for r in &seen {
        assert_eq!(r.value, history[r.offset as usize].value, "record {} is as written", r.offset);
    }
    let offsets: HashSet<u64> = seen.iter().map(|r| r.offset).collect();
    for o in (20..40).chain(390..400) {
        assert!(offsets.contains(&o), "latest value of a key (offset {o}) was skipped");
    }
}
