//! A view's join tree, resolved and checked from its config.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{JoinConfig, JoinKind, ViewConfig};
use crate::json::Fields;
use crate::ViewError;

/// One table of a view: the root (node 0) or a join, with the columns it needs.
#[derive(Debug, Clone)]
pub struct Node {
    /// Where it is configured, for messages: `views.v` or `views.v.joins[0].joins[1]`.
    pub path: String,
    /// The document field it fills in its parent (empty for the root).
    pub name: String,
    pub topic: String,
    pub kind: JoinKind,
    pub parent: Option<usize>,
    /// Join columns of the parent row and, pairwise, of this node's rows.
    pub parent_cols: Vec<String>,
    pub child_cols: Vec<String>,
    pub fields: Option<Vec<String>>,
    pub rename: BTreeMap<String, String>,
    pub order_by: Vec<String>,
    pub children: Vec<usize>,
    /// Columns kept in the state (`None`: every column, as no projection is given).
    pub stored: Option<BTreeSet<String>>,
}

/// A checked view: its nodes in depth-first order, the root first.
#[derive(Debug, Clone)]
pub struct ViewSpec {
    pub name: String,
    pub nodes: Vec<Node>,
    pub cache_mb: u64,
    /// The config it came from, to notice a changed definition.
    pub fingerprint: String,
}

/// A column as the source's schema history records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    pub type_name: String,
}

fn bad(path: &str, msg: impl std::fmt::Display) -> ViewError {
    ViewError::Config(format!("`{path}`: {msg}"))
}

impl ViewSpec {
    /// Checks the shape of a view (names, topics, join cycles); columns are checked against
    /// the tables' schemas by [`ViewSpec::check_columns`].
    pub fn new(name: &str, cfg: &ViewConfig) -> Result<ViewSpec, ViewError> {
        let at = format!("views.{name}");
        polylog_log::validate_topic_name(&format!("views.{name}"))
            .map_err(|e| bad(&at, format!("the view's name makes a bad topic name: {e}")))?;
        polylog_log::validate_topic_name(&cfg.root).map_err(|e| bad(&format!("{at}.root"), e))?;
        let root = Node {
            path: at.clone(),
            name: String::new(),
            topic: cfg.root.clone(),
            kind: JoinKind::One,
            parent: None,
            parent_cols: Vec::new(),
            child_cols: Vec::new(),
            fields: cfg.fields.clone(),
            rename: cfg.rename.clone(),
            order_by: Vec::new(),
            children: Vec::new(),
            stored: None,
        };
        let mut spec = ViewSpec {
            name: name.to_string(),
            nodes: vec![root],
            cache_mb: cfg.cache_mb.max(1),
            fingerprint: format!("{cfg:?}"),
        };
        spec.add_joins(0, &at, &cfg.joins)?;
        if spec.nodes.len() > 255 {
            return Err(bad(&at, "a view joins at most 255 tables"));
        }
        for i in 0..spec.nodes.len() {
            spec.check_names(i)?;
            spec.nodes[i].stored = spec.stored_columns(i);
        }
        Ok(spec)
    }

    fn add_joins(
        &mut self,
        parent: usize,
        at: &str,
        joins: &[JoinConfig],
    ) -> Result<(), ViewError> {
        for (i, j) in joins.iter().enumerate() {
            let path = format!("{at}.joins[{i}]");
            polylog_log::validate_topic_name(&j.topic)
                .map_err(|e| bad(&format!("{path}.topic"), e))?;
            if j.on.is_empty() {
                return Err(bad(
                    &format!("{path}.on"),
                    "give at least one `parent_column = \"joined_column\"` pair",
                ));
            }
            // A topic joined below itself would nest documents without end.
            let mut up = Some(parent);
            while let Some(a) = up {
                if self.nodes[a].topic == j.topic {
                    return Err(bad(
                        &format!("{path}.topic"),
                        format!(
                            "{:?} is already joined above this join (at `{}`): a join cycle",
                            j.topic, self.nodes[a].path
                        ),
                    ));
                }
                up = self.nodes[a].parent;
            }
            if j.kind == JoinKind::One && !j.order_by.is_empty() {
                return Err(bad(
                    &format!("{path}.order_by"),
                    "only `kind = \"many\"` joins are ordered",
                ));
            }
            let id = self.nodes.len();
            self.nodes.push(Node {
                path: path.clone(),
                name: j.name.clone(),
                topic: j.topic.clone(),
                kind: j.kind,
                parent: Some(parent),
                parent_cols: j.on.keys().cloned().collect(),
                child_cols: j.on.values().cloned().collect(),
                fields: j.fields.clone(),
                rename: j.rename.clone(),
                order_by: j.order_by.clone(),
                children: Vec::new(),
                stored: None,
            });
            self.nodes[parent].children.push(id);
            self.add_joins(id, &path, &j.joins)?;
        }
        Ok(())
    }

    /// Field names of one document level must not collide.
    fn check_names(&self, i: usize) -> Result<(), ViewError> {
        let n = &self.nodes[i];
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let mut claim = |field: String, what: String| -> Result<(), ViewError> {
            if field.is_empty() {
                return Err(bad(&n.path, format!("{what} has an empty field name")));
            }
            if field == "_version" && n.parent.is_none() {
                return Err(bad(
                    &n.path,
                    format!("{what}: `_version` is the document's version field"),
                ));
            }
            if let Some(other) = seen.insert(field.clone(), what.clone()) {
                return Err(bad(
                    &n.path,
                    format!("field {field:?} comes from both {other} and {what}"),
                ));
            }
            Ok(())
        };
        if let Some(fields) = &n.fields {
            for f in fields {
                claim(
                    n.rename.get(f).cloned().unwrap_or_else(|| f.clone()),
                    format!("column {f:?}"),
                )?;
            }
            for col in n.rename.keys() {
                if !fields.contains(col) {
                    return Err(bad(
                        &format!("{}.rename", n.path),
                        format!("column {col:?} is renamed but not in `fields`"),
                    ));
                }
            }
        }
        for &c in &n.children {
            claim(self.nodes[c].name.clone(), format!("join `{}`", self.nodes[c].path))?;
        }
        Ok(())
    }

    fn stored_columns(&self, i: usize) -> Option<BTreeSet<String>> {
        let n = &self.nodes[i];
        let fields = n.fields.as_ref()?;
        let mut cols: BTreeSet<String> = fields.iter().cloned().collect();
        cols.extend(n.child_cols.iter().cloned());
        cols.extend(n.order_by.iter().cloned());
        for &c in &n.children {
            cols.extend(self.nodes[c].parent_cols.iter().cloned());
        }
        Some(cols)
    }

    /// The topic the view writes.
    pub fn output_topic(&self) -> String {
        format!("views.{}", self.name)
    }

    /// Every topic the view reads, once each.
    pub fn topics(&self) -> BTreeSet<&str> {
        self.nodes.iter().map(|n| n.topic.as_str()).collect()
    }

    /// The nodes fed by a topic.
    pub fn nodes_of(&self, topic: &str) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].topic == topic).collect()
    }

    /// Checks every column the view names against the tables' columns (`schema(topic)`,
    /// `None` when a topic's schema is not known) and that joined columns have comparable
    /// types.
    pub fn check_columns(
        &self,
        schema: impl Fn(&str) -> Option<Vec<ColumnInfo>>,
    ) -> Result<(), ViewError> {
        let schemas: Vec<Option<Vec<ColumnInfo>>> =
            self.nodes.iter().map(|n| schema(&n.topic)).collect();
        let find = |i: usize, col: &str| -> Result<Option<&ColumnInfo>, String> {
            let Some(cols) = &schemas[i] else { return Ok(None) };
            cols.iter().find(|c| c.name == col).map(Some).ok_or_else(|| {
                let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
                format!(
                    "{col:?} is not a column of {} (its columns: {})",
                    self.nodes[i].topic,
                    names.join(", ")
                )
            })
        };
        for (i, n) in self.nodes.iter().enumerate() {
            if let (None, Some(cols)) = (&n.fields, &schemas[i]) {
                for c in cols {
                    let name = n.rename.get(&c.name).unwrap_or(&c.name);
                    if let Some(&j) = n.children.iter().find(|&&j| &self.nodes[j].name == name) {
                        return Err(bad(
                            &format!("{}.name", self.nodes[j].path),
                            format!(
                                "{name:?} is also a column of {}: name the join differently, or list `fields`",
                                n.topic
                            ),
                        ));
                    }
                }
            }
            for f in n.fields.iter().flatten() {
                find(i, f).map_err(|e| bad(&format!("{}.fields", n.path), e))?;
            }
            for f in &n.order_by {
                find(i, f).map_err(|e| bad(&format!("{}.order_by", n.path), e))?;
            }
            let Some(p) = n.parent else { continue };
            for (pc, cc) in n.parent_cols.iter().zip(&n.child_cols) {
                let on = format!("{}.on", n.path);
                let a = find(p, pc).map_err(|e| bad(&on, e))?;
                let b = find(i, cc).map_err(|e| bad(&on, e))?;
                if let (Some(a), Some(b)) = (a, b) {
                    if type_class(&a.type_name) != type_class(&b.type_name) {
                        return Err(bad(
                            &on,
                            format!(
                                "{pc} ({}) and {cc} ({}) have types that do not compare",
                                a.type_name, b.type_name
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Types whose values compare equal in the documents' JSON form belong to one class.
fn type_class(type_name: &str) -> String {
    let base = type_name.split('(').next().unwrap_or(type_name).trim();
    match base {
        "smallint" | "integer" | "bigint" | "oid" | "int2" | "int4" | "int8" => "integer".into(),
        "text" | "character varying" | "varchar" | "name" | "citext" => "text".into(),
        other => other.to_string(),
    }
}

/// The values of `cols` in a row, as the bytes of a JSON array; `None` if any is null or
/// missing (a null never joins).
pub fn join_values(row: &Fields<'_>, cols: &[String]) -> Option<Vec<u8>> {
    let mut out = vec![b'['];
    for (i, c) in cols.iter().enumerate() {
        let v = row.get(c).filter(|v| *v != b"null")?;
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(v);
    }
    out.push(b']');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> Result<ViewSpec, ViewError> {
        let cfg: ViewConfig = toml::from_str(toml_text).expect("config parses");
        ViewSpec::new("v", &cfg)
    }

    #[test]
    fn cycles_and_name_clashes_are_rejected_with_their_place() {
        let e = spec(
            "root = \"a.public.videos\"\njoins = [{ name = \"p\", topic = \"a.public.p\", on = { p_id = \"id\" }, kind = \"one\", joins = [{ name = \"v\", topic = \"a.public.videos\", on = { id = \"p_id\" }, kind = \"many\" }] }]",
        )
        .expect_err("a cycle");
        assert!(e.to_string().contains("`views.v.joins[0].joins[0].topic`"), "{e}");
        assert!(e.to_string().contains("cycle"), "{e}");
        let e = spec(
            "root = \"a.public.videos\"\nfields = [\"id\", \"p\"]\njoins = [{ name = \"p\", topic = \"a.public.p\", on = { p_id = \"id\" }, kind = \"one\" }]",
        )
        .expect_err("a clash");
        assert!(e.to_string().contains("\"p\""), "{e}");
    }

    #[test]
    fn columns_and_types_are_checked_against_schemas() {
        let s = spec(
            "root = \"a.public.videos\"\njoins = [{ name = \"p\", topic = \"a.public.p\", on = { p_id = \"id\" }, kind = \"one\" }]",
        )
        .expect("valid");
        let cols = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(n, t)| ColumnInfo { name: n.to_string(), type_name: t.to_string() })
                .collect()
        };
        let ok = |t: &str| match t {
            "a.public.videos" => Some(cols(&[("id", "integer"), ("p_id", "bigint")])),
            _ => Some(cols(&[("id", "integer"), ("name", "text")])),
        };
        s.check_columns(ok).expect("int and bigint compare");
        let e = s
            .check_columns(|t| match t {
                "a.public.videos" => Some(cols(&[("id", "integer"), ("p_id", "text")])),
                _ => Some(cols(&[("id", "integer")])),
            })
            .expect_err("text vs integer");
        assert!(e.to_string().contains("`views.v.joins[0].on`"), "{e}");
        let e = s
            .check_columns(|t| match t {
                "a.public.videos" => Some(cols(&[("id", "integer")])),
                _ => Some(cols(&[("id", "integer")])),
            })
            .expect_err("unknown column");
        assert!(e.to_string().contains("\"p_id\" is not a column"), "{e}");
    }
}
