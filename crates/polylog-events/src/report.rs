//! Reports over a rollup: any range and grouping, from the stored minutes, hours and days plus
//! the buckets still open in memory, so a report over months includes the events of the last
//! seconds.
//!
//! `GET /v1/reports/<rollup>?from=&to=&group_by=&interval=&filter=&format=`:
//! - `from`, `to`: `now`, `now-6h` (`s m h d w mo`), ms since the epoch, `2026-05-01` or
//!   `2026-05-01T10:00:00Z`; default the last 24 hours. Whole minutes: `from`'s minute is the
//!   first, `to`'s minute the last.
//! - `group_by`: dimensions of the rollup, comma-separated; none gives one row of totals.
//! - `interval`: `minute`, `hour` or `day` for a row per period (default: one period).
//! - `filter`: `dimension:value` terms, comma-separated; terms on one dimension are alternatives
//!   (`campaign_id:c1,campaign_id:c2,device:mobile`).
//! - `format`: `json` (default) or `csv`.
//!
//! The range is read from the coarsest stored rows that fit it (whole days from `_day`, whole
//! hours from `_hour`, the rest from `_minute`) in one Postgres snapshot taken together with a
//! copy of the open buckets, so every minute is counted exactly once.

use std::collections::HashMap;

use polylog_postgres::schema::quote_literal;
use serde_json::{json, Map, Value};

use crate::hll::Hll;
use crate::rollup::{lock, unhex, Agg, Rollup, RollupError, GRAINS};
use crate::time::{format_ms, parse_time};

/// Most rows a report returns.
pub const ROWS_MAX: usize = 100_000;

#[derive(Debug, Clone, PartialEq)]
pub struct ReportQuery {
    /// First minute (ms, aligned).
    pub from_ms: i64,
    /// End, exclusive (ms, aligned to a minute).
    pub to_ms: i64,
    /// Indexes into the rollup's dimensions.
    pub group_by: Vec<usize>,
    /// Index into [`GRAINS`]; `None`: the whole range.
    pub interval: Option<usize>,
    /// (dimension index, accepted values).
    pub filters: Vec<(usize, Vec<String>)>,
    pub csv: bool,
}

#[derive(Debug)]
pub enum ReportError {
    /// The request is wrong (400).
    Bad(String),
    /// The rollup cannot answer now (503).
    Unavailable(String),
}

impl From<RollupError> for ReportError {
    fn from(e: RollupError) -> Self {
        ReportError::Unavailable(e.to_string())
    }
}

impl From<polylog_postgres::wire::PgError> for ReportError {
    fn from(e: polylog_postgres::wire::PgError) -> Self {
        ReportError::Unavailable(format!("postgres: {e}"))
    }
}

impl ReportQuery {
    /// Parses a query string (`from=...&group_by=...`, URL-encoded).
    pub fn parse(rollup: &Rollup, query: &str, now_ms: i64) -> Result<ReportQuery, String> {
        let dims = rollup.dimension_names();
        let dim = |n: &str| {
            dims.iter().position(|d| d == n).ok_or_else(|| {
                format!("{n:?} is not a dimension of this rollup; it has {}", dims.join(", "))
            })
        };
        let (mut from, mut to, mut q) = (
            None,
            None,
            ReportQuery {
                from_ms: 0,
                to_ms: 0,
                group_by: Vec::new(),
                interval: None,
                filters: Vec::new(),
                csv: false,
            },
        );
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let v = crate::server::url_decode(raw);
            match k {
                "from" => from = Some(parse_time(&v, now_ms)?),
                "to" => to = Some(parse_time(&v, now_ms)?),
                "group_by" => {
                    for n in v.split(',').filter(|n| !n.is_empty()) {
                        let i = dim(n)?;
                        if !q.group_by.contains(&i) {
                            q.group_by.push(i);
                        }
                    }
                }
                "interval" => {
                    q.interval = match v.as_str() {
                        "" | "none" => None,
                        g => Some(GRAINS.iter().position(|(n, _)| *n == g).ok_or_else(|| {
                            format!("interval {g:?}: use minute, hour, day or none")
                        })?),
                    }
                }
                "filter" => {
                    // Split before decoding: a value may hold an encoded comma (%2C).
                    for term in
                        raw.split(',').map(crate::server::url_decode).filter(|t| !t.is_empty())
                    {
                        let (n, value) = term.split_once(':').ok_or_else(|| {
                            format!("filter term {term:?} is not dimension:value")
                        })?;
                        let i = dim(n)?;
                        match q.filters.iter_mut().find(|(j, _)| *j == i) {
                            Some((_, vs)) => vs.push(value.to_string()),
                            None => q.filters.push((i, vec![value.to_string()])),
                        }
                    }
                }
                "format" => {
                    q.csv = match v.as_str() {
                        "json" => false,
                        "csv" => true,
                        other => return Err(format!("format {other:?}: use json or csv")),
                    }
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}; reports take from, to, group_by, interval, \
                         filter, format"
                    ))
                }
            }
        }
        let to = to.unwrap_or(now_ms);
        let from = from.unwrap_or(to - 86_400_000);
        q.from_ms = from.div_euclid(60_000) * 60_000;
        q.to_ms = (to.div_euclid(60_000) + 1) * 60_000;
        if from > to {
            return Err(format!("from ({}) is after to ({})", format_ms(from), format_ms(to)));
        }
        Ok(q)
    }
}

/// Splits `[a, b)` (minute-aligned ms) into whole periods of the coarsest grains up to `max`:
/// (grain index, start, end).
fn plan(a: i64, b: i64, max: usize, out: &mut Vec<(usize, i64, i64)>) {
    if a >= b {
        return;
    }
    if max == 0 {
        out.push((0, a, b));
        return;
    }
    let g = GRAINS[max].1;
    let (lo, hi) = ((a + g - 1).div_euclid(g) * g, b.div_euclid(g) * g);
    if lo >= hi {
        return plan(a, b, max - 1, out);
    }
    plan(a, lo, max - 1, out);
    out.push((max, lo, hi));
    plan(hi, b, max - 1, out);
}

/// One line of a report.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    /// Start of the period (with an interval).
    pub time_ms: Option<i64>,
    pub dims: Vec<String>,
    pub agg: Agg,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub rollup: String,
    pub query: ReportQuery,
    pub group_by: Vec<String>,
    pub rows: Vec<ReportRow>,
    /// The newest minute read from Postgres; later ones came from memory.
    pub flushed_through_ms: Option<i64>,
    pub late_events: u64,
}

/// A group of a report: the period (with an interval) and the grouped dimension values.
type GroupKey<'a> = dyn Fn(i64, &[String]) -> (Option<i64>, Vec<String>) + 'a;

/// Groups rows, bounded.
struct Groups {
    map: HashMap<(Option<i64>, Vec<String>), Agg>,
}

impl Groups {
    fn add(&mut self, key: (Option<i64>, Vec<String>), agg: &Agg) -> Result<(), ReportError> {
        match self.map.get_mut(&key) {
            Some(a) => a.merge(agg),
            None => {
                if self.map.len() >= ROWS_MAX {
                    return Err(ReportError::Bad(format!(
                        "the report has over {ROWS_MAX} rows: narrow it with filter=, fewer \
                         group_by dimensions or a coarser interval"
                    )));
                }
                self.map.insert(key, agg.clone());
            }
        }
        Ok(())
    }
}

/// Undoes COPY's text escaping of one field (`\N` is NULL).
fn copy_field(f: &[u8]) -> Option<String> {
    if f == b"\\N" {
        return None;
    }
    if !f.contains(&b'\\') {
        return Some(String::from_utf8_lossy(f).into_owned());
    }
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\' && i + 1 < f.len() {
            i += 1;
            out.push(match f[i] {
                b'n' => b'\n',
                b't' => b'\t',
                b'r' => b'\r',
                b'b' => 8,
                b'f' => 12,
                b'v' => 11,
                c => c,
            });
        } else {
            out.push(f[i]);
        }
        i += 1;
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

impl Rollup {
    /// Runs a report.
    pub fn report(&self, q: &ReportQuery) -> Result<Report, ReportError> {
        let pooled = lock(&self.pool).pop();
        let mut c = match pooled {
            Some(c) => c,
            None => self.connect()?,
        };
        let wanted =
            |dims: &[String]| q.filters.iter().all(|(i, vs)| vs.iter().any(|v| *v == dims[*i]));
        let grain_ms = q.interval.map(|g| GRAINS[g].1);
        let key = |minute_ms: i64, dims: &[String]| {
            (
                grain_ms.map(|g| minute_ms.div_euclid(g) * g),
                q.group_by.iter().map(|&i| dims[i].clone()).collect::<Vec<_>>(),
            )
        };
        let mut groups = Groups { map: HashMap::new() };
        // A Postgres snapshot and a copy of the open buckets that agree: the snapshot's last
        // flushed minute is the one memory starts after (a flush commits, then moves memory
        // on, under the lock; if one lands in between, take both again).
        let mut attempt = 0;
        let (flushed_through, late_events) = loop {
            attempt += 1;
            let rows = c.query(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
                 SELECT flushed_through FROM polylog_rollups WHERE name = {}",
                quote_literal(&self.opts.name)
            ))?;
            let stored: Option<i64> =
                rows.first().and_then(|r| r[0].as_deref()).and_then(|v| v.parse().ok());
            let open = lock(&self.open);
            if !open.ready {
                drop(open);
                let _ = c.execute("ROLLBACK");
                lock(&self.pool).push(c);
                return Err(ReportError::Unavailable(format!(
                    "rollup {} is starting, catching up or reconnecting to Postgres; try again \
                     shortly",
                    self.opts.name
                )));
            }
            if open.flushed_through != stored {
                drop(open);
                c.execute("ROLLBACK")?;
                if attempt >= 20 {
                    return Err(ReportError::Unavailable(
                        "the rollup is flushing too often to take a consistent report; try again"
                            .into(),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
            for b in open.buckets.values().chain(open.flushing.iter()) {
                let ms = b.minute * 60_000;
                if ms >= q.from_ms && ms < q.to_ms && wanted(&b.dims) {
                    groups.add(key(ms, &b.dims), &b.agg)?;
                }
            }
            break (open.flushed_through, open.late_total + open.late_pending);
        };
        let result = self.read_stored(&mut c, q, &mut groups, &key);
        let _ = c.execute("COMMIT");
        result?;
        let mut pool = lock(&self.pool);
        if pool.len() < 4 {
            pool.push(c);
        }
        drop(pool);
        let mut rows: Vec<ReportRow> = groups
            .map
            .into_iter()
            .map(|((time_ms, dims), agg)| ReportRow { time_ms, dims, agg })
            .collect();
        rows.sort_by(|a, b| {
            a.time_ms
                .cmp(&b.time_ms)
                .then(b.agg.impressions.cmp(&a.agg.impressions))
                .then_with(|| a.dims.cmp(&b.dims))
        });
        Ok(Report {
            rollup: self.opts.name.clone(),
            query: q.clone(),
            group_by: q.group_by.iter().map(|&i| self.opts.dimensions[i].clone()).collect(),
            rows,
            flushed_through_ms: flushed_through.map(|m| m * 60_000),
            late_events,
        })
    }

    fn read_stored(
        &self,
        c: &mut polylog_postgres::wire::Connection,
        q: &ReportQuery,
        groups: &mut Groups,
        key: &GroupKey<'_>,
    ) -> Result<(), ReportError> {
        let mut segments = Vec::new();
        plan(q.from_ms, q.to_ms, q.interval.unwrap_or(GRAINS.len() - 1), &mut segments);
        let dims = &self.opts.dimensions;
        let mut filter = String::new();
        for (i, vs) in &q.filters {
            let list: Vec<String> = vs.iter().map(|v| quote_literal(v)).collect();
            filter.push_str(&format!(" AND {} IN ({})", dims[*i], list.join(", ")));
        }
        let n = dims.len();
        for (grain, start, end) in segments {
            let sql = format!(
                "COPY (SELECT (extract(epoch FROM bucket) * 1000)::bigint, {}, impressions, \
                 measurable, viewable, clicks, in_view_ms, invalid, encode(users, 'hex') FROM {}_{} WHERE bucket \
                 >= '{}' AND bucket < '{}'{filter}) TO STDOUT",
                dims.join(", "),
                self.opts.table,
                GRAINS[grain].0,
                format_ms(start),
                format_ms(end)
            );
            let mut row_dims = vec![String::new(); n];
            c.copy_out(&sql, |line: &[u8]| -> Result<(), ReportError> {
                let line = line.strip_suffix(b"\n").unwrap_or(line);
                let fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
                if fields.len() != n + 8 {
                    return Err(ReportError::Unavailable(format!(
                        "a row of {}_{} has {} fields",
                        self.opts.table,
                        GRAINS[grain].0,
                        fields.len()
                    )));
                }
                let num = |f: &[u8]| -> u64 {
                    std::str::from_utf8(f).ok().and_then(|s| s.parse().ok()).unwrap_or(0)
                };
                let ms: i64 =
                    std::str::from_utf8(fields[0]).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                for (i, d) in row_dims.iter_mut().enumerate() {
                    *d = copy_field(fields[i + 1]).unwrap_or_default();
                }
                let users = copy_field(fields[n + 7])
                    .ok_or_else(|| "null sketch".to_string())
                    .and_then(|h| unhex(&h))
                    .and_then(|b| Hll::from_bytes(&b))
                    .map_err(|e| ReportError::Unavailable(format!("a stored sketch: {e}")))?;
                let agg = Agg {
                    impressions: num(fields[n + 1]),
                    measurable: num(fields[n + 2]),
                    viewable: num(fields[n + 3]),
                    clicks: num(fields[n + 4]),
                    in_view_ms: num(fields[n + 5]),
                    invalid: num(fields[n + 6]),
                    users,
                };
                groups.add(key(ms, &row_dims), &agg)
            })?;
        }
        Ok(())
    }
}

fn rate(num: u64, den: u64) -> Value {
    if den == 0 {
        Value::Null
    } else {
        json!(((num as f64 / den as f64) * 10_000.0).round() / 10_000.0)
    }
}

impl Report {
    pub fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let mut o = Map::new();
                if let Some(t) = r.time_ms {
                    o.insert("time".into(), json!(format_ms(t)));
                }
                for (name, v) in self.group_by.iter().zip(&r.dims) {
                    o.insert(name.clone(), json!(v));
                }
                let a = &r.agg;
                o.insert("impressions".into(), json!(a.impressions));
                o.insert("measurable".into(), json!(a.measurable));
                o.insert("viewable".into(), json!(a.viewable));
                o.insert("viewability".into(), rate(a.viewable, a.measurable));
                o.insert("clicks".into(), json!(a.clicks));
                o.insert("ctr".into(), rate(a.clicks, a.impressions));
                o.insert("in_view_ms".into(), json!(a.in_view_ms));
                o.insert("invalid".into(), json!(a.invalid));
                o.insert("users".into(), json!(a.users.count()));
                Value::Object(o)
            })
            .collect();
        json!({
            "rollup": self.rollup,
            "from": format_ms(self.query.from_ms),
            "to": format_ms(self.query.to_ms),
            "interval": self.query.interval.map(|g| GRAINS[g].0),
            "group_by": self.group_by,
            "stored_through": self.flushed_through_ms.map(|m| format_ms(m + 59_999)),
            "late_events": self.late_events,
            "users_error": crate::hll::STANDARD_ERROR,
            "rows": rows,
        })
    }

    pub fn to_csv(&self) -> String {
        let quote = |s: &str| {
            if s.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        let mut out = String::new();
        let mut head: Vec<String> = Vec::new();
        if self.query.interval.is_some() {
            head.push("time".into());
        }
        head.extend(self.group_by.iter().cloned());
        head.extend(
            [
                "impressions",
                "measurable",
                "viewable",
                "viewability",
                "clicks",
                "ctr",
                "in_view_ms",
                "invalid",
                "users",
            ]
            .map(String::from),
        );
        out.push_str(&head.join(","));
        out.push('\n');
        for r in &self.rows {
            let mut cells: Vec<String> = Vec::new();
            if let Some(t) = r.time_ms {
                cells.push(format_ms(t));
            }
            cells.extend(r.dims.iter().map(|d| quote(d)));
            let a = &r.agg;
            let num = |v: Value| if v.is_null() { String::new() } else { v.to_string() };
            cells.extend([
                a.impressions.to_string(),
                a.measurable.to_string(),
                a.viewable.to_string(),
                num(rate(a.viewable, a.measurable)),
                a.clicks.to_string(),
                num(rate(a.clicks, a.impressions)),
                a.in_view_ms.to_string(),
                a.invalid.to_string(),
                a.users.count().to_string(),
            ]);
            out.push_str(&cells.join(","));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_whole_periods() {
        let (m, h, d) = (60_000, 3_600_000, 86_400_000);
        let mut out = Vec::new();
        // 23:58 on day 0 to 01:03 on day 2.
        plan(d - 2 * m, 2 * d + h + 3 * m, 2, &mut out);
        assert_eq!(
            out,
            vec![
                (0, d - 2 * m, d),
                (2, d, 2 * d),
                (1, 2 * d, 2 * d + h),
                (0, 2 * d + h, 2 * d + h + 3 * m)
            ]
        );
        out.clear();
        plan(5 * m, 50 * m, 2, &mut out);
        assert_eq!(out, vec![(0, 5 * m, 50 * m)]);
        out.clear();
        plan(0, 2 * d, 1, &mut out);
        assert_eq!(out, vec![(1, 0, 2 * d)]);
    }

    #[test]
    fn copy_fields_unescape() {
        assert_eq!(copy_field(b"\\N"), None);
        assert_eq!(copy_field(b"a\\tb\\\\c").as_deref(), Some("a\tb\\c"));
        assert_eq!(copy_field(b"\\\\x0102").as_deref(), Some("\\x0102"));
    }
}
