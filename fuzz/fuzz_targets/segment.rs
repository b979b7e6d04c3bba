//! Fuzzes the embedded log's recovery scan and segment reader through the public API, the way a
//! crash or a bad disk damages a segment file.
//!
//! Once per process a real log is written (a topic `t` of one partition, a few batches of
//! records with keys, tombstones, headers and timestamps) and its files are kept in memory. Each
//! input restores those files into a scratch data directory, damages the segment file
//! (`topics/t/0/00000000000000000000.log`), reopens the log (the recovery scan), and reads every
//! record from the beginning up to the durable offset.
//!
//! Input: byte 0 is the mode, bytes 1..3 a position (u16, little-endian), the rest the payload.
//! - mode % 4 == 0: overwrite the segment at `position % (len + 1)` with the payload;
//! - mode % 4 == 1: append the payload after the last batch (garbage after the end);
//! - mode % 4 == 2: truncate the segment at `position % (len + 1)`, then append the payload;
//! - mode % 4 == 3: truncate at a batch boundary (`position % (batches + 1)`) and append the
//!   payload framed as a batch with a correct length and CRC32C, so that the checks behind the
//!   checksum (header, record layout) see arbitrary bytes too. With mode & 4 the payload's first
//!   10 bytes are also set to a plausible header start (the expected base offset, magic 1,
//!   attributes 0).
//!
//! Properties (what the log documents and its recovery tests check):
//! - opening a damaged partition succeeds: recovery keeps the longest valid prefix;
//! - reading the recovered partition from the beginning to the durable offset never fails: only
//!   batches that pass their checks are kept, and no other is served;
//! - every record of a batch that ends before the damage reads back exactly as written, at its
//!   offset, before anything else; offsets read are strictly ascending and below the durable
//!   offset;
//! - the recovered log takes a new record at its end offset and, reopened, reads back the same
//!   records plus that one.
//!
//! `POLYLOG_FUZZ_VERBOSE=1` prints what each input did. Nothing may panic. The scratch directory (under /dev/shm when it exists) is reused for every
//! input of a process.

#![no_main]

mod scratch;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use polylog_log::{
    EmbeddedLog, FsyncPolicy, Log, LogOptions, Record, StartAt, StoredRecord, TopicConfig,
};

const TOPIC: &str = "t";
const SEGMENT: &str = "topics/t/0/00000000000000000000.log";

/// The pristine log and what is known about it.
struct Template {
    /// Every file of the data directory: path relative to it, contents.
    files: Vec<(PathBuf, Vec<u8>)>,
    /// The segment file's bytes.
    segment: Vec<u8>,
    /// Batches of the segment: (end byte, offset after the batch).
    batches: Vec<(usize, u64)>,
    /// Every record, by offset.
    records: Vec<StoredRecord>,
    /// The scratch data directory reused for every input.
    work: PathBuf,
}

fn opts() -> LogOptions {
    LogOptions { fsync: FsyncPolicy::Never, maintenance_interval_ms: 0, ..LogOptions::default() }
}

fn read_tree(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).expect("list the template") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            read_tree(root, &p, out);
        } else {
            let rel = p.strip_prefix(root).expect("under the root").to_path_buf();
            out.push((rel, std::fs::read(&p).expect("read a template file")));
        }
    }
}

/// Every record from the beginning to the durable offset; `Err` names what failed.
fn read_all(log: &EmbeddedLog) -> Result<Vec<StoredRecord>, String> {
    let end = log.durable_offset(TOPIC, 0).map_err(|e| format!("durable offset: {e}"))?;
    let mut r = log.reader(TOPIC, 0, StartAt::Beginning).map_err(|e| format!("reader: {e}"))?;
    let mut out: Vec<StoredRecord> = Vec::new();
    while r.position() < end {
        let got = r.poll(1000, Duration::ZERO).map_err(|e| format!("poll: {e}"))?;
        if got.is_empty() {
            break;
        }
        out.extend(got);
    }
    Ok(out)
}

fn template() -> &'static Mutex<Template> {
    static T: OnceLock<Mutex<Template>> = OnceLock::new();
    T.get_or_init(|| {
        let root = scratch::scratch_root("segment");
        let dir = root.join("template");
        {
            let log = EmbeddedLog::open(&dir, opts()).expect("open the template log");
            log.create_topic(TOPIC, &TopicConfig::new(1)).expect("create the topic");
            let mut ts = 1_700_000_000_000i64;
            for b in 0..6u8 {
                let batch: Vec<Record> = (0..1 + b % 3)
                    .map(|i| {
                        ts += 17 * i64::from(b) - 20;
                        Record {
                            key: (i != 1).then(|| format!("key-{b}-{i}").into_bytes()),
                            value: (b != 3).then(|| vec![b ^ i; usize::from(b) * 9 + 1]),
                            headers: (0..i).map(|h| (format!("h{h}"), vec![h; 3])).collect(),
                            timestamp_ms: Some(ts),
                        }
                    })
                    .collect();
                log.append(TOPIC, 0, &batch).expect("append");
            }
        }
        let log = EmbeddedLog::open(&dir, opts()).expect("reopen the template log");
        let records = read_all(&log).expect("read the template");
        drop(log);
        let mut files = Vec::new();
        read_tree(&dir, &dir, &mut files);
        let segment = std::fs::read(dir.join(SEGMENT)).expect("the segment file");
        // Walk the batches by the documented layout: CRC, len, base offset, magic, attributes,
        // last offset delta, ...
        let mut batches = Vec::new();
        let mut pos = 0;
        while pos < segment.len() {
            let le32 = |at: usize| u32::from_le_bytes(segment[at..at + 4].try_into().expect("4"));
            let len = le32(pos + 4) as usize;
            let base = u64::from_le_bytes(segment[pos + 8..pos + 16].try_into().expect("8"));
            let last_offset_delta = le32(pos + 18);
            pos += 8 + len;
            batches.push((pos, base + u64::from(last_offset_delta) + 1));
        }
        assert_eq!(records.last().map(|r| r.offset + 1), batches.last().map(|b| b.1));
        let work = root.join("work");
        Mutex::new(Template { files, segment, batches, records, work })
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (mode, at, payload) =
        (data[0], usize::from(u16::from_le_bytes([data[1], data[2]])), &data[3..]);
    let t = template().lock().unwrap_or_else(|e| e.into_inner());

    // The damaged segment, and the byte where the damage starts.
    let mut seg = t.segment.clone();
    let len = seg.len();
    let damage = match mode % 4 {
        0 => {
            let at = at % (len + 1);
            if seg.len() < at + payload.len() {
                seg.resize(at + payload.len(), 0);
            }
            seg[at..at + payload.len()].copy_from_slice(payload);
            if payload.is_empty() {
                len
            } else {
                at
            }
        }
        1 => {
            seg.extend_from_slice(payload);
            len
        }
        2 => {
            let at = at % (len + 1);
            seg.truncate(at);
            seg.extend_from_slice(payload);
            at
        }
        _ => {
            let k = at % (t.batches.len() + 1);
            let (cut, next) = if k == 0 { (0, 0) } else { t.batches[k - 1] };
            seg.truncate(cut);
            let mut body = payload.to_vec();
            if mode & 4 != 0 && body.len() >= 10 {
                body[..8].copy_from_slice(&next.to_le_bytes());
                body[8] = 1;
                body[9] = 0;
            }
            let mut framed = (body.len() as u32).to_le_bytes().to_vec();
            framed.extend_from_slice(&body);
            seg.extend_from_slice(&crc32c::crc32c(&framed).to_le_bytes());
            seg.extend_from_slice(&framed);
            cut
        }
    };
    // Records of batches that end before the damage are kept.
    let kept_end = t.batches.iter().take_while(|b| b.0 <= damage).last().map_or(0, |b| b.1);
    let kept: Vec<&StoredRecord> = t.records.iter().filter(|r| r.offset < kept_end).collect();

    // Restore the pristine data directory with the damaged segment.
    let work = &t.work;
    let _ = std::fs::remove_dir_all(work);
    for (rel, bytes) in &t.files {
        let p = work.join(rel);
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("create a directory");
        std::fs::write(&p, if rel == Path::new(SEGMENT) { &seg } else { bytes })
            .expect("write a file");
    }

    let log = EmbeddedLog::open(work, opts())
        .unwrap_or_else(|e| panic!("opening a log whose segment is damaged at byte {damage}: {e}"));
    let got = read_all(&log).unwrap_or_else(|e| panic!("reading the recovered log: {e}"));
    let durable = log.durable_offset(TOPIC, 0).expect("durable offset");
    if std::env::var_os("POLYLOG_FUZZ_VERBOSE").is_some_and(|v| v != "0") {
        eprintln!(
            "mode {} damage at byte {damage}: {} records kept of {}, {} read, durable offset {durable}",
            mode % 4,
            kept.len(),
            t.records.len(),
            got.len()
        );
    }
    let d = log.describe_topic(TOPIC).expect("describe").partitions[0].clone();
    assert_eq!(d.durable_offset, durable);
    assert!(d.end_offset >= kept_end, "end offset {} below the kept {kept_end}", d.end_offset);
    assert!(got.len() >= kept.len(), "{} records read, {} kept", got.len(), kept.len());
    for (g, k) in got.iter().zip(&kept) {
        assert_eq!(&g, k, "a record written before the damage at byte {damage} differs");
    }
    for w in got.windows(2) {
        assert!(w[0].offset < w[1].offset, "offsets {} then {}", w[0].offset, w[1].offset);
    }
    if let Some(last) = got.last() {
        assert!(last.offset < durable, "record {} at or past the durable {durable}", last.offset);
    }

    // The recovered log takes new records at its end, and keeps them.
    let after =
        Record { timestamp_ms: Some(1_800_000_000_000), ..Record::new("after", "recovery") };
    let a = log.append(TOPIC, 0, &[after]).unwrap_or_else(|e| panic!("append after recovery: {e}"));
    assert_eq!(a.base_offset, d.end_offset, "the first record after recovery");
    drop(log);
    let log = EmbeddedLog::open(work, opts()).unwrap_or_else(|e| panic!("reopening: {e}"));
    let again = read_all(&log).unwrap_or_else(|e| panic!("reading after reopening: {e}"));
    assert_eq!(again.len(), got.len() + 1, "records after reopening");
    assert_eq!(&again[..got.len()], &got[..], "records changed by reopening");
    let last = again.last().expect("the appended record");
    assert_eq!((last.offset, last.value.as_deref()), (d.end_offset, Some(&b"recovery"[..])));
});
