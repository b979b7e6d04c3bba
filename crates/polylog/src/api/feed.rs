//! `GET /v1/changes`: the live change feed, as Server-Sent Events.
//!
//! Each record of the followed topics becomes one event `change` whose data is
//! `{"topic", "partition", "offset", "timestamp_ms", "key", "op", "table", "before", "after"}`:
//! for a change event of a source, its operation (`c`, `u`, `d`, `r` for snapshot reads, `t`)
//! and table (`schema.table`); for other records (a view's documents) `op` is `u`, or `d` for a
//! tombstone, and `after` is the value.
//!
//! Parameters: `topic` (comma-separated `*` patterns; by default the sources' table topics and
//! the views' outputs), `table` (`schema.table` or `table`), `key` (the key as JSON, or one of
//! its fields' values), `op` (comma-separated), `from` (`end`, the default: only what comes
//! next; `beginning`; or a number N: the last N records of each partition first). New topics
//! that match are followed as they appear. A comment line goes out every 15 s so that proxies
//! keep the connection; a client that stops reading for 10 s is dropped.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use polylog_log::{LogReader, StartAt, StoredRecord};
use polylog_postgres::config::glob_match;
use serde_json::{json, Value};

use super::{bytes_json, error, Api, Reply, Request};

/// Change feeds served at once (each holds a connection and a reader per partition).
const FEEDS_MAX: usize = 16;
const KEEPALIVE: Duration = Duration::from_secs(15);
const RESCAN: Duration = Duration::from_secs(2);

struct Filter {
    topics: Vec<String>,
    /// Topics left out although a pattern matches (the sources' transaction and schema topics
    /// when following the default topics).
    skip: Vec<String>,
    table: Option<String>,
    key: Option<String>,
    ops: Vec<String>,
}

#[derive(Clone, Copy)]
enum From {
    Beginning,
    End,
    Last(u64),
}

/// Decrements the feed count however the feed ends.
struct FeedSlot<'a>(&'a Api);

impl Drop for FeedSlot<'_> {
    fn drop(&mut self) {
        self.0.feeds.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn handle(api: &Api, req: &Request, _: &[String], stream: &TcpStream) -> Reply {
    let list = |k: &str| -> Vec<String> {
        req.param(k)
            .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    };
    let (mut topics, mut skip) = (list("topic"), Vec::new());
    if topics.is_empty() {
        topics = api.feed_topics.clone();
        skip = api.feed_skip.clone();
    }
    let filter = Filter {
        topics,
        skip,
        table: req.param("table").filter(|t| !t.is_empty()),
        key: req.param("key").filter(|k| !k.is_empty()),
        ops: list("op"),
    };
    if let Some(bad) = filter.ops.iter().find(|o| !["c", "u", "d", "r", "t"].contains(&o.as_str()))
    {
        return error(400, format!("op {bad:?}: the operations are c, u, d, r and t"));
    }
    let from = match req.param("from").as_deref() {
        None | Some("end") => From::End,
        Some("beginning") => From::Beginning,
        Some(n) => match n.parse() {
            Ok(n) => From::Last(n),
            Err(_) => return error(400, "from must be end, beginning or a number of records"),
        },
    };
    if api.feeds.fetch_add(1, Ordering::SeqCst) >= FEEDS_MAX {
        api.feeds.fetch_sub(1, Ordering::SeqCst);
        return error(503, format!("{FEEDS_MAX} change feeds are open already"));
    }
    let _slot = FeedSlot(api);
    let _ = follow(api, &filter, from, stream);
    Reply::Streamed
}

/// Streams until the client goes away or the process stops.
fn follow(api: &Api, filter: &Filter, from: From, mut stream: &TcpStream) -> std::io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    // The readers start before the answer does: a client acting on the answer misses nothing.
    let mut readers: BTreeMap<(String, u32), Box<dyn LogReader>> = BTreeMap::new();
    open_readers(api, filter, from, &mut readers);
    let mut rescanned = Instant::now();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n: polylog change feed\n\n"
    )?;
    stream.flush()?;
    let mut written = Instant::now();
    while !api.stop.load(Ordering::SeqCst) {
        if rescanned.elapsed() >= RESCAN {
            // Topics that appear later are read from their beginning: all of them is new (as
            // is a partition whose reader failed, its records gone to retention, say).
            open_readers(api, filter, From::Beginning, &mut readers);
            rescanned = Instant::now();
        }
        // A batch of one partition at a time goes out before the next is read: what a feed
        // holds is bounded by one poll.
        let mut any = false;
        let mut failed = Vec::new();
        for ((topic, p), r) in readers.iter_mut() {
            let Ok(records) = r.poll(500, Duration::ZERO) else {
                failed.push((topic.clone(), *p));
                continue;
            };
            any |= !records.is_empty();
            let mut out = String::new();
            for rec in &records {
                if let Some(ev) = event(topic, rec, filter) {
                    out.push_str(&format!(
                        "id: {topic}/{}/{}\nevent: change\ndata: {ev}\n\n",
                        rec.partition, rec.offset
                    ));
                }
            }
            if !out.is_empty() {
                stream.write_all(out.as_bytes())?;
                stream.flush()?;
                written = Instant::now();
            }
        }
        for k in failed {
            readers.remove(&k);
        }
        if written.elapsed() >= KEEPALIVE {
            stream.write_all(b": keepalive\n\n")?;
            stream.flush()?;
            written = Instant::now();
        }
        if !any {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn open_readers(
    api: &Api,
    filter: &Filter,
    from: From,
    readers: &mut BTreeMap<(String, u32), Box<dyn LogReader>>,
) {
    let topics = api.log.topics().unwrap_or_default();
    let followed =
        |t: &String| filter.topics.iter().any(|p| glob_match(p, t)) && !filter.skip.contains(t);
    for t in topics.iter().filter(|t| followed(t)) {
        let Ok(d) = api.log.describe_topic(t) else { continue };
        for p in &d.partitions {
            if readers.contains_key(&(t.clone(), p.partition)) {
                continue;
            }
            let start = match from {
                From::Beginning => StartAt::Offset(p.start_offset),
                From::End => StartAt::Offset(p.durable_offset),
                From::Last(n) => {
                    StartAt::Offset(p.durable_offset.saturating_sub(n).max(p.start_offset))
                }
            };
            if let Ok(r) = api.log.reader(t, p.partition, start) {
                readers.insert((t.clone(), p.partition), r);
            }
        }
    }
}

/// The event for a record, if it passes the filter.
fn event(topic: &str, rec: &StoredRecord, f: &Filter) -> Option<Value> {
    let key = bytes_json(rec.key.as_deref());
    let value = bytes_json(rec.value.as_deref());
    let debezium = value.get("op").and_then(Value::as_str).is_some()
        && (value.get("after").is_some() || value.get("before").is_some());
    let (op, table, before, after) = if debezium {
        let src = &value["source"];
        let table = match (src["schema"].as_str(), src["table"].as_str()) {
            (Some(s), Some(t)) => Value::String(format!("{s}.{t}")),
            (None, Some(t)) => Value::String(t.to_string()),
            _ => Value::Null,
        };
        (
            value["op"].as_str().unwrap_or("").to_string(),
            table,
            value["before"].clone(),
            value["after"].clone(),
        )
    } else if value.is_null() {
        ("d".to_string(), Value::Null, Value::Null, Value::Null)
    } else {
        ("u".to_string(), Value::Null, Value::Null, value)
    };
    if !f.ops.is_empty() && !f.ops.contains(&op) {
        return None;
    }
    if let Some(want) = &f.table {
        let t = table.as_str().unwrap_or("");
        if t != want && t.rsplit('.').next() != Some(want.as_str()) {
            return None;
        }
    }
    if let Some(want) = &f.key {
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let whole = serde_json::from_str::<Value>(want).is_ok_and(|w| w == key);
        let field = key.as_object().is_some_and(|m| m.values().any(|v| text(v) == *want));
        if !whole && !field && text(&key) != *want {
            return None;
        }
    }
    Some(json!({
        "topic": topic,
        "partition": rec.partition,
        "offset": rec.offset,
        "timestamp_ms": rec.timestamp_ms,
        "key": key,
        "op": op,
        "table": table,
        "before": before,
        "after": after,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, value: Option<&str>) -> StoredRecord {
        StoredRecord {
            partition: 0,
            offset: 7,
            timestamp_ms: 1,
            key: Some(key.as_bytes().to_vec()),
            value: value.map(|v| v.as_bytes().to_vec()),
            headers: vec![],
        }
    }

    fn filter(table: Option<&str>, key: Option<&str>, ops: &[&str]) -> Filter {
        Filter {
            topics: vec!["*".into()],
            skip: vec![],
            table: table.map(str::to_string),
            key: key.map(str::to_string),
            ops: ops.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn change_events_are_filtered_by_table_key_and_operation() {
        let r = rec(
            r#"{"id":42}"#,
            Some(
                r#"{"op":"u","before":null,"after":{"id":42,"t":"x"},"source":{"schema":"public","table":"videos"}}"#,
            ),
        );
        let ev = event("app.public.videos", &r, &filter(None, None, &[])).expect("passes");
        assert_eq!((ev["op"].as_str(), ev["table"].as_str()), (Some("u"), Some("public.videos")));
        assert_eq!(ev["after"]["t"], "x");
        assert!(event("t", &r, &filter(Some("videos"), Some("42"), &["u", "c"])).is_some());
        assert!(event("t", &r, &filter(Some("public.videos"), Some(r#"{"id":42}"#), &[])).is_some());
        assert!(event("t", &r, &filter(Some("tags"), None, &[])).is_none());
        assert!(event("t", &r, &filter(None, Some("43"), &[])).is_none());
        assert!(event("t", &r, &filter(None, None, &["d"])).is_none());
        // A view's document and its tombstone.
        let doc = event("views.v", &rec("1", Some(r#"{"title":"a"}"#)), &filter(None, None, &[]));
        assert_eq!(doc.map(|d| d["op"].clone()), Some(json!("u")));
        let gone = event("views.v", &rec("1", None), &filter(None, Some("1"), &["d"]));
        assert!(gone.is_some());
    }
}
