//! The view's state and its incremental maintenance, on one redb table.
//!
//! Keys (node ids are one byte; `vals` is a join value tuple as JSON, length-prefixed):
//!
//! | key                         | value                | what                                  |
//! |-----------------------------|----------------------|---------------------------------------|
//! | `R node pk`                 | row (JSON object)    | a row of the node's table             |
//! | `C node vals pk`            | row (JSON object)    | rows of a join, by their join columns |
//! | `P node vals parent_pk`     | -                    | its parent's rows, by the parent's join columns |
//! | `E root_pk`                 | version (u64), digest (16 bytes) | the document last emitted for a root |
//! | `D root_pk`                 | -                    | roots to re-emit, spilled from memory |
//! | `M name`                    | bytes                | checkpoint metadata                   |
//!
//! A change to a row marks every root whose document includes the row before or after the
//! change (walking `P` entries up to the root); when the change's transaction is complete, each
//! marked root's document is rebuilt from the state (walking `C` entries down) and emitted if it
//! differs from the last one emitted.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use redb::{ReadableTable, Table};
use serde_json::Value;

use crate::config::JoinKind;
use crate::json::{write_str, Fields};
use crate::spec::{join_values, ViewSpec};
use crate::ViewError;

pub(crate) type StateTable<'t> = Table<'t, &'static [u8], &'static [u8]>;

pub(crate) const STATE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("state");

/// Roots held in memory before they spill into the store (bounded memory for a transaction
/// that touches millions of rows).
const DIRTY_MEMORY_MAX: usize = 100_000;

pub(crate) fn store_err(e: impl std::fmt::Display) -> ViewError {
    ViewError::State(e.to_string())
}

fn row_key(node: usize, pk: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(pk.len() + 2);
    k.push(b'R');
    k.push(node as u8);
    k.extend_from_slice(pk);
    k
}

fn index_prefix(tag: u8, node: usize, vals: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(vals.len() + 32);
    k.push(tag);
    k.push(node as u8);
    k.extend_from_slice(&(vals.len() as u32).to_be_bytes());
    k.extend_from_slice(vals);
    k
}

fn index_key(tag: u8, node: usize, vals: &[u8], pk: &[u8]) -> Vec<u8> {
    let mut k = index_prefix(tag, node, vals);
    k.extend_from_slice(pk);
    k
}

/// The first key after every key starting with `prefix` (`None`: there is none).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Keys (with `prefix` removed) of every entry starting with `prefix`.
fn scan(t: &StateTable<'_>, prefix: &[u8], limit: usize) -> Result<Vec<Vec<u8>>, ViewError> {
    scan_from(t, prefix, prefix, limit)
}

fn get_row(t: &StateTable<'_>, node: usize, pk: &[u8]) -> Result<Option<Vec<u8>>, ViewError> {
    Ok(t.get(row_key(node, pk).as_slice()).map_err(store_err)?.map(|v| v.value().to_vec()))
}

/// A row's fields; a stored row is always an object, so an unreadable one reads as empty.
fn fields(row: &[u8]) -> Fields<'_> {
    Fields::parse(row).unwrap_or_default()
}

/// Roots whose documents must be rebuilt: in memory, spilling into the store when many.
#[derive(Default)]
pub(crate) struct Dirty {
    memory: BTreeSet<Vec<u8>>,
    spilled: bool,
}

impl Dirty {
    fn mark(&mut self, t: &mut StateTable<'_>, root: &[u8]) -> Result<(), ViewError> {
        if self.memory.contains(root) {
            return Ok(());
        }
        self.memory.insert(root.to_vec());
        if self.memory.len() > DIRTY_MEMORY_MAX {
            for k in std::mem::take(&mut self.memory) {
                let mut key = vec![b'D'];
                key.extend_from_slice(&k);
                t.insert(key.as_slice(), &[][..]).map_err(store_err)?;
            }
            self.spilled = true;
        }
        Ok(())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.memory.is_empty() && !self.spilled
    }

    /// Takes up to `n` roots, removing them from the set.
    fn take(&mut self, t: &mut StateTable<'_>, n: usize) -> Result<Vec<Vec<u8>>, ViewError> {
        if self.spilled {
            let keys = scan(t, b"D", n)?;
            if !keys.is_empty() {
                for k in &keys {
                    let mut key = vec![b'D'];
                    key.extend_from_slice(k);
                    t.remove(key.as_slice()).map_err(store_err)?;
                    self.memory.remove(k);
                }
                return Ok(keys);
            }
            self.spilled = false;
        }
        let mut out = Vec::new();
        while out.len() < n {
            let Some(k) = self.memory.pop_first() else { break };
            out.push(k);
        }
        Ok(out)
    }
}

/// A stored entry: its key (without the prefix it was found by) and its value.
type Entry = (Vec<u8>, Vec<u8>);

/// A document to write: the root key and the document (`None`: a tombstone).
pub(crate) type Emitted = (Vec<u8>, Option<Vec<u8>>);

/// The view's maintenance logic over its state table.
pub(crate) struct Core<'s> {
    pub spec: &'s ViewSpec,
}

impl Core<'_> {
    /// Sets (`Some`, a JSON object) or deletes (`None`) a row of `node`, marking the roots it
    /// affects.
    pub fn apply(
        &self,
        t: &mut StateTable<'_>,
        dirty: &mut Dirty,
        node: usize,
        pk: &[u8],
        row: Option<&[u8]>,
    ) -> Result<(), ViewError> {
        let n = &self.spec.nodes[node];
        let new: Option<Vec<u8>> = row.map(|r| match &n.stored {
            None => r.to_vec(),
            Some(cols) => {
                let mut out = vec![b'{'];
                for (k, v) in fields(r).items.iter().filter(|(k, _)| cols.contains(k.as_ref())) {
                    if out.len() > 1 {
                        out.push(b',');
                    }
                    write_str(&mut out, k);
                    out.push(b':');
                    out.extend_from_slice(v);
                }
                out.push(b'}');
                out
            }
        });
        let old = get_row(t, node, pk)?;
        if old == new {
            return Ok(()); // nothing this view keeps changed
        }
        let old_fields = old.as_deref().map(fields);
        let new_fields = new.as_deref().map(fields);
        if let Some(o) = &old_fields {
            self.mark_roots(t, dirty, node, pk, o)?;
        }
        if n.parent.is_some() {
            // A join's rows are kept in its index too, so documents read them in one scan.
            let cols = &n.child_cols;
            let (of, nf) = (old_fields.as_ref(), new_fields.as_ref());
            self.reindex(t, b'C', node, cols, pk, of, nf, new.as_deref())?;
        }
        for &c in &n.children {
            let cols = &self.spec.nodes[c].parent_cols;
            self.reindex(t, b'P', c, cols, pk, old_fields.as_ref(), new_fields.as_ref(), None)?;
        }
        let key = row_key(node, pk);
        match &new {
            Some(r) => {
                t.insert(key.as_slice(), r.as_slice()).map_err(store_err)?;
            }
            None => {
                t.remove(key.as_slice()).map_err(store_err)?;
            }
        }
        if let Some(r) = &new_fields {
            self.mark_roots(t, dirty, node, pk, r)?;
        }
        Ok(())
    }

    /// Deletes the rows of `node` (a TRUNCATE of its table): all of them, or with
    /// `Some((p, n))` those whose key falls in partition `p` of `n` (a CDC source writes a
    /// TRUNCATE to every partition; each copy empties its own).
    pub fn truncate(
        &self,
        t: &mut StateTable<'_>,
        dirty: &mut Dirty,
        node: usize,
        partition: Option<(u32, u32)>,
    ) -> Result<(), ViewError> {
        let prefix = [b'R', node as u8];
        let mut from = prefix.to_vec();
        loop {
            let page = scan_from(t, &prefix, &from, 1000)?;
            let Some(last) = page.last() else { return Ok(()) };
            from = [&prefix[..], last, &[0]].concat();
            let mine = |pk: &[u8]| {
                partition.is_none_or(|(p, n)| polylog_log::partition_for_key(pk, n) == p)
            };
            for pk in page.iter().filter(|pk| mine(pk)) {
                self.apply(t, dirty, node, pk, None)?;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn reindex(
        &self,
        t: &mut StateTable<'_>,
        tag: u8,
        node: usize,
        cols: &[String],
        pk: &[u8],
        old: Option<&Fields<'_>>,
        new: Option<&Fields<'_>>,
        value: Option<&[u8]>,
    ) -> Result<(), ViewError> {
        let ov = old.and_then(|r| join_values(r, cols));
        let nv = new.and_then(|r| join_values(r, cols));
        if ov == nv && value.is_none() {
            return Ok(());
        }
        if let Some(v) = ov.as_ref().filter(|&v| Some(v) != nv.as_ref()) {
            t.remove(index_key(tag, node, v, pk).as_slice()).map_err(store_err)?;
        }
        if let Some(v) = nv {
            let value = value.unwrap_or_default();
            t.insert(index_key(tag, node, &v, pk).as_slice(), value).map_err(store_err)?;
        }
        Ok(())
    }

    /// Marks the roots whose documents contain `row` (a row of `node` with key `pk`).
    fn mark_roots(
        &self,
        t: &mut StateTable<'_>,
        dirty: &mut Dirty,
        node: usize,
        pk: &[u8],
        row: &Fields<'_>,
    ) -> Result<(), ViewError> {
        let n = &self.spec.nodes[node];
        let Some(parent) = n.parent else { return dirty.mark(t, pk) };
        let Some(vals) = join_values(row, &n.child_cols) else { return Ok(()) };
        let prefix = index_prefix(b'P', node, &vals);
        let mut after: Option<Vec<u8>> = None;
        // In pages, so a row joined by a great many parents does not load them all at once.
        loop {
            let mut parents = match &after {
                None => scan(t, &prefix, 1000)?,
                Some(last) => {
                    let mut from = prefix.clone();
                    from.extend_from_slice(last);
                    from.push(0);
                    let mut page = scan_from(t, &prefix, &from, 1000)?;
                    page.retain(|p| p > last);
                    page
                }
            };
            if parents.is_empty() {
                return Ok(());
            }
            parents.sort();
            for ppk in &parents {
                if let Some(prow) = get_row(t, parent, ppk)? {
                    self.mark_roots(t, dirty, parent, ppk, &fields(&prow))?;
                }
            }
            if parents.len() < 1000 {
                return Ok(());
            }
            after = parents.pop();
        }
    }

    /// The document of a root, from the state (`None` if the root row does not exist).
    pub fn document(&self, t: &StateTable<'_>, pk: &[u8]) -> Result<Option<Vec<u8>>, ViewError> {
        let Some(row) = get_row(t, 0, pk)? else { return Ok(None) };
        let mut out = Vec::with_capacity(row.len() * 2);
        self.node_document(t, 0, &row, &mut out)?;
        Ok(Some(out))
    }

    /// Writes the document of a row of `node` (its fields, then its joins) to `out`.
    fn node_document(
        &self,
        t: &StateTable<'_>,
        node: usize,
        row: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ViewError> {
        let n = &self.spec.nodes[node];
        let row = fields(row);
        let start = out.len();
        out.push(b'{');
        let field = |out: &mut Vec<u8>, name: &str| {
            if out.len() > start + 1 {
                out.push(b',');
            }
            write_str(out, n.rename.get(name).map_or(name, String::as_str));
            out.push(b':');
        };
        match &n.fields {
            Some(names) => {
                for f in names {
                    field(out, f);
                    out.extend_from_slice(row.get(f).unwrap_or(b"null"));
                }
            }
            None => {
                // A column named like one of the joins gives way to the join (and at the
                // root, a column named `_version` to the document's version).
                let joined = |k: &str| {
                    let name = n.rename.get(k).map_or(k, String::as_str);
                    (node == 0 && name == "_version")
                        || n.children.iter().any(|&c| self.spec.nodes[c].name == name)
                };
                for (k, v) in row.items.iter().filter(|(k, _)| !joined(k)) {
                    field(out, k);
                    out.extend_from_slice(v);
                }
            }
        }
        for &c in &n.children {
            let child = &self.spec.nodes[c];
            let rows = match join_values(&row, &child.parent_cols) {
                Some(vals) => scan_entries(t, &index_prefix(b'C', c, &vals))?,
                None => Vec::new(),
            };
            let mut rows = rows;
            if rows.len() > 1 {
                let mut keyed: Vec<(Vec<Value>, Entry)> = rows
                    .into_iter()
                    .map(|(pk, r)| {
                        let f = fields(&r);
                        let mut k: Vec<Value> = child
                            .order_by
                            .iter()
                            .map(|c| {
                                f.get(c)
                                    .and_then(|v| serde_json::from_slice(v).ok())
                                    .unwrap_or(Value::Null)
                            })
                            .collect();
                        k.push(serde_json::from_slice(&pk).unwrap_or(Value::Null));
                        (k, (pk, r))
                    })
                    .collect();
                keyed.sort_by(|a, b| cmp_values_list(&a.0, &b.0));
                rows = keyed.into_iter().map(|(_, r)| r).collect();
            }
            field(out, &child.name);
            match child.kind {
                JoinKind::One => match rows.first() {
                    Some((_, r)) => self.node_document(t, c, r, out)?,
                    None => out.extend_from_slice(b"null"),
                },
                JoinKind::Many => {
                    out.push(b'[');
                    for (i, (_, r)) in rows.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        self.node_document(t, c, r, out)?;
                    }
                    out.push(b']');
                }
            }
        }
        out.push(b'}');
        Ok(())
    }

    /// Rebuilds the documents of up to `n` marked roots; what changed since the last emission
    /// of each comes back (documents stamped with `_version`).
    pub fn emit(
        &self,
        t: &mut StateTable<'_>,
        dirty: &mut Dirty,
        version: u64,
        n: usize,
    ) -> Result<Vec<Emitted>, ViewError> {
        let mut out = Vec::new();
        for pk in dirty.take(t, n)? {
            let mut ekey = vec![b'E'];
            ekey.extend_from_slice(&pk);
            // The version and digest of the document last written.
            let last = t.get(ekey.as_slice()).map_err(store_err)?.map(|v| {
                let b = v.value();
                let version =
                    b.get(..8).and_then(|s| s.try_into().ok()).map_or(0, u64::from_be_bytes);
                let digest: [u8; 16] =
                    b.get(8..24).and_then(|s| s.try_into().ok()).unwrap_or_default();
                (version, digest)
            });
            match self.document(t, &pk)? {
                Some(mut doc) => {
                    let hash = digest(&doc);
                    if last.is_some_and(|(_, h)| h == hash) {
                        continue; // the same document as last emitted
                    }
                    let v = last.map_or(version, |(lv, _)| lv.max(version));
                    stamp(&mut doc, v);
                    let mut e = v.to_be_bytes().to_vec();
                    e.extend_from_slice(&hash);
                    t.insert(ekey.as_slice(), e.as_slice()).map_err(store_err)?;
                    out.push((pk, Some(doc)));
                }
                None => {
                    if last.is_some() {
                        t.remove(ekey.as_slice()).map_err(store_err)?;
                        out.push((pk, None));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A document to write again when a process takes over its output partition.
pub enum Handover {
    /// The root's current document, stamped with the version it was last emitted with.
    Document(Vec<u8>, Vec<u8>),
    /// A root deleted while another process owned its partition: the deletion's version.
    Deleted(Vec<u8>, u64),
}

impl Core<'_> {
    /// Records what emission skipped because another process owns the root's output
    /// partition: a deletion is remembered (`X`) for a later takeover, a document forgets it.
    pub fn skipped(
        &self,
        t: &mut StateTable<'_>,
        pk: &[u8],
        deleted_at: Option<u64>,
    ) -> Result<(), ViewError> {
        let mut key = vec![b'X'];
        key.extend_from_slice(pk);
        match deleted_at {
            Some(v) => t.insert(key.as_slice(), &v.to_be_bytes()[..]).map_err(store_err)?,
            None => t.remove(key.as_slice()).map_err(store_err)?,
        };
        Ok(())
    }

    /// The next up to `n` roots after `cursor` (deletions first, then documents) whose
    /// output partition `mine` accepts, for a process taking partitions over; the cursor to
    /// continue from, `None` when done. Deletion markers handed over are removed.
    pub fn handover(
        &self,
        t: &mut StateTable<'_>,
        cursor: &[u8],
        n: usize,
        mine: &dyn Fn(&[u8]) -> bool,
    ) -> Result<(Vec<Handover>, Option<Vec<u8>>), ViewError> {
        let mut out = Vec::new();
        // The cursor is a whole key: deletion markers (`X…`) go first, then documents (`E…`).
        let (prefix, from) = match cursor.first() {
            None => (b"X".as_slice(), b"X".to_vec()),
            Some(b'X') => (b"X".as_slice(), next_key(cursor)),
            _ => (b"E".as_slice(), next_key(cursor)),
        };
        let keys = scan_from(t, prefix, &from, n)?;
        let Some(last) = keys.last() else {
            return Ok((out, (prefix == b"X").then(|| b"E".to_vec())));
        };
        let mut last_key = prefix.to_vec();
        last_key.extend_from_slice(last);
        for pk in keys {
            if !mine(&pk) {
                continue;
            }
            let mut key = prefix.to_vec();
            key.extend_from_slice(&pk);
            let value = t.get(key.as_slice()).map_err(store_err)?.map(|v| v.value().to_vec());
            let version = value
                .as_deref()
                .and_then(|b| b.get(..8))
                .and_then(|s| s.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            if prefix == b"X" {
                t.remove(key.as_slice()).map_err(store_err)?;
                out.push(Handover::Deleted(pk, version));
            } else if let Some(mut doc) = self.document(t, &pk)? {
                stamp(&mut doc, version);
                out.push(Handover::Document(pk, doc));
            }
        }
        Ok((out, Some(last_key)))
    }
}

/// The smallest key after `key`.
fn next_key(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

/// Adds `"_version": v` to a document (an object).
fn stamp(doc: &mut Vec<u8>, v: u64) {
    doc.pop(); // the closing brace
    if doc.len() > 1 {
        doc.push(b',');
    }
    doc.extend_from_slice(format!("\"_version\":{v}}}").as_bytes());
}

/// Every entry starting with `prefix`: its key without the prefix, and its value.
fn scan_entries(t: &StateTable<'_>, prefix: &[u8]) -> Result<Vec<Entry>, ViewError> {
    let mut out = Vec::new();
    let iter = match prefix_end(prefix) {
        Some(end) => t.range(prefix..end.as_slice()),
        None => t.range(prefix..),
    }
    .map_err(store_err)?;
    for entry in iter {
        let (k, v) = entry.map_err(store_err)?;
        out.push((k.value()[prefix.len()..].to_vec(), v.value().to_vec()));
    }
    Ok(out)
}

fn scan_from(
    t: &StateTable<'_>,
    prefix: &[u8],
    from: &[u8],
    limit: usize,
) -> Result<Vec<Vec<u8>>, ViewError> {
    let mut out = Vec::new();
    let iter = match prefix_end(prefix) {
        Some(end) => t.range(from..end.as_slice()),
        None => t.range(from..),
    }
    .map_err(store_err)?;
    for entry in iter {
        let (k, _) = entry.map_err(store_err)?;
        out.push(k.value()[prefix.len()..].to_vec());
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// A digest of a document, to tell whether it changed since it was last written.
fn digest(bytes: &[u8]) -> [u8; 16] {
    use sha2::Digest;
    let full = sha2::Sha256::digest(bytes);
    let mut out = [0; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// A total order on JSON values: null < booleans < numbers < strings < arrays < objects;
/// numbers by value, strings by bytes (as Postgres's "C" collation orders text).
pub fn cmp_values(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            Value::Array(_) => 4,
            Value::Object(_) => 5,
        }
    }
    match (a, b) {
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x.cmp(&y),
            _ => {
                let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
                x.partial_cmp(&y).unwrap_or(Ordering::Equal)
            }
        },
        (Value::String(x), Value::String(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Value::Array(x), Value::Array(y)) => cmp_values_list(x, y),
        (Value::Object(x), Value::Object(y)) => {
            let xs: Vec<&Value> = x.values().collect();
            let ys: Vec<&Value> = y.values().collect();
            for (p, q) in xs.iter().zip(&ys) {
                let o = cmp_values(p, q);
                if o != Ordering::Equal {
                    return o;
                }
            }
            xs.len().cmp(&ys.len())
        }
        _ => rank(a).cmp(&rank(b)),
    }
}

fn cmp_values_list(a: &[Value], b: &[Value]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = cmp_values(x, y);
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    //! The view core against a model that recomputes every document from the tables.

    use std::collections::{BTreeMap, BTreeSet};

    use polylog_testkit::Rng;
    use serde_json::{json, Map, Value};

    use super::*;
    use crate::config::JoinKind;
    use crate::config::ViewConfig;

    const VIEW: &str = r#"
        root = "app.public.videos"
        fields = ["id", "title", "publisher_id"]
        rename = { title = "headline" }

        [[joins]]
        name = "publisher"
        topic = "app.public.publishers"
        on = { publisher_id = "id" }
        kind = "one"
        joins = [{ name = "country", topic = "app.public.countries", on = { country = "code" }, kind = "one" }]

        [[joins]]
        name = "tags"
        topic = "app.public.video_tags"
        on = { id = "video_id" }
        kind = "many"
        fields = ["pos"]
        order_by = ["pos"]
        joins = [{ name = "tag", topic = "app.public.tags", on = { tag_id = "id" }, kind = "one" }]
    "#;

    /// Tables by node, rows by key (the key as JSON).
    type Tables = Vec<BTreeMap<Vec<u8>, Map<String, Value>>>;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// A random row change of one of the five tables (keys from small domains, so rows
    /// collide, move between parents and point at missing parents).
    fn change(rng: &mut Rng) -> (usize, Vec<u8>, Option<Map<String, Value>>) {
        let small = |rng: &mut Rng, n: u64| -> Value {
            if rng.chance(10) {
                Value::Null
            } else {
                json!(rng.below(n))
            }
        };
        let node = rng.below(5) as usize;
        let (key, row) = match node {
            0 => {
                let id = rng.below(6);
                let row = json!({"id": id, "title": format!("t{}", rng.below(4)), "publisher_id": small(rng, 4), "secret": rng.below(3)});
                (json!({"id": id}), row)
            }
            1 => {
                let id = rng.below(4);
                let country = if rng.chance(10) {
                    Value::Null
                } else {
                    json!(["fr", "de", "us"][rng.below(3) as usize])
                };
                (
                    json!({"id": id}),
                    json!({"id": id, "name": format!("p{}", rng.below(3)), "country": country}),
                )
            }
            2 => {
                let code = ["fr", "de", "us"][rng.below(3) as usize];
                (json!({"code": code}), json!({"code": code, "name": format!("c{}", rng.below(3))}))
            }
            3 => {
                let (v, t) = (rng.below(6), rng.below(4));
                (
                    json!({"video_id": v, "tag_id": t}),
                    json!({"video_id": v, "tag_id": t, "pos": rng.below(3)}),
                )
            }
            _ => {
                let id = rng.below(4);
                (json!({"id": id}), json!({"id": id, "label": format!("l{}", rng.below(3))}))
            }
        };
        let key = serde_json::to_vec(&key).expect("json");
        let row = (!rng.chance(25)).then(|| obj(row));
        (node, key, row)
    }

    /// The model: a document computed from the tables the way the view is defined.
    fn model_doc(
        spec: &ViewSpec,
        tables: &Tables,
        node: usize,
        row: &Map<String, Value>,
    ) -> Map<String, Value> {
        let n = &spec.nodes[node];
        let mut out = Map::new();
        let name = |c: &str| n.rename.get(c).cloned().unwrap_or_else(|| c.to_string());
        match &n.fields {
            Some(f) => f.iter().for_each(|c| {
                out.insert(name(c), row.get(c).cloned().unwrap_or(Value::Null));
            }),
            None => row.iter().for_each(|(c, v)| {
                out.insert(name(c), v.clone());
            }),
        }
        for &c in &n.children {
            let child = &spec.nodes[c];
            let mut matches: Vec<(Value, &Map<String, Value>)> = tables[c]
                .iter()
                .filter(|(_, r)| {
                    child.parent_cols.iter().zip(&child.child_cols).all(|(p, q)| {
                        let (a, b) =
                            (row.get(p).unwrap_or(&Value::Null), r.get(q).unwrap_or(&Value::Null));
                        !a.is_null() && a == b
                    })
                })
                .map(|(k, r)| (serde_json::from_slice(k).expect("key"), r))
                .collect();
            matches.sort_by(|(ka, a), (kb, b)| {
                let key = |k: &Value, r: &Map<String, Value>| {
                    let mut v: Vec<Value> = child
                        .order_by
                        .iter()
                        .map(|c| r.get(c).cloned().unwrap_or(Value::Null))
                        .collect();
                    v.push(k.clone());
                    Value::Array(v)
                };
                cmp_values(&key(ka, a), &key(kb, b))
            });
            let v = match child.kind {
                JoinKind::One => matches
                    .first()
                    .map_or(Value::Null, |(_, r)| Value::Object(model_doc(spec, tables, c, r))),
                JoinKind::Many => Value::Array(
                    matches
                        .iter()
                        .map(|(_, r)| Value::Object(model_doc(spec, tables, c, r)))
                        .collect(),
                ),
            };
            out.insert(child.name.clone(), v);
        }
        out
    }

    fn model_docs(spec: &ViewSpec, tables: &Tables) -> BTreeMap<Vec<u8>, Map<String, Value>> {
        tables[0].iter().map(|(k, r)| (k.clone(), model_doc(spec, tables, 0, r))).collect()
    }

    #[test]
    fn incremental_documents_equal_recomputed_ones_over_random_changes() {
        let cfg: ViewConfig = toml::from_str(VIEW).expect("view config");
        let spec = ViewSpec::new("v", &cfg).expect("valid view");
        let core = Core { spec: &spec };
        let mut rng = Rng::from_env("views core model");
        for case in 0..1000 {
            let db = redb::Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .expect("in-memory store");
            let wtx = db.begin_write().expect("write");
            let mut t = wtx.open_table(STATE).expect("table");
            let mut dirty = Dirty::default();
            let mut tables: Tables = vec![BTreeMap::new(); spec.nodes.len()];
            let mut emitted: BTreeMap<Vec<u8>, Map<String, Value>> = BTreeMap::new();
            let mut last_version = BTreeMap::new();
            for tx in 1..=(10 + rng.below(30)) {
                let before = model_docs(&spec, &tables);
                let mut ops = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    if rng.chance(2) {
                        let node = rng.below(5) as usize;
                        core.truncate(&mut t, &mut dirty, node, None).expect("truncate");
                        tables[node].clear();
                        ops.push(format!("truncate {node}"));
                        continue;
                    }
                    let (node, key, row) = change(&mut rng);
                    ops.push(format!("{node} {} {row:?}", String::from_utf8_lossy(&key)));
                    let bytes = row.as_ref().map(|r| serde_json::to_vec(r).expect("json"));
                    core.apply(&mut t, &mut dirty, node, &key, bytes.as_deref()).expect("apply");
                    match row {
                        Some(r) => tables[node].insert(key, r),
                        None => tables[node].remove(&key),
                    };
                }
                let after = model_docs(&spec, &tables);
                let mut out = Vec::new();
                while !dirty.is_empty() {
                    out.extend(core.emit(&mut t, &mut dirty, tx, 3).expect("emit"));
                }
                let mut seen = BTreeSet::new();
                for (key, doc) in out {
                    assert!(
                        seen.insert(key.clone()),
                        "case {case} tx {tx}: a document emitted twice"
                    );
                    match doc {
                        Some(bytes) => {
                            let mut d: Map<String, Value> =
                                serde_json::from_slice(&bytes).expect("json");
                            let v =
                                d.remove("_version").and_then(|v| v.as_u64()).expect("_version");
                            assert!(
                                v >= *last_version.get(&key).unwrap_or(&0),
                                "versions go forward"
                            );
                            last_version.insert(key.clone(), v);
                            emitted.insert(key, d);
                        }
                        None => {
                            assert!(
                                emitted.remove(&key).is_some(),
                                "case {case}: a tombstone for a document never emitted"
                            );
                        }
                    }
                }
                let changed: BTreeSet<Vec<u8>> = before
                    .keys()
                    .chain(after.keys())
                    .filter(|k| before.get(*k) != after.get(*k))
                    .cloned()
                    .collect();
                assert_eq!(
                    seen, changed,
                    "case {case} tx {tx}: emitted exactly the changed documents; ops {ops:#?}"
                );
                assert_eq!(emitted, after, "case {case} tx {tx}: documents after {ops:#?}");
            }
        }
    }
}
