//! Segment files: naming, sequential batch reading, and the recovery scan.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::{self, BatchHeader, FormatError, BATCH_PREFIX_BYTES};
use crate::index::IndexBuilder;

/// Bytes read from a segment at a time by readers and scans.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// A segment in a partition's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentMeta {
    /// Offset of the first record the segment can hold (its file name).
    pub base: u64,
    /// Offset after the last record in it.
    pub next_offset: u64,
    /// Bytes of valid batches.
    pub size: u64,
    /// Newest record timestamp, `i64::MIN` if empty.
    pub max_timestamp: i64,
}

pub(crate) fn log_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// Base offsets of the `*.log` files in a partition directory, ascending.
pub(crate) fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".log") {
            if stem.len() == 20 {
                if let Ok(base) = stem.parse::<u64>() {
                    bases.push(base);
                }
            }
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Why a sequential read stopped before the requested end.
#[derive(Debug)]
pub(crate) enum ReadStop {
    /// The batch at `pos` is cut short (a torn write, or not yet complete).
    Torn {
        pos: u64,
    },
    /// The batch at `pos` fails its checks.
    Corrupt {
        pos: u64,
        reason: String,
    },
    Io(std::io::Error),
}

/// Reads the batches of one segment file in order, through a bounded buffer.
pub(crate) struct BatchCursor {
    file: File,
    /// File position of `buf[0]`.
    buf_pos: u64,
    buf: Vec<u8>,
    /// Position of the next batch.
    pub pos: u64,
    batch_bytes_max: usize,
}

impl BatchCursor {
    pub fn new(file: File, pos: u64, batch_bytes_max: usize) -> Self {
        BatchCursor { file, buf_pos: pos, buf: Vec::new(), pos, batch_bytes_max }
    }

    /// Ensures `buf` holds `n` bytes from `self.pos`, reading no further than `end`.
    fn fill(&mut self, n: usize, end: u64) -> Result<bool, ReadStop> {
        let have = (self.buf_pos + self.buf.len() as u64).saturating_sub(self.pos) as usize;
        if have >= n {
            return Ok(true);
        }
        // Drop consumed bytes, then read a chunk (or the whole batch if it is larger).
        let consumed = (self.pos - self.buf_pos) as usize;
        self.buf.drain(..consumed.min(self.buf.len()));
        self.buf_pos = self.pos;
        let want = n.max(READ_CHUNK_BYTES).min((end - self.pos) as usize);
        if want < n {
            return Ok(false);
        }
        let start = self.buf.len();
        self.buf.resize(want, 0);
        let mut filled = start;
        while filled < want {
            match self.file.read_at(&mut self.buf[filled..], self.buf_pos + filled as u64) {
                Ok(0) => break,
                Ok(k) => filled += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadStop::Io(e)),
            }
        }
        self.buf.truncate(filled);
        Ok(filled >= n)
    }

    /// The file, to read again from another position.
    pub fn into_file(self) -> File {
        self.file
    }

    /// Current length of the file being read.
    pub fn file_len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// The next batch before `end`, or `Ok(None)` exactly at `end`.
    pub fn next_batch(&mut self, end: u64) -> Result<Option<(BatchHeader, &[u8])>, ReadStop> {
        if self.pos >= end {
            return Ok(None);
        }
        let pos = self.pos;
        if !self.fill(BATCH_PREFIX_BYTES, end)? {
            return Err(ReadStop::Torn { pos });
        }
        let at = (pos - self.buf_pos) as usize;
        let total = match format::batch_total_len(&self.buf[at..], self.batch_bytes_max) {
            Ok(t) => t,
            Err(FormatError::Incomplete { .. }) => return Err(ReadStop::Torn { pos }),
            Err(FormatError::Corrupt(reason)) => return Err(ReadStop::Corrupt { pos, reason }),
        };
        if !self.fill(total, end)? {
            return Err(ReadStop::Torn { pos });
        }
        let at = (pos - self.buf_pos) as usize;
        let bytes = &self.buf[at..at + total];
        match format::check_batch(bytes, self.batch_bytes_max) {
            Ok(h) => {
                self.pos += total as u64;
                Ok(Some((h, bytes)))
            }
            Err(FormatError::Incomplete { .. }) => Err(ReadStop::Torn { pos }),
            Err(FormatError::Corrupt(reason)) => Err(ReadStop::Corrupt { pos, reason }),
        }
    }
}

/// What a full scan of a segment found.
#[derive(Debug)]
pub(crate) struct Scan {
    pub meta: SegmentMeta,
    pub index: IndexBuilder,
    /// Where and why the valid prefix ends before the end of the file, if it does.
    pub stop: Option<(u64, String)>,
}

/// Reads a whole segment, checking every batch, and indexes its longest valid prefix.
/// `min_offset` is the offset the segment's first batch may not precede.
pub(crate) fn scan(
    path: &Path,
    base: u64,
    min_offset: u64,
    batch_bytes_max: usize,
    index_interval_bytes: u64,
) -> std::io::Result<Scan> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    scan_from(
        file,
        file_len,
        Scan::empty(base),
        min_offset.max(base),
        batch_bytes_max,
        index_interval_bytes,
    )
}

impl Scan {
    pub fn empty(base: u64) -> Self {
        Scan {
            meta: SegmentMeta { base, next_offset: base, size: 0, max_timestamp: i64::MIN },
            index: IndexBuilder::new(),
            stop: None,
        }
    }
}

/// Continues a scan from `scan.meta.size` up to `file_len`.
pub(crate) fn scan_from(
    file: File,
    file_len: u64,
    mut scan: Scan,
    min_offset: u64,
    batch_bytes_max: usize,
    index_interval_bytes: u64,
) -> std::io::Result<Scan> {
    let base = scan.meta.base;
    let mut expected = scan.meta.next_offset.max(min_offset);
    let mut cur = BatchCursor::new(file, scan.meta.size, batch_bytes_max);
    scan.stop = None;
    loop {
        let pos = cur.pos;
        match cur.next_batch(file_len) {
            Ok(None) => break,
            Ok(Some((h, bytes))) => {
                let len = bytes.len() as u64;
                let fits = h.base_offset >= base && h.next_offset() - base <= u64::from(u32::MAX);
                if h.base_offset < expected || !fits || pos + len > u64::from(u32::MAX) {
                    let why = format!(
                        "batch base offset {} out of order (expected at least {expected})",
                        h.base_offset
                    );
                    scan.stop = Some((pos, why));
                    break;
                }
                let rel = (h.base_offset - base) as u32;
                scan.index.on_batch(rel, pos as u32, len, h.max_timestamp, index_interval_bytes);
                expected = h.next_offset();
                scan.meta.next_offset = expected;
                scan.meta.size = pos + len;
                scan.meta.max_timestamp = scan.meta.max_timestamp.max(h.max_timestamp);
            }
            Err(ReadStop::Io(e)) => return Err(e),
            Err(ReadStop::Torn { pos }) => {
                scan.stop =
                    Some((pos, format!("torn batch at the end ({} bytes)", file_len - pos)));
                break;
            }
            Err(ReadStop::Corrupt { pos, reason }) => {
                scan.stop = Some((pos, reason));
                break;
            }
        }
    }
    Ok(scan)
}
