//! The on-disk batch format: pure encoding and decoding, no I/O.
//!
//! A segment file is a sequence of batches. Every byte of a batch after the checksum field is
//! covered by the checksum, so a batch is either served exactly as written or not at all.
//!
//! | offset | size | field                                            |
//! |-------:|-----:|--------------------------------------------------|
//! |      0 |    4 | CRC32C of bytes `[4, 8 + len)`                   |
//! |      4 |    4 | `len`: bytes after this field                    |
//! |      8 |    8 | base offset                                      |
//! |     16 |    1 | magic (`1`)                                      |
//! |     17 |    1 | attributes (`0`; reserved for compression)       |
//! |     18 |    4 | last offset delta (kept when compaction removes records) |
//! |     22 |    8 | base timestamp, ms since the epoch               |
//! |     30 |    8 | max timestamp                                    |
//! |     38 |    4 | record count                                     |
//! |     42 |    … | records                                          |
//!
//! A record is `varint body_len`, then its body: `varint offset_delta`, `zigzag timestamp_delta`,
//! `zigzag key_len` (−1: no key), key, `zigzag value_len` (−1: tombstone), value,
//! `varint header_count`, and per header `varint key_len`, key (UTF-8), `varint value_len`, value.
//! All fixed-width integers are little-endian. The layout follows Kafka's record batch v2 so the
//! two backends carry the same information.

use crate::{Record, StoredRecord};

pub(crate) const MAGIC: u8 = 1;
/// Bytes of the fixed batch header, records start here.
pub(crate) const BATCH_HEADER_BYTES: usize = 42;
/// Bytes needed to learn a batch's total length: CRC and `len`.
pub(crate) const BATCH_PREFIX_BYTES: usize = 8;

/// What the fixed header of a batch says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchHeader {
    pub crc: u32,
    /// Bytes after the `len` field.
    pub len: u32,
    pub base_offset: u64,
    pub last_offset_delta: u32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub record_count: u32,
}

impl BatchHeader {
    /// Offset after the last record of the batch: where the next batch starts.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.last_offset_delta) + 1
    }
}

/// Why bytes are not a valid batch. Never a panic: decoding is total over arbitrary input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FormatError {
    /// Fewer bytes than the batch needs: a torn write, or the end of what was written so far.
    Incomplete {
        needed: usize,
    },
    Corrupt(String),
}

fn corrupt<T>(why: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError::Corrupt(why.into()))
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}
fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Parses the length prefix of a batch starting at `buf[0]`; returns the total bytes it spans.
/// `batch_bytes_max` bounds what a reader will ever allocate for one batch.
pub(crate) fn batch_total_len(buf: &[u8], batch_bytes_max: usize) -> Result<usize, FormatError> {
    if buf.len() < BATCH_PREFIX_BYTES {
        return Err(FormatError::Incomplete { needed: BATCH_PREFIX_BYTES });
    }
    let len = u32_at(buf, 4) as usize;
    let total = BATCH_PREFIX_BYTES + len;
    if total < BATCH_HEADER_BYTES {
        return corrupt(format!("batch length {len} is shorter than a batch header"));
    }
    if total > batch_bytes_max {
        return corrupt(format!(
            "batch length {total} exceeds the limit of {batch_bytes_max} bytes"
        ));
    }
    Ok(total)
}

/// Checks the batch at the start of `buf` (length, checksum, header, every record) and returns
/// its header. `buf` may extend past the batch.
pub(crate) fn check_batch(buf: &[u8], batch_bytes_max: usize) -> Result<BatchHeader, FormatError> {
    let total = batch_total_len(buf, batch_bytes_max)?;
    if buf.len() < total {
        return Err(FormatError::Incomplete { needed: total });
    }
    let batch = &buf[..total];
    let crc = u32_at(batch, 0);
    let actual = crc32c::crc32c(&batch[4..]);
    if crc != actual {
        return corrupt(format!("checksum mismatch: stored {crc:#010x}, computed {actual:#010x}"));
    }
    if batch[16] != MAGIC {
        return corrupt(format!("unknown batch magic {}", batch[16]));
    }
    if batch[17] != 0 {
        return corrupt(format!("unknown batch attributes {:#04x}", batch[17]));
    }
    let header = BatchHeader {
        crc,
        len: u32_at(batch, 4),
        base_offset: u64_at(batch, 8),
        last_offset_delta: u32_at(batch, 18),
        base_timestamp: u64_at(batch, 22) as i64,
        max_timestamp: u64_at(batch, 30) as i64,
        record_count: u32_at(batch, 38),
    };
    // Offsets are Kafka's: non-negative 64-bit signed integers.
    let next = header.base_offset.checked_add(u64::from(header.last_offset_delta) + 1);
    if next.is_none_or(|n| n > i64::MAX as u64) {
        return corrupt("offsets beyond the largest offset");
    }
    // Walk the records without keeping them: a batch is valid only if all of it parses.
    let mut records = RecordIter::new(header, &batch[BATCH_HEADER_BYTES..]);
    let mut count = 0u32;
    while let Some(r) = records.next_raw() {
        r?;
        count += 1;
    }
    if count != header.record_count {
        return corrupt(format!("header says {} records, found {count}", header.record_count));
    }
    Ok(header)
}

/// What [`encode_batch`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Encoded {
    pub len: usize,
    pub max_timestamp: i64,
    pub next_offset: u64,
}

/// Appends one encoded batch holding `records` at `base_offset` to `out`. Each item is
/// (offset delta, timestamp, record), deltas ascending; `last_offset_delta` must be at least the
/// last delta (compaction keeps it when it removes the last records).
pub(crate) fn encode_batch<'a>(
    out: &mut Vec<u8>,
    base_offset: u64,
    last_offset_delta: u32,
    records: impl IntoIterator<Item = (u32, i64, &'a Record)>,
) -> Encoded {
    let start = out.len();
    out.extend_from_slice(&[0u8; BATCH_HEADER_BYTES]);
    let mut count = 0u32;
    let mut base_timestamp = None;
    let mut max_timestamp = i64::MIN;
    for (delta, ts, r) in records {
        let base_ts = *base_timestamp.get_or_insert(ts);
        max_timestamp = max_timestamp.max(ts);
        let ts_delta = zigzag(ts.wrapping_sub(base_ts));
        let key = r.key.as_deref();
        let value = r.value.as_deref();
        let mut body = varint_len(u64::from(delta))
            + varint_len(ts_delta)
            + nullable_len(key)
            + nullable_len(value)
            + varint_len(r.headers.len() as u64);
        for (k, v) in &r.headers {
            body += varint_len(k.len() as u64) + k.len() + varint_len(v.len() as u64) + v.len();
        }
        out.reserve(body + 10);
        let mut head = Varints::default();
        head.push(body as u64);
        head.push(u64::from(delta));
        head.push(ts_delta);
        head.push(key.map_or(zigzag(-1), |k| zigzag(k.len() as i64)));
        out.extend_from_slice(head.as_slice());
        out.extend_from_slice(key.unwrap_or_default());
        let mut mid = Varints::default();
        mid.push(value.map_or(zigzag(-1), |v| zigzag(v.len() as i64)));
        out.extend_from_slice(mid.as_slice());
        out.extend_from_slice(value.unwrap_or_default());
        put_varint(out, r.headers.len() as u64);
        for (k, v) in &r.headers {
            put_varint(out, k.len() as u64);
            out.extend_from_slice(k.as_bytes());
            put_varint(out, v.len() as u64);
            out.extend_from_slice(v);
        }
        count += 1;
    }
    let base_timestamp = base_timestamp.unwrap_or(0);
    let total = out.len() - start;
    let b = &mut out[start..];
    b[4..8].copy_from_slice(&((total - BATCH_PREFIX_BYTES) as u32).to_le_bytes());
    b[8..16].copy_from_slice(&base_offset.to_le_bytes());
    b[16] = MAGIC;
    b[17] = 0;
    b[18..22].copy_from_slice(&last_offset_delta.to_le_bytes());
    b[22..30].copy_from_slice(&base_timestamp.to_le_bytes());
    b[30..38].copy_from_slice(&max_timestamp.to_le_bytes());
    b[38..42].copy_from_slice(&count.to_le_bytes());
    let crc = crc32c::crc32c(&b[4..]);
    b[0..4].copy_from_slice(&crc.to_le_bytes());
    Encoded {
        len: total,
        max_timestamp,
        next_offset: base_offset + u64::from(last_offset_delta) + 1,
    }
}

/// A few varints encoded on the stack, appended to the batch in one copy.
#[derive(Default)]
struct Varints {
    buf: [u8; 32],
    len: usize,
}

impl Varints {
    fn push(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf[self.len] = (v as u8) | 0x80;
            self.len += 1;
            v >>= 7;
        }
        self.buf[self.len] = v as u8;
        self.len += 1;
    }
    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}
fn nullable_len(b: Option<&[u8]>) -> usize {
    match b {
        None => 1,
        Some(b) => varint_len(zigzag(b.len() as i64)) + b.len(),
    }
}

/// Bytes a record adds to a batch at most (used to enforce `batch_bytes_max` before encoding).
pub(crate) fn record_bytes_upper_bound(r: &Record) -> usize {
    let headers: usize = r.headers.iter().map(|(k, v)| k.len() + v.len() + 20).sum();
    40 + r.key.as_ref().map_or(0, Vec::len) + r.value.as_ref().map_or(0, Vec::len) + headers
}

/// A record as it sits in a batch, borrowing the batch's bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawRecord<'a> {
    pub offset: u64,
    pub timestamp: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    headers: &'a [u8],
    header_count: usize,
}

impl RawRecord<'_> {
    pub fn to_stored(self, partition: u32) -> StoredRecord {
        let mut headers = Vec::with_capacity(self.header_count);
        let mut cur = Cursor { buf: self.headers, pos: 0 };
        for _ in 0..self.header_count {
            // The record was validated when it was parsed, so these reads succeed; a failure
            // would end the header list early rather than panic.
            let Ok(k) = cur.bytes_exact() else { break };
            let Ok(v) = cur.bytes_exact() else { break };
            headers.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
        }
        StoredRecord {
            partition,
            offset: self.offset,
            timestamp_ms: self.timestamp,
            key: self.key.map(<[u8]>::to_vec),
            value: self.value.map(<[u8]>::to_vec),
            headers,
        }
    }
    /// The record as a producer would write it (for compaction, which rewrites batches).
    pub fn to_record(self) -> Record {
        let s = self.to_stored(0);
        Record {
            key: s.key,
            value: s.value,
            headers: s.headers,
            timestamp_ms: Some(s.timestamp_ms),
        }
    }
}

/// Iterates the records of a batch body, validating as it goes.
pub(crate) struct RecordIter<'a> {
    header: BatchHeader,
    cur: Cursor<'a>,
    last_delta: Option<u32>,
    failed: bool,
}

impl<'a> RecordIter<'a> {
    pub fn new(header: BatchHeader, body: &'a [u8]) -> Self {
        RecordIter { header, cur: Cursor { buf: body, pos: 0 }, last_delta: None, failed: false }
    }

    pub fn next_raw(&mut self) -> Option<Result<RawRecord<'a>, FormatError>> {
        if self.failed || self.cur.pos == self.cur.buf.len() {
            return None;
        }
        let r = self.parse_one();
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }

    fn parse_one(&mut self) -> Result<RawRecord<'a>, FormatError> {
        let body = self.cur.bytes_exact()?;
        let mut c = Cursor { buf: body, pos: 0 };
        let delta = c.varint()?;
        let delta = u32::try_from(delta).or_else(|_| corrupt("offset delta overflows"))?;
        if delta > self.header.last_offset_delta {
            return corrupt(format!(
                "record offset delta {delta} beyond last offset delta {}",
                self.header.last_offset_delta
            ));
        }
        if self.last_delta.is_some_and(|last| delta <= last) {
            return corrupt("record offsets are not ascending");
        }
        self.last_delta = Some(delta);
        let ts = self.header.base_timestamp.wrapping_add(c.zigzag()?);
        let key = c.nullable_bytes()?;
        let value = c.nullable_bytes()?;
        let header_count = usize::try_from(c.varint()?).or_else(|_| corrupt("header count"))?;
        let headers_start = c.pos;
        for _ in 0..header_count {
            let k = c.bytes_exact()?;
            if std::str::from_utf8(k).is_err() {
                return corrupt("header key is not UTF-8");
            }
            c.bytes_exact()?;
        }
        let headers = &body[headers_start..c.pos];
        if c.pos != body.len() {
            return corrupt("trailing bytes in record");
        }
        Ok(RawRecord {
            offset: self.header.base_offset + u64::from(delta),
            timestamp: ts,
            key,
            value,
            headers,
            header_count,
        })
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn varint(&mut self) -> Result<u64, FormatError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else { return corrupt("truncated varint") };
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        corrupt("varint longer than 10 bytes")
    }
    fn zigzag(&mut self) -> Result<i64, FormatError> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else { return corrupt(format!("length {n} runs past the record")) };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn bytes_exact(&mut self) -> Result<&'a [u8], FormatError> {
        let n = self.varint()?;
        let n = usize::try_from(n).or_else(|_| corrupt("length overflows"))?;
        self.take(n)
    }
    fn nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, FormatError> {
        match self.zigzag()? {
            -1 => Ok(None),
            n if n < 0 => corrupt(format!("negative length {n}")),
            n => self.take(n as usize).map(Some),
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(k: &str, v: Option<&str>) -> Record {
        Record {
            key: Some(k.as_bytes().to_vec()),
            value: v.map(|v| v.as_bytes().to_vec()),
            headers: vec![("h".into(), b"x".to_vec())],
            timestamp_ms: None,
        }
    }

    #[test]
    fn batch_round_trips_and_every_bit_flip_is_caught() {
        let rs = [rec("a", Some("1")), rec("b", None), rec("c", Some(""))];
        let mut buf = Vec::new();
        let items = rs.iter().enumerate().map(|(i, r)| (i as u32 * 2, 100 - i as i64, r));
        let e = encode_batch(&mut buf, 7, 4, items);
        assert_eq!((e.len, e.max_timestamp, e.next_offset), (buf.len(), 100, 12));
        for v in [0u64, 1, 127, 128, 16383, 16384, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "varint_len({v})");
        }
        let h = check_batch(&buf, 1 << 20).expect("valid batch");
        assert_eq!((h.base_offset, h.next_offset(), h.record_count), (7, 12, 3));
        assert_eq!((h.base_timestamp, h.max_timestamp), (100, 100));
        let mut it = RecordIter::new(h, &buf[BATCH_HEADER_BYTES..]);
        let got: Vec<_> =
            std::iter::from_fn(|| it.next_raw()).map(|r| r.expect("record").to_stored(0)).collect();
        assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), [7, 9, 11]);
        assert_eq!(got[1].value, None);
        assert_eq!(got[2].value.as_deref(), Some(&b""[..]));
        assert_eq!(got[0].headers, vec![("h".to_string(), b"x".to_vec())]);
        for bit in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(check_batch(&b, 1 << 20).is_err(), "bit {bit} flip not detected");
        }
        for cut in 0..buf.len() {
            assert!(check_batch(&buf[..cut], 1 << 20).is_err(), "cut at {cut} accepted");
        }
    }
}
