//! Recovery oracle: damage a partition the ways a crash or a bad disk does — truncation at any
//! byte, garbage after the end, single bit flips in the active segment and in the index files —
//! and check that opening it recovers exactly the longest valid prefix, never panics, and never
//! serves a corrupt record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use polylog_log::{Log, Record, StartAt, StoredRecord, TopicConfig};

use crate::support::{open, read_all, Rng, TempDir};

/// Cases per kind of damage; four kinds.
const CASES_PER_KIND: usize = 2600;
const TEMPLATES: usize = 8;

/// A pristine partition and what is known about it.
struct Template {
    files: BTreeMap<String, Vec<u8>>,
    active: String,
    sealed_indexes: Vec<String>,
    /// Every record, by offset.
    records: Vec<StoredRecord>,
    /// Batches of the active segment: (start byte, end byte, next offset after it).
    active_batches: Vec<(usize, usize, u64)>,
    active_base: u64,
}

fn part_dir(root: &Path) -> PathBuf {
    root.join("topics").join("t").join("0")
}

fn build_template(rng: &mut Rng, root: &Path) -> Template {
    {
        let log = open(root);
        log.create_topic("t", &TopicConfig { segment_bytes: 16 * 1024, ..TopicConfig::new(1) })
            .expect("create");
        let mut ts = 1_700_000_000_000i64;
        while log.describe_topic("t").expect("describe").partitions[0].segments < 3
            || rng.chance(97)
        {
            let batch: Vec<Record> = (0..1 + rng.below(6))
                .map(|_| {
                    ts += rng.below(1000) as i64 - 100;
                    Record {
                        key: rng.chance(90).then(|| rng.bytes_below(21)),
                        value: rng.chance(90).then(|| rng.bytes_below(300)),
                        headers: (0..rng.below(3))
                            .map(|i| (format!("h{i}"), rng.bytes_below(8)))
                            .collect(),
                        timestamp_ms: Some(ts),
                    }
                })
                .collect();
            log.append("t", 0, &batch).expect("append");
        }
    }
    let log = open(root);
    let records = read_all(&log, "t", 0, StartAt::Beginning);
    drop(log);
    let dir = part_dir(root);
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(&dir).expect("list") {
        let p = e.expect("entry").path();
        let name = p.file_name().and_then(|n| n.to_str()).expect("name").to_string();
        files.insert(name, std::fs::read(&p).expect("read"));
    }
    let active = files.keys().filter(|n| n.ends_with(".log")).max().expect("segments").clone();
    let active_base: u64 = active.trim_end_matches(".log").parse().expect("base");
    let sealed_indexes = files
        .keys()
        .filter(|n| n.ends_with("index") && !n.starts_with(&active[..20]))
        .cloned()
        .collect();
    // Walk the pristine active segment by the documented batch layout.
    let bytes = &files[&active];
    let mut active_batches = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let len = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("len")) as usize;
        let base = u64::from_le_bytes(bytes[pos + 8..pos + 16].try_into().expect("base"));
        let delta = u32::from_le_bytes(bytes[pos + 18..pos + 22].try_into().expect("delta"));
        active_batches.push((pos, pos + 8 + len, base + u64::from(delta) + 1));
        pos += 8 + len;
    }
    Template { files, active, sealed_indexes, records, active_batches, active_base }
}

fn restore(t: &Template, dir: &Path) {
    for e in std::fs::read_dir(dir).expect("list") {
        std::fs::remove_file(e.expect("entry").path()).expect("remove");
    }
    for (name, bytes) in &t.files {
        std::fs::write(dir.join(name), bytes).expect("write");
    }
}

/// Opens the damaged partition and checks it holds exactly `expected_end` worth of records.
fn check(t: &Template, root: &Path, expected_end: u64, case: &str, deep: bool, rng: &mut Rng) {
    let log = open(root);
    let got = read_all(&log, "t", 0, StartAt::Beginning);
    let want: Vec<&StoredRecord> = t.records.iter().filter(|r| r.offset < expected_end).collect();
    assert_eq!(got.len(), want.len(), "{case}: record count");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(&g, w, "{case}: record differs");
    }
    let d = &log.describe_topic("t").expect("describe").partitions[0];
    assert_eq!(d.end_offset, expected_end, "{case}: end offset");
    if deep {
        // Seeks by offset and by time land where a full scan says they should.
        for _ in 0..4 {
            let i = rng.below(want.len() as u64) as usize;
            let from = read_all(&log, "t", 0, StartAt::Offset(want[i].offset));
            assert_eq!(from.first().map(|r| r.offset), Some(want[i].offset), "{case}: seek");
            let ts = want[i].timestamp_ms;
            let first = want.iter().find(|r| r.timestamp_ms >= ts).map(|r| r.offset);
            let by_time = read_all(&log, "t", 0, StartAt::Timestamp(ts));
            assert_eq!(by_time.first().map(|r| r.offset), first, "{case}: time seek");
        }
        // The recovered log takes new records at the right offset, and keeps them.
        let a = log.append("t", 0, &[Record::new("after", "recovery")]).expect("append");
        assert_eq!(a.base_offset, expected_end, "{case}: next offset");
        drop(log);
        let log = open(root);
        let again = read_all(&log, "t", 0, StartAt::Beginning);
        assert_eq!(again.len(), want.len() + 1, "{case}: after reopen");
    }
}

#[test]
fn recovery_keeps_exactly_the_longest_valid_prefix() {
    let mut rng = Rng::from_env("recovery");
    let mut cases = 0;
    for template in 0..TEMPLATES {
        let root = TempDir::new("recovery");
        let t = build_template(&mut rng, root.path());
        let dir = part_dir(root.path());
        let active_len = t.files[&t.active].len();
        let all_end = t.records.last().map_or(0, |r| r.offset + 1);
        let end_at_byte = |cut: usize| {
            let kept = t.active_batches.iter().take_while(|b| b.1 <= cut).last();
            kept.map_or(t.active_base, |b| b.2)
        };
        let per_template = CASES_PER_KIND / TEMPLATES + 1;
        for i in 0..per_template {
            let deep = i % 16 == 0;
            // 1. Truncation at any byte of the active segment.
            restore(&t, &dir);
            let cut = rng.below(active_len as u64 + 1) as usize;
            std::fs::write(dir.join(&t.active), &t.files[&t.active][..cut]).expect("truncate");
            check(
                &t,
                root.path(),
                end_at_byte(cut),
                &format!("t{template} truncate at {cut}"),
                deep,
                &mut rng,
            );

            // 2. Garbage after the end: random bytes, or a copy of a real batch's start.
            restore(&t, &dir);
            let mut bytes = t.files[&t.active].clone();
            if rng.chance(50) {
                let n = 1 + rng.below(400) as usize;
                bytes.extend(rng.bytes(n));
            } else if let Some(&(s, e, _)) = t.active_batches.last() {
                let copy = bytes[s..e].to_vec();
                bytes.extend_from_slice(&copy[..rng.below(copy.len() as u64) as usize]);
            }
            std::fs::write(dir.join(&t.active), &bytes).expect("append garbage");
            check(&t, root.path(), all_end, &format!("t{template} garbage"), deep, &mut rng);

            // 3. A single bit flip in the active segment.
            restore(&t, &dir);
            let mut bytes = t.files[&t.active].clone();
            if !bytes.is_empty() {
                let bit = rng.below(bytes.len() as u64 * 8) as usize;
                bytes[bit / 8] ^= 1 << (bit % 8);
                std::fs::write(dir.join(&t.active), &bytes).expect("flip");
                check(
                    &t,
                    root.path(),
                    end_at_byte(bit / 8),
                    &format!("t{template} flip bit {bit}"),
                    deep,
                    &mut rng,
                );
            }

            // 4. A single bit flip in a sealed segment's offset or time index: nothing is
            // lost, lookups stay right, and the index is rebuilt to what it was.
            restore(&t, &dir);
            let name = &t.sealed_indexes[rng.below(t.sealed_indexes.len() as u64) as usize];
            let mut bytes = t.files[name].clone();
            let bit = rng.below(bytes.len() as u64 * 8) as usize;
            bytes[bit / 8] ^= 1 << (bit % 8);
            std::fs::write(dir.join(name), &bytes).expect("flip");
            let case = format!("t{template} flip bit {bit} of {name}");
            check(&t, root.path(), all_end, &case, true, &mut rng);
            // Look up every sealed segment by offset and by time, so each index is consulted.
            let log = open(root.path());
            let bases: Vec<u64> = t
                .files
                .keys()
                .filter(|n| n.ends_with(".log"))
                .map(|n| n[..20].parse().expect("base"))
                .collect();
            for w in bases.windows(2) {
                let in_segment = t.records.iter().filter(|r| r.offset >= w[0] && r.offset < w[1]);
                let Some(max_ts) = in_segment.map(|r| r.timestamp_ms).max() else { continue };
                read_all(&log, "t", 0, StartAt::Offset(w[0] + 1));
                read_all(&log, "t", 0, StartAt::Timestamp(max_ts));
            }
            drop(log);
            let rebuilt = std::fs::read(dir.join(name)).expect("index exists");
            assert!(rebuilt == t.files[name], "{case}: index not rebuilt to its original content");
            cases += 4;
        }
    }
    assert!(cases >= 10_000, "ran {cases} cases");
}
