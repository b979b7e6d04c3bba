//! The `elasticsearch` sink (Elasticsearch and OpenSearch): documents through `_bulk`, each
//! indexed with `version_type=external` from its `_version` (which becomes the document's
//! version, not a field: Elasticsearch reserves the name), or its change's commit LSN, so a
//! replay or an out-of-order retry never replaces a newer document: the cluster answers 409,
//! counted as already applied. A tombstone deletes (404: already gone).
//!
//! Requests are batched by count and bytes, one in flight at a time. A whole request that
//! fails (connection, 429, 5xx) is retried by the runner with backoff; items that fail with 429
//! or 5xx are sent again here a few times first. Items the cluster rejects for good (a mapping
//! conflict, a malformed document) go to the dead-letter topic with the reason, and the batch
//! goes on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use polylog_log::{Log, LogError, Record, TopicConfig};
use polylog_postgres::event::{Position, VERSION_HEADER};
use serde_json::{json, Value};

use crate::config::ElasticsearchSinkConfig;
use crate::http::Endpoint;
use crate::{Item, SinkError, Writer};

const ITEM_RETRIES: u32 = 5;

pub struct ElasticsearchWriter {
    cfg: ElasticsearchSinkConfig,
    endpoint: Endpoint,
    log: Arc<dyn Log>,
    dead_letter_topic: String,
    created: HashSet<String>,
    /// Documents sent to the dead-letter topic (shown in status).
    pub dead_letters: Arc<AtomicU64>,
}

/// One document operation of a `_bulk` request.
struct Op<'a> {
    item: &'a Item,
    action: String,
    source: Option<Vec<u8>>,
    /// Why the record cannot be sent at all (it goes to the dead-letter topic).
    invalid: Option<String>,
}

/// The version a record is indexed with: a document's `_version`; a view tombstone's
/// version header; for change events, the change's own WAL position (later changes of a row
/// always have higher ones, even within one transaction).
fn record_version(r: &polylog_log::StoredRecord, doc: Option<&Value>) -> Option<u64> {
    if let Some(v) = doc.and_then(|d| d.get("_version")).and_then(Value::as_u64) {
        return Some(v);
    }
    let header = r.headers.iter().find(|(k, _)| k == VERSION_HEADER);
    if let Some(v) = header.and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok()) {
        return Some(v);
    }
    Position::from_headers(&r.headers).map(|p| {
        if p.change_lsn > 0 {
            p.change_lsn
        } else {
            p.commit_lsn
        }
    })
}

impl ElasticsearchWriter {
    pub fn new(
        name: &str,
        cfg: ElasticsearchSinkConfig,
        log: Arc<dyn Log>,
        dead_letters: Arc<AtomicU64>,
    ) -> Result<ElasticsearchWriter, SinkError> {
        let endpoint = Endpoint::parse(&cfg.url).map_err(SinkError::Config)?;
        let dead_letter_topic =
            cfg.dead_letter_topic.clone().unwrap_or_else(|| format!("dlq.{name}"));
        Ok(ElasticsearchWriter {
            cfg,
            endpoint,
            log,
            dead_letter_topic,
            created: HashSet::new(),
            dead_letters,
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.timeout_ms.max(100))
    }

    fn index_of(&self, topic: &str) -> String {
        self.cfg.index.clone().unwrap_or_else(|| topic.to_lowercase())
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        ctype: &str,
        body: &[u8],
    ) -> Result<(u16, Value), SinkError> {
        let (status, bytes) = self
            .endpoint
            .request(method, path, ctype, body, self.timeout())
            .map_err(|e| SinkError::Target(format!("{}: {e}", self.cfg.url)))?;
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status == 429 || status >= 500 {
            return Err(SinkError::Target(format!(
                "{} answered {status}: {}",
                self.cfg.url,
                reason(&v)
            )));
        }
        Ok((status, v))
    }

    fn ensure_index(&mut self, index: &str) -> Result<(), SinkError> {
        if !self.cfg.create_index || self.created.contains(index) {
            return Ok(());
        }
        let body = match &self.cfg.mappings {
            Some(m) => format!("{{\"mappings\":{m}}}"),
            None => "{}".to_string(),
        };
        let (status, v) =
            self.send("PUT", &format!("/{index}"), "application/json", body.as_bytes())?;
        let exists = v["error"]["type"] == "resource_already_exists_exception";
        if !(200..300).contains(&status) && !exists {
            return Err(SinkError::Config(format!(
                "creating index {index}: {status} {}",
                reason(&v)
            )));
        }
        self.created.insert(index.to_string());
        Ok(())
    }

    fn op<'a>(&self, item: &'a Item) -> Op<'a> {
        let r = &item.record;
        let index = self.index_of(&item.topic);
        let id = document_id(r.key.as_deref().unwrap_or_default());
        let mut meta = json!({"_index": index, "_id": id});
        match r.value.as_deref() {
            None => {
                if let Some(version) = record_version(r, None) {
                    meta["version"] = json!(version);
                    meta["version_type"] = json!("external");
                }
                Op {
                    item,
                    action: json!({ "delete": meta }).to_string(),
                    source: None,
                    invalid: None,
                }
            }
            Some(v) => {
                let Ok(mut doc) = serde_json::from_slice::<Value>(v) else {
                    let invalid = Some("the value is not JSON".to_string());
                    return Op { item, action: String::new(), source: None, invalid };
                };
                if !doc.is_object() {
                    let invalid = Some("the value is not a JSON object".to_string());
                    return Op { item, action: String::new(), source: None, invalid };
                }
                let version = record_version(r, Some(&doc));
                // `_version` is a metadata field in Elasticsearch: it becomes the document's
                // version rather than a field.
                if let Some(o) = doc.as_object_mut() {
                    o.remove("_version");
                }
                if let Some(version) = version {
                    meta["version"] = json!(version);
                    meta["version_type"] = json!("external");
                }
                let source = Some(doc.to_string().into_bytes());
                Op { item, action: json!({ "index": meta }).to_string(), source, invalid: None }
            }
        }
    }

    /// Sends `ops` in one `_bulk` request; returns the ones to send again and the rejected
    /// ones with their reasons.
    #[allow(clippy::type_complexity)]
    fn bulk<'a>(&self, ops: &[Op<'a>]) -> Result<(Vec<usize>, Vec<(usize, String)>), SinkError> {
        let mut body = Vec::new();
        for op in ops {
            body.extend_from_slice(op.action.as_bytes());
            body.push(b'\n');
            if let Some(src) = &op.source {
                body.extend_from_slice(src);
                body.push(b'\n');
            }
        }
        let (status, v) = self.send("POST", "/_bulk", "application/x-ndjson", &body)?;
        if !(200..300).contains(&status) {
            return Err(SinkError::Config(format!("_bulk answered {status}: {}", reason(&v))));
        }
        let items = v["items"].as_array().cloned().unwrap_or_default();
        if items.len() != ops.len() {
            return Err(SinkError::Target(format!(
                "_bulk answered for {} of {} documents",
                items.len(),
                ops.len()
            )));
        }
        let (mut again, mut rejected) = (Vec::new(), Vec::new());
        for (i, item) in items.iter().enumerate() {
            let result =
                item.as_object().and_then(|o| o.values().next()).cloned().unwrap_or_default();
            let code = result["status"].as_u64().unwrap_or(0);
            let is_delete = item.get("delete").is_some();
            match code {
                200..=299 => {}
                409 => {}              // a newer or equal version is indexed
                404 if is_delete => {} // already gone
                429 | 500..=599 => again.push(i),
                _ => rejected.push((i, format!("{code} {}", reason(&result)))),
            }
        }
        Ok((again, rejected))
    }

    fn dead_letter(&self, rejected: Vec<(&Item, String)>) -> Result<(), SinkError> {
        if rejected.is_empty() {
            return Ok(());
        }
        match self.log.create_topic(&self.dead_letter_topic, &TopicConfig::new(1)) {
            Ok(()) | Err(LogError::TopicExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let records: Vec<Record> = rejected
            .iter()
            .map(|(item, why)| {
                let r = &item.record;
                let mut rec =
                    Record { key: r.key.clone(), value: r.value.clone(), ..Record::default() };
                rec.headers.push(("polylog.error".into(), why.clone().into_bytes()));
                let from = format!("{}/{}/{}", item.topic, r.partition, r.offset);
                rec.headers.push(("polylog.source".into(), from.into_bytes()));
                rec
            })
            .collect();
        let a = self.log.append(&self.dead_letter_topic, 0, &records)?;
        self.log.wait_durable(&self.dead_letter_topic, 0, a.last_offset + 1, self.timeout())?;
        self.dead_letters.fetch_add(records.len() as u64, Ordering::SeqCst);
        for (item, why) in &rejected {
            tracing::warn!(
                "elasticsearch: {}/{}/{} rejected ({why}); written to {}",
                item.topic,
                item.record.partition,
                item.record.offset,
                self.dead_letter_topic
            );
        }
        Ok(())
    }
}

impl Writer for ElasticsearchWriter {
    fn write(&mut self, items: &[Item]) -> Result<(), SinkError> {
        let indexes: HashSet<String> = items.iter().map(|i| self.index_of(&i.topic)).collect();
        for index in indexes {
            self.ensure_index(&index)?;
        }
        let (ops, invalid): (Vec<Op<'_>>, Vec<Op<'_>>) =
            items.iter().map(|i| self.op(i)).partition(|op| op.invalid.is_none());
        self.dead_letter(
            invalid.into_iter().map(|op| (op.item, op.invalid.unwrap_or_default())).collect(),
        )?;
        let mut start = 0;
        while start < ops.len() {
            // A request of up to `batch_docs` operations and `batch_bytes` bytes.
            let (mut end, mut bytes) = (start, 0);
            while end < ops.len() && end - start < self.cfg.batch_docs {
                let size = ops[end].action.len() + ops[end].source.as_ref().map_or(0, Vec::len) + 2;
                if end > start && bytes + size > self.cfg.batch_bytes {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let mut pending: Vec<usize> = (start..end).collect();
            let mut rejected = Vec::new();
            let mut backoff = Duration::from_millis(100);
            for attempt in 0..=ITEM_RETRIES {
                let chunk: Vec<Op<'_>> = pending
                    .iter()
                    .map(|&i| Op {
                        item: ops[i].item,
                        action: ops[i].action.clone(),
                        source: ops[i].source.clone(),
                        invalid: None,
                    })
                    .collect();
                let (again, bad) = self.bulk(&chunk)?;
                rejected.extend(bad.into_iter().map(|(i, why)| (ops[pending[i]].item, why)));
                pending = again.into_iter().map(|i| pending[i]).collect();
                if pending.is_empty() {
                    break;
                }
                if attempt == ITEM_RETRIES {
                    return Err(SinkError::Target(format!(
                        "{} documents still refused with 429/5xx after {ITEM_RETRIES} retries",
                        pending.len()
                    )));
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            self.dead_letter(rejected)?;
            start = end;
        }
        Ok(())
    }
}

/// A document's `_id`: the key's single value when the key is an object of one field
/// (`{"id":7}` → `7`), else the key's JSON text.
pub fn document_id(key: &[u8]) -> String {
    match serde_json::from_slice::<Value>(key) {
        Ok(Value::Object(o)) if o.len() == 1 => match o.values().next() {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        },
        Ok(v) => v.to_string(),
        Err(_) => String::from_utf8_lossy(key).into_owned(),
    }
}

fn reason(v: &Value) -> String {
    let e = &v["error"];
    match (e["type"].as_str(), e["reason"].as_str()) {
        (Some(t), Some(r)) => format!("{t}: {r}"),
        _ => v.to_string().chars().take(300).collect(),
    }
}
