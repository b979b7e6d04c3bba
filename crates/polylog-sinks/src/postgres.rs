//! The `postgres` sink.
//!
//! - `mode = "table"`: each table topic of a Polylog CDC source becomes a table of the same
//!   schema and name in the target database, created from the schema the source recorded. Two
//!   columns are added: `_polylog_position` (the change's position, 20 bytes that sort like
//!   positions) and `_polylog_partition`. A row is only written over by a change with a higher
//!   position, so replays and retries never roll a row back; a delete removes the row if its
//!   position is lower; a TRUNCATE (one copy per partition) deletes that partition's rows
//!   written before it.
//! - `mode = "document"`: a view topic into a table `(id jsonb primary key, doc jsonb,
//!   version bigint)`; a document replaces the stored one unless that one has a higher
//!   `_version`; a tombstone deletes it.
//!
//! Each batch is one Postgres transaction. Changes to one key within a batch are folded to the
//! last, and all of a table's upserts go in one `INSERT ... SELECT FROM
//! jsonb_populate_recordset(...) ON CONFLICT` statement.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine;
use polylog_log::Log;
use polylog_postgres::event::Position;
use polylog_postgres::schema::{quote_ident, quote_literal};
use polylog_postgres::wire::{ConnectParams, Connection, PgError};
use serde_json::{Map, Value};

use crate::config::{PostgresSinkConfig, PostgresSinkMode};
use crate::{Item, SinkError, Writer};

fn pg(e: PgError) -> SinkError {
    // Besides connection trouble: deadlocks, serialization failures, lock and statement
    // timeouts pass on a retry.
    let transient = matches!(e.code(), Some("40P01" | "40001" | "55P03" | "57014"));
    if e.is_retryable() || transient {
        SinkError::Target(format!("the target Postgres: {e}"))
    } else {
        SinkError::Config(format!("the target Postgres: {e}"))
    }
}

/// A replicated table as the sink writes it.
struct Target {
    /// `"schema"."table"`.
    sql_name: String,
    key: Vec<String>,
    columns: Vec<String>,
    bytea: Vec<String>,
}

pub struct PostgresWriter {
    cfg: PostgresSinkConfig,
    log: Arc<dyn Log>,
    conn: Option<Connection>,
    targets: HashMap<String, Target>,
    skipped: HashMap<String, u64>,
}

/// A document and its `_version`.
type VersionedDoc = (Value, u64);

/// The change a batch leaves for one key.
enum Last {
    Upsert(Map<String, Value>),
    /// An update some of whose values the source did not know (unchanged TOASTed values it
    /// had never seen): only the columns it has are written.
    Partial(Map<String, Value>),
    Delete(Map<String, Value>),
}

impl PostgresWriter {
    pub fn new(cfg: PostgresSinkConfig, log: Arc<dyn Log>) -> PostgresWriter {
        PostgresWriter { cfg, log, conn: None, targets: HashMap::new(), skipped: HashMap::new() }
    }

    /// Reports a record passed over (once per topic; the rest are counted in the log line).
    fn skip(&mut self, item: &Item, why: &str) {
        let n = self.skipped.entry(item.topic.clone()).or_default();
        *n += 1;
        if *n == 1 {
            tracing::warn!(
                "postgres sink: passing over {}/{}/{}: {why} (further ones are not reported)",
                item.topic,
                item.record.partition,
                item.record.offset
            );
        }
    }

    fn conn(&mut self) -> Result<&mut Connection, SinkError> {
        if self.conn.is_none() {
            let params = ConnectParams::parse(&self.cfg.url)
                .map_err(|e| SinkError::Config(e.to_string()))?;
            self.conn = Some(Connection::connect(&params, false).map_err(pg)?);
        }
        self.conn.as_mut().ok_or_else(|| SinkError::Target("not connected".into()))
    }

    fn execute(&mut self, sql: &str) -> Result<(), SinkError> {
        let r = self.conn()?.execute(sql);
        if let Err(e) = r {
            // A failed statement leaves the connection in a failed transaction (or gone).
            self.conn = None;
            return Err(pg(e));
        }
        Ok(())
    }

    /// Runs statements, each with its JSON parameter (`$1`), in one transaction.
    fn run_transaction(&mut self, statements: &[(String, String)]) -> Result<(), SinkError> {
        if statements.is_empty() {
            return Ok(());
        }
        self.execute("BEGIN")?;
        for (sql, json) in statements {
            let r = self.conn()?.query_params(sql, &[json.as_bytes()]);
            if let Err(e) = r {
                self.conn = None;
                return Err(pg(e));
            }
        }
        self.execute("COMMIT")
    }

    fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, SinkError> {
        match self.conn()?.query(sql) {
            Ok(rows) => Ok(rows),
            Err(e) => {
                self.conn = None;
                Err(pg(e))
            }
        }
    }

    /// The target table of a table topic: created from the source's recorded schema if it does
    /// not exist, checked (and given new source columns) if it does.
    fn target(&mut self, topic: &str) -> Result<(), SinkError> {
        if self.targets.contains_key(topic) {
            return Ok(());
        }
        let topics = self.log.topics()?;
        let (history, table) = polylog_postgres::source::sibling_topic(&topics, topic, "schema-history")
            .ok_or_else(|| {
                SinkError::Config(format!(
                    "topic {topic:?}: no schema recorded for it (table mode replicates the table topics of a Polylog CDC source)"
                ))
            })?;
        let recorded = polylog_postgres::source::read_recorded_schemas(&*self.log, &history)?;
        let columns = recorded.get(&table).and_then(Value::as_array).ok_or_else(|| {
            SinkError::Config(format!("topic {topic:?}: {history} records no table {table:?}"))
        })?;
        let (schema_name, table_name) = table.split_once('.').unwrap_or(("public", &table));
        let sql_name = format!("{}.{}", quote_ident(schema_name), quote_ident(table_name));
        let mut defs = Vec::new();
        let mut target = Target {
            sql_name: sql_name.clone(),
            key: Vec::new(),
            columns: Vec::new(),
            bytea: Vec::new(),
        };
        for c in columns.iter().filter(|c| c["excluded"] != Value::Bool(true)) {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            let oid = c["type_oid"].as_u64().unwrap_or(0);
            let ty = c["type"].as_str().unwrap_or("text");
            // Types of the source database's own (enums, domains) become text.
            let ty =
                if oid < 10_000 && !c["masked"].as_bool().unwrap_or(false) { ty } else { "text" };
            if ty == "bytea" {
                target.bytea.push(name.clone());
            }
            if c["key"].as_bool().unwrap_or(false) {
                target.key.push(name.clone());
            }
            defs.push(format!("{} {ty}", quote_ident(&name)));
            target.columns.push(name);
        }
        if target.key.is_empty() {
            return Err(SinkError::Config(format!("table {table}: no key columns recorded")));
        }
        let key_sql: Vec<String> = target.key.iter().map(|k| quote_ident(k)).collect();
        self.execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {sql_name} ({}, _polylog_partition int NOT NULL, _polylog_position bytea NOT NULL, PRIMARY KEY ({}))",
            quote_ident(schema_name),
            defs.join(", "),
            key_sql.join(", ")
        ))?;
        let existing: Vec<String> = self
            .query(&format!(
                "SELECT attname FROM pg_attribute WHERE attrelid = {}::regclass AND attnum > 0 AND NOT attisdropped",
                quote_literal(&sql_name)
            ))?
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
        for hidden in ["_polylog_partition", "_polylog_position"] {
            if !existing.iter().any(|e| e == hidden) {
                return Err(SinkError::Config(format!(
                    "replica table {table} exists without the column {hidden}: it was not created by this sink (its columns: {}); drop or rename it",
                    existing.join(", ")
                )));
            }
        }
        // Columns the source gained since the table was created.
        for (name, def) in target.columns.iter().zip(&defs) {
            if !existing.contains(name) {
                self.execute(&format!("ALTER TABLE {sql_name} ADD COLUMN IF NOT EXISTS {def}"))?;
            }
        }
        self.targets.insert(topic.to_string(), target);
        Ok(())
    }

    fn write_tables(&mut self, items: &[Item]) -> Result<(), SinkError> {
        // A source's transaction and schema history topics are not tables.
        let items: Vec<&Item> = items
            .iter()
            .filter(|i| !i.topic.ends_with(".transaction") && !i.topic.ends_with(".schema-history"))
            .collect();
        // Change events, parsed once; a record that is not one is reported and passed over.
        let mut parsed: Vec<Option<Map<String, Value>>> = Vec::with_capacity(items.len());
        for item in &items {
            let r = &item.record;
            let v = match r.value.as_deref().map(serde_json::from_slice::<Value>) {
                None => None, // a tombstone: the delete before it did the work
                Some(Ok(Value::Object(v)))
                    if r.key.is_some() || v.get("op") == Some(&Value::from("t")) =>
                {
                    Some(v)
                }
                Some(_) => {
                    self.skip(item, "not a change event with a key");
                    None
                }
            };
            parsed.push(v);
        }
        for item in &items {
            self.target(&item.topic)?;
        }
        // A column the target does not have yet: the source's table gained it; look again.
        let mut stale: Vec<String> = Vec::new();
        for (item, v) in items.iter().zip(&parsed) {
            let Some(after) = v.as_ref().and_then(|v| v.get("after")).and_then(Value::as_object)
            else {
                continue;
            };
            let known = self.targets.get(&item.topic).map(|t| &t.columns);
            if known.is_some_and(|cols| after.keys().any(|k| !cols.contains(k)))
                && !stale.contains(&item.topic)
            {
                stale.push(item.topic.clone());
            }
        }
        for topic in stale {
            self.targets.remove(&topic);
            self.target(&topic)?;
        }
        let mut statements: Vec<(String, String)> = Vec::new();
        // Per topic, the last change of each key since the last TRUNCATE.
        let mut pending: BTreeMap<String, BTreeMap<Vec<u8>, Last>> = BTreeMap::new();
        for (item, v) in items.iter().zip(parsed) {
            let r = &item.record;
            let Some(mut v) = v else { continue };
            let pos = Position::from_headers(&r.headers).unwrap_or(Position {
                commit_lsn: v.get("source").and_then(|s| s["lsn"].as_u64()).unwrap_or(0),
                change_lsn: 0,
                sub: 0,
            });
            let stamp = |mut row: Map<String, Value>, target: &Target| {
                for b in &target.bytea {
                    if let Some(Value::String(s)) = row.get(b) {
                        let bytes =
                            base64::engine::general_purpose::STANDARD.decode(s).unwrap_or_default();
                        row.insert(b.clone(), Value::String(format!("\\x{}", hex(&bytes))));
                    }
                }
                row.insert("_polylog_partition".into(), Value::from(r.partition));
                row.insert(
                    "_polylog_position".into(),
                    Value::String(format!("\\x{}", hex(&pos.to_bytes()))),
                );
                row
            };
            let Some(target) = self.targets.get(&item.topic) else { continue };
            let op = v.get("op").and_then(Value::as_str).unwrap_or_default().to_string();
            match op.as_str() {
                "c" | "u" | "r" => {
                    let Some(Value::Object(mut after)) = v.remove("after") else { continue };
                    let key = r.key.clone().unwrap_or_default();
                    let unknown = Value::from(polylog_postgres::event::UNAVAILABLE_VALUE);
                    let before = after.len();
                    after.retain(|_, v| *v != unknown);
                    let partial = after.len() < before;
                    let row = stamp(after, target);
                    let last = if partial { Last::Partial(row) } else { Last::Upsert(row) };
                    pending.entry(item.topic.clone()).or_default().insert(key, last);
                }
                "d" => {
                    let Some(key) = r.key.as_deref() else { continue };
                    let Ok(Value::Object(k)) = serde_json::from_slice::<Value>(key) else {
                        continue;
                    };
                    let row = stamp(k, target);
                    pending
                        .entry(item.topic.clone())
                        .or_default()
                        .insert(key.to_vec(), Last::Delete(row));
                }
                "t" => {
                    if let Some(changes) = pending.remove(&item.topic) {
                        statements.extend(self.flush_sql(&item.topic, changes));
                    }
                    let Some(target) = self.targets.get(&item.topic) else { continue };
                    statements.push((
                        format!(
                            "DELETE FROM {} WHERE _polylog_partition = {} AND _polylog_position < decode($1, 'hex')",
                            target.sql_name, r.partition
                        ),
                        hex(&pos.to_bytes()),
                    ));
                }
                _ => {}
            }
        }
        for (topic, changes) in pending {
            statements.extend(self.flush_sql(&topic, changes));
        }
        self.run_transaction(&statements)
    }

    /// The statements applying the last change of each key.
    fn flush_sql(&self, topic: &str, changes: BTreeMap<Vec<u8>, Last>) -> Vec<(String, String)> {
        let Some(t) = self.targets.get(topic) else { return Vec::new() };
        let (mut upserts, mut deletes, mut partial) = (Vec::new(), Vec::new(), Vec::new());
        for (_, last) in changes {
            match last {
                Last::Upsert(row) => upserts.push(Value::Object(row)),
                Last::Partial(row) => partial.push(row),
                Last::Delete(row) => deletes.push(Value::Object(row)),
            }
        }
        let mut sql = Vec::new();
        let keys: Vec<String> = t.key.iter().map(|k| quote_ident(k)).collect();
        let on: Vec<String> = keys.iter().map(|k| format!("t.{k} = d.{k}")).collect();
        for row in partial {
            let set: Vec<String> = row
                .keys()
                .filter(|c| !t.key.contains(c))
                .map(|c| format!("{0} = d.{0}", quote_ident(c)))
                .collect();
            sql.push((
                format!(
                    "UPDATE {name} AS t SET {set} FROM jsonb_populate_record(NULL::{name}, $1::jsonb) d \
                     WHERE {on} AND t._polylog_position < d._polylog_position",
                    name = t.sql_name,
                    set = set.join(", "),
                    on = on.join(" AND "),
                ),
                Value::Object(row).to_string(),
            ));
        }
        if !upserts.is_empty() {
            let set: Vec<String> = t
                .columns
                .iter()
                .chain(["_polylog_partition".to_string(), "_polylog_position".to_string()].iter())
                .filter(|c| !t.key.contains(c))
                .map(|c| format!("{0} = excluded.{0}", quote_ident(c)))
                .collect();
            let cols: Vec<String> = t
                .columns
                .iter()
                .chain(["_polylog_partition".to_string(), "_polylog_position".to_string()].iter())
                .map(|c| quote_ident(c))
                .collect();
            sql.push((format!(
                "INSERT INTO {name} AS t ({cols}) SELECT {cols} FROM jsonb_populate_recordset(NULL::{name}, $1::jsonb) \
                 ON CONFLICT ({keys}) DO UPDATE SET {set} WHERE t._polylog_position < excluded._polylog_position",
                name = t.sql_name,
                cols = cols.join(", "),
                keys = keys.join(", "),
                set = if set.is_empty() { "_polylog_position = excluded._polylog_position".to_string() } else { set.join(", ") },
            ), Value::Array(upserts).to_string()));
        }
        if !deletes.is_empty() {
            sql.push((
                format!(
                "DELETE FROM {name} AS t USING jsonb_populate_recordset(NULL::{name}, $1::jsonb) d \
                 WHERE {on} AND t._polylog_position < d._polylog_position",
                name = t.sql_name,
                on = on.join(" AND "),
            ),
                Value::Array(deletes).to_string(),
            ));
        }
        sql
    }

    fn write_documents(&mut self, items: &[Item]) -> Result<(), SinkError> {
        let mut by_table: BTreeMap<String, BTreeMap<Vec<u8>, Option<VersionedDoc>>> =
            BTreeMap::new();
        for item in items {
            let table =
                self.cfg.table.clone().unwrap_or_else(|| item.topic.replace(['.', '-'], "_"));
            let Some(key) = item.record.key.clone() else { continue };
            let doc = match item.record.value.as_deref().map(serde_json::from_slice::<Value>) {
                None => None,
                Some(Ok(doc)) => {
                    let version = doc.get("_version").and_then(Value::as_u64).unwrap_or(0);
                    Some((doc, version))
                }
                Some(Err(_)) => continue,
            };
            by_table.entry(table).or_default().insert(key, doc);
        }
        let mut statements: Vec<(String, String)> = Vec::new();
        for (table, docs) in by_table {
            let name = quote_ident(&table);
            self.execute(&format!(
                "CREATE TABLE IF NOT EXISTS {name} (id jsonb PRIMARY KEY, doc jsonb NOT NULL, version bigint NOT NULL)"
            ))?;
            let (mut upserts, mut deletes) = (Vec::new(), Vec::new());
            for (key, doc) in docs {
                let id: Value = serde_json::from_slice(&key)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&key).into_owned()));
                match doc {
                    Some((doc, version)) => {
                        upserts.push(serde_json::json!({"id": id, "doc": doc, "version": version}))
                    }
                    None => deletes.push(id),
                }
            }
            if !upserts.is_empty() {
                statements.push((
                    format!(
                        "INSERT INTO {name} AS t SELECT * FROM jsonb_populate_recordset(NULL::{name}, $1::jsonb) \
                         ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, version = excluded.version \
                         WHERE t.version <= excluded.version"
                    ),
                    Value::Array(upserts).to_string(),
                ));
            }
            if !deletes.is_empty() {
                statements.push((
                    format!(
                        "DELETE FROM {name} WHERE id IN (SELECT jsonb_array_elements($1::jsonb))"
                    ),
                    Value::Array(deletes).to_string(),
                ));
            }
        }
        self.run_transaction(&statements)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Writer for PostgresWriter {
    fn write(&mut self, items: &[Item]) -> Result<(), SinkError> {
        match self.cfg.mode {
            PostgresSinkMode::Table => self.write_tables(items),
            PostgresSinkMode::Document => self.write_documents(items),
        }
    }
}
