//! Column types: what a load accepts, how a text field becomes a value, and how values are
//! encoded for Postgres' binary COPY. Every value is parsed once, on our side, into the exact
//! value Postgres stores (numeric rounded to its scale, timestamps to their precision, blank
//! padded characters padded), so that Postgres and the Parquet files hold the same values.

use std::fmt::Write as _;

/// A column's type, as far as loading is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// `numeric(precision, scale)`, or unconstrained.
    Numeric(Option<(u32, u32)>),
    /// `text`, `varchar(n)` (max characters), enums (`typtype = 'e'`).
    Text(Option<u32>),
    /// `char(n)`: blank-padded to n characters.
    Char(u32),
    Date,
    /// `time(p)`: microseconds since midnight, rounded to p fractional digits.
    Time(Option<u32>),
    Timestamp(Option<u32>),
    Timestamptz(Option<u32>),
    Uuid,
    Bytea,
    Json,
    Jsonb,
}

/// A column of the target table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub ty: ColType,
    pub not_null: bool,
    /// The type as Postgres writes it (`numeric(12,2)`), for messages and `CREATE TABLE`.
    pub sql_type: String,
}

impl ColType {
    /// The type from Postgres' catalog: the base type name (`typname`), the type modifier
    /// (`atttypmod`) and whether it is an enum. `None` for types a load cannot carry exactly.
    pub fn from_catalog(typname: &str, typmod: i32, is_enum: bool) -> Option<ColType> {
        let tm = (typmod >= 0).then_some(typmod);
        let precision = |p: i32| (0..=6).contains(&p).then_some(p as u32);
        Some(match typname {
            _ if is_enum => ColType::Text(None),
            "bool" => ColType::Bool,
            "int2" => ColType::Int2,
            "int4" => ColType::Int4,
            "int8" => ColType::Int8,
            "float4" => ColType::Float4,
            "float8" => ColType::Float8,
            "numeric" => match tm {
                None => ColType::Numeric(None),
                Some(t) => {
                    let p = ((t - 4) >> 16) & 0xffff;
                    // The scale is 11 bits, signed (Postgres 15 allows negative scales).
                    let s = (((t - 4) & 0x7ff) << 21) >> 21;
                    if s < 0 || s > p {
                        return None; // numeric(5,-2), numeric(3,5): not carried yet
                    }
                    ColType::Numeric(Some((p as u32, s as u32)))
                }
            },
            "text" | "name" => ColType::Text(None),
            "varchar" => ColType::Text(tm.map(|t| (t - 4) as u32)),
            "bpchar" => match tm {
                Some(t) => ColType::Char((t - 4) as u32),
                None => ColType::Text(None), // bpchar without a length: no padding, no limit
            },
            "date" => ColType::Date,
            "time" => ColType::Time(tm.and_then(precision)),
            "timestamp" => ColType::Timestamp(tm.and_then(precision)),
            "timestamptz" => ColType::Timestamptz(tm.and_then(precision)),
            "uuid" => ColType::Uuid,
            "bytea" => ColType::Bytea,
            "json" => ColType::Json,
            "jsonb" => ColType::Jsonb,
            _ => return None,
        })
    }

    /// The types a load supports, for the error that names an unsupported one.
    pub const SUPPORTED: &'static str = "boolean, smallint, integer, bigint, real, double \
        precision, numeric, text, varchar, char, enums, date, time, timestamp, timestamptz, uuid, \
        bytea, json, jsonb (and domains over them)";
}

/// Why a field could not become a value of its column.
pub type FieldError = String;

/// Values of one column for a chunk of rows: a validity flag per row and the non-null values.
#[derive(Debug, Clone)]
pub struct ColumnData {
    pub valid: Vec<bool>,
    pub values: Values,
}

/// The non-null values of a column.
#[derive(Debug, Clone)]
pub enum Values {
    Bool(Vec<bool>),
    I16(Vec<i16>),
    /// int4, and dates as days since 2000-01-01 (Postgres' epoch).
    I32(Vec<i32>),
    /// int8, and times, timestamps as microseconds (since midnight, since 2000-01-01).
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// Text, bytea, json; numeric as its canonical decimal text (`-12.50`, `NaN`).
    Bytes {
        data: Vec<u8>,
        ends: Vec<usize>,
    },
    Uuid(Vec<[u8; 16]>),
}

impl Values {
    fn new(ty: &ColType) -> Values {
        match ty {
            ColType::Bool => Values::Bool(Vec::new()),
            ColType::Int2 => Values::I16(Vec::new()),
            ColType::Int4 | ColType::Date => Values::I32(Vec::new()),
            ColType::Int8 | ColType::Time(_) | ColType::Timestamp(_) | ColType::Timestamptz(_) => {
                Values::I64(Vec::new())
            }
            ColType::Float4 => Values::F32(Vec::new()),
            ColType::Float8 => Values::F64(Vec::new()),
            ColType::Uuid => Values::Uuid(Vec::new()),
            ColType::Numeric(_)
            | ColType::Text(_)
            | ColType::Char(_)
            | ColType::Bytea
            | ColType::Json
            | ColType::Jsonb => Values::Bytes { data: Vec::new(), ends: Vec::new() },
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Values::Bool(v) => v.len(),
            Values::I16(v) => v.len(),
            Values::I32(v) => v.len(),
            Values::I64(v) => v.len(),
            Values::F32(v) => v.len(),
            Values::F64(v) => v.len(),
            Values::Bytes { ends, .. } => ends.len(),
            Values::Uuid(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The i-th value of a `Bytes` column.
    pub fn bytes(&self, i: usize) -> &[u8] {
        match self {
            Values::Bytes { data, ends } => {
                let start = if i == 0 { 0 } else { ends[i - 1] };
                &data[start..ends[i]]
            }
            _ => &[],
        }
    }
}

impl ColumnData {
    pub fn new(ty: &ColType) -> ColumnData {
        ColumnData { valid: Vec::new(), values: Values::new(ty) }
    }

    /// Room for `rows` rows.
    pub fn with_capacity(ty: &ColType, rows: usize) -> ColumnData {
        let mut c = ColumnData::new(ty);
        c.valid.reserve(rows);
        match &mut c.values {
            Values::Bool(v) => v.reserve(rows),
            Values::I16(v) => v.reserve(rows),
            Values::I32(v) => v.reserve(rows),
            Values::I64(v) => v.reserve(rows),
            Values::F32(v) => v.reserve(rows),
            Values::F64(v) => v.reserve(rows),
            Values::Uuid(v) => v.reserve(rows),
            Values::Bytes { ends, .. } => ends.reserve(rows),
        }
        c
    }

    /// Drops rows from `rows` on (a row that failed half-way through its columns).
    pub fn truncate_rows(&mut self, rows: usize) {
        if self.valid.len() <= rows {
            return;
        }
        let keep = self.valid[..rows].iter().filter(|&&v| v).count();
        self.valid.truncate(rows);
        match &mut self.values {
            Values::Bool(v) => v.truncate(keep),
            Values::I16(v) => v.truncate(keep),
            Values::I32(v) => v.truncate(keep),
            Values::I64(v) => v.truncate(keep),
            Values::F32(v) => v.truncate(keep),
            Values::F64(v) => v.truncate(keep),
            Values::Uuid(v) => v.truncate(keep),
            Values::Bytes { data, ends } => {
                ends.truncate(keep);
                data.truncate(ends.last().copied().unwrap_or(0));
            }
        }
    }

    pub fn push_null(&mut self) {
        self.valid.push(false);
    }

    /// Parses `text` as a value of `ty` and appends it. On error nothing is appended.
    pub fn push_text(&mut self, ty: &ColType, text: &[u8]) -> Result<(), FieldError> {
        self.push_field(ty, text, None)
    }

    /// [`ColumnData::push_text`] with the field as `&str` when it is already known to be
    /// UTF-8 (the whole record was checked at once).
    pub fn push_field(
        &mut self,
        ty: &ColType,
        text: &[u8],
        utf8: Option<&str>,
    ) -> Result<(), FieldError> {
        let st = || utf8.map_or_else(|| str_of(text), Ok);
        match (&mut self.values, ty) {
            (Values::Bool(v), _) => v.push(parse_bool(st()?)?),
            (Values::I16(v), _) => {
                let n = parse_int(text, "smallint")?;
                v.push(i16::try_from(n).map_err(|_| "out of range for type smallint")?)
            }
            (Values::I32(v), ColType::Date) => v.push(parse_date(st()?.trim())?),
            (Values::I32(v), _) => {
                let n = parse_int(text, "integer")?;
                v.push(i32::try_from(n).map_err(|_| "out of range for type integer")?)
            }
            (Values::I64(v), ColType::Time(p)) => v.push(parse_time(st()?.trim(), *p)?),
            (Values::I64(v), ColType::Timestamp(p)) => {
                v.push(parse_timestamp(st()?.trim(), *p, false)?)
            }
            (Values::I64(v), ColType::Timestamptz(p)) => {
                v.push(parse_timestamp(st()?.trim(), *p, true)?)
            }
            (Values::I64(v), _) => v.push(parse_int(text, "bigint")?),
            (Values::F32(v), _) => v.push(parse_f32(st()?)?),
            (Values::F64(v), _) => v.push(parse_float(st()?)?),
            (Values::Uuid(v), _) => v.push(parse_uuid(text)?),
            (Values::Bytes { data, ends }, ty) => {
                let start = data.len();
                let r = match (ty, utf8) {
                    (ColType::Bytea, _) | (_, None) => push_bytes(data, ty, text),
                    (_, Some(s)) => push_str(data, ty, s),
                };
                if r.is_err() {
                    data.truncate(start);
                }
                r?;
                ends.push(data.len());
            }
        }
        self.valid.push(true);
        Ok(())
    }
}

fn str_of(text: &[u8]) -> Result<&str, FieldError> {
    std::str::from_utf8(text).map_err(|_| "is not valid UTF-8".to_string())
}

fn parse_bool(s: &str) -> Result<bool, FieldError> {
    let s = s.trim().to_ascii_lowercase();
    match s.as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Ok(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Ok(false),
        _ => Err("is not a boolean (true/false, t/f, yes/no, on/off, 1/0)".into()),
    }
}

fn parse_int(text: &[u8], ty: &str) -> Result<i64, FieldError> {
    let t = text.trim_ascii();
    let (neg, digits) = match t.first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(format!("is not a valid {ty}"));
    }
    let mut v: i128 = 0;
    for &c in digits {
        v = v * 10 + (c - b'0') as i128;
        if v > i64::MAX as i128 + 1 {
            return Err(format!("out of range for type {ty}"));
        }
    }
    let v = if neg { -v } else { v };
    i64::try_from(v).map_err(|_| format!("out of range for type {ty}"))
}

fn parse_float(s: &str) -> Result<f64, FieldError> {
    let s = s.trim();
    let v: f64 = s.parse().map_err(|_| "is not a number".to_string())?;
    check_float_range(s, v.is_infinite(), v == 0.0, "double precision")?;
    Ok(v)
}

/// Postgres refuses what overflows to infinity or underflows to zero, unlike Rust's parser.
fn check_float_range(s: &str, infinite: bool, zero: bool, ty: &str) -> Result<(), FieldError> {
    let spelled_inf = s.bytes().any(|c| c.eq_ignore_ascii_case(&b'i'));
    if infinite && !spelled_inf {
        return Err(format!("is out of range for type {ty}"));
    }
    let mantissa = s.split(['e', 'E']).next().unwrap_or("");
    if zero && mantissa.bytes().any(|c| (b'1'..=b'9').contains(&c)) {
        return Err(format!("is out of range for type {ty}"));
    }
    Ok(())
}

/// A float4 parsed straight to `f32` (correctly rounded, as Postgres' `strtof`).
pub fn parse_f32(s: &str) -> Result<f32, FieldError> {
    let s = s.trim();
    let v = s.parse::<f32>().map_err(|_| "is not a number".to_string())?;
    check_float_range(s, v.is_infinite(), v == 0.0, "real")?;
    Ok(v)
}

fn parse_uuid(text: &[u8]) -> Result<[u8; 16], FieldError> {
    let t = text.trim_ascii();
    let t = t.strip_prefix(b"{").and_then(|t| t.strip_suffix(b"}")).unwrap_or(t);
    let bad = || "is not a UUID".to_string();
    let mut out = [0u8; 16];
    let mut n = 0;
    for &c in t {
        if c == b'-' {
            continue;
        }
        let d = hex_digit(c).ok_or_else(bad)?;
        if n >= 32 {
            return Err(bad());
        }
        out[n / 2] |= if n % 2 == 0 { d << 4 } else { d };
        n += 1;
    }
    if n != 32 {
        return Err(bad());
    }
    Ok(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn push_bytes(out: &mut Vec<u8>, ty: &ColType, text: &[u8]) -> Result<(), FieldError> {
    match ty {
        ColType::Bytea => decode_bytea(text, out),
        _ => push_str(out, ty, str_of(text)?),
    }
}

fn push_str(out: &mut Vec<u8>, ty: &ColType, s: &str) -> Result<(), FieldError> {
    let text = s.as_bytes();
    match ty {
        ColType::Numeric(tm) => {
            DIGITS.with(|d| parse_numeric_into(s, *tm, &mut d.borrow_mut(), out))?
        }
        ColType::Bytea => decode_bytea(text, out)?,
        ColType::Text(max) => {
            let s = check_text(s)?;
            if let Some(max) = max {
                let chars = s.chars().count();
                if chars > *max as usize {
                    // Postgres, too, accepts a value whose extra characters are all spaces.
                    let keep: usize = s.char_indices().nth(*max as usize).map_or(s.len(), |c| c.0);
                    if s[keep..].bytes().any(|c| c != b' ') {
                        return Err(format!("is too long for character varying({max})"));
                    }
                    out.extend_from_slice(&text[..keep]);
                    return Ok(());
                }
            }
            out.extend_from_slice(text);
        }
        ColType::Char(n) => {
            let s = check_text(s)?;
            let n = *n as usize;
            let chars = s.chars().count();
            if chars > n {
                let keep: usize = s.char_indices().nth(n).map_or(s.len(), |c| c.0);
                if s[keep..].bytes().any(|c| c != b' ') {
                    return Err(format!("is too long for character({n})"));
                }
                out.extend_from_slice(&text[..keep]);
            } else {
                out.extend_from_slice(text);
                out.resize(out.len() + (n - chars), b' ');
            }
        }
        ColType::Json | ColType::Jsonb => {
            check_text(s)?;
            serde_json::from_slice::<serde::de::IgnoredAny>(text)
                .map_err(|e| format!("is not valid JSON ({e})"))?;
            out.extend_from_slice(text);
        }
        _ => unreachable!("not a bytes type"),
    }
    Ok(())
}

thread_local! {
    static DIGITS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn check_text(s: &str) -> Result<&str, FieldError> {
    if s.as_bytes().contains(&0) {
        return Err("contains a NUL byte, which Postgres text cannot hold".into());
    }
    Ok(s)
}

/// bytea in either of Postgres' text forms: hex (`\x0aff`) or escape (`a\000\\`).
fn decode_bytea(text: &[u8], out: &mut Vec<u8>) -> Result<(), FieldError> {
    if let Some(hex) = text.strip_prefix(b"\\x") {
        let mut high = None;
        for &c in hex {
            if c.is_ascii_whitespace() {
                continue;
            }
            let d = hex_digit(c).ok_or("is not valid hex bytea")?;
            match high.take() {
                None => high = Some(d),
                Some(h) => out.push(h << 4 | d),
            }
        }
        if high.is_some() {
            return Err("is not valid hex bytea (odd number of digits)".into());
        }
        return Ok(());
    }
    let mut i = 0;
    while i < text.len() {
        if text[i] != b'\\' {
            out.push(text[i]);
            i += 1;
        } else if text.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else if i + 3 < text.len()
            && text[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            && text[i + 1] <= b'3'
        {
            out.push((text[i + 1] - b'0') << 6 | (text[i + 2] - b'0') << 3 | (text[i + 3] - b'0'));
            i += 4;
        } else {
            return Err("is not valid escape-format bytea".into());
        }
    }
    Ok(())
}

/// A numeric in canonical decimal text: optional `-`, integer digits without leading zeros
/// (`0` when none), and exactly `scale` fraction digits; or `NaN`, `Infinity`, `-Infinity`.
/// With a type modifier the value is rounded half away from zero to its scale, as Postgres does,
/// and refused when it has too many integer digits.
pub fn parse_numeric(s: &str, typmod: Option<(u32, u32)>) -> Result<String, FieldError> {
    let mut out = Vec::new();
    parse_numeric_into(s, typmod, &mut Vec::new(), &mut out)?;
    Ok(String::from_utf8(out).unwrap_or_default())
}

/// [`parse_numeric`] appending to `out`, with `digits` as scratch space (no allocation once
/// both have grown).
pub fn parse_numeric_into(
    s: &str,
    typmod: Option<(u32, u32)>,
    digits: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(), FieldError> {
    let s = s.trim();
    if s.len() <= 9 && s.bytes().any(|c| c.is_ascii_alphabetic() && c != b'e' && c != b'E') {
        let special = if s.eq_ignore_ascii_case("nan") {
            Some("NaN")
        } else if ["infinity", "+infinity", "inf", "+inf"].iter().any(|w| s.eq_ignore_ascii_case(w))
        {
            Some("Infinity")
        } else if ["-infinity", "-inf"].iter().any(|w| s.eq_ignore_ascii_case(w)) {
            Some("-Infinity")
        } else {
            None
        };
        if let Some(sp) = special {
            if typmod.is_some() && sp != "NaN" {
                return Err("does not fit a numeric with precision and scale (infinity)".into());
            }
            out.extend_from_slice(sp.as_bytes());
            return Ok(());
        }
    }
    let bad = || "is not a number".to_string();
    let b = s.as_bytes();
    let mut i = 0;
    let neg = match b.first() {
        Some(b'-') => {
            i = 1;
            true
        }
        Some(b'+') => {
            i = 1;
            false
        }
        _ => false,
    };
    digits.clear();
    let mut frac = 0i64;
    let mut seen_point = false;
    let mut any = false;
    while i < b.len() {
        match b[i] {
            c @ b'0'..=b'9' => {
                digits.push(c - b'0');
                any = true;
                if seen_point {
                    frac += 1;
                }
            }
            b'.' if !seen_point => seen_point = true,
            b'e' | b'E' => break,
            _ => return Err(bad()),
        }
        i += 1;
    }
    if !any {
        return Err(bad());
    }
    let mut exp = 0i64;
    if i < b.len() {
        let e = &s[i + 1..];
        exp = e.parse::<i64>().map_err(|_| bad())?;
        if exp.abs() > 1000 {
            return Err("exponent is out of range for numeric".into());
        }
    }
    // value = digits * 10^(exp - frac)
    let mut scale = (frac - exp).max(0);
    let shift = exp - frac; // > 0: append zeros
    if shift > 0 {
        digits.extend(std::iter::repeat_n(0, shift as usize));
    }
    // At least one digit before the point (5e-4: digits 5, scale 4 becomes 00005).
    while (digits.len() as i64) < scale + 1 {
        digits.insert(0, 0);
    }
    if let Some((p, target)) = typmod {
        let target = target as i64;
        if scale > target {
            let drop = (scale - target) as usize;
            let round_up = digits[digits.len() - drop] >= 5;
            digits.truncate(digits.len() - drop);
            if round_up {
                let mut k = digits.len();
                loop {
                    if k == 0 {
                        digits.insert(0, 1);
                        break;
                    }
                    k -= 1;
                    if digits[k] == 9 {
                        digits[k] = 0;
                    } else {
                        digits[k] += 1;
                        break;
                    }
                }
            }
        } else {
            digits.extend(std::iter::repeat_n(0, (target - scale) as usize));
        }
        scale = target;
        let int_digits = digits.len() as i64 - scale;
        let significant =
            digits[..int_digits.max(0) as usize].iter().skip_while(|&&d| d == 0).count();
        if significant as i64 > p as i64 - scale {
            return Err(format!(
                "overflows numeric({p},{target}): at most {} digits before the point",
                p as i64 - scale
            ));
        }
    }
    if scale > 16383 {
        return Err("has too many digits after the point for numeric".into());
    }
    let int_len = (digits.len() as i64 - scale).max(0) as usize;
    let all_zero = digits.iter().all(|&d| d == 0);
    if neg && !all_zero {
        out.push(b'-');
    }
    let int_part = &digits[..int_len];
    let lead = int_part.iter().take_while(|&&d| d == 0).count();
    if lead == int_len {
        out.push(b'0');
    }
    out.extend(int_part[lead..].iter().map(|&d| b'0' + d));
    if scale > 0 {
        out.push(b'.');
        let frac_digits = &digits[int_len..];
        // When there are fewer digits than the scale (0.05 written as .05), pad on the left.
        out.extend(std::iter::repeat_n(b'0', (scale as usize).saturating_sub(frac_digits.len())));
        out.extend(frac_digits.iter().map(|&d| b'0' + d));
    }
    Ok(())
}

/// Days from 1970-01-01 to 2000-01-01, Postgres' epoch.
const PG_EPOCH_DAYS: i64 = 10_957;

/// Days since 2000-01-01 of a civil date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    polylog_postgres::calendar::days_from_civil(y, m, d) - PG_EPOCH_DAYS
}

/// The civil date of a day count since 2000-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    polylog_postgres::calendar::civil_from_days(days + PG_EPOCH_DAYS)
}

const DATE_INFINITY: i32 = i32::MAX;
const DATE_NEG_INFINITY: i32 = i32::MIN;
const TS_INFINITY: i64 = i64::MAX;
const TS_NEG_INFINITY: i64 = i64::MIN;
const USECS_PER_DAY: i64 = 86_400_000_000;

fn parse_date(s: &str) -> Result<i32, FieldError> {
    match s.to_ascii_lowercase().as_str() {
        "infinity" => return Ok(DATE_INFINITY),
        "-infinity" => return Ok(DATE_NEG_INFINITY),
        _ => {}
    }
    let (days, rest) = parse_ymd(s)?;
    if !rest.is_empty() {
        return Err("is not a date (YYYY-MM-DD)".into());
    }
    Ok(days as i32)
}

/// `YYYY-MM-DD` at the start of `s`: days since 2000-01-01 and the rest.
fn parse_ymd(s: &str) -> Result<(i64, &str), FieldError> {
    let b = s.as_bytes();
    // The common form, YYYY-MM-DD, without splitting.
    if b.len() >= 10
        && b[4] == b'-'
        && b[7] == b'-'
        && [0, 1, 2, 3, 5, 6, 8, 9].iter().all(|&i| b[i].is_ascii_digit())
        && b.get(10).is_none_or(|c| !c.is_ascii_digit())
    {
        let n =
            |r: std::ops::Range<usize>| b[r].iter().fold(0u32, |a, &c| a * 10 + (c - b'0') as u32);
        let (y, m, d) = (n(0..4) as i64, n(5..7), n(8..10));
        if y == 0 {
            return Err("is not a valid date (there is no year 0)".into());
        }
        if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
            return Err("is not a valid date".into());
        }
        return Ok((days_from_civil(y, m, d), &s[10..]));
    }
    let bad = || "is not a date (YYYY-MM-DD)".to_string();
    let mut parts = s.splitn(3, '-');
    let y = parts.next().ok_or_else(bad)?;
    let m = parts.next().ok_or_else(bad)?;
    let rest = parts.next().ok_or_else(bad)?;
    let dlen = rest.bytes().take_while(u8::is_ascii_digit).count();
    let (d, rest) = rest.split_at(dlen);
    if y.len() < 4 || !y.bytes().all(|c| c.is_ascii_digit()) || m.len() != 2 || d.len() != 2 {
        return Err(bad());
    }
    let (y, m, d): (i64, u32, u32) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return Err("is not a valid date".into());
    }
    if y == 0 {
        return Err("is not a valid date (there is no year 0)".into());
    }
    if y > 294_276 {
        return Err("is out of range for dates and timestamps".into());
    }
    Ok((days_from_civil(y, m, d), rest))
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Postgres rounds fractional seconds to a column's precision, half away from zero.
fn round_to_precision(us: i64, p: Option<u32>) -> i64 {
    let Some(p) = p else { return us };
    let unit = 10i64.pow(6 - p.min(6));
    let half = unit / 2;
    if us >= 0 {
        (us + half) / unit * unit
    } else {
        -((-us + half) / unit * unit)
    }
}

/// `HH:MM[:SS[.ffffff]]` as microseconds; `rest` is what follows.
fn parse_hms(s: &str) -> Result<(i64, &str), FieldError> {
    let bad = || "is not a time (HH:MM:SS[.ffffff])".to_string();
    let b = s.as_bytes();
    let two = |i: usize| -> Result<i64, FieldError> {
        match (b.get(i), b.get(i + 1)) {
            (Some(a @ b'0'..=b'9'), Some(c @ b'0'..=b'9')) => {
                Ok(((a - b'0') * 10 + (c - b'0')) as i64)
            }
            _ => Err(bad()),
        }
    };
    let h = two(0)?;
    if b.get(2) != Some(&b':') {
        return Err(bad());
    }
    let mi = two(3)?;
    let mut at = 5;
    let mut sec = 0;
    let mut us = 0i64;
    if b.get(5) == Some(&b':') {
        sec = two(6)?;
        at = 8;
        if b.get(8) == Some(&b'.') {
            at = 9;
            let mut n = 0;
            let mut extra_round = false;
            while let Some(c @ b'0'..=b'9') = b.get(at) {
                if n < 6 {
                    us = us * 10 + (c - b'0') as i64;
                } else if n == 6 {
                    extra_round = *c >= b'5';
                }
                n += 1;
                at += 1;
            }
            if n == 0 {
                return Err(bad());
            }
            for _ in n..6 {
                us *= 10;
            }
            if extra_round {
                us += 1;
            }
        }
    }
    if h > 24 || mi > 59 || sec > 60 || (h == 24 && (mi, sec, us) != (0, 0, 0)) {
        return Err("is not a valid time of day".into());
    }
    Ok((((h * 60 + mi) * 60 + sec) * 1_000_000 + us, &s[at..]))
}

fn parse_time(s: &str, p: Option<u32>) -> Result<i64, FieldError> {
    let (us, rest) = parse_hms(s)?;
    if !rest.is_empty() {
        return Err("is not a time (HH:MM:SS[.ffffff])".into());
    }
    Ok(round_to_precision(us, p).min(USECS_PER_DAY))
}

/// `YYYY-MM-DD[ T]HH:MM:SS[.ffffff][Z|±HH[:MM]]` as microseconds since 2000-01-01. For
/// `timestamptz` the offset is applied (no offset: UTC); a `timestamp` refuses an offset.
fn parse_timestamp(s: &str, p: Option<u32>, tz: bool) -> Result<i64, FieldError> {
    match s.to_ascii_lowercase().as_str() {
        "infinity" => return Ok(TS_INFINITY),
        "-infinity" => return Ok(TS_NEG_INFINITY),
        _ => {}
    }
    let (days, rest) = parse_ymd(s)?;
    let (time, rest) = match rest.strip_prefix([' ', 'T', 't']) {
        Some(r) => parse_hms(r)?,
        None if rest.is_empty() => (0, ""),
        None => return Err("is not a timestamp (YYYY-MM-DD HH:MM:SS[.ffffff][+HH:MM])".into()),
    };
    let rest = rest.trim_start();
    let offset_us = if rest.is_empty() {
        0
    } else if !tz {
        return Err(
            "has a time zone offset, but the column is a timestamp without time zone".into()
        );
    } else if rest == "Z" || rest == "z" || rest.eq_ignore_ascii_case("utc") {
        0
    } else {
        parse_offset(rest)?
    };
    let us = days
        .checked_mul(USECS_PER_DAY)
        .and_then(|d| d.checked_add(time))
        .and_then(|t| t.checked_sub(offset_us))
        .ok_or("is out of range for timestamps")?;
    Ok(round_to_precision(us, p))
}

/// `±HH`, `±HHMM`, `±HH:MM[:SS]` as microseconds east of UTC.
fn parse_offset(s: &str) -> Result<i64, FieldError> {
    let bad = || "has an invalid time zone offset (use Z, +HH, +HH:MM)".to_string();
    let (sign, r) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let digits: String = r.chars().filter(|&c| c != ':').collect();
    if !digits.bytes().all(|c| c.is_ascii_digit()) || ![2, 4, 6].contains(&digits.len()) {
        return Err(bad());
    }
    let n = |i: usize| digits.get(i..i + 2).map_or(0, |d| d.parse::<i64>().unwrap_or(0));
    let (h, m, sec) = (n(0), n(2), n(4));
    if h > 15 || m > 59 || sec > 59 {
        return Err(bad());
    }
    Ok(sign * ((h * 60 + m) * 60 + sec) * 1_000_000)
}

/// Formats microseconds since 2000-01-01 as `YYYY-MM-DD HH:MM:SS[.ffffff]`.
pub fn format_timestamp(us: i64) -> String {
    match us {
        TS_INFINITY => return "infinity".into(),
        TS_NEG_INFINITY => return "-infinity".into(),
        _ => {}
    }
    let days = us.div_euclid(USECS_PER_DAY);
    let t = us.rem_euclid(USECS_PER_DAY);
    let mut s = format_date(days as i32);
    s.push(' ');
    s.push_str(&format_time(t));
    s
}

pub fn format_date(days: i32) -> String {
    match days {
        DATE_INFINITY => "infinity".into(),
        DATE_NEG_INFINITY => "-infinity".into(),
        _ => {
            let (y, m, d) = civil_from_days(days as i64);
            format!("{y:04}-{m:02}-{d:02}")
        }
    }
}

pub fn format_time(us: i64) -> String {
    let (secs, frac) = (us / 1_000_000, us % 1_000_000);
    let mut s = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if frac != 0 {
        let _ = write!(s, ".{frac:06}");
        while s.ends_with('0') {
            s.pop();
        }
    }
    s
}

/// Appends Postgres' binary form of a canonical numeric (see [`parse_numeric`]).
pub fn encode_numeric(text: &str, out: &mut Vec<u8>) {
    let (sign, body) = match text {
        "NaN" => return push_numeric_header(out, 0, 0, 0xC000, 0),
        "Infinity" => return push_numeric_header(out, 0, 0, 0xD000, 0),
        "-Infinity" => return push_numeric_header(out, 0, 0, 0xF000, 0),
        t => match t.strip_prefix('-') {
            Some(b) => (0x4000u16, b),
            None => (0, t),
        },
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let dscale = frac.len() as u16;
    // Base-10000 groups aligned on the point: pad the integer part on the left and the
    // fraction on the right to multiples of four digits.
    let int = int.trim_start_matches('0');
    let int_pad = (4 - int.len() % 4) % 4;
    let frac_pad = (4 - frac.len() % 4) % 4;
    let mut groups: Vec<i16> = Vec::with_capacity((int.len() + frac.len()) / 4 + 2);
    let mut acc = 0i16;
    let mut n = 0;
    let digits = std::iter::repeat_n(b'0', int_pad)
        .chain(int.bytes())
        .chain(frac.bytes())
        .chain(std::iter::repeat_n(b'0', frac_pad));
    for c in digits {
        acc = acc * 10 + (c - b'0') as i16;
        n += 1;
        if n == 4 {
            groups.push(acc);
            acc = 0;
            n = 0;
        }
    }
    let int_groups = (int.len() + int_pad) / 4;
    let mut weight = int_groups as i16 - 1;
    // Strip leading and trailing zero groups.
    let lead = groups.iter().take_while(|&&g| g == 0).count();
    weight -= lead as i16;
    let groups = &groups[lead..];
    let trail = groups.iter().rev().take_while(|&&g| g == 0).count();
    let groups = &groups[..groups.len() - trail];
    if groups.is_empty() {
        return push_numeric_header(out, 0, 0, 0, dscale);
    }
    push_numeric_header(out, groups.len() as i16, weight, sign, dscale);
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
}

fn push_numeric_header(out: &mut Vec<u8>, ndigits: i16, weight: i16, sign: u16, dscale: u16) {
    out.extend_from_slice(&((8 + 2 * ndigits as i32).max(8)).to_be_bytes());
    out.extend_from_slice(&ndigits.to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&dscale.to_be_bytes());
}

/// The unscaled integer of a canonical numeric of a `numeric(p, s)` column (for Parquet's
/// DECIMAL), or `None` for NaN.
pub fn numeric_unscaled(text: &str) -> Option<i128> {
    let digits: String = text.chars().filter(|&c| c != '.').collect();
    digits.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn numerics_are_canonical_and_rounded_like_postgres() {
        let p = |s: &str, t| parse_numeric(s, t).unwrap();
        assert_eq!(p("0012.340", None), "12.340");
        assert_eq!(p("-0.0", None), "0.0");
        assert_eq!(p(".05", None), "0.05");
        assert_eq!(p("1.5e3", None), "1500");
        assert_eq!(p("1.5e-3", None), "0.0015");
        assert_eq!(p("2.345", Some((10, 2))), "2.35");
        assert_eq!(p("-2.345", Some((10, 2))), "-2.35");
        assert_eq!(p("9.995", Some((5, 2))), "10.00");
        assert_eq!(p("7", Some((5, 2))), "7.00");
        assert!(parse_numeric("9999.995", Some((6, 2))).is_err());
        assert!(parse_numeric("1x", None).is_err());
        assert!(parse_numeric("", None).is_err());
        assert_eq!(p("nan", Some((5, 2))), "NaN");
        assert_eq!(p("5e-4", Some((10, 2))), "0.00");
        assert_eq!(p("5e-3", Some((10, 2))), "0.01");
        assert_eq!(p("1e-05", None), "0.00001");
        assert!(parse_float("1e400").is_err() && parse_float("1e-400").is_err());
        assert!(
            parse_float("-Infinity").unwrap().is_infinite() && parse_float("0e5").unwrap() == 0.0
        );
        assert!(parse_f32("1e39").is_err());
        assert!(ColType::from_catalog("numeric", ((5 << 16) | 0x7fe) + 4, false).is_none());
        assert_eq!(ColType::from_catalog("bpchar", -1, false), Some(ColType::Text(None)));
    }

    #[test]
    fn dates_and_timestamps() {
        assert_eq!(parse_date("2000-01-01").unwrap(), 0);
        assert_eq!(parse_date("1999-12-31").unwrap(), -1);
        assert!(parse_date("2023-02-29").is_err());
        assert!(parse_date("0000-01-01").is_err());
        let ts = parse_timestamp("2000-01-02 00:00:01.5", None, false).unwrap();
        assert_eq!(ts, USECS_PER_DAY + 1_500_000);
        let tz = parse_timestamp("2000-01-02T02:00:01.5+02:00", None, true).unwrap();
        assert_eq!(tz, ts);
        assert_eq!(parse_timestamp("2000-01-01 00:00:00.1234567", None, false).unwrap(), 123_457);
        assert_eq!(parse_timestamp("2000-01-01 00:00:00.15", Some(1), false).unwrap(), 200_000);
        assert!(parse_timestamp("2000-01-01 00:00:00+01", None, false).is_err());
        assert_eq!(format_timestamp(ts), "2000-01-02 00:00:01.5");
        for d in [-800_000, -1, 0, 59, 60, 365 * 400 + 97] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn numeric_binary_form() {
        let enc = |s: &str| {
            let mut v = Vec::new();
            encode_numeric(s, &mut v);
            v[4..].chunks(2).map(|c| i16::from_be_bytes([c[0], c[1]])).collect::<Vec<_>>()
        };
        // ndigits, weight, sign, dscale, digits...
        assert_eq!(enc("12345.678"), vec![3, 1, 0, 3, 1, 2345, 6780]);
        assert_eq!(enc("-0.0001"), vec![1, -1, 0x4000, 4, 1]);
        assert_eq!(enc("0.00"), vec![0, 0, 0, 2]);
        assert_eq!(enc("10000"), vec![1, 1, 0, 0, 1]);
    }
}
