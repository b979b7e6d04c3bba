//! Sparse indexes of a segment: offset → file position, and timestamp → offset.
//!
//! The active segment's indexes live in memory (they are rebuilt by the scan that recovery does
//! on every open anyway); a sealed segment's are written once, when it is sealed, to
//! `<base>.index` and `<base>.timeindex`. Each index file starts with a header that names the
//! segment length it describes and carries checksums of itself and of its entries, so an index
//! that is damaged or that belongs to another version of the segment (a crash between
//! compaction's renames) is detected and rebuilt instead of trusted.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

pub(crate) const OFFSET_INDEX_MAGIC: [u8; 4] = *b"PLOI";
pub(crate) const TIME_INDEX_MAGIC: [u8; 4] = *b"PLTI";
const HEADER_BYTES: usize = 40;
/// Largest index file a reader loads (a 2 GiB segment indexed every 4 KiB needs 6 MiB).
const INDEX_BYTES_MAX: u64 = 64 << 20;

/// What a sealed segment's index header says about the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentSummary {
    pub segment_len: u64,
    pub next_offset: u64,
    pub max_timestamp: i64,
}

/// The indexes of one segment, built batch by batch.
#[derive(Debug, Clone, Default)]
pub(crate) struct IndexBuilder {
    /// (offset relative to the segment base, file position) of a batch start.
    pub offsets: Vec<(u32, u32)>,
    /// (max timestamp of all records before the batch, offset of the batch relative to base).
    pub times: Vec<(i64, u32)>,
    bytes_since_entry: u64,
    /// Max timestamp over all batches seen; `i64::MIN` before the first.
    pub max_timestamp: i64,
}

impl IndexBuilder {
    pub fn new() -> Self {
        IndexBuilder { max_timestamp: i64::MIN, ..Default::default() }
    }

    /// Records a batch starting at `pos` whose first offset is `rel_offset` past the base.
    pub fn on_batch(&mut self, rel_offset: u32, pos: u32, bytes: u64, max_ts: i64, interval: u64) {
        if self.offsets.is_empty() || self.bytes_since_entry >= interval {
            self.offsets.push((rel_offset, pos));
            self.bytes_since_entry = 0;
            let newer = self.times.last().is_none_or(|&(ts, _)| self.max_timestamp > ts);
            if self.max_timestamp != i64::MIN && newer {
                self.times.push((self.max_timestamp, rel_offset));
            }
        }
        self.bytes_since_entry += bytes;
        self.max_timestamp = self.max_timestamp.max(max_ts);
    }

    /// Position of the last indexed batch at or before `rel_offset` (0 if none).
    pub fn position_for(&self, rel_offset: u32) -> u32 {
        position_for(&self.offsets, rel_offset)
    }

    /// A relative offset from which scanning finds the first record with timestamp ≥ `ts`:
    /// every record before it is older than `ts`.
    pub fn scan_start_for_time(&self, ts: i64) -> u32 {
        let i = self.times.partition_point(|&(t, _)| t < ts);
        if i == 0 {
            0
        } else {
            self.times[i - 1].1
        }
    }

    /// Writes both index files for a sealed segment, each via temp file, fsync (when
    /// `durable`) and rename.
    pub fn write_files(
        &self,
        log_path: &Path,
        summary: SegmentSummary,
        durable: bool,
    ) -> io::Result<()> {
        let mut entries = Vec::with_capacity(self.offsets.len() * 8);
        for &(o, p) in &self.offsets {
            entries.extend_from_slice(&o.to_le_bytes());
            entries.extend_from_slice(&p.to_le_bytes());
        }
        write_index(
            &log_path.with_extension("index"),
            OFFSET_INDEX_MAGIC,
            summary,
            &entries,
            durable,
        )?;
        entries.clear();
        for &(t, o) in &self.times {
            entries.extend_from_slice(&t.to_le_bytes());
            entries.extend_from_slice(&o.to_le_bytes());
        }
        write_index(
            &log_path.with_extension("timeindex"),
            TIME_INDEX_MAGIC,
            summary,
            &entries,
            durable,
        )
    }
}

fn position_for(entries: &[(u32, u32)], rel_offset: u32) -> u32 {
    let i = entries.partition_point(|&(o, _)| o <= rel_offset);
    if i == 0 {
        0
    } else {
        entries[i - 1].1
    }
}

fn write_index(
    path: &Path,
    magic: [u8; 4],
    s: SegmentSummary,
    entries: &[u8],
    durable: bool,
) -> io::Result<()> {
    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(&magic);
    header.extend_from_slice(&s.segment_len.to_le_bytes());
    header.extend_from_slice(&s.next_offset.to_le_bytes());
    header.extend_from_slice(&s.max_timestamp.to_le_bytes());
    header.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    header.extend_from_slice(&crc32c::crc32c(entries).to_le_bytes());
    let crc = crc32c::crc32c(&header);
    header.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(header.len(), HEADER_BYTES);
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("index")
    ));
    let mut f = File::create(&tmp)?;
    f.write_all(&header)?;
    f.write_all(entries)?;
    if durable {
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

fn parse_header(h: &[u8; HEADER_BYTES], magic: [u8; 4]) -> Option<(SegmentSummary, u32, u32)> {
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or_default());
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap_or_default());
    if h[..4] != magic || crc32c::crc32c(&h[..36]) != u32_at(36) {
        return None;
    }
    let summary = SegmentSummary {
        segment_len: u64_at(4),
        next_offset: u64_at(12),
        max_timestamp: u64_at(20) as i64,
    };
    Some((summary, u32_at(28), u32_at(32)))
}

/// Reads a sealed segment's summary from its offset index header, or `None` if the index is
/// missing, damaged, or describes a segment of another length.
pub(crate) fn read_summary(log_path: &Path, segment_len: u64) -> Option<SegmentSummary> {
    let mut f = File::open(log_path.with_extension("index")).ok()?;
    let mut h = [0u8; HEADER_BYTES];
    f.read_exact(&mut h).ok()?;
    let (s, _, _) = parse_header(&h, OFFSET_INDEX_MAGIC)?;
    (s.segment_len == segment_len).then_some(s)
}

/// Loads and checks a whole index file; `None` if it is missing, damaged or stale.
fn read_entries(path: &Path, magic: [u8; 4], segment_len: u64) -> Option<Vec<u8>> {
    let f = File::open(path).ok()?;
    if f.metadata().ok()?.len() > INDEX_BYTES_MAX {
        return None;
    }
    let mut all = Vec::new();
    f.take(INDEX_BYTES_MAX).read_to_end(&mut all).ok()?;
    let h: &[u8; HEADER_BYTES] = all.get(..HEADER_BYTES)?.try_into().ok()?;
    let (s, len, crc) = parse_header(h, magic)?;
    let entries = &all[HEADER_BYTES..];
    (s.segment_len == segment_len
        && entries.len() == len as usize
        && crc32c::crc32c(entries) == crc)
        .then(|| entries.to_vec())
}

/// Position of the last indexed batch at or before `rel_offset` in a sealed segment, or `None`
/// if its index cannot be trusted (the caller scans from the segment start).
pub(crate) fn sealed_position_for(
    log_path: &Path,
    segment_len: u64,
    rel_offset: u32,
) -> Option<u32> {
    let e = read_entries(&log_path.with_extension("index"), OFFSET_INDEX_MAGIC, segment_len)?;
    let entries: Vec<(u32, u32)> = e
        .chunks_exact(8)
        .map(|c| {
            let o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            (o, u32::from_le_bytes([c[4], c[5], c[6], c[7]]))
        })
        .collect();
    Some(position_for(&entries, rel_offset))
}

/// The time-index scan start (see [`IndexBuilder::scan_start_for_time`]) of a sealed segment.
pub(crate) fn sealed_scan_start_for_time(
    log_path: &Path,
    segment_len: u64,
    ts: i64,
) -> Option<u32> {
    let e = read_entries(&log_path.with_extension("timeindex"), TIME_INDEX_MAGIC, segment_len)?;
    let times: Vec<(i64, u32)> = e
        .chunks_exact(12)
        .map(|c| {
            let t = i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            (t, u32::from_le_bytes([c[8], c[9], c[10], c[11]]))
        })
        .collect();
    let b = IndexBuilder { times, ..IndexBuilder::new() };
    Some(b.scan_start_for_time(ts))
}
