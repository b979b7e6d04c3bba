//! The target table: its columns from Postgres' catalog (or a schema file when the load creates
//! it), and its partitions, so rows go straight into the right one.

use std::path::Path;

use polylog_postgres::schema::{quote_ident, quote_literal};
use polylog_postgres::wire::Connection;
use serde::Deserialize;

use crate::types::{ColType, Column, ColumnData, Values};
use crate::LoadError;

/// A schema file: the table a load creates when it does not exist yet.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaFile {
    pub columns: Vec<SchemaColumn>,
    /// Range-partition the table by a date or timestamp column, one partition per interval,
    /// created as rows need them.
    pub partition: Option<PartitionSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaColumn {
    pub name: String,
    /// A Postgres type: `bigint`, `numeric(12,2)`, `timestamptz`, `varchar(40)`, ...
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default)]
    pub not_null: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    pub column: String,
    pub interval: Interval,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    Day,
    Month,
}

impl SchemaFile {
    pub fn read(path: &Path) -> Result<SchemaFile, LoadError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LoadError::Setup(format!("cannot read {}: {e}", path.display())))?;
        let s: SchemaFile = toml::from_str(&text)
            .map_err(|e| LoadError::Setup(format!("schema file {}: {e}", path.display())))?;
        if s.columns.is_empty() {
            return Err(LoadError::Setup(format!(
                "schema file {}: no [[columns]]",
                path.display()
            )));
        }
        if let Some(p) = &s.partition {
            if !s.columns.iter().any(|c| c.name == p.column) {
                return Err(LoadError::Setup(format!(
                    "schema file {}: partition column {:?} is not one of its columns",
                    path.display(),
                    p.column
                )));
            }
        }
        Ok(s)
    }

    pub fn create_sql(&self, table: &str) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                format!(
                    "{} {}{}",
                    quote_ident(&c.name),
                    c.ty,
                    if c.not_null { " NOT NULL" } else { "" }
                )
            })
            .collect();
        let part = match &self.partition {
            Some(p) => format!(" PARTITION BY RANGE ({})", quote_ident(&p.column)),
            None => String::new(),
        };
        format!("CREATE TABLE {table} ({}){part}", cols.join(", "))
    }
}

/// `schema.table` or `table`, quoted for SQL.
pub fn quote_table(name: &str) -> String {
    match name.split_once('.') {
        Some((s, t)) => format!("{}.{}", quote_ident(s), quote_ident(t)),
        None => quote_ident(name),
    }
}

fn pg(e: polylog_postgres::wire::PgError) -> LoadError {
    LoadError::Postgres(e.to_string())
}

/// Whether the table exists.
pub fn exists(conn: &mut Connection, table: &str) -> Result<bool, LoadError> {
    let rows = conn
        .query_params("SELECT to_regclass($1) IS NOT NULL", &[quote_table(table).as_bytes()])
        .map_err(pg)?;
    Ok(rows.first().and_then(|r| r[0].as_deref()) == Some("t"))
}

/// The table's columns that a COPY can write (not generated), in order.
pub fn columns(conn: &mut Connection, table: &str) -> Result<Vec<Column>, LoadError> {
    let rows = conn
        .query_params(
            "SELECT a.attname, bt.typname, \
                    CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END, \
                    a.attnotnull, format_type(a.atttypid, a.atttypmod), bt.typtype = 'e', \
                    bt.typcategory = 'A' \
             FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
             WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped \
               AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[quote_table(table).as_bytes()],
        )
        .map_err(pg)?;
    let mut cols = Vec::new();
    for r in rows {
        let get = |i: usize| r[i].clone().unwrap_or_default();
        let (name, typname, sql_type) = (get(0), get(1), get(4));
        let typmod: i32 = get(2).parse().unwrap_or(-1);
        let ty = ColType::from_catalog(&typname, typmod, get(5) == "t").ok_or_else(|| {
            LoadError::Setup(format!(
                "column {name:?} of {table} is {sql_type}, which a load cannot carry exactly; \
                 supported: {}",
                ColType::SUPPORTED
            ))
        })?;
        cols.push(Column { name, ty, not_null: get(3) == "t", sql_type });
    }
    if cols.is_empty() {
        return Err(LoadError::Setup(format!("{table} has no columns to load")));
    }
    Ok(cols)
}

/// Where a chunk's rows go: the table itself, or one of its partitions.
#[derive(Debug, Clone)]
pub struct Target {
    /// Quoted SQL name.
    pub sql: String,
    /// `CREATE TABLE ... PARTITION OF ...` when the load creates this partition; the rows of
    /// its first chunk then go in with `FREEZE`.
    pub create: Option<String>,
}

/// Routes rows to partitions of a table partitioned by range on one integer, date or timestamp
/// column. Tables partitioned otherwise get their rows through the parent (Postgres routes).
#[derive(Debug)]
pub struct Router {
    pub targets: Vec<Target>,
    /// The key column's index in the loaded columns.
    key: usize,
    /// Sorted, non-overlapping `[lo, hi)` ranges of the key's ordinal, with their target.
    ranges: Vec<(i64, i64, usize)>,
    default: Option<usize>,
    auto: Option<Interval>,
    parent: String,
    parent_unquoted: String,
}

impl Router {
    /// `None` when the table is not partitioned in a way rows can be routed on our side.
    pub fn discover(
        conn: &mut Connection,
        table: &str,
        columns: &[Column],
        auto: Option<Interval>,
    ) -> Result<Option<Router>, LoadError> {
        let qt = quote_table(table);
        let rows = conn
            .query_params(
                "SELECT p.partstrat, p.partnatts, a.attname \
                 FROM pg_partitioned_table p \
                 LEFT JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0] \
                 WHERE p.partrelid = $1::regclass",
                &[qt.as_bytes()],
            )
            .map_err(pg)?;
        let Some(r) = rows.first() else { return Ok(None) };
        if r[0].as_deref() != Some("r") || r[1].as_deref() != Some("1") || r[2].is_none() {
            return Ok(None); // list, hash, several or expression keys: Postgres routes
        }
        let key_name = r[2].clone().unwrap_or_default();
        let Some(key) = columns.iter().position(|c| c.name == key_name) else {
            return Err(LoadError::Setup(format!(
                "{table} is partitioned by {key_name:?}, which the input does not give"
            )));
        };
        if !matches!(
            columns[key].ty,
            ColType::Int2
                | ColType::Int4
                | ColType::Int8
                | ColType::Date
                | ColType::Timestamp(_)
                | ColType::Timestamptz(_)
        ) {
            return Ok(None);
        }
        if auto.is_some()
            && !matches!(
                columns[key].ty,
                ColType::Date | ColType::Timestamp(_) | ColType::Timestamptz(_)
            )
        {
            return Err(LoadError::Setup(format!(
                "partitions by day or month need a date or timestamp key; {key_name:?} is {}",
                columns[key].sql_type
            )));
        }
        // Bounds in UTC, so that timestamptz literals carry +00.
        conn.execute("SET TimeZone = 'UTC'").map_err(pg)?;
        let parts = conn
            .query_params(
                "SELECT c.oid::regclass::text, pg_get_expr(c.relpartbound, c.oid), c.relkind \
                 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = $1::regclass ORDER BY 1",
                &[qt.as_bytes()],
            )
            .map_err(pg)?;
        let mut router = Router {
            targets: vec![Target { sql: qt.clone(), create: None }],
            key,
            ranges: Vec::new(),
            default: None,
            auto,
            parent: qt,
            parent_unquoted: table.to_string(),
        };
        for p in parts {
            let name = p[0].clone().unwrap_or_default();
            let bound = p[1].clone().unwrap_or_default();
            if p[2].as_deref() == Some("p") {
                return Ok(None); // sub-partitioned: let Postgres route
            }
            let t = router.targets.len();
            router.targets.push(Target { sql: name.clone(), create: None });
            if bound == "DEFAULT" {
                router.default = Some(t);
                continue;
            }
            let (lo, hi) = parse_range_bound(&bound, &columns[key].ty).ok_or_else(|| {
                LoadError::Setup(format!("cannot read the bounds of partition {name}: {bound}"))
            })?;
            router.ranges.push((lo, hi, t));
        }
        router.ranges.sort();
        Ok(Some(router))
    }

    /// The target of the last row of `col` (the key column of a chunk being built), creating a
    /// partition when the load makes them. `Err` names the row's problem.
    pub fn route(&mut self, key: &ColumnData, ty: &ColType) -> Result<usize, String> {
        let row = key.valid.len() - 1;
        if !key.valid[row] {
            return self.default.ok_or_else(|| {
                "the partition key is NULL and the table has no default partition".into()
            });
        }
        let n = key.values.len() - 1;
        let v = match &key.values {
            Values::I16(v) => v[n] as i64,
            Values::I32(v) => v[n] as i64,
            Values::I64(v) => v[n],
            _ => return Ok(0),
        };
        let i = self.ranges.partition_point(|r| r.1 <= v);
        if let Some(&(lo, hi, t)) = self.ranges.get(i) {
            if lo <= v && v < hi {
                return Ok(t);
            }
        }
        if let Some(interval) = self.auto {
            if let Some(t) = self.create_for(v, ty, interval, i) {
                return Ok(t);
            }
        }
        self.default.ok_or_else(|| format!("no partition of {} holds this key", self.parent))
    }

    pub fn key(&self) -> usize {
        self.key
    }

    fn create_for(&mut self, v: i64, ty: &ColType, interval: Interval, at: usize) -> Option<usize> {
        use crate::types::{civil_from_days, days_from_civil, format_date};
        let day = match ty {
            ColType::Date => v,
            _ => v.div_euclid(86_400_000_000),
        };
        if !(-1_000_000..=3_000_000).contains(&day) {
            return None; // infinity and far dates: no partition of their own
        }
        let (y, m, d) = civil_from_days(day);
        let (lo_day, hi_day, suffix) = match interval {
            Interval::Day => (day, day + 1, format!("{y:04}{m:02}{d:02}")),
            Interval::Month => {
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (days_from_civil(y, m, 1), days_from_civil(ny, nm, 1), format!("{y:04}{m:02}"))
            }
        };
        let (lo, hi) = match ty {
            ColType::Date => (lo_day, hi_day),
            _ => (lo_day * 86_400_000_000, hi_day * 86_400_000_000),
        };
        // Do not overlap a partition made by someone else.
        if self.ranges.get(at).is_some_and(|r| r.0 < hi) || at > 0 && self.ranges[at - 1].1 > lo {
            return None;
        }
        let base = self.parent_unquoted.rsplit('.').next().unwrap_or(&self.parent_unquoted);
        let name = format!("{base}_{suffix}");
        let sql_name = match self.parent_unquoted.split_once('.') {
            Some((s, _)) => format!("{}.{}", quote_ident(s), quote_ident(&name)),
            None => quote_ident(&name),
        };
        let lit = |d: i64| match ty {
            ColType::Timestamptz(_) => quote_literal(&format!("{}+00", format_date(d as i32))),
            _ => quote_literal(&format_date(d as i32)),
        };
        let create = format!(
            "CREATE TABLE {sql_name} PARTITION OF {} FOR VALUES FROM ({}) TO ({})",
            self.parent,
            lit(lo_day),
            lit(hi_day)
        );
        let t = self.targets.len();
        self.targets.push(Target { sql: sql_name, create: Some(create) });
        self.ranges.insert(at, (lo, hi, t));
        Some(t)
    }
}

/// `FOR VALUES FROM (x) TO (y)` as ordinals of the key (MINVALUE/MAXVALUE as the extremes).
fn parse_range_bound(bound: &str, ty: &ColType) -> Option<(i64, i64)> {
    let rest = bound.strip_prefix("FOR VALUES FROM (")?;
    let (lo, rest) = rest.split_once(") TO (")?;
    let hi = rest.strip_suffix(')')?;
    let ordinal = |s: &str| -> Option<i64> {
        match s {
            "MINVALUE" => return Some(i64::MIN),
            "MAXVALUE" => return Some(i64::MAX),
            _ => {}
        }
        let s = s.trim_matches('\'');
        let mut col = ColumnData::new(ty);
        col.push_text(ty, s.as_bytes()).ok()?;
        match &col.values {
            Values::I16(v) => v.first().map(|&x| x as i64),
            Values::I32(v) => v.first().map(|&x| x as i64),
            Values::I64(v) => v.first().copied(),
            _ => None,
        }
    };
    Some((ordinal(lo)?, ordinal(hi)?))
}
