//! Country lookup in a MaxMind DB file (the format of GeoIP2 / GeoLite2 Country and City):
//! the binary search tree over the address bits, then the record's `country.iso_code` (or
//! `registered_country.iso_code`). The file is read whole into memory; every read is bounds
//! checked, so a damaged file gives no country, never a crash.
//!
//! Format: <https://maxmind.github.io/MaxMind-DB/> (metadata after the last
//! `\xAB\xCD\xEFMaxMind.com`, a tree of `node_count` nodes of two `record_size`-bit records, 16
//! zero bytes, then the data section).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

const MARKER: &[u8] = b"\xAB\xCD\xEFMaxMind.com";
/// Most values decoded for one record.
const VALUES_MAX: usize = 10_000;
/// Deepest nesting of maps and arrays decoded.
const DEPTH_MAX: usize = 16;

/// A decoded value of the data section.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    Uint(u128),
    Int(i32),
    Float(f64),
    Bool(bool),
    Bytes(Vec<u8>),
    Map(BTreeMap<String, Value>),
    Array(Vec<Value>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(m) => m.get(key),
            _ => None,
        }
    }
    fn uint(&self) -> Option<u128> {
        match self {
            Value::Uint(v) => Some(*v),
            _ => None,
        }
    }
}

pub struct GeoDb {
    bytes: Vec<u8>,
    node_count: usize,
    record_size: usize,
    ip_version: u128,
    /// Where the data section starts.
    data: usize,
    /// The node IPv4 addresses start from in an IPv6 tree (after 96 zero bits).
    ipv4_start: usize,
}

impl std::fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDb").field("nodes", &self.node_count).finish_non_exhaustive()
    }
}

/// Decodes one value at `at` (an offset into `b`); returns it and the offset after it.
/// `data` is the start of the data section (pointers are relative to it).
fn decode(
    b: &[u8],
    data: usize,
    at: usize,
    depth: usize,
    budget: &mut usize,
) -> Result<(Value, usize), String> {
    let bad = || "the data section is damaged".to_string();
    if depth > DEPTH_MAX {
        return Err("the data section nests too deep".into());
    }
    // Pointers can make a small file decode into a huge value: stop early.
    *budget = budget.checked_sub(1).ok_or("a record decodes into too many values")?;
    let byte = |i: usize| b.get(i).copied().ok_or_else(bad);
    let ctrl = byte(at)?;
    let mut pos = at + 1;
    let mut kind = ctrl >> 5;
    if kind == 1 {
        // A pointer: to a value elsewhere in the data section.
        let ss = (ctrl >> 3) & 3;
        let v = (ctrl & 7) as usize;
        let n = ss as usize + 1;
        let mut p = 0usize;
        for i in 0..n {
            p = p << 8 | byte(pos + i)? as usize;
        }
        let p = match ss {
            0 => v << 8 | p,
            1 => (v << 16 | p) + 2048,
            2 => (v << 24 | p) + 526_336,
            _ => p,
        };
        let target = data.checked_add(p).ok_or_else(bad)?;
        let (value, _) = decode(b, data, target, depth + 1, budget)?;
        return Ok((value, pos + n));
    }
    if kind == 0 {
        kind = 7u8.checked_add(byte(pos)?).ok_or_else(bad)?;
        pos += 1;
    }
    let mut size = (ctrl & 0x1f) as usize;
    if kind != 14 {
        match size {
            29 => {
                size = 29 + byte(pos)? as usize;
                pos += 1;
            }
            30 => {
                size = 285 + (byte(pos)? as usize) * 256 + byte(pos + 1)? as usize;
                pos += 2;
            }
            31 => {
                size = 65_821
                    + ((byte(pos)? as usize) << 16
                        | (byte(pos + 1)? as usize) << 8
                        | byte(pos + 2)? as usize);
                pos += 3;
            }
            _ => {}
        }
    }
    let slice = |n: usize| b.get(pos..pos.checked_add(n).ok_or_else(bad)?).ok_or_else(bad);
    let uint = |n: usize, max: usize| -> Result<u128, String> {
        if n > max {
            return Err(bad());
        }
        Ok(slice(n)?.iter().fold(0u128, |acc, &x| acc << 8 | x as u128))
    };
    Ok(match kind {
        2 => (Value::String(String::from_utf8_lossy(slice(size)?).into_owned()), pos + size),
        3 if size == 8 => {
            let s: [u8; 8] = slice(8)?.try_into().map_err(|_| bad())?;
            (Value::Float(f64::from_be_bytes(s)), pos + 8)
        }
        4 => (Value::Bytes(slice(size)?.to_vec()), pos + size),
        5 => (Value::Uint(uint(size, 2)?), pos + size),
        6 => (Value::Uint(uint(size, 4)?), pos + size),
        8 => (Value::Int(uint(size, 4)? as u32 as i32), pos + size),
        9 => (Value::Uint(uint(size, 8)?), pos + size),
        10 => (Value::Uint(uint(size, 16)?), pos + size),
        7 => {
            let mut m = BTreeMap::new();
            for _ in 0..size {
                let (k, next) = decode(b, data, pos, depth + 1, budget)?;
                let Value::String(k) = k else { return Err(bad()) };
                let (v, next) = decode(b, data, next, depth + 1, budget)?;
                m.insert(k, v);
                pos = next;
            }
            (Value::Map(m), pos)
        }
        11 => {
            let mut a = Vec::new();
            for _ in 0..size {
                let (v, next) = decode(b, data, pos, depth + 1, budget)?;
                a.push(v);
                pos = next;
            }
            (Value::Array(a), pos)
        }
        14 => (Value::Bool(size != 0), pos),
        15 if size == 4 => {
            let s: [u8; 4] = slice(4)?.try_into().map_err(|_| bad())?;
            (Value::Float(f32::from_be_bytes(s) as f64), pos + 4)
        }
        _ => return Err(bad()),
    })
}

impl GeoDb {
    pub fn open(path: &Path) -> Result<GeoDb, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        GeoDb::from_bytes(bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<GeoDb, String> {
        let start = bytes
            .windows(MARKER.len())
            .rposition(|w| w == MARKER)
            .ok_or("not a MaxMind DB file (no metadata marker)")?
            + MARKER.len();
        let (meta, _) = decode(&bytes, start, start, 0, &mut VALUES_MAX.clone())
            .map_err(|e| format!("its metadata: {e}"))?;
        let field = |k: &str| {
            meta.get(k).and_then(Value::uint).ok_or_else(|| format!("its metadata has no {k}"))
        };
        let node_count =
            usize::try_from(field("node_count")?).map_err(|_| "node_count is too large")?;
        let record_size =
            usize::try_from(field("record_size")?).map_err(|_| "record size is too large")?;
        let ip_version = field("ip_version")?;
        if ![24, 28, 32].contains(&record_size) {
            return Err(format!("record size {record_size} is not 24, 28 or 32"));
        }
        if ![4, 6].contains(&ip_version) {
            return Err(format!("IP version {ip_version} is not 4 or 6"));
        }
        let tree = node_count
            .checked_mul(record_size / 4)
            .filter(|&t| t.checked_add(16).is_some_and(|end| end <= start))
            .ok_or("its search tree is larger than the file")?;
        let mut db =
            GeoDb { bytes, node_count, record_size, ip_version, data: tree + 16, ipv4_start: 0 };
        if ip_version == 6 {
            let mut node = 0;
            for _ in 0..96 {
                if node >= node_count {
                    break;
                }
                node = db.record(node, false).ok_or("its search tree is damaged")?;
            }
            db.ipv4_start = node;
        }
        Ok(db)
    }

    /// The left (`false`) or right record of a node.
    fn record(&self, node: usize, right: bool) -> Option<usize> {
        let size = self.record_size / 4; // bytes per node
        let b = self.bytes.get(node * size..node * size + size)?;
        let be = |s: &[u8]| s.iter().fold(0usize, |acc, &x| acc << 8 | x as usize);
        Some(match (self.record_size, right) {
            (24, false) => be(&b[0..3]),
            (24, true) => be(&b[3..6]),
            (28, false) => ((b[3] as usize & 0xf0) << 20) | be(&b[0..3]),
            (28, true) => ((b[3] as usize & 0x0f) << 24) | be(&b[4..7]),
            (_, false) => be(&b[0..4]),
            (_, true) => be(&b[4..8]),
        })
    }

    /// The record for an address, if the database has one.
    pub fn lookup(&self, ip: IpAddr) -> Option<Value> {
        let (bits, mut node): (Vec<bool>, usize) = match ip {
            IpAddr::V4(v4) => {
                let n = u32::from(v4);
                ((0..32).rev().map(|i| n >> i & 1 == 1).collect(), self.ipv4_start)
            }
            IpAddr::V6(v6) => {
                if self.ip_version == 4 {
                    return None;
                }
                let n = u128::from(v6);
                ((0..128).rev().map(|i| n >> i & 1 == 1).collect(), 0)
            }
        };
        for bit in bits {
            if node >= self.node_count {
                break;
            }
            node = self.record(node, bit)?;
        }
        if node <= self.node_count {
            return None; // no data for it
        }
        let at = self.data.checked_add(node - self.node_count)?.checked_sub(16)?;
        decode(&self.bytes, self.data, at, 0, &mut VALUES_MAX.clone()).ok().map(|(v, _)| v)
    }

    /// The ISO country code of an address (`FR`), from `country` or `registered_country`.
    pub fn country(&self, ip: IpAddr) -> Option<String> {
        let r = self.lookup(ip)?;
        ["country", "registered_country"].iter().find_map(|k| match r.get(k)?.get("iso_code")? {
            Value::String(s) if !s.is_empty() && s.len() <= 8 => Some(s.clone()),
            _ => None,
        })
    }
}
