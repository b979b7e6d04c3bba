//! Change events: Debezium's envelope, keys, the ordering position carried in headers, and the
//! conversion of row images to JSON.

use serde_json::{Map, Value};

use crate::schema::TableSchema;
use crate::types::{text_to_json, PgType};

/// Header carrying a record's position in the change stream (see [`Position`]).
pub const POSITION_HEADER: &str = "polylog.position";
/// The value of an unchanged TOAST column whose previous value Polylog does not know.
pub const UNAVAILABLE_VALUE: &str = "__polylog_unavailable_value";

/// Where a change sits in the stream: commit LSN of its transaction, the WAL position of the
/// change, and its index among changes at that same WAL position (a multi-row insert or COPY
/// writes many rows at one LSN). Strictly increasing along the stream, so a replay after a crash
/// can drop everything at or below what a partition already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub commit_lsn: u64,
    pub change_lsn: u64,
    pub sub: u32,
}

impl Position {
    pub fn to_header(self) -> (String, Vec<u8>) {
        let mut v = Vec::with_capacity(20);
        v.extend_from_slice(&self.commit_lsn.to_be_bytes());
        v.extend_from_slice(&self.change_lsn.to_be_bytes());
        v.extend_from_slice(&self.sub.to_be_bytes());
        (POSITION_HEADER.to_string(), v)
    }
    pub fn from_headers(headers: &[(String, Vec<u8>)]) -> Option<Position> {
        let (_, v) = headers.iter().find(|(k, _)| k == POSITION_HEADER)?;
        let b: &[u8; 20] = v.as_slice().try_into().ok()?;
        Some(Position {
            commit_lsn: u64::from_be_bytes(b[0..8].try_into().ok()?),
            change_lsn: u64::from_be_bytes(b[8..16].try_into().ok()?),
            sub: u32::from_be_bytes(b[16..20].try_into().ok()?),
        })
    }
}

/// A column value as it comes from Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raw<'a> {
    Null,
    UnchangedToast,
    Text(&'a [u8]),
}

/// Turns values to JSON, masking and excluding columns; warns once per unknown type.
pub struct Converter {
    mask_key: Option<Vec<u8>>,
    warned: std::collections::HashSet<u32>,
}

impl Converter {
    pub fn new(mask_key: Option<Vec<u8>>) -> Self {
        Converter { mask_key, warned: Default::default() }
    }

    /// One value. A value that does not parse as its type is passed as text with a warning:
    /// capture never stops on a value.
    pub fn value(&mut self, ty: &PgType, type_oid: u32, masked: bool, raw: Raw<'_>) -> Value {
        let text = match raw {
            Raw::Null => return Value::Null,
            Raw::UnchangedToast => return Value::String(UNAVAILABLE_VALUE.into()),
            Raw::Text(t) => t,
        };
        if masked {
            return Value::String(self.mask(text));
        }
        if let PgType::Unknown(oid) = ty {
            if self.warned.insert(*oid) {
                eprintln!("polylog: warning: type oid {oid} is not known to polylog; its values are passed as text");
            }
        }
        match text_to_json(ty, text) {
            Ok(v) => v,
            Err(e) => {
                if self.warned.insert(type_oid) {
                    eprintln!("polylog: warning: {e}; passing such values as text");
                }
                Value::String(String::from_utf8_lossy(text).into_owned())
            }
        }
    }

    fn mask(&self, text: &[u8]) -> String {
        use hmac::{Hmac, Mac};
        let key = self.mask_key.as_deref().unwrap_or_default();
        match Hmac::<sha2::Sha256>::new_from_slice(key) {
            Ok(mut m) => {
                m.update(text);
                m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
            }
            Err(_) => String::new(),
        }
    }
}

/// A row image as a JSON object of the table's captured columns, in column order.
pub fn row_object(
    conv: &mut Converter,
    table: &TableSchema,
    values: &[Raw<'_>],
    only: Option<&[usize]>,
) -> Value {
    let mut m = Map::new();
    for (i, c) in table.columns.iter().enumerate() {
        if c.excluded || only.is_some_and(|o| !o.contains(&i)) {
            continue;
        }
        let raw = values.get(i).copied().unwrap_or(Raw::Null);
        m.insert(c.name.clone(), conv.value(&c.ty, c.type_oid, c.masked, raw));
    }
    Value::Object(m)
}

/// The key of a row: its key columns as a JSON object.
pub fn key_object(conv: &mut Converter, table: &TableSchema, values: &[Raw<'_>]) -> Value {
    row_object(conv, table, values, Some(&table.key))
}

/// Debezium's `source` block.
pub struct SourceInfo<'a> {
    pub name: &'a str,
    pub db: &'a str,
    pub lsn: Option<u64>,
    pub tx_id: Option<u32>,
    pub ts_ms: i64,
    /// `"true"`, `"last"` or `"false"`.
    pub snapshot: &'a str,
}

/// A change event value in Debezium's envelope.
pub fn envelope(
    table: &TableSchema,
    op: &str,
    before: Value,
    after: Value,
    src: &SourceInfo<'_>,
) -> Value {
    serde_json::json!({
        "before": before,
        "after": after,
        "op": op,
        "ts_ms": polylog_log::now_ms(),
        "source": {
            "connector": "postgresql",
            "name": src.name,
            "db": src.db,
            "schema": table.schema,
            "table": table.name,
            "lsn": src.lsn,
            "txId": src.tx_id,
            "ts_ms": src.ts_ms,
            "snapshot": src.snapshot,
        }
    })
}

/// Splits one row of `COPY ... TO STDOUT` text format into raw column values (`\N` is null;
/// backslash escapes are undone). `out` receives owned bytes per column.
pub fn parse_copy_row(line: &[u8], out: &mut Vec<Option<Vec<u8>>>) {
    out.clear();
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    for field in line.split(|&b| b == b'\t') {
        if field == b"\\N" {
            out.push(None);
            continue;
        }
        let mut v = Vec::with_capacity(field.len());
        let mut i = 0;
        while i < field.len() {
            let b = field[i];
            if b != b'\\' || i + 1 == field.len() {
                v.push(b);
                i += 1;
                continue;
            }
            let e = field[i + 1];
            i += 2;
            match e {
                b'b' => v.push(8),
                b'f' => v.push(12),
                b'n' => v.push(b'\n'),
                b'r' => v.push(b'\r'),
                b't' => v.push(b'\t'),
                b'v' => v.push(11),
                b'0'..=b'7' => {
                    let mut n = u32::from(e - b'0');
                    let mut k = 0;
                    while k < 2 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                        n = n * 8 + u32::from(field[i] - b'0');
                        i += 1;
                        k += 1;
                    }
                    v.push(n as u8);
                }
                b'x' if i < field.len() && field[i].is_ascii_hexdigit() => {
                    let mut n = 0u32;
                    let mut k = 0;
                    while k < 2 && i < field.len() && field[i].is_ascii_hexdigit() {
                        n = n * 16 + (field[i] as char).to_digit(16).unwrap_or(0);
                        i += 1;
                        k += 1;
                    }
                    v.push(n as u8);
                }
                other => v.push(other),
            }
        }
        out.push(Some(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_unescape() {
        let mut out = Vec::new();
        parse_copy_row(b"1\t\\N\ta\\tb\\nc\\\\d\t\\x41\\\\x0a\t\n", &mut out);
        let got: Vec<Option<&[u8]>> = out.iter().map(|v| v.as_deref()).collect();
        assert_eq!(
            got,
            vec![
                Some(&b"1"[..]),
                None,
                Some(&b"a\tb\nc\\d"[..]),
                Some(&b"A\\x0a"[..]),
                Some(&b""[..])
            ]
        );
    }

    #[test]
    fn positions_order_and_round_trip() {
        let a = Position { commit_lsn: 5, change_lsn: 9, sub: 0 };
        let b = Position { commit_lsn: 5, change_lsn: 9, sub: 1 };
        let c = Position { commit_lsn: 6, change_lsn: 1, sub: 0 };
        assert!(a < b && b < c);
        let (k, v) = b.to_header();
        assert_eq!(Position::from_headers(&[(k, v)]), Some(b));
    }
}
