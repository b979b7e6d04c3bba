//! Inputs of a load, read as records of text fields: CSV (RFC 4180, as Postgres writes and reads
//! it: an unquoted empty field is NULL, a quoted one is an empty string), Postgres' text format
//! (tab separated, `\N` for NULL, backslash escapes; what `COPY ... TO` writes; `.tsv`), and
//! Parquet files (each value turned into the text form of its target column).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use crate::types::{format_date, format_time, format_timestamp, ColType, Column};

/// One input record: field contents (unescaped) in `data`, and per field its range or NULL.
#[derive(Debug, Default)]
pub struct Record {
    pub data: Vec<u8>,
    /// `(start, end)` into `data`; `None` is NULL.
    pub fields: Vec<Option<(usize, usize)>>,
    /// The line of the input where the record starts (1-based; for Parquet, the row number;
    /// for a topic, [`TopicSource::place`]).
    pub line: u64,
    /// Why the source already knows the record cannot load (a topic record with a key that is
    /// not a column).
    pub bad: Option<String>,
}

impl Record {
    pub fn field(&self, i: usize) -> Option<&[u8]> {
        self.fields[i].map(|(s, e)| &self.data[s..e])
    }
    fn clear(&mut self) {
        self.data.clear();
        self.fields.clear();
        self.bad = None;
    }
}

/// Where the input is, for progress: done and total in bytes (or rows for Parquet).
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

pub trait Source: Send {
    /// Reads the next record; `Ok(false)` at the end. A malformed record is an `Err` with the
    /// reason, after which the source may not be usable.
    fn next(&mut self, rec: &mut Record) -> Result<bool, String>;
    fn progress(&self) -> Progress;
    /// Column names carried by the input (a Parquet schema, or a CSV header line that was
    /// recognised as one), in field order.
    fn names(&self) -> Option<Vec<String>>;
}

/// Input formats of files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    /// Postgres' text format (`.tsv`, `.txt`, what `COPY TO` writes).
    Text,
    Parquet,
    /// A topic's records (JSON objects, or change events' `after`).
    Topic,
}

impl Format {
    /// From the file name, unless given.
    pub fn detect(path: &Path) -> Result<Format, String> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Ok(Format::Csv),
            "tsv" | "txt" | "tab" | "copy" => Ok(Format::Text),
            "parquet" | "pq" => Ok(Format::Parquet),
            _ => Err(format!(
                "cannot tell the format of {} from its name; give --format csv|tsv|parquet",
                path.display()
            )),
        }
    }
}

/// CSV or Postgres text format.
pub struct Delimited {
    r: BufReader<Box<dyn Read + Send>>,
    csv: bool,
    delim: u8,
    null: Vec<u8>,
    line: u64,
    done: u64,
    total: u64,
    names: Option<Vec<String>>,
}

/// Whether the first line of a CSV file names columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A header when every field of the first line is a column name of the target.
    Auto,
    Yes,
    No,
}

impl Delimited {
    pub fn open(
        path: &Path,
        csv: bool,
        delimiter: Option<u8>,
        null: Option<&str>,
        header: Header,
        columns: &[Column],
    ) -> Result<Delimited, String> {
        let f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let total = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut d = Delimited {
            r: BufReader::with_capacity(1 << 20, Box::new(f)),
            csv,
            delim: delimiter.unwrap_or(if csv { b',' } else { b'\t' }),
            null: null.unwrap_or(if csv { "" } else { "\\N" }).as_bytes().to_vec(),
            line: 1,
            done: 0,
            total,
            names: None,
        };
        if header != Header::No {
            // Peek at the first record without consuming it unless it is a header.
            let mut rec = Record::default();
            let buf = d.r.fill_buf().map_err(|e| format!("reading {}: {e}", path.display()))?;
            let mut probe = Delimited {
                r: BufReader::new(Box::new(io::Cursor::new(buf.to_vec()))),
                csv,
                delim: d.delim,
                null: d.null.clone(),
                line: 1,
                done: 0,
                total,
                names: None,
            };
            let got = probe.next(&mut rec).unwrap_or(false);
            let names: Vec<String> = (0..rec.fields.len())
                .map(|i| String::from_utf8_lossy(rec.field(i).unwrap_or(b"")).trim().to_string())
                .collect();
            let is_header = got
                && (header == Header::Yes
                    || names
                        .iter()
                        .all(|n| columns.iter().any(|c| c.name.eq_ignore_ascii_case(n))));
            if is_header {
                let mut skip = Record::default();
                d.next(&mut skip)?;
                d.names = Some(names);
            }
        }
        Ok(d)
    }
}

impl Source for Delimited {
    fn next(&mut self, rec: &mut Record) -> Result<bool, String> {
        rec.clear();
        rec.line = self.line;
        // As in Postgres, a blank line is a record of one empty field.
        if self.csv {
            self.next_csv(rec)
        } else {
            self.next_text(rec)
        }
    }

    fn progress(&self) -> Progress {
        Progress { done: self.done, total: self.total }
    }

    fn names(&self) -> Option<Vec<String>> {
        self.names.clone()
    }
}

impl Delimited {
    /// One CSV record. Quotes may open anywhere in a field, as in Postgres; `""` inside quotes
    /// is a quote; a field that was never quoted and equals the NULL string is NULL.
    fn next_csv(&mut self, rec: &mut Record) -> Result<bool, String> {
        let mut start = 0;
        let mut quoted = false;
        let mut in_quote = false;
        let mut quote_pending = false; // saw `"` inside quotes: closing, or the first of `""`
        let mut tail = 0; // where the field's bytes after its last closing quote begin
        let mut any = false;
        let start_line = self.line;
        loop {
            let buf = self.r.fill_buf().map_err(|e| format!("reading the input: {e}"))?;
            if buf.is_empty() {
                if in_quote && !quote_pending {
                    return Err(format!(
                        "a quoted field opened on line {start_line} is never closed"
                    ));
                }
                if !any {
                    return Ok(false);
                }
                end_field(rec, start, quoted, &self.null);
                return Ok(true);
            }
            let n = buf.len();
            let mut i = 0;
            let mut ended = false;
            // Copy runs of plain bytes at once.
            while i < n {
                let c = buf[i];
                any = true;
                if quote_pending {
                    quote_pending = false;
                    if c == b'"' {
                        rec.data.push(b'"');
                        i += 1;
                        continue;
                    }
                    in_quote = false;
                    tail = rec.data.len();
                }
                if in_quote {
                    match c {
                        b'"' => quote_pending = true,
                        b'\n' => {
                            self.line += 1;
                            rec.data.push(c);
                        }
                        _ => {
                            let run = buf[i..].iter().position(|&b| b == b'"' || b == b'\n');
                            let end = run.map_or(n, |r| i + r);
                            rec.data.extend_from_slice(&buf[i..end]);
                            i = end;
                            continue;
                        }
                    }
                    i += 1;
                    continue;
                }
                if c == self.delim {
                    end_field(rec, start, quoted, &self.null);
                    start = rec.data.len();
                    tail = start;
                    quoted = false;
                } else if c == b'\n' {
                    self.line += 1;
                    if rec.data.last() == Some(&b'\r') && rec.data.len() > start.max(tail) {
                        rec.data.pop();
                    }
                    end_field(rec, start, quoted, &self.null);
                    i += 1;
                    ended = true;
                    break;
                } else if c == b'"' {
                    in_quote = true;
                    quoted = true;
                } else {
                    let delim = self.delim;
                    let run = buf[i..].iter().position(|&b| b == delim || b == b'\n' || b == b'"');
                    let end = run.map_or(n, |r| i + r);
                    rec.data.extend_from_slice(&buf[i..end]);
                    i = end;
                    continue;
                }
                i += 1;
            }
            self.done += i as u64;
            self.r.consume(i);
            if ended {
                return Ok(true);
            }
        }
    }

    /// One record of Postgres' text format.
    fn next_text(&mut self, rec: &mut Record) -> Result<bool, String> {
        let mut f = TextField::default();
        let mut any = false;
        loop {
            let buf = self.r.fill_buf().map_err(|e| format!("reading the input: {e}"))?;
            if buf.is_empty() {
                if !any {
                    return Ok(false);
                }
                f.end(rec, &self.null);
                return Ok(true);
            }
            let n = buf.len();
            let mut i = 0;
            let mut ended = false;
            while i < n {
                let c = buf[i];
                any = true;
                if let Some((kind, val, count)) = f.esc {
                    f.raw_len += 1;
                    match kind {
                        b'\\' => {
                            f.esc = None;
                            f.escaped = true;
                            match c {
                                b'N' if f.raw_len == 2 => f.backslash_n = true,
                                b'b' => rec.data.push(8),
                                b'f' => rec.data.push(12),
                                b'n' => rec.data.push(b'\n'),
                                b'r' => rec.data.push(b'\r'),
                                b't' => rec.data.push(b'\t'),
                                b'v' => rec.data.push(11),
                                b'0'..=b'7' => f.esc = Some((b'o', (c - b'0') as u32, 1)),
                                b'x' => f.esc = Some((b'x', 0, 0)),
                                _ => rec.data.push(c),
                            }
                            f.literal_cr = None;
                            i += 1;
                            continue;
                        }
                        b'o' if (b'0'..=b'7').contains(&c) && count < 3 => {
                            f.esc = Some((b'o', val * 8 + (c - b'0') as u32, count + 1));
                            i += 1;
                            continue;
                        }
                        b'x' if c.is_ascii_hexdigit() && count < 2 => {
                            let d = (c as char).to_digit(16).unwrap_or(0);
                            f.esc = Some((b'x', val * 16 + d, count + 1));
                            i += 1;
                            continue;
                        }
                        _ => {
                            f.raw_len -= 1;
                            finish_escape(rec, (kind, val, count));
                            f.esc = None;
                        }
                    }
                }
                match c {
                    b'\\' => {
                        f.esc = Some((b'\\', 0, 0));
                        f.raw_len += 1;
                    }
                    b'\n' => {
                        self.line += 1;
                        // A CR written as such before the newline ends the line (CRLF files).
                        if f.literal_cr.is_some_and(|at| at + 1 == rec.data.len()) {
                            rec.data.pop();
                            f.raw_len -= 1;
                        }
                        f.end(rec, &self.null);
                        i += 1;
                        ended = true;
                        break;
                    }
                    _ if c == self.delim => {
                        f.end(rec, &self.null);
                        f = TextField { start: rec.data.len(), ..TextField::default() };
                    }
                    _ => {
                        let delim = self.delim;
                        let run =
                            buf[i..].iter().position(|&b| b == delim || b == b'\n' || b == b'\\');
                        let end = run.map_or(n, |r| i + r);
                        rec.data.extend_from_slice(&buf[i..end]);
                        if buf[end - 1] == b'\r' {
                            f.literal_cr = Some(rec.data.len() - 1);
                        }
                        f.raw_len += end - i;
                        i = end;
                        continue;
                    }
                }
                i += 1;
            }
            self.done += i as u64;
            self.r.consume(i);
            if ended {
                return Ok(true);
            }
        }
    }
}

/// The field of Postgres' text format being read.
#[derive(Default)]
struct TextField {
    start: usize,
    /// Raw bytes of the field so far.
    raw_len: usize,
    /// The field began with `\N`.
    backslash_n: bool,
    /// It held a backslash escape (so it is not the NULL string as written).
    escaped: bool,
    /// A pending escape: kind, value, digits.
    esc: Option<(u8, u32, u32)>,
    /// Where a CR that was not escaped sits in the data.
    literal_cr: Option<usize>,
}

impl TextField {
    fn end(&mut self, rec: &mut Record, null: &[u8]) {
        if let Some(e) = self.esc.take() {
            finish_escape(rec, e);
        }
        let is_null = if null == b"\\N" {
            self.backslash_n && self.raw_len == 2
        } else {
            !self.escaped && rec.data[self.start..] == *null
        };
        if self.backslash_n && !is_null {
            rec.data.insert(self.start, b'N'); // `\Nabc` is `Nabc`
        }
        rec.fields.push(if is_null { None } else { Some((self.start, rec.data.len())) });
    }
}

fn end_field(rec: &mut Record, start: usize, quoted: bool, null: &[u8]) {
    let is_null = !quoted && rec.data[start..] == *null;
    rec.fields.push(if is_null { None } else { Some((start, rec.data.len())) });
}

fn finish_escape(rec: &mut Record, (kind, val, count): (u8, u32, u32)) {
    match kind {
        b'o' => rec.data.push(val as u8),
        b'x' if count > 0 => rec.data.push(val as u8),
        b'x' => rec.data.push(b'x'),
        _ => {}
    }
}

/// A Parquet file, row by row; each value becomes the text form of its target column.
pub struct ParquetSource {
    rows: parquet::record::reader::RowIter<'static>,
    names: Vec<String>,
    /// For each field of the file, the target column's type (None: not loaded).
    types: Vec<Option<ColType>>,
    done: u64,
    total: u64,
}

impl ParquetSource {
    pub fn open(path: &Path, columns: &[Column]) -> Result<ParquetSource, String> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let reader = SerializedFileReader::new(f)
            .map_err(|e| format!("{} is not a readable Parquet file: {e}", path.display()))?;
        let meta = reader.metadata();
        let total = meta.file_metadata().num_rows().max(0) as u64;
        let schema = meta.file_metadata().schema_descr();
        let names: Vec<String> = schema.columns().iter().map(|c| c.name().to_string()).collect();
        let types = names
            .iter()
            .map(|n| columns.iter().find(|c| c.name == *n).map(|c| c.ty.clone()))
            .collect();
        let rows = reader
            .into_iter()
            .project(None)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Ok(ParquetSource { rows, names, types, done: 0, total })
    }
}

impl Source for ParquetSource {
    fn next(&mut self, rec: &mut Record) -> Result<bool, String> {
        use parquet::record::Field;
        rec.clear();
        let Some(row) = self.rows.next() else { return Ok(false) };
        let row = row.map_err(|e| format!("reading Parquet row {}: {e}", self.done + 1))?;
        self.done += 1;
        rec.line = self.done;
        for (i, (_, field)) in row.get_column_iter().enumerate() {
            let ty = self.types.get(i).cloned().flatten();
            let start = rec.data.len();
            let text = match field {
                Field::Null => None,
                Field::Bool(b) => Some(b.to_string()),
                Field::Byte(v) => Some(v.to_string()),
                Field::Short(v) => Some(v.to_string()),
                Field::Int(v) => match ty {
                    Some(ColType::Date) => Some(format_date(v - 10_957)),
                    _ => Some(v.to_string()),
                },
                Field::Long(v) => Some(v.to_string()),
                Field::UByte(v) => Some(v.to_string()),
                Field::UShort(v) => Some(v.to_string()),
                Field::UInt(v) => Some(v.to_string()),
                Field::ULong(v) => Some(v.to_string()),
                Field::Float16(v) => Some(format!("{v}")),
                Field::Float(v) => Some(format!("{v:?}")),
                Field::Double(v) => Some(format!("{v:?}")),
                Field::Decimal(d) => Some(decimal_text(d.data(), d.scale())),
                Field::Str(s) => Some(s.clone()),
                Field::Bytes(b) => match ty {
                    Some(ColType::Uuid) if b.len() == 16 => {
                        Some(b.data().iter().map(|x| format!("{x:02x}")).collect())
                    }
                    Some(ColType::Bytea) => {
                        let mut s = String::from("\\x");
                        for x in b.data() {
                            s.push_str(&format!("{x:02x}"));
                        }
                        Some(s)
                    }
                    _ => Some(String::from_utf8_lossy(b.data()).into_owned()),
                },
                Field::Date(d) => Some(format_date(*d - 10_957)),
                Field::TimeMillis(t) => Some(format_time(*t as i64 * 1000)),
                Field::TimeMicros(t) => Some(format_time(*t)),
                Field::TimestampMillis(t) => Some(epoch_text(t * 1000, &ty)),
                Field::TimestampMicros(t) => Some(epoch_text(*t, &ty)),
                Field::Group(_) | Field::ListInternal(_) | Field::MapInternal(_) => {
                    return Err(format!(
                        "Parquet column {:?} is nested (a group, list or map); only flat columns load",
                        self.names[i]
                    ))
                }
            };
            match text {
                Some(t) => {
                    rec.data.extend_from_slice(t.as_bytes());
                    rec.fields.push(Some((start, rec.data.len())));
                }
                None => rec.fields.push(None),
            }
        }
        Ok(true)
    }

    fn progress(&self) -> Progress {
        Progress { done: self.done, total: self.total }
    }

    fn names(&self) -> Option<Vec<String>> {
        Some(self.names.clone())
    }
}

/// Microseconds since 1970 as timestamp text (with `+00` for timestamptz targets).
fn epoch_text(us: i64, ty: &Option<ColType>) -> String {
    let t = format_timestamp(us - 946_684_800_000_000);
    match ty {
        Some(ColType::Timestamptz(_)) => t + "+00",
        _ => t,
    }
}

/// A big-endian two's complement unscaled integer with a scale, as decimal text.
fn decimal_text(be: &[u8], scale: i32) -> String {
    if be.len() > 16 {
        return "(a decimal wider than 38 digits)".into(); // refused as not a number
    }
    let mut v: i128 = if be.first().is_some_and(|b| b & 0x80 != 0) { -1 } else { 0 };
    for b in be {
        v = (v << 8) | *b as i128;
    }
    let neg = v < 0;
    let digits = v.unsigned_abs().to_string();
    let scale = scale.max(0) as usize;
    let digits = if digits.len() <= scale {
        format!("{}{digits}", "0".repeat(scale + 1 - digits.len()))
    } else {
        digits
    };
    let (int, frac) = digits.split_at(digits.len() - scale);
    let sign = if neg { "-" } else { "" };
    if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

/// Records of a topic, partition after partition, each over a fixed offset range (so that a
/// resumed load reads the same records in the same order). A record's value is a JSON object
/// whose keys are column names, or a change event whose `after` is one (deletes and
/// tombstones are skipped). Missing keys are NULL.
pub struct TopicSource {
    log: std::sync::Arc<dyn polylog_log::Log>,
    topic: String,
    ranges: Vec<(u32, u64, u64)>,
    at: usize,
    reader: Option<Box<dyn polylog_log::LogReader>>,
    pending: std::collections::VecDeque<polylog_log::StoredRecord>,
    columns: Vec<String>,
    done: u64,
    total: u64,
}

impl TopicSource {
    /// Reads `ranges` (`partition, from, to` offsets) of `topic`; fields are `columns`.
    pub fn open(
        log: std::sync::Arc<dyn polylog_log::Log>,
        topic: &str,
        ranges: Vec<(u32, u64, u64)>,
        columns: &[Column],
    ) -> TopicSource {
        let total = ranges.iter().map(|r| r.2.saturating_sub(r.1)).sum();
        TopicSource {
            log,
            topic: topic.to_string(),
            ranges,
            at: 0,
            reader: None,
            pending: Default::default(),
            columns: columns.iter().map(|c| c.name.clone()).collect(),
            done: 0,
            total,
        }
    }

    /// Encodes where a record is as one number, for messages: partition and offset.
    pub fn place(partition: u32, offset: u64) -> u64 {
        (partition as u64) << 48 | offset
    }

    fn next_record(&mut self) -> Result<Option<polylog_log::StoredRecord>, String> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Ok(Some(r));
            }
            let Some(&(p, from, to)) = self.ranges.get(self.at) else { return Ok(None) };
            let reader = match &mut self.reader {
                Some(r) => r,
                None => {
                    let r = self
                        .log
                        .reader(&self.topic, p, polylog_log::StartAt::Offset(from))
                        .map_err(|e| format!("reading topic {} partition {p}: {e}", self.topic))?;
                    self.reader.insert(r)
                }
            };
            if reader.position() >= to {
                self.reader = None;
                self.at += 1;
                continue;
            }
            let batch = reader
                .poll(1000, std::time::Duration::from_secs(5))
                .map_err(|e| format!("reading topic {} partition {p}: {e}", self.topic))?;
            if batch.is_empty() {
                return Err(format!(
                    "topic {} partition {p} ends before offset {to}, which the load was begun with",
                    self.topic
                ));
            }
            self.pending.extend(batch.into_iter().filter(|r| r.offset < to));
        }
    }
}

impl Source for TopicSource {
    fn next(&mut self, rec: &mut Record) -> Result<bool, String> {
        loop {
            rec.clear();
            let Some(r) = self.next_record()? else { return Ok(false) };
            self.done += 1;
            rec.line = TopicSource::place(r.partition, r.offset);
            let Some(value) = r.value else { continue }; // a tombstone
            use serde_json::value::RawValue;
            type Object<'a> = std::collections::BTreeMap<String, &'a RawValue>;
            let where_ = || format!("partition {} offset {}", r.partition, r.offset);
            rec.fields.resize(self.columns.len(), None);
            let mut obj: Object<'_> = match serde_json::from_slice(&value) {
                Ok(o) => o,
                Err(e) => {
                    rec.bad = Some(format!("is not a JSON object ({e})"));
                    return Ok(true);
                }
            };
            if obj.contains_key("op") && obj.contains_key("after") {
                let after = obj.get("after").map_or("null", |a| a.get());
                if after == "null" {
                    continue; // a delete
                }
                obj = match serde_json::from_str(after) {
                    Ok(o) => o,
                    Err(e) => {
                        rec.bad = Some(format!("has an `after` that is not a JSON object ({e})"));
                        return Ok(true);
                    }
                };
            }
            for (k, v) in obj {
                let Some(i) = self.columns.iter().position(|c| *c == k) else {
                    rec.bad = Some(format!("has {k:?}, which is not a column of the table"));
                    return Ok(true);
                };
                let raw = v.get();
                let start = rec.data.len();
                if raw == "null" {
                    continue;
                } else if raw.starts_with('"') {
                    // Numbers and the rest keep their exact text; strings are unescaped.
                    let text: String =
                        serde_json::from_str(raw).map_err(|e| format!("{}: {e}", where_()))?;
                    rec.data.extend_from_slice(text.as_bytes());
                } else {
                    rec.data.extend_from_slice(raw.as_bytes());
                }
                rec.fields[i] = Some((start, rec.data.len()));
            }
            return Ok(true);
        }
    }

    fn progress(&self) -> Progress {
        Progress { done: self.done, total: self.total }
    }

    fn names(&self) -> Option<Vec<String>> {
        Some(self.columns.clone())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn read_all(data: &str, csv: bool) -> Vec<Vec<Option<String>>> {
        let mut d = Delimited {
            r: BufReader::with_capacity(7, Box::new(io::Cursor::new(data.as_bytes().to_vec()))),
            csv,
            delim: if csv { b',' } else { b'\t' },
            null: if csv { vec![] } else { b"\\N".to_vec() },
            line: 1,
            done: 0,
            total: 0,
            names: None,
        };
        let mut out = Vec::new();
        let mut rec = Record::default();
        while d.next(&mut rec).unwrap() {
            out.push(
                (0..rec.fields.len())
                    .map(|i| rec.field(i).map(|f| String::from_utf8(f.to_vec()).unwrap()))
                    .collect(),
            );
        }
        out
    }

    #[test]
    fn csv_quotes_nulls_and_newlines() {
        let rows = read_all("a,,\"\",\"x\"\"y\"\r\n\"multi\nline\",\"a,b\",3,\n", true);
        let s = |x: &str| Some(x.to_string());
        assert_eq!(rows[0], vec![s("a"), None, s(""), s("x\"y")]);
        assert_eq!(rows[1], vec![s("multi\nline"), s("a,b"), s("3"), None]);
    }

    #[test]
    fn text_format_escapes() {
        let rows = read_all("a\\tb\t\\N\t\\\\N\t\\101\\x41\\n\nlast", false);
        let s = |x: &str| Some(x.to_string());
        assert_eq!(rows[0], vec![s("a\tb"), None, s("\\N"), s("AA\n")]);
        assert_eq!(rows[1], vec![s("last")]);
        // CRLF line ends; an escaped CR stays; `\N` at the end is NULL; `\Nabc` is `Nabc`;
        // a blank line is one empty field, as in Postgres.
        let rows = read_all("abc\\r\t\\N\r\n\\Nabc\tx\r\n\n", false);
        assert_eq!(rows[0], vec![s("abc\r"), None]);
        assert_eq!(rows[1], vec![s("Nabc"), s("x")]);
        assert_eq!(rows[2], vec![s("")]);
    }

    #[test]
    fn decimals() {
        assert_eq!(decimal_text(&[0x30, 0x39], 2), "123.45");
        assert_eq!(decimal_text(&[0xff, 0xfe], 3), "-0.002");
        assert_eq!(decimal_text(&[5], 0), "5");
    }
}
