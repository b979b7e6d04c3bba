//! Change events: Debezium's envelope, keys, the ordering position carried in headers, and the
//! conversion of row images to JSON.

use serde_json::Value;

use crate::schema::TableSchema;
use crate::types::{text_to_json, PgType};

/// Header carrying a record's position in the change stream (see [`Position`]).
pub const POSITION_HEADER: &str = "polylog.position";
/// Header of a view's tombstone: the source LSN of the change that removed its document (a
/// document carries its version in `_version`).
pub const VERSION_HEADER: &str = "polylog.version";
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
    /// The 20 bytes that encode a position (big-endian, so they sort like positions).
    pub fn to_bytes(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(20);
        v.extend_from_slice(&self.commit_lsn.to_be_bytes());
        v.extend_from_slice(&self.change_lsn.to_be_bytes());
        v.extend_from_slice(&self.sub.to_be_bytes());
        v
    }
    pub fn from_bytes(v: &[u8]) -> Option<Position> {
        let b: &[u8; 20] = v.try_into().ok()?;
        Some(Position {
            commit_lsn: u64::from_be_bytes(b[0..8].try_into().ok()?),
            change_lsn: u64::from_be_bytes(b[8..16].try_into().ok()?),
            sub: u32::from_be_bytes(b[16..20].try_into().ok()?),
        })
    }
    pub fn to_header(self) -> (String, Vec<u8>) {
        (POSITION_HEADER.to_string(), self.to_bytes())
    }
    pub fn from_headers(headers: &[(String, Vec<u8>)]) -> Option<Position> {
        let (_, v) = headers.iter().find(|(k, _)| k == POSITION_HEADER)?;
        Position::from_bytes(v)
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

    /// Writes one value as JSON. A value that does not parse as its type is passed as text
    /// with a warning: capture never stops on a value.
    pub fn write_value(
        &mut self,
        out: &mut Vec<u8>,
        ty: &PgType,
        type_oid: u32,
        masked: bool,
        raw: Raw<'_>,
    ) {
        let text = match raw {
            Raw::Null => return out.extend_from_slice(b"null"),
            Raw::UnchangedToast => return write_str(out, UNAVAILABLE_VALUE.as_bytes()),
            Raw::Text(t) => t,
        };
        if masked {
            return write_str(out, self.mask(text).as_bytes());
        }
        // Fast paths for the common types, byte-identical to the general conversion.
        match ty {
            PgType::Int2 | PgType::Int4 | PgType::Int8 | PgType::Oid if is_integer(text) => {
                return out.extend_from_slice(text)
            }
            PgType::Bool if text == b"t" || text == b"f" => {
                return out.extend_from_slice(if text == b"t" { b"true" } else { b"false" })
            }
            PgType::Text
            | PgType::Enum
            | PgType::Uuid
            | PgType::Inet
            | PgType::Cidr
            | PgType::MacAddr
                if std::str::from_utf8(text).is_ok() =>
            {
                return write_str(out, text)
            }
            PgType::Numeric if text.iter().all(|b| b.is_ascii_digit() || b"-+.eE".contains(b)) => {
                return write_str(out, text)
            }
            PgType::Unknown(oid) if self.warned.insert(*oid) => {
                tracing::warn!(
                    "type oid {oid} is not known to polylog; its values are passed as text"
                );
            }
            _ => {}
        }
        let v = match text_to_json(ty, text) {
            Ok(v) => v,
            Err(e) => {
                if self.warned.insert(type_oid) {
                    tracing::warn!("{e}; passing such values as text");
                }
                Value::String(String::from_utf8_lossy(text).into_owned())
            }
        };
        // Writing a Value to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &v);
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

fn is_integer(t: &[u8]) -> bool {
    let digits = t.strip_prefix(b"-").unwrap_or(t);
    !digits.is_empty()
        && digits.iter().all(u8::is_ascii_digit)
        && (digits == b"0" || digits[0] != b'0')
}

/// Writes `s` (UTF-8) as a JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &[u8]) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < s.len() {
        // Eight bytes at a time while none of them needs escaping (the common case).
        if let Some(word) = s.get(i..i + 8) {
            let w = u64::from_le_bytes(word.try_into().unwrap_or_default());
            if !needs_escape(w) {
                i += 8;
                continue;
            }
        }
        let b = s[i];
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&s[start..i]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 15)]);
                i += 1;
                start = i;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&s[start..i]);
        out.extend_from_slice(esc);
        i += 1;
        start = i;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

/// Whether any of the eight bytes in `w` is a control character, `"` or `\\`.
fn needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte is zero after the xor/subtraction exactly when it matched; bytes >= 0x80 are
    // excluded by `!w`, so UTF-8 continuation bytes never count as matches.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    below_space | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\'))) != 0
}

/// Writes a decimal integer (what `write!(out, "{n}")` writes, without the formatting machinery).
pub fn write_int(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    write_uint(out, n.unsigned_abs());
}

/// Writes a decimal unsigned integer.
pub fn write_uint(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[at..]);
}

/// A row image as a JSON object of the table's captured columns (all, or `only` these), in
/// column order.
pub fn row_object(
    conv: &mut Converter,
    table: &TableSchema,
    values: &[Raw<'_>],
    only: Option<&[usize]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * table.columns.len());
    write_row_object(conv, table, values, only, &mut out);
    out
}

/// Appends what [`row_object`] returns to `out`.
pub fn write_row_object(
    conv: &mut Converter,
    table: &TableSchema,
    values: &[Raw<'_>],
    only: Option<&[usize]>,
    out: &mut Vec<u8>,
) {
    out.push(b'{');
    let mut first = true;
    for (i, c) in table.columns.iter().enumerate() {
        if c.excluded || only.is_some_and(|o| !o.contains(&i)) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(out, c.name.as_bytes());
        out.push(b':');
        let raw = values.get(i).copied().unwrap_or(Raw::Null);
        conv.write_value(out, &c.ty, c.type_oid, c.masked, raw);
    }
    out.push(b'}');
}

/// The key of a row: its key columns as a JSON object.
pub fn key_object(conv: &mut Converter, table: &TableSchema, values: &[Raw<'_>]) -> Vec<u8> {
    row_object(conv, table, values, Some(&table.key))
}

/// Debezium's `source` block.
pub struct SourceInfo<'a> {
    pub name: &'a str,
    pub db: &'a str,
    pub lsn: Option<u64>,
    pub tx_id: Option<u32>,
    pub ts_ms: i64,
    /// `"true"`, `"incremental"` or `"false"`.
    pub snapshot: &'a str,
    /// When Polylog processed the change (the envelope's own `ts_ms`).
    pub processed_ms: i64,
}

/// A change event value in Debezium's envelope; `before`/`after` are JSON objects or `None`
/// for null.
pub fn envelope(
    table: &TableSchema,
    op: &str,
    before: Option<&[u8]>,
    after: Option<&[u8]>,
    src: &SourceInfo<'_>,
) -> Vec<u8> {
    let image_len = before.map_or(4, <[u8]>::len) + after.map_or(4, <[u8]>::len);
    let mut out = Vec::with_capacity(image_len + 256);
    out.extend_from_slice(b"{\"before\":");
    out.extend_from_slice(before.unwrap_or(b"null"));
    out.extend_from_slice(b",\"after\":");
    out.extend_from_slice(after.unwrap_or(b"null"));
    write_envelope_tail(&mut out, table, op, src);
    out
}

/// Everything of an envelope after its `after` image (operation, timestamps and the `source`
/// block), for writers that build many envelopes with the same ending.
pub fn envelope_tail(table: &TableSchema, op: &str, src: &SourceInfo<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(192);
    write_envelope_tail(&mut out, table, op, src);
    out
}

fn write_envelope_tail(out: &mut Vec<u8>, table: &TableSchema, op: &str, src: &SourceInfo<'_>) {
    let num = |out: &mut Vec<u8>, v: Option<u64>| match v {
        Some(n) => write_uint(out, n),
        None => out.extend_from_slice(b"null"),
    };
    out.extend_from_slice(b",\"op\":");
    write_str(out, op.as_bytes());
    out.extend_from_slice(b",\"ts_ms\":");
    write_int(out, src.processed_ms);
    out.extend_from_slice(b",\"source\":{\"connector\":\"postgresql\",\"name\":");
    write_str(out, src.name.as_bytes());
    out.extend_from_slice(b",\"db\":");
    write_str(out, src.db.as_bytes());
    out.extend_from_slice(b",\"schema\":");
    write_str(out, table.schema.as_bytes());
    out.extend_from_slice(b",\"table\":");
    write_str(out, table.name.as_bytes());
    out.extend_from_slice(b",\"lsn\":");
    num(out, src.lsn);
    out.extend_from_slice(b",\"txId\":");
    num(out, src.tx_id.map(u64::from));
    out.extend_from_slice(b",\"ts_ms\":");
    write_int(out, src.ts_ms);
    out.extend_from_slice(b",\"snapshot\":");
    write_str(out, src.snapshot.as_bytes());
    out.extend_from_slice(b"}}");
}

/// Splits one row of `COPY ... TO STDOUT` text format into raw column values (`\N` is null;
/// backslash escapes are undone). `out` receives owned bytes per column.
pub fn parse_copy_row(line: &[u8], out: &mut Vec<Option<Vec<u8>>>) {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let mut n = 0;
    for field in line.split(|&b| b == b'\t') {
        if n == out.len() {
            out.push(None);
        }
        if field == b"\\N" {
            out[n] = None;
            n += 1;
            continue;
        }
        // Buffers are reused from row to row.
        let v = out[n].get_or_insert_with(Vec::new);
        v.clear();
        n += 1;
        if !field.contains(&b'\\') {
            v.extend_from_slice(field);
            continue;
        }
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
                    let mut x = u32::from(e - b'0');
                    let mut k = 0;
                    while k < 2 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                        x = x * 8 + u32::from(field[i] - b'0');
                        i += 1;
                        k += 1;
                    }
                    v.push(x as u8);
                }
                b'x' if i < field.len() && field[i].is_ascii_hexdigit() => {
                    let mut x = 0u32;
                    let mut k = 0;
                    while k < 2 && i < field.len() && field[i].is_ascii_hexdigit() {
                        x = x * 16 + (field[i] as char).to_digit(16).unwrap_or(0);
                        i += 1;
                        k += 1;
                    }
                    v.push(x as u8);
                }
                other => v.push(other),
            }
        }
    }
    out.truncate(n);
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
    fn json_strings_escape_like_serde() {
        for s in ["plain", "tab\there \"q\" back\\slash\nnew ünï", "\u{1}\u{1f}\u{7f}", ""] {
            let mut out = Vec::new();
            write_str(&mut out, s.as_bytes());
            let back: String = serde_json::from_slice(&out).expect("valid JSON");
            assert_eq!(back, s);
        }
    }

    #[test]
    fn json_strings_escape_like_serde_at_every_offset() {
        // Each special byte at each position around the eight-byte steps, among plain
        // ASCII and multi-byte UTF-8.
        let specials = ["\"", "\\", "\n", "\u{0}", "\u{1f}", "\u{7f}", "é", "\u{20ac}", " "];
        for len in 0..20 {
            for at in 0..=len {
                for sp in specials {
                    let s: String = (0..len)
                        .map(|i| {
                            if i == at {
                                sp.to_string()
                            } else {
                                ((b'a' + i as u8) as char).to_string()
                            }
                        })
                        .collect();
                    let mut out = Vec::new();
                    write_str(&mut out, s.as_bytes());
                    assert_eq!(out, serde_json::to_vec(&s).expect("serializes"), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn integers_write_like_display() {
        for n in [0, 1, -1, 9, 10, 99, 100, 12345, -98765, i64::MAX, i64::MIN] {
            let mut out = Vec::new();
            write_int(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
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
