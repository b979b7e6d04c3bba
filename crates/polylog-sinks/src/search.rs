//! The `search` sink: an embedded full-text index (tantivy) of a view's documents, one per
//! sink, under `<data_dir>/search/<name>`. A document replaces the indexed one with the same key
//! unless that one has a higher `_version`; a tombstone removes it. The index is searched
//! through [`SearchIndex::search`] and [`SearchIndex::get`] (served by the HTTP API).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tantivy::collector::{Count, TopDocs};
use tantivy::query::{QueryParser, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, FAST, INDEXED, STORED, STRING, TEXT};
use tantivy::{Document, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use crate::{Item, SinkError, Writer};

fn fail(e: impl std::fmt::Display) -> SinkError {
    SinkError::Target(format!("the search index: {e}"))
}

/// An index and a reader of it, shared by the sink writing it and the API reading it.
pub struct SearchIndex {
    pub name: String,
    index: Index,
    reader: IndexReader,
    schema: Schema,
    id: Field,
    doc: Field,
}

/// The indexes of this process, by name, for the API.
pub type SearchIndexes = Arc<Mutex<HashMap<String, Arc<SearchIndex>>>>;

impl SearchIndex {
    /// Opens the index in `dir`, creating it if needed.
    pub fn open(name: &str, dir: &Path) -> Result<SearchIndex, SinkError> {
        std::fs::create_dir_all(dir).map_err(fail)?;
        let mut sb = Schema::builder();
        let id = sb.add_text_field("_id", STRING | STORED);
        sb.add_u64_field("_version", INDEXED | STORED | FAST);
        let doc = sb.add_json_field("doc", TEXT | STORED);
        let schema = sb.build();
        let directory = tantivy::directory::MmapDirectory::open(dir).map_err(fail)?;
        let index = Index::open_or_create(directory, schema.clone()).map_err(fail)?;
        let reader =
            index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(fail)?;
        Ok(SearchIndex { name: name.to_string(), index, reader, schema, id, doc })
    }

    fn to_json(&self, d: &TantivyDocument) -> Value {
        let v: Value = serde_json::from_str(&d.to_json(&self.schema)).unwrap_or_default();
        // Stored fields come back as arrays of values.
        let first = |k: &str| v.get(k).and_then(|a| a.get(0)).cloned().unwrap_or(Value::Null);
        let id = first("_id");
        json!({
            "id": id.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()).unwrap_or(id),
            "version": first("_version"),
            "doc": first("doc"),
        })
    }

    /// Documents matching `query` (tantivy's query syntax over the documents' fields:
    /// `title:rust AND publisher.name:acme`), best first.
    pub fn search(&self, query: &str, limit: usize) -> Result<Value, SinkError> {
        let searcher = self.reader.searcher();
        let parser = QueryParser::for_index(&self.index, vec![self.doc]);
        let q = parser
            .parse_query(query)
            .map_err(|e| SinkError::Config(format!("the query {query:?}: {e}")))?;
        let (top, total) = searcher
            .search(&q, &(TopDocs::with_limit(limit.clamp(1, 1000)), Count))
            .map_err(fail)?;
        let mut hits = Vec::new();
        for (score, addr) in top {
            let d: TantivyDocument = searcher.doc(addr).map_err(fail)?;
            let mut hit = self.to_json(&d);
            hit["score"] = json!(score);
            hits.push(hit);
        }
        Ok(json!({"total": total, "hits": hits}))
    }

    /// The document with key `id` (the key as JSON, e.g. `{"id":7}`).
    pub fn get(&self, id: &str) -> Result<Option<Value>, SinkError> {
        let searcher = self.reader.searcher();
        let q = TermQuery::new(Term::from_field_text(self.id, id), IndexRecordOption::Basic);
        let top = searcher.search(&q, &TopDocs::with_limit(1)).map_err(fail)?;
        match top.first() {
            Some((_, addr)) => {
                let d: TantivyDocument = searcher.doc(*addr).map_err(fail)?;
                Ok(Some(self.to_json(&d)))
            }
            None => Ok(None),
        }
    }

    /// The indexed version of a key, if it is indexed.
    fn version_of(&self, id: &str) -> Result<Option<u64>, SinkError> {
        Ok(self.get(id)?.and_then(|d| d["version"].as_u64()))
    }

    /// Documents in the index.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes a view's documents into its index.
pub struct SearchWriter {
    index: Arc<SearchIndex>,
    writer: Option<IndexWriter>,
}

impl SearchWriter {
    pub fn new(index: Arc<SearchIndex>) -> SearchWriter {
        SearchWriter { index, writer: None }
    }
}

/// A record key as the index stores it: its JSON text, normalized when it is JSON.
fn key_text(key: &[u8]) -> String {
    match serde_json::from_slice::<Value>(key) {
        Ok(v) => v.to_string(),
        Err(_) => String::from_utf8_lossy(key).into_owned(),
    }
}

impl Writer for SearchWriter {
    fn write(&mut self, items: &[Item]) -> Result<(), SinkError> {
        let r = self.write_batch(items);
        if r.is_err() {
            self.writer = None; // dropped uncommitted: the batch is written again whole
        }
        r
    }
}

impl SearchWriter {
    fn write_batch(&mut self, items: &[Item]) -> Result<(), SinkError> {
        if self.writer.is_none() {
            self.writer = Some(self.index.index.writer(50_000_000).map_err(fail)?);
        }
        let Some(writer) = self.writer.as_mut() else { return Ok(()) };
        let ix = &self.index;
        // Versions written in this batch, not yet visible to the reader.
        let mut written: HashMap<String, Option<u64>> = HashMap::new();
        for item in items {
            let Some(key) = item.record.key.as_deref() else { continue };
            let id = key_text(key);
            match item.record.value.as_deref() {
                None => {
                    writer.delete_term(Term::from_field_text(ix.id, &id));
                    written.insert(id, None);
                }
                Some(value) => {
                    let doc = match serde_json::from_slice::<Value>(value) {
                        Ok(doc) if doc.is_object() => doc,
                        _ => {
                            tracing::warn!(
                                "search sink {}: passing over {}/{}/{}: the value is not a JSON object",
                                ix.name, item.topic, item.record.partition, item.record.offset
                            );
                            continue;
                        }
                    };
                    let version = doc.get("_version").and_then(Value::as_u64).unwrap_or(0);
                    let current = match written.get(&id) {
                        Some(v) => *v,
                        None => ix.version_of(&id)?,
                    };
                    if current.is_some_and(|c| c > version) {
                        continue; // an older document than the one indexed
                    }
                    writer.delete_term(Term::from_field_text(ix.id, &id));
                    let body = json!({"_id": id, "_version": version, "doc": doc});
                    let d =
                        TantivyDocument::parse_json(&ix.schema, &body.to_string()).map_err(fail)?;
                    writer.add_document(d).map_err(fail)?;
                    written.insert(id, Some(version));
                }
            }
        }
        polylog_log::failpoint::check("search.commit").map_err(fail)?;
        writer.commit().map_err(fail)?;
        ix.reader.reload().map_err(fail)?;
        Ok(())
    }
}
