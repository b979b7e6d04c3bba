//! Postgres text-format column values to JSON, for Debezium-style change events.
//!
//! Postgres sends column values in text format (pgoutput `'t'` tuple values, and the unescaped
//! fields of `COPY ... TO STDOUT`). [`text_to_json`] turns one non-null value into JSON according
//! to the column's [`PgType`]. The connection is expected to run with `client_encoding=UTF8`,
//! `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601`, `bytea_output=hex` and
//! `extra_float_digits` at its default; values printed under other settings are rejected where the
//! difference is detectable (non-ISO dates and intervals, escape-format bytea).
//!
//! The mapping:
//! - bool → `true`/`false`; int2, int4, int8, oid → JSON integer.
//! - float4, float8 → JSON number; `NaN`, `Infinity`, `-Infinity` → those strings.
//! - numeric → the decimal string exactly as printed (never a float).
//! - text, varchar, bpchar, name, char, xml, enum, uuid, inet, cidr, macaddr → string.
//! - bytea (`\x0a0b`) → standard padded base64 string.
//! - date, time, timetz, interval → string unchanged.
//! - timestamp → ISO 8601 string without zone (`2024-01-31T13:45:00.123456`).
//! - timestamptz → ISO 8601 string with offset, `Z` for UTC (`2024-01-31T13:45:00.123456Z`).
//! - json, jsonb → the parsed JSON value.
//! - arrays → JSON arrays (nested for multi-dimensional arrays), elements converted by type.
//! - unknown types → the text as a string.

use std::fmt;

use base64::Engine as _;
use serde_json::Value;

/// How a column's values are turned into JSON, chosen from its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgType {
    /// `bool`.
    Bool,
    /// `int2` / `smallint`.
    Int2,
    /// `int4` / `integer`.
    Int4,
    /// `int8` / `bigint`.
    Int8,
    /// `float4` / `real`.
    Float4,
    /// `float8` / `double precision`.
    Float8,
    /// `numeric` / `decimal`.
    Numeric,
    /// Character types: `text`, `varchar`, `bpchar`, `name`, `"char"`, and also `xml`.
    Text,
    /// `bytea`.
    Bytea,
    /// `date`.
    Date,
    /// `time` (without time zone).
    Time,
    /// `timetz` (time with time zone).
    TimeTz,
    /// `timestamp` (without time zone).
    Timestamp,
    /// `timestamptz` (timestamp with time zone).
    TimestampTz,
    /// `interval`.
    Interval,
    /// `uuid`.
    Uuid,
    /// `json`.
    Json,
    /// `jsonb`.
    Jsonb,
    /// `inet`.
    Inet,
    /// `cidr`.
    Cidr,
    /// `macaddr`.
    MacAddr,
    /// `oid`.
    Oid,
    /// A user-defined enum type.
    Enum,
    /// An array of the given element type (of any number of dimensions).
    Array(Box<PgType>),
    /// A type this module does not know, with its oid; values pass through as strings.
    Unknown(u32),
}

impl PgType {
    /// The type for a built-in type oid: the scalar types listed on the variants plus their
    /// array types. Unknown oids give `Unknown(oid)`; the caller may turn user-defined enum oids
    /// into `Enum` and their array types into `Array(Enum)` using `pg_type` lookups.
    pub fn from_oid(oid: u32) -> PgType {
        match oid {
            16 => PgType::Bool,
            17 => PgType::Bytea,
            18 | 19 | 25 | 142 | 1042 | 1043 => PgType::Text,
            20 => PgType::Int8,
            21 => PgType::Int2,
            23 => PgType::Int4,
            26 => PgType::Oid,
            114 => PgType::Json,
            650 => PgType::Cidr,
            700 => PgType::Float4,
            701 => PgType::Float8,
            829 => PgType::MacAddr,
            869 => PgType::Inet,
            1082 => PgType::Date,
            1083 => PgType::Time,
            1114 => PgType::Timestamp,
            1184 => PgType::TimestampTz,
            1186 => PgType::Interval,
            1266 => PgType::TimeTz,
            1700 => PgType::Numeric,
            2950 => PgType::Uuid,
            3802 => PgType::Jsonb,
            _ => match array_element_oid(oid) {
                Some(element) => PgType::Array(Box::new(PgType::from_oid(element))),
                None => PgType::Unknown(oid),
            },
        }
    }
}

/// Shows the type the way Postgres names it (`int4`, `text[]`), for error messages.
impl fmt::Display for PgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            PgType::Bool => "bool",
            PgType::Int2 => "int2",
            PgType::Int4 => "int4",
            PgType::Int8 => "int8",
            PgType::Float4 => "float4",
            PgType::Float8 => "float8",
            PgType::Numeric => "numeric",
            PgType::Text => "text",
            PgType::Bytea => "bytea",
            PgType::Date => "date",
            PgType::Time => "time",
            PgType::TimeTz => "timetz",
            PgType::Timestamp => "timestamp",
            PgType::TimestampTz => "timestamptz",
            PgType::Interval => "interval",
            PgType::Uuid => "uuid",
            PgType::Json => "json",
            PgType::Jsonb => "jsonb",
            PgType::Inet => "inet",
            PgType::Cidr => "cidr",
            PgType::MacAddr => "macaddr",
            PgType::Oid => "oid",
            PgType::Enum => "enum",
            PgType::Array(element) => return write!(f, "{element}[]"),
            PgType::Unknown(oid) => return write!(f, "type with oid {oid}"),
        };
        f.write_str(name)
    }
}

/// The element type oid of a built-in array type oid.
fn array_element_oid(oid: u32) -> Option<u32> {
    let element = match oid {
        1000 => 16,   // _bool
        1001 => 17,   // _bytea
        1002 => 18,   // _char
        1003 => 19,   // _name
        1005 => 21,   // _int2
        1007 => 23,   // _int4
        1009 => 25,   // _text
        1014 => 1042, // _bpchar
        1015 => 1043, // _varchar
        1016 => 20,   // _int8
        1021 => 700,  // _float4
        1022 => 701,  // _float8
        1028 => 26,   // _oid
        1040 => 829,  // _macaddr
        1041 => 869,  // _inet
        651 => 650,   // _cidr
        143 => 142,   // _xml
        199 => 114,   // _json
        1115 => 1114, // _timestamp
        1182 => 1082, // _date
        1183 => 1083, // _time
        1185 => 1184, // _timestamptz
        1187 => 1186, // _interval
        1231 => 1700, // _numeric
        1270 => 1266, // _timetz
        2951 => 2950, // _uuid
        3807 => 3802, // _jsonb
        _ => return None,
    };
    Some(element)
}

/// A value that is not valid text output of its type.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("value {value:?} is not valid {ty}: {reason}")]
pub struct TypeError {
    /// The type's name, as shown by `PgType`'s `Display` (`int4`, `text[]`).
    pub ty: String,
    /// The offending value (lossily decoded as UTF-8, cut after 200 characters).
    pub value: String,
    /// Why it was rejected.
    pub reason: String,
}

/// The number of characters of an offending value kept in a [`TypeError`].
const MAX_ERROR_VALUE_CHARS: usize = 200;

/// Converts one non-null text-format value of type `ty` to JSON (see the module docs for the
/// mapping). Invalid input gives a [`TypeError`].
pub fn text_to_json(ty: &PgType, text: &[u8]) -> Result<Value, TypeError> {
    convert(ty, text).map_err(|reason| TypeError {
        ty: ty.to_string(),
        value: error_value(text),
        reason,
    })
}

/// The value shown in a [`TypeError`]: lossy UTF-8, cut to a bounded length.
fn error_value(text: &[u8]) -> String {
    let lossy = String::from_utf8_lossy(text);
    match lossy.char_indices().nth(MAX_ERROR_VALUE_CHARS) {
        Some((cut, _)) => format!("{}…", lossy.get(..cut).unwrap_or_default()),
        None => lossy.into_owned(),
    }
}

/// Converts a value, giving the reason on failure.
fn convert(ty: &PgType, text: &[u8]) -> Result<Value, String> {
    match ty {
        PgType::Bytea => bytea(text),
        PgType::Json | PgType::Jsonb => json(text),
        PgType::Array(element) => array(element, text),
        PgType::Bool => boolean(utf8(text)?),
        PgType::Int2 => integer::<i16>(utf8(text)?),
        PgType::Int4 => integer::<i32>(utf8(text)?),
        PgType::Int8 => integer::<i64>(utf8(text)?),
        PgType::Oid => integer::<u32>(utf8(text)?),
        PgType::Float4 | PgType::Float8 => float(utf8(text)?),
        PgType::Numeric => numeric(utf8(text)?),
        PgType::Uuid => uuid(utf8(text)?),
        PgType::Date => date(utf8(text)?),
        PgType::Time => time(utf8(text)?),
        PgType::TimeTz => timetz(utf8(text)?),
        PgType::Timestamp => timestamp(utf8(text)?),
        PgType::TimestampTz => timestamptz(utf8(text)?),
        PgType::Interval => interval(utf8(text)?),
        PgType::Text
        | PgType::Enum
        | PgType::Inet
        | PgType::Cidr
        | PgType::MacAddr
        | PgType::Unknown(_) => Ok(string(utf8(text)?)),
    }
}

/// The value as UTF-8 text.
fn utf8(text: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(text).map_err(|e| format!("not valid UTF-8: {e}"))
}

/// A JSON string.
fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

/// `t` / `f` → `true` / `false`.
fn boolean(s: &str) -> Result<Value, String> {
    match s {
        "t" => Ok(Value::Bool(true)),
        "f" => Ok(Value::Bool(false)),
        _ => Err("expected 't' or 'f'".to_owned()),
    }
}

/// A decimal integer that fits `T` → JSON integer.
fn integer<T>(s: &str) -> Result<Value, String>
where
    T: std::str::FromStr<Err = std::num::ParseIntError> + Into<i64>,
{
    let v = s.parse::<T>().map_err(|e| e.to_string())?;
    Ok(Value::from(v.into()))
}

/// A float → JSON number, with the non-finite values as strings.
fn float(s: &str) -> Result<Value, String> {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return Ok(string(s));
    }
    let v = s.parse::<f64>().map_err(|e| e.to_string())?;
    serde_json::Number::from_f64(v)
        .map(Value::Number)
        .ok_or_else(|| "not a finite number (Postgres prints NaN, Infinity, -Infinity)".to_owned())
}

/// A numeric → its exact decimal string, after checking it is one.
fn numeric(s: &str) -> Result<Value, String> {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return Ok(string(s));
    }
    let unsigned = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let all_digits = whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit());
    if !all_digits || whole.len() + fraction.len() == 0 {
        return Err("expected a decimal number like -123.45, NaN, Infinity or -Infinity".to_owned());
    }
    Ok(string(s))
}

/// A uuid in Postgres' canonical form (8-4-4-4-12 hex digits) → string as given.
fn uuid(s: &str) -> Result<Value, String> {
    let groups: Vec<&str> = s.split('-').collect();
    let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    let hex = groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
    if lengths != [8, 4, 4, 4, 12] || !hex {
        return Err("expected 8-4-4-4-12 hex digits".to_owned());
    }
    Ok(string(s))
}

/// Hex-format bytea (`\x0a0b`) → standard padded base64.
fn bytea(text: &[u8]) -> Result<Value, String> {
    let hex = text
        .strip_prefix(b"\\x")
        .ok_or("expected hex format starting with \\x (bytea_output=hex)")?;
    if hex.len() % 2 != 0 {
        return Err("odd number of hex digits".to_owned());
    }
    let bytes = hex
        .chunks_exact(2)
        .map(|pair| match pair {
            [high, low] => Ok((hex_digit(*high)? << 4) | hex_digit(*low)?),
            _ => Err("odd number of hex digits".to_owned()),
        })
        .collect::<Result<Vec<u8>, String>>()?;
    Ok(Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)))
}

/// The value of one hex digit.
fn hex_digit(b: u8) -> Result<u8, String> {
    match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err(format!("invalid hex digit {:?}", char::from(b))),
    }
}

/// json / jsonb text → the parsed JSON value.
fn json(text: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(text).map_err(|e| format!("invalid JSON: {e}"))
}

/// Whether a date or timestamp is one of the special infinite values.
fn is_infinity(s: &str) -> bool {
    matches!(s, "infinity" | "-infinity")
}

/// Splits off the " BC" era suffix Postgres prints for dates before year 1.
fn split_era(s: &str) -> (&str, &str) {
    match s.strip_suffix(" BC") {
        Some(body) => (body, " BC"),
        None => (s, ""),
    }
}

/// Checks that `s` is between `min` and `max` ASCII digits.
fn check_digits(s: &str, min: usize, max: usize, what: &str) -> Result<(), String> {
    if (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(format!("bad {what} {s:?}"))
    }
}

/// Checks an ISO date body: `YYYY-MM-DD` (the year may have more than 4 digits).
fn check_date(s: &str) -> Result<(), String> {
    let mut parts = s.split('-');
    let (Some(year), Some(month), Some(day), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("expected an ISO date YYYY-MM-DD (DateStyle=ISO)".to_owned());
    };
    check_digits(year, 4, 7, "year")?;
    check_digits(month, 2, 2, "month")?;
    check_digits(day, 2, 2, "day")
}

/// Checks a time of day: `HH:MM:SS` with an optional fraction.
fn check_time(s: &str) -> Result<(), String> {
    let (hms, fraction) = match s.split_once('.') {
        Some((hms, fraction)) => (hms, Some(fraction)),
        None => (s, None),
    };
    let mut parts = hms.split(':');
    let (Some(hours), Some(minutes), Some(seconds), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("expected a time HH:MM:SS[.ffffff]".to_owned());
    };
    check_digits(hours, 2, 2, "hours")?;
    check_digits(minutes, 2, 2, "minutes")?;
    check_digits(seconds, 2, 2, "seconds")?;
    match fraction {
        Some(f) => check_digits(f, 1, 9, "fractional seconds"),
        None => Ok(()),
    }
}

/// Splits a time with zone into the time and the UTC offset (`13:45:00+02` → `13:45:00`,
/// `+02`).
fn split_offset(s: &str) -> Result<(&str, &str), String> {
    let at = s.find(['+', '-']).ok_or("missing UTC offset")?;
    Ok(s.split_at(at))
}

/// Normalises a UTC offset `±HH[:MM[:SS]]` to ISO 8601: `Z` for zero, else `±HH:MM[:SS]`.
fn normalise_offset(offset: &str) -> Result<String, String> {
    let bad = || format!("bad UTC offset {offset:?}");
    let sign = offset.get(..1).filter(|s| matches!(*s, "+" | "-")).ok_or_else(bad)?;
    let mut parts = offset.get(1..).unwrap_or_default().split(':');
    let hours = parts.next().unwrap_or_default();
    let minutes = parts.next().unwrap_or("00");
    let seconds = parts.next();
    if parts.next().is_some() {
        return Err(bad());
    }
    check_digits(hours, 2, 2, "offset hours")?;
    check_digits(minutes, 2, 2, "offset minutes")?;
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    match seconds {
        Some(seconds) => {
            check_digits(seconds, 2, 2, "offset seconds")?;
            if zero(hours) && zero(minutes) && zero(seconds) {
                Ok("Z".to_owned())
            } else {
                Ok(format!("{sign}{hours}:{minutes}:{seconds}"))
            }
        }
        None if zero(hours) && zero(minutes) => Ok("Z".to_owned()),
        None => Ok(format!("{sign}{hours}:{minutes}")),
    }
}

/// A date → string unchanged.
fn date(s: &str) -> Result<Value, String> {
    if !is_infinity(s) {
        check_date(split_era(s).0)?;
    }
    Ok(string(s))
}

/// A time → string unchanged.
fn time(s: &str) -> Result<Value, String> {
    check_time(s)?;
    Ok(string(s))
}

/// A time with zone → string unchanged.
fn timetz(s: &str) -> Result<Value, String> {
    let (time, offset) = split_offset(s)?;
    check_time(time)?;
    normalise_offset(offset)?;
    Ok(string(s))
}

/// A timestamp → ISO 8601 without zone: the space becomes 'T', a " BC" suffix is kept.
fn timestamp(s: &str) -> Result<Value, String> {
    if is_infinity(s) {
        return Ok(string(s));
    }
    let (body, era) = split_era(s);
    let (date, time) = body.split_once(' ').ok_or("expected 'YYYY-MM-DD HH:MM:SS'")?;
    check_date(date)?;
    check_time(time)?;
    Ok(Value::String(format!("{date}T{time}{era}")))
}

/// A timestamp with zone → ISO 8601 with the offset normalised (`Z` for UTC, `+05:30`, `+02:00`);
/// a " BC" suffix is kept.
fn timestamptz(s: &str) -> Result<Value, String> {
    if is_infinity(s) {
        return Ok(string(s));
    }
    let (body, era) = split_era(s);
    let (date, time_and_offset) =
        body.split_once(' ').ok_or("expected 'YYYY-MM-DD HH:MM:SS+HH'")?;
    check_date(date)?;
    let (time, offset) = split_offset(time_and_offset)?;
    check_time(time)?;
    let offset = normalise_offset(offset)?;
    Ok(Value::String(format!("{date}T{time}{offset}{era}")))
}

/// An ISO 8601 interval (`P1Y2M3DT4H5M6.5S`) → string unchanged.
fn interval(s: &str) -> Result<Value, String> {
    let iso = s.len() > 1
        && s.starts_with('P')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'));
    if !iso && !is_infinity(s) {
        return Err(
            "expected an ISO 8601 interval like P1Y2M3DT4H5M6S (IntervalStyle=iso_8601)".to_owned()
        );
    }
    Ok(string(s))
}

/// The deepest array nesting accepted (Postgres' MAXDIM).
const MAX_ARRAY_DIMENSIONS: usize = 6;

/// Array text (`{1,2,NULL}`, `[0:1]={1,2}`, `{{1,2},{3,4}}`) → JSON array of converted elements.
fn array(element: &PgType, text: &[u8]) -> Result<Value, String> {
    let mut parser = ArrayParser { input: strip_bounds(text)?, pos: 0, element, count: 0 };
    parser.skip_whitespace();
    let value = parser.parse_level(1)?;
    parser.skip_whitespace();
    if parser.pos < parser.input.len() {
        return Err(format!("unexpected characters after the array at offset {}", parser.pos));
    }
    Ok(value)
}

/// Strips an explicit bounds decoration (`[0:1][1:2]=`) from array text.
fn strip_bounds(text: &[u8]) -> Result<&[u8], String> {
    if text.first() != Some(&b'[') {
        return Ok(text);
    }
    let eq = text.iter().position(|&b| b == b'=').ok_or("array bounds without '='")?;
    let (bounds, rest) = text.split_at(eq);
    if !bounds.iter().all(|b| b"[]:-+0123456789 ".contains(b)) {
        return Err("malformed array bounds".to_owned());
    }
    Ok(rest.get(1..).unwrap_or_default())
}

/// Whether `b` is whitespace to Postgres' array parser.
fn is_array_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0B | 0x0C)
}

/// A recursive-descent parser of Postgres array text.
struct ArrayParser<'a> {
    /// The array text after any bounds decoration.
    input: &'a [u8],
    /// The offset of the next unread byte.
    pos: usize,
    /// The element type.
    element: &'a PgType,
    /// The number of elements seen so far, for error messages.
    count: usize,
}

impl ArrayParser<'_> {
    /// The next byte, without consuming it.
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    /// Consumes and returns the next byte.
    fn next_byte(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    /// Skips whitespace.
    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(is_array_whitespace) {
            self.pos += 1;
        }
    }

    /// An error at the current offset.
    fn error(&self, what: &str) -> String {
        format!("malformed array: {what} at offset {}", self.pos)
    }

    /// Parses `{...}` at nesting `depth`: either all nested arrays or all elements.
    fn parse_level(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_ARRAY_DIMENSIONS {
            return Err(self.error("more than 6 dimensions"));
        }
        if self.next_byte() != Some(b'{') {
            return Err(self.error("expected '{'"));
        }
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        let mut nested_level: Option<bool> = None;
        loop {
            self.skip_whitespace();
            let nested = self.peek() == Some(b'{');
            if *nested_level.get_or_insert(nested) != nested {
                return Err(self.error("mixed sub-arrays and elements"));
            }
            items.push(if nested { self.parse_level(depth + 1)? } else { self.parse_element()? });
            self.skip_whitespace();
            match self.next_byte() {
                Some(b',') => {}
                Some(b'}') => return Ok(Value::Array(items)),
                Some(_) => return Err(self.error("expected ',' or '}'")),
                None => return Err(self.error("unterminated array")),
            }
        }
    }

    /// Parses one element (quoted or not) and converts it; unquoted `NULL` is null.
    fn parse_element(&mut self) -> Result<Value, String> {
        let (raw, literal) =
            if self.peek() == Some(b'"') { (self.quoted()?, true) } else { self.unquoted()? };
        if !literal && raw.eq_ignore_ascii_case(b"NULL") {
            return Ok(Value::Null);
        }
        self.count += 1;
        convert(self.element, &raw).map_err(|reason| {
            format!("element {} ({}) {:?}: {reason}", self.count, self.element, error_value(&raw))
        })
    }

    /// Reads a double-quoted element, undoing backslash escapes.
    fn quoted(&mut self) -> Result<Vec<u8>, String> {
        self.pos += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            match self.next_byte() {
                Some(b'"') => return Ok(out),
                Some(b'\\') => {
                    out.push(self.next_byte().ok_or_else(|| self.error("dangling '\\'"))?)
                }
                Some(b) => out.push(b),
                None => return Err(self.error("unterminated quoted element")),
            }
        }
    }

    /// Reads an unquoted element up to ',' or '}', undoing backslash escapes and trimming
    /// unescaped trailing whitespace. Also returns whether any escape was seen (an escaped
    /// `NULL` is the string "NULL", not null).
    fn unquoted(&mut self) -> Result<(Vec<u8>, bool), String> {
        let mut out = Vec::new();
        let mut keep = 0; // length without trailing unescaped whitespace
        let mut escaped = false;
        loop {
            match self.peek() {
                Some(b',' | b'}') => break,
                Some(b'{' | b'"') => return Err(self.error("unexpected character in element")),
                Some(b'\\') => {
                    self.pos += 1;
                    out.push(self.next_byte().ok_or_else(|| self.error("dangling '\\'"))?);
                    keep = out.len();
                    escaped = true;
                }
                Some(b) => {
                    self.pos += 1;
                    out.push(b);
                    if !is_array_whitespace(b) {
                        keep = out.len();
                    }
                }
                None => return Err(self.error("unterminated array")),
            }
        }
        out.truncate(keep);
        if out.is_empty() {
            return Err(self.error("empty unquoted element"));
        }
        Ok((out, escaped))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::PgType::*;
    use super::*;

    fn array_of(t: PgType) -> PgType {
        Array(Box::new(t))
    }

    /// Asserts that `input` of type `ty` converts to `expected`.
    fn check(ty: &PgType, input: &str, expected: &Value) {
        assert_eq!(
            text_to_json(ty, input.as_bytes()).as_ref(),
            Ok(expected),
            "converting {input:?} as {ty}"
        );
    }

    /// Asserts that `input` of type `ty` is rejected with a reason mentioning `needle`.
    fn check_err(ty: &PgType, input: &[u8], needle: &str) {
        match text_to_json(ty, input) {
            Ok(v) => panic!("{input:?} as {ty} converted to {v}, expected an error"),
            Err(e) => assert!(e.reason.contains(needle), "error {e} does not mention {needle:?}"),
        }
    }

    #[test]
    fn converts_scalars() {
        let cases: Vec<(PgType, &str, Value)> = vec![
            (Bool, "t", json!(true)),
            (Bool, "f", json!(false)),
            (Int2, "-32768", json!(-32768)),
            (Int2, "32767", json!(32767)),
            (Int4, "-2147483648", json!(-2_147_483_648_i64)),
            (Int4, "0", json!(0)),
            (Int8, "-9223372036854775808", json!(i64::MIN)),
            (Int8, "9223372036854775807", json!(i64::MAX)),
            (Oid, "4294967295", json!(4_294_967_295_u32)),
            (Float4, "1.5", json!(1.5)),
            (Float4, "0.1", json!(0.1)),
            (Float8, "-1.25e-10", json!(-1.25e-10)),
            (Float8, "1e+308", json!(1e308)),
            (Float8, "3", json!(3.0)),
            (Float8, "NaN", json!("NaN")),
            (Float8, "Infinity", json!("Infinity")),
            (Float4, "-Infinity", json!("-Infinity")),
            (Numeric, "12345678901234567890.000000001", json!("12345678901234567890.000000001")),
            (Numeric, "123456789012345678901234567890", json!("123456789012345678901234567890")),
            (
                Numeric,
                "-0.000000000000000000000000000001",
                json!("-0.000000000000000000000000000001"),
            ),
            (Numeric, "0", json!("0")),
            (Numeric, "NaN", json!("NaN")),
            (Numeric, "Infinity", json!("Infinity")),
            (Numeric, "-Infinity", json!("-Infinity")),
            (Text, "hello, world", json!("hello, world")),
            (Text, "", json!("")),
            (Text, "ünïcødé \\ \"quoted\" {x}", json!("ünïcødé \\ \"quoted\" {x}")),
            (Text, "<a>xml</a>", json!("<a>xml</a>")),
            (Enum, "happy", json!("happy")),
            (
                Uuid,
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            ),
            (Inet, "192.168.0.1/24", json!("192.168.0.1/24")),
            (Inet, "::1", json!("::1")),
            (Cidr, "10.0.0.0/8", json!("10.0.0.0/8")),
            (MacAddr, "08:00:2b:01:02:03", json!("08:00:2b:01:02:03")),
            (Unknown(99_999), "(1,2)", json!("(1,2)")),
            (Bytea, "\\x", json!("")),
            (Bytea, "\\x0a0b", json!("Cgs=")),
            (Bytea, "\\xDEADbeef", json!("3q2+7w==")),
            (Bytea, "\\x00ff00", json!("AP8A")),
            (Date, "2024-01-31", json!("2024-01-31")),
            (Date, "0044-03-15 BC", json!("0044-03-15 BC")),
            (Date, "infinity", json!("infinity")),
            (Date, "-infinity", json!("-infinity")),
            (Time, "13:45:00.123456", json!("13:45:00.123456")),
            (Time, "00:00:00", json!("00:00:00")),
            (TimeTz, "13:45:00+02", json!("13:45:00+02")),
            (TimeTz, "13:45:00.5-05:30", json!("13:45:00.5-05:30")),
            (Timestamp, "2024-01-31 13:45:00.123456", json!("2024-01-31T13:45:00.123456")),
            (Timestamp, "2024-01-31 13:45:00", json!("2024-01-31T13:45:00")),
            (Timestamp, "0044-03-15 12:00:00 BC", json!("0044-03-15T12:00:00 BC")),
            (Timestamp, "infinity", json!("infinity")),
            (Timestamp, "-infinity", json!("-infinity")),
            (TimestampTz, "2024-01-31 13:45:00.123456+00", json!("2024-01-31T13:45:00.123456Z")),
            (TimestampTz, "2024-01-31 13:45:00+00", json!("2024-01-31T13:45:00Z")),
            (TimestampTz, "2024-01-31 13:45:00.5+05:30", json!("2024-01-31T13:45:00.5+05:30")),
            (TimestampTz, "2024-01-31 13:45:00+02", json!("2024-01-31T13:45:00+02:00")),
            (TimestampTz, "2024-01-31 13:45:00-08", json!("2024-01-31T13:45:00-08:00")),
            (TimestampTz, "1850-01-01 00:00:00+00:53:28", json!("1850-01-01T00:00:00+00:53:28")),
            (TimestampTz, "0044-03-15 12:00:00+00 BC", json!("0044-03-15T12:00:00Z BC")),
            (TimestampTz, "infinity", json!("infinity")),
            (Interval, "P1Y2M3DT4H5M6.5S", json!("P1Y2M3DT4H5M6.5S")),
            (Interval, "PT0S", json!("PT0S")),
            (Interval, "P-1Y-2M", json!("P-1Y-2M")),
            (Json, r#"{"b":1,"a":[1,2,{"c":null}]}"#, json!({"b": 1, "a": [1, 2, {"c": null}]})),
            (Json, "\"just a string\"", json!("just a string")),
            (
                Jsonb,
                r#"{"a": {"b": {"c": [true, 1.5, "x"]}}, "d": null}"#,
                json!({"a": {"b": {"c": [true, 1.5, "x"]}}, "d": null}),
            ),
            (Jsonb, "42", json!(42)),
        ];
        for (ty, input, expected) in &cases {
            check(ty, input, expected);
        }
    }

    #[test]
    fn converts_arrays() {
        let cases: Vec<(PgType, &str, Value)> = vec![
            (array_of(Int4), "{1,2,NULL,3}", json!([1, 2, null, 3])),
            (array_of(Int4), "{}", json!([])),
            (array_of(Text), "{}", json!([])),
            (array_of(Int4), "{{1,2},{3,4}}", json!([[1, 2], [3, 4]])),
            (array_of(Int4), "{{{1}},{{2}}}", json!([[[1]], [[2]]])),
            (array_of(Int4), "[0:1]={1,2}", json!([1, 2])),
            (array_of(Int4), "[1:2][-1:0]={{1,2},{3,4}}", json!([[1, 2], [3, 4]])),
            (array_of(Bool), "{t,f,NULL}", json!([true, false, null])),
            (
                array_of(Text),
                r#"{"a b","with \"quote\"",NULL,"NULL",null,"c,d","back\\slash",plain,""}"#,
                json!([
                    "a b",
                    "with \"quote\"",
                    null,
                    "NULL",
                    null,
                    "c,d",
                    "back\\slash",
                    "plain",
                    ""
                ]),
            ),
            (array_of(Text), r#"{{a,NULL},{"}","{"}}"#, json!([["a", null], ["}", "{"]])),
            (array_of(Text), "{ a , b c }", json!(["a", "b c"])),
            (array_of(Text), r"{N\ULL,a\,b}", json!(["NULL", "a,b"])),
            (array_of(Bytea), r#"{"\\x0a","\\x",NULL}"#, json!(["Cg==", "", null])),
            (array_of(Float8), "{NaN,1.5,-Infinity}", json!(["NaN", 1.5, "-Infinity"])),
            (array_of(Numeric), "{1.10,-2}", json!(["1.10", "-2"])),
            (
                array_of(TimestampTz),
                r#"{"2024-01-31 13:45:00+00","2024-01-31 13:45:00.5+05:30"}"#,
                json!(["2024-01-31T13:45:00Z", "2024-01-31T13:45:00.5+05:30"]),
            ),
            (
                array_of(Jsonb),
                r#"{"{\"a\": {\"b\": [1, 2]}}",3,NULL}"#,
                json!([{"a": {"b": [1, 2]}}, 3, null]),
            ),
            (array_of(Enum), "{happy,sad}", json!(["happy", "sad"])),
            (
                array_of(Uuid),
                "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
                json!(["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
            ),
        ];
        for (ty, input, expected) in &cases {
            check(ty, input, expected);
        }
    }

    #[test]
    fn rejects_invalid_values() {
        let cases: Vec<(PgType, &[u8], &str)> = vec![
            (Bool, b"x", "expected 't' or 'f'"),
            (Bool, b"true", "expected 't' or 'f'"),
            (Int4, b"1.5", "invalid digit"),
            (Int4, b"", "empty"),
            (Int4, b" 1", "invalid digit"),
            (Int4, b"2147483648", "too large"),
            (Int2, b"32768", "too large"),
            (Int8, b"9223372036854775808", "too large"),
            (Int8, b"-9223372036854775809", "too small"),
            (Oid, b"-1", "invalid digit"),
            (Float8, b"abc", "invalid float"),
            (Float8, b"inf", "not a finite number"),
            (Float8, b"1e999", "not a finite number"),
            (Numeric, b"1e5", "decimal number"),
            (Numeric, b"", "decimal number"),
            (Numeric, b"-", "decimal number"),
            (Numeric, b"1.2.3", "decimal number"),
            (Numeric, b"nan", "decimal number"),
            (Text, b"\xFF\xFE", "UTF-8"),
            (Unknown(1), b"\xC3", "UTF-8"),
            (Uuid, b"xyz", "8-4-4-4-12"),
            (Uuid, b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g", "8-4-4-4-12"),
            (Bytea, b"abc", "\\x"),
            (Bytea, b"\\x0", "odd number"),
            (Bytea, b"\\xzz", "invalid hex digit"),
            (Bytea, b"\\x0a 0", "invalid hex digit"),
            (Date, b"01/31/2024", "ISO date"),
            (Date, b"2024-1-31", "month"),
            (Time, b"1pm", "HH:MM:SS"),
            (Time, b"13:45:00.", "fractional"),
            (TimeTz, b"13:45:00", "offset"),
            (Timestamp, b"2024-01-31", "expected"),
            (Timestamp, b"2024-01-31T13:45:00", "expected"),
            (TimestampTz, b"2024-01-31 13:45:00", "offset"),
            (TimestampTz, b"2024-01-31 13:45:00+5", "offset hours"),
            (TimestampTz, b"2024-01-31 13:45:00+05:3", "offset minutes"),
            (TimestampTz, b"2024-01-31 13:45:00+05:30:00:00", "bad UTC offset"),
            (Interval, b"1 year 2 mons", "ISO 8601"),
            (Interval, b"P", "ISO 8601"),
            (Json, b"{", "invalid JSON"),
            (Jsonb, b"{\"a\":1} x", "invalid JSON"),
            (array_of(Int4), b"{1,x}", "element 2 (int4)"),
            (array_of(Int4), b"{1,2", "unterminated"),
            (array_of(Int4), b"1,2", "expected '{'"),
            (array_of(Int4), b"", "expected '{'"),
            (array_of(Int4), b"{1,2}x", "after the array"),
            (array_of(Int4), b"{1,{2}}", "mixed"),
            (array_of(Int4), b"{{1},2}", "mixed"),
            (array_of(Int4), b"{{{{{{{1}}}}}}}", "more than 6 dimensions"),
            (array_of(Text), b"{\"abc}", "unterminated quoted"),
            (array_of(Text), b"{\"abc\\", "dangling"),
            (array_of(Text), b"{a,,b}", "empty unquoted"),
            (array_of(Text), b"{a\"b\"}", "unexpected character"),
            (array_of(Text), b"{\"a\"b}", "expected ',' or '}'"),
            (array_of(Int4), b"[0:1]{1,2}", "without '='"),
            (array_of(Int4), b"[a]={1}", "malformed array bounds"),
            (array_of(Bytea), b"{\"\\\\x0\"}", "odd number"),
            (array_of(Bytea), b"{\"\\x0a\"}", "starting with \\x"),
        ];
        for (ty, input, needle) in &cases {
            check_err(ty, input, needle);
        }
    }

    #[test]
    fn error_display_and_truncation() {
        let err = text_to_json(&Bool, b"x").expect_err("invalid bool");
        assert_eq!(err.to_string(), "value \"x\" is not valid bool: expected 't' or 'f'");
        let err = text_to_json(&array_of(Int4), b"{1,x}").expect_err("invalid element");
        assert_eq!(err.ty, "int4[]");
        let long = "é".repeat(1000);
        let err = text_to_json(&Int4, long.as_bytes()).expect_err("invalid int4");
        assert_eq!(err.value.chars().count(), MAX_ERROR_VALUE_CHARS + 1);
    }

    #[test]
    fn maps_oids() {
        let cases: Vec<(u32, PgType)> = vec![
            (16, Bool),
            (17, Bytea),
            (18, Text),
            (19, Text),
            (20, Int8),
            (21, Int2),
            (23, Int4),
            (25, Text),
            (26, Oid),
            (114, Json),
            (142, Text),
            (650, Cidr),
            (700, Float4),
            (701, Float8),
            (829, MacAddr),
            (869, Inet),
            (1042, Text),
            (1043, Text),
            (1082, Date),
            (1083, Time),
            (1114, Timestamp),
            (1184, TimestampTz),
            (1186, Interval),
            (1266, TimeTz),
            (1700, Numeric),
            (2950, Uuid),
            (3802, Jsonb),
            (1000, array_of(Bool)),
            (1001, array_of(Bytea)),
            (1005, array_of(Int2)),
            (1007, array_of(Int4)),
            (1009, array_of(Text)),
            (1014, array_of(Text)),
            (1015, array_of(Text)),
            (1016, array_of(Int8)),
            (1021, array_of(Float4)),
            (1022, array_of(Float8)),
            (1041, array_of(Inet)),
            (1115, array_of(Timestamp)),
            (1182, array_of(Date)),
            (1183, array_of(Time)),
            (1185, array_of(TimestampTz)),
            (1187, array_of(Interval)),
            (1231, array_of(Numeric)),
            (199, array_of(Json)),
            (2951, array_of(Uuid)),
            (3807, array_of(Jsonb)),
            (0, Unknown(0)),
            (790, Unknown(790)),
            (16_390, Unknown(16_390)),
        ];
        for (oid, expected) in cases {
            assert_eq!(PgType::from_oid(oid), expected, "oid {oid}");
        }
    }

    #[test]
    fn arbitrary_input_never_panics() {
        let types = [
            Bool,
            Int2,
            Int4,
            Int8,
            Float4,
            Float8,
            Numeric,
            Text,
            Bytea,
            Date,
            Time,
            TimeTz,
            Timestamp,
            TimestampTz,
            Interval,
            Uuid,
            Json,
            Jsonb,
            Inet,
            Cidr,
            MacAddr,
            Oid,
            Enum,
            Unknown(1),
            array_of(Int4),
            array_of(Text),
            array_of(Bytea),
            array_of(TimestampTz),
        ];
        let alphabet = b"{}[]:=,\"\\ NUL0123456789-+.:TZx\xC3\xA9P";
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = usize::try_from(state % 24).expect("small");
            let input: Vec<u8> = (0..len)
                .filter_map(|i| {
                    let pick = state.rotate_left(u32::try_from(i * 5).expect("small"));
                    alphabet.get(usize::try_from(pick % 40).expect("small")).copied()
                })
                .collect();
            for ty in &types {
                let _ = text_to_json(ty, &input);
            }
        }
    }
}
