//! What is captured: tables, their columns and keys, read from the catalog; the publication.

use crate::config::{glob_match, PostgresSourceConfig};
use crate::error::SourceError;
use crate::types::PgType;
use crate::wire::Connection;

/// A captured column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSchema {
    pub name: String,
    pub type_oid: u32,
    /// As `format_type` prints it (`numeric(10,2)`, `text[]`, `mood`).
    pub type_name: String,
    pub ty: PgType,
    /// Left out of events (`exclude_columns`).
    pub excluded: bool,
    /// Replaced by a keyed hash (`mask_columns`).
    pub masked: bool,
}

/// A captured table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `d` default (primary key), `f` full, `i` index, `n` nothing.
    pub replica_identity: char,
    pub columns: Vec<ColumnSchema>,
    /// Indexes into `columns` of the event key, in key order: the primary key, the columns of
    /// the replica identity index with `REPLICA IDENTITY USING INDEX` (what Postgres sends for
    /// deletes), or every column with `REPLICA IDENTITY FULL` and no primary key.
    pub key: Vec<usize>,
}

impl TableSchema {
    /// `schema.table`
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
    /// The table as an SQL identifier.
    pub fn sql_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Refuses a server that cannot do logical replication, saying how to fix it.
pub fn check_server(conn: &mut Connection) -> Result<(), SourceError> {
    let rows = conn.query("SHOW wal_level")?;
    let level = rows.first().and_then(|r| r.first().cloned().flatten()).unwrap_or_default();
    if level != "logical" {
        return Err(SourceError::Setup(format!(
            "wal_level is {level:?}, and logical replication needs \"logical\": run ALTER SYSTEM SET \
             wal_level = logical; then restart Postgres"
        )));
    }
    Ok(())
}

const CATALOG_QUERY: &str = "\
SELECT c.oid, n.nspname, c.relname, c.relreplident, a.attname, a.atttypid, \
       format_type(a.atttypid, a.atttypmod), t.typtype, t.typbasetype, \
       COALESCE(et.typtype, ''), COALESCE(et.oid, 0), \
       COALESCE((SELECT k.n FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
                 WHERE i.indrelid = c.oid AND k.attnum = a.attnum \
                   AND CASE WHEN c.relreplident = 'i' THEN i.indisreplident ELSE i.indisprimary END), 0) \
FROM pg_class c \
JOIN pg_namespace n ON n.oid = c.relnamespace \
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
JOIN pg_type t ON t.oid = a.atttypid \
LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A' \
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
ORDER BY c.oid, a.attnum";

/// How a column of this type is converted, from the catalog's description of the type.
pub(crate) fn column_type(
    type_oid: u32,
    typtype: &str,
    base: u32,
    elem_typtype: &str,
    elem_oid: u32,
) -> PgType {
    match (typtype, elem_typtype) {
        ("e", _) => PgType::Enum,
        ("d", _) => PgType::from_oid(base),
        (_, "e") => PgType::Array(Box::new(PgType::Enum)),
        _ => match PgType::from_oid(type_oid) {
            PgType::Unknown(_) if elem_oid != 0 => {
                PgType::Array(Box::new(PgType::from_oid(elem_oid)))
            }
            t => t,
        },
    }
}

/// Reads every captured table from the catalog. A table that cannot be captured (no primary
/// key and no `REPLICA IDENTITY FULL`) is an error naming it and the fix.
pub fn discover(
    conn: &mut Connection,
    cfg: &PostgresSourceConfig,
) -> Result<Vec<TableSchema>, SourceError> {
    let rows = conn.query(CATALOG_QUERY)?;
    let mut tables: Vec<TableSchema> = Vec::new();
    let mut keys: Vec<Vec<(i64, usize)>> = Vec::new();
    for r in rows {
        let f = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        let oid: u32 = f(0).parse().unwrap_or(0);
        let (schema, name) = (f(1), f(2));
        let is_signal = cfg.signal_table.as_deref() == Some(format!("{schema}.{name}").as_str());
        if !cfg.captures(&schema, &name) || is_signal {
            continue;
        }
        if tables.last().is_none_or(|t| t.oid != oid) {
            tables.push(TableSchema {
                oid,
                schema: schema.clone(),
                name: name.clone(),
                replica_identity: f(3).chars().next().unwrap_or('d'),
                columns: Vec::new(),
                key: Vec::new(),
            });
            keys.push(Vec::new());
        }
        let (Some(t), Some(k)) = (tables.last_mut(), keys.last_mut()) else { continue };
        let column = f(4);
        let full = format!("{schema}.{name}.{column}");
        let type_oid: u32 = f(5).parse().unwrap_or(0);
        let ty = column_type(
            type_oid,
            &f(7),
            f(8).parse().unwrap_or(0),
            &f(9),
            f(10).parse().unwrap_or(0),
        );
        let key_pos: i64 = f(11).parse().unwrap_or(0);
        if key_pos > 0 {
            k.push((key_pos, t.columns.len()));
        }
        t.columns.push(ColumnSchema {
            name: column,
            type_oid,
            type_name: f(6),
            ty,
            excluded: cfg.exclude_columns.iter().any(|p| glob_match(p, &full)),
            masked: cfg.mask_columns.iter().any(|p| glob_match(p, &full)),
        });
    }
    for (t, mut k) in tables.iter_mut().zip(keys) {
        k.sort_unstable();
        t.key = k.into_iter().map(|(_, i)| i).collect();
        if t.key.is_empty() {
            if t.replica_identity == 'f' {
                t.key = (0..t.columns.len()).collect();
            } else {
                return Err(SourceError::Setup(format!(
                    "table {} has no primary key; set REPLICA IDENTITY FULL on it (ALTER TABLE {} \
                     REPLICA IDENTITY FULL) or exclude it with exclude_tables",
                    t.qualified(),
                    t.sql_name()
                )));
            }
        }
        if let Some(&i) = t.key.iter().find(|&&i| t.columns[i].excluded) {
            return Err(SourceError::Setup(format!(
                "column {}.{} is part of the key and cannot be excluded",
                t.qualified(),
                t.columns[i].name
            )));
        }
    }
    Ok(tables)
}

/// Creates the publication for `tables`, or makes an existing one publish exactly them.
pub fn ensure_publication(
    conn: &mut Connection,
    publication: &str,
    tables: &[TableSchema],
    signal_table: Option<&str>,
) -> Result<(), SourceError> {
    if tables.is_empty() {
        return Err(SourceError::Setup(
            "no table matches `tables` (minus `exclude_tables`); nothing to capture".into(),
        ));
    }
    let mut list: Vec<String> = tables.iter().map(TableSchema::sql_name).collect();
    if let Some(signal) = signal_table {
        let (schema, name) = signal.split_once('.').unwrap_or(("public", signal));
        let sql_name = format!("{}.{}", quote_ident(schema), quote_ident(name));
        let found = conn.query(&format!("SELECT to_regclass({})", quote_literal(&sql_name)))?;
        if found.first().and_then(|r| r.first().cloned().flatten()).is_none() {
            return Err(SourceError::Setup(format!(
                "signal table {signal} does not exist; create it with CREATE TABLE {sql_name} \
                 (id text PRIMARY KEY, type text NOT NULL, data text)"
            )));
        }
        if !list.contains(&sql_name) {
            list.push(sql_name);
        }
    }
    let exists = conn.query(&format!(
        "SELECT 1 FROM pg_publication WHERE pubname = {}",
        quote_literal(publication)
    ))?;
    let sql = if exists.is_empty() {
        format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
            quote_ident(publication),
            list.join(", ")
        )
    } else {
        format!("ALTER PUBLICATION {} SET TABLE {}", quote_ident(publication), list.join(", "))
    };
    conn.execute(&sql).map_err(|e| match e.code() {
        Some("42501") => SourceError::Setup(format!(
            "cannot manage publication {publication:?}: {e}. The user needs CREATE on the database \
             and must own the captured tables (or create the publication yourself as a superuser)"
        )),
        _ => e.into(),
    })
}
