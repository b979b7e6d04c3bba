//! Fuzzes the event collector's request handling, `polylog_events::Collector::ingest`, over a
//! real embedded log, and the event checker `polylog_events::RawEvent::parse` directly.
//!
//! Input: byte 0 picks how the rest is posted: `mode % 3 == 0` as is, `1` as a body that claims
//! to be gzip (arbitrary bytes for the decompressor), `2` gzip-compressed by this harness (so the
//! decompressed JSON is arbitrary too).
//!
//! Properties:
//! - nothing panics;
//! - the answer is 200, 400 or 413 (503 only when the log refuses the events); 413 only for a
//!   body over `body_max` or more than `events_max` events;
//! - an answer that counts events (`{"accepted": n, "rejected": [...]}`) counts every item of the
//!   body exactly once: accepted + rejected = the number of events posted, each rejection names
//!   an item by its index (ascending) with a reason; the status is 200 exactly when something
//!   was accepted, and exactly that many records were appended to the topic;
//! - `RawEvent::parse` of any JSON value either refuses it or returns an event that obeys the
//!   documented rules (required fields present, `ts` within a day ahead and 31 days back,
//!   viewability samples complete, numbers in range, strings at most 2,048 bytes).
//!
//! `POLYLOG_FUZZ_VERBOSE=1` prints each answer, e.g. when running the target on one input.
//!
//! The log and the collector (with its anonymization keys) live in a scratch directory (under
//! /dev/shm when it exists) created once per process; it is started afresh when it grows.

#![no_main]

mod scratch;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use polylog_events::model::{EventKind, STRING_MAX};
use polylog_events::{Collector, CollectorOptions, RawEvent};
use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions};
use serde_json::Value;

/// A fixed "now", so that an input always gets the same answer.
const NOW: i64 = 1_795_680_000_000;
const TOPIC: &str = "events.viewability";
const BODY_MAX: usize = 256 * 1024;
const EVENTS_MAX: usize = 100;
/// Size of the log at which it is thrown away and started again.
const LOG_BYTES_MAX: u64 = 64 << 20;

struct State {
    dir: PathBuf,
    log: Arc<dyn Log>,
    collector: Collector,
}

impl State {
    fn new(dir: PathBuf) -> State {
        let _ = std::fs::remove_dir_all(&dir);
        let o = LogOptions {
            fsync: FsyncPolicy::Never,
            maintenance_interval_ms: 0,
            ..LogOptions::default()
        };
        let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.join("log"), o).expect("log"));
        let mut opts = CollectorOptions::new(TOPIC);
        opts.body_max = BODY_MAX;
        opts.events_max = EVENTS_MAX;
        opts.site_categories.insert("example.com".into(), "news".into());
        let collector =
            Collector::new(opts, Arc::clone(&log), &dir.join("keys")).expect("collector");
        State { dir, log, collector }
    }

    /// Records in the topic, and its size in bytes.
    fn stored(&self) -> (u64, u64) {
        let d = self.log.describe_topic(TOPIC).expect("the topic");
        d.partitions.iter().fold((0, 0), |(n, b), p| (n + p.end_offset, b + p.size_bytes))
    }
}

/// `POLYLOG_FUZZ_VERBOSE=1` prints every answer (to look at what an input does).
fn verbose() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var_os("POLYLOG_FUZZ_VERBOSE").is_some_and(|v| v != "0"))
}

fn state() -> &'static Mutex<State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(State::new(scratch::scratch_root("events"))))
}

/// How many events the collector must find in a (decompressed) body that is within limits:
/// the items of a JSON array, or the non-blank lines of NDJSON. `None` if an array does not
/// parse (the whole request is refused then).
fn items(plain: &[u8]) -> Option<usize> {
    let trimmed = plain.trim_ascii_start();
    if trimmed.first() == Some(&b'[') {
        serde_json::from_slice::<Vec<Value>>(trimmed).ok().map(|v| v.len())
    } else {
        Some(trimmed.split(|&b| b == b'\n').filter(|l| !l.trim_ascii().is_empty()).count())
    }
}

/// Checks what `RawEvent::parse` accepted against the documented rules.
fn check_event(v: &Value) {
    let Ok(e) = RawEvent::parse(v, NOW) else { return };
    let obj = v.as_object().expect("only objects are events");
    assert!(obj.contains_key("type") && obj.contains_key("ts"), "{v}");
    assert!(e.ts_ms <= NOW + 24 * 3600 * 1000, "ts {} in the future: {v}", e.ts_ms);
    assert!(e.ts_ms >= NOW - 31 * 24 * 3600 * 1000, "ts {} too old: {v}", e.ts_ms);
    for (name, s) in [
        ("impression_id", &e.impression_id),
        ("campaign_id", &e.campaign_id),
        ("site_domain", &e.site_domain),
    ] {
        assert!(!s.is_empty() && s.len() <= STRING_MAX, "`{name}` {s:?} accepted: {v}");
    }
    assert_eq!(e.site_domain, e.site_domain.to_ascii_lowercase());
    for s in
        [&e.creative_id, &e.placement_id, &e.page_url, &e.ip, &e.user_agent, &e.user_id, &e.ad_size]
            .into_iter()
            .flatten()
    {
        assert!(s.len() <= STRING_MAX, "a string of {} bytes accepted: {v}", s.len());
    }
    if let Some(p) = e.in_view_pct {
        assert!((0.0..=100.0).contains(&p), "in_view_pct {p}: {v}");
    }
    if let Some(ms) = e.in_view_ms {
        assert!(ms <= 86_400_000, "in_view_ms {ms}: {v}");
    }
    if e.kind == EventKind::Viewability {
        assert!(e.ad_format.is_some() && e.in_view_pct.is_some() && e.in_view_ms.is_some(), "{v}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (body, gzip) = match mode % 3 {
        0 => (rest.to_vec(), false),
        1 => (rest.to_vec(), true),
        _ => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(rest).expect("compress");
            (enc.finish().expect("compress"), true)
        }
    };
    // What the collector sees once decompressed (None: it does not decompress).
    let plain: Option<Vec<u8>> = if gzip {
        let mut out = Vec::new();
        let mut d = flate2::read::GzDecoder::new(&body[..]).take(BODY_MAX as u64 + 1);
        d.read_to_end(&mut out).ok().map(|_| out)
    } else {
        Some(body.clone())
    };

    // The checker on its own, on every JSON value in the body.
    if let Some(p) = &plain {
        if let Ok(v) = serde_json::from_slice::<Value>(p) {
            check_event(&v);
            if let Value::Array(items) = &v {
                items.iter().for_each(check_event);
            }
        }
        for line in p.split(|&b| b == b'\n') {
            if let Ok(v) = serde_json::from_slice::<Value>(line) {
                check_event(&v);
            }
        }
    }

    let mut st = state().lock().unwrap_or_else(|e| e.into_inner());
    if st.stored().1 > LOG_BYTES_MAX {
        let dir = st.dir.clone();
        *st = State::new(dir);
    }
    let (before, _) = st.stored();
    let answer = st.collector.ingest(&body, gzip, NOW);
    let (after, _) = st.stored();
    let a = &answer.body;
    if verbose() {
        eprintln!("{} {a}", answer.status);
    }
    let error = a["error"].as_str().unwrap_or_default();
    match answer.status {
        200 | 400 => {}
        413 => {
            let too_big =
                body.len() > BODY_MAX || plain.as_ref().is_some_and(|p| p.len() > BODY_MAX);
            let too_many = plain.as_deref().and_then(items).is_some_and(|n| n > EVENTS_MAX);
            assert!(too_big || too_many, "413 for a body within limits: {a}");
        }
        503 => assert!(
            error.starts_with("the log refused") || error.starts_with("the events are not durable"),
            "503 without the log refusing: {a}"
        ),
        s => panic!("status {s}: {a}"),
    }
    if answer.status == 400 || answer.status == 413 {
        // Refused or nothing accepted: nothing stored.
        assert_eq!(after, before, "records stored for a {} answer: {a}", answer.status);
    }
    if a.get("accepted").is_some() {
        let accepted = a["accepted"].as_u64().expect("accepted is a count");
        let rejected = a["rejected"].as_array().expect("rejected is a list");
        let n = plain.as_deref().and_then(items).expect("a counted body has items");
        assert_eq!(accepted as usize + rejected.len(), n, "items miscounted: {a}");
        assert_eq!(answer.status == 200, accepted > 0, "status {} for {a}", answer.status);
        assert_eq!(after - before, accepted, "records stored differ from accepted: {a}");
        let mut last = None;
        for r in rejected {
            let i = r["index"].as_u64().expect("a rejection names its index");
            assert!((i as usize) < n && last.is_none_or(|l| l < i), "index {i}: {a}");
            assert!(r["reason"].as_str().is_some_and(|s| !s.is_empty()), "no reason: {a}");
            last = Some(i);
        }
    } else {
        assert!(!error.is_empty(), "an answer that neither counts nor says why: {a}");
        assert_ne!(answer.status, 200, "200 without counts: {a}");
    }
});
