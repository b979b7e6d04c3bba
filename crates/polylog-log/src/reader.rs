//! Readers of one partition: offset order, durable records only, blocking follow.

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::format::{RecordIter, BATCH_HEADER_BYTES};
use crate::partition::Partition;
use crate::segment::{BatchCursor, ReadStop};
use crate::{LogError, LogReader, Result, StartAt, StoredRecord};

/// How often a read-only view (another process owns the log) looks for new records.
const READ_ONLY_POLL: Duration = Duration::from_millis(100);

pub(crate) struct PartitionReader {
    part: Arc<Partition>,
    next: u64,
    /// With [`StartAt::Timestamp`]: records older than this are skipped until the first newer.
    skip_older_than: Option<i64>,
    cur: Option<Cursor>,
}

enum Open {
    Opened,
    NoData,
    Retry,
}

struct Cursor {
    base: u64,
    cursor: BatchCursor,
}

impl PartitionReader {
    pub fn new(part: Arc<Partition>, start: StartAt) -> Result<Self> {
        part.refresh()?;
        let mut skip_older_than = None;
        let next = match start {
            StartAt::Beginning => part.start_offset(),
            StartAt::End => part.durable_offset(),
            StartAt::Offset(o) => o,
            StartAt::Timestamp(ts) => match part.locate_time(ts) {
                Some(o) => {
                    skip_older_than = Some(ts);
                    o
                }
                None => part.durable_offset(),
            },
        };
        let mut r = PartitionReader { part, next, skip_older_than, cur: None };
        r.check_range()?;
        Ok(r)
    }

    /// Offsets below the partition start were removed. In a compacted topic that is what
    /// compaction is for, so the reader moves on; otherwise the caller must decide.
    fn check_range(&mut self) -> Result<()> {
        let start = self.part.start_offset();
        if self.next >= start || self.cur.is_some() {
            return Ok(());
        }
        if self.part.config.compacted {
            self.next = start;
            return Ok(());
        }
        Err(LogError::OffsetOutOfRange {
            topic: self.part.topic.clone(),
            partition: self.part.id,
            requested: self.next,
            start,
        })
    }

    fn read_available(&mut self, max: usize) -> Result<Vec<StoredRecord>> {
        let mut out = Vec::new();
        let hw = self.part.durable_offset();
        while out.len() < max && self.next < hw {
            self.check_range()?;
            if self.cur.is_none() {
                match self.open_cursor()? {
                    Open::Opened => {}
                    Open::Retry => break,
                    // No segment holds a record at or after `next`: compaction removed them.
                    Open::NoData => {
                        self.next = hw;
                        break;
                    }
                }
            }
            let Some(c) = self.cur.as_mut() else { break };
            // While the segment is active, read only what the writer has finished writing.
            // Once sealed, the file our descriptor points to never changes (compaction writes a
            // new file), so its own length bounds it, whatever the segment list says now.
            let (limit, seg_next, still_active) = match self.part.segment_state(c.base) {
                Some((meta, true)) => (meta.size, meta.next_offset, true),
                state => {
                    let len = c
                        .cursor
                        .file_len()
                        .map_err(LogError::io("reading", self.part.dir.clone()))?;
                    (len, state.map_or(0, |(meta, _)| meta.next_offset), false)
                }
            };
            let pos = c.cursor.pos;
            match c.cursor.next_batch(limit) {
                Ok(None) => {
                    if still_active {
                        break;
                    }
                    self.next = self.next.max(seg_next);
                    self.cur = None;
                }
                Ok(Some((h, bytes))) => {
                    if h.base_offset >= hw {
                        c.cursor.pos = pos;
                        break;
                    }
                    let mut it = RecordIter::new(h, &bytes[BATCH_HEADER_BYTES..]);
                    while let Some(r) = it.next_raw() {
                        let r = r.map_err(|e| LogError::Corrupt {
                            path: self.part.dir.clone(),
                            position: pos,
                            reason: format!("{e:?}"),
                        })?;
                        if r.offset < self.next || out.len() >= max {
                            continue;
                        }
                        self.next = r.offset + 1;
                        if let Some(ts) = self.skip_older_than {
                            if r.timestamp < ts {
                                continue;
                            }
                            self.skip_older_than = None;
                        }
                        out.push(r.to_stored(self.part.id));
                    }
                    if out.len() >= max && self.next < h.next_offset() {
                        c.cursor.pos = pos; // the rest of this batch is read next time
                    } else {
                        self.next = self.next.max(h.next_offset());
                    }
                }
                Err(ReadStop::Torn { .. }) if self.part.is_read_only() => {
                    // The writer is mid-append or truncated a torn tail; look again later.
                    self.cur = None;
                    break;
                }
                Err(ReadStop::Io(e)) => {
                    return Err(LogError::io("reading", self.part.dir.clone())(e))
                }
                Err(ReadStop::Torn { pos }) => {
                    let base = c.base;
                    return Err(self.corrupt(base, pos, "segment ends inside a batch".into()));
                }
                Err(ReadStop::Corrupt { pos, reason }) => {
                    let base = c.base;
                    return Err(self.corrupt(base, pos, reason));
                }
            }
        }
        Ok(out)
    }

    fn corrupt(&self, base: u64, position: u64, reason: String) -> LogError {
        LogError::Corrupt { path: crate::segment::log_path(&self.part.dir, base), position, reason }
    }

    /// Opens the segment holding `self.next`.
    fn open_cursor(&mut self) -> Result<Open> {
        let Some(loc) = self.part.locate(self.next) else { return Ok(Open::NoData) };
        let file = match File::open(&loc.path) {
            Ok(f) => f,
            // Removed by retention or compaction between the lookup and the open: look again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.part.reload()?;
                return Ok(Open::Retry);
            }
            Err(e) => return Err(LogError::io("opening", loc.path)(e)),
        };
        let max = self.part.opts.batch_bytes_max;
        let mut cursor = BatchCursor::new(file, loc.start_pos, max);
        // The index position is a hint: the file may have been replaced by its compacted version
        // since the index was read. Use it only if a valid batch starts there at or before the
        // offset we want; otherwise read the segment from its start.
        if loc.start_pos > 0 {
            let len = cursor.file_len().map_err(LogError::io("reading", &loc.path))?;
            let fits =
                matches!(cursor.next_batch(len), Ok(Some((h, _))) if h.base_offset <= self.next);
            cursor = if fits {
                BatchCursor::new(cursor.into_file(), loc.start_pos, max)
            } else {
                BatchCursor::new(cursor.into_file(), 0, max)
            };
        }
        self.cur = Some(Cursor { base: loc.meta.base, cursor });
        Ok(Open::Opened)
    }
}

impl LogReader for PartitionReader {
    fn poll(&mut self, max_records: usize, timeout: Duration) -> Result<Vec<StoredRecord>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut out = self.read_available(max_records.max(1))?;
            if out.is_empty() && self.part.is_read_only() {
                // Another process writes this log: look at the files again before giving up.
                self.part.refresh()?;
                out = self.read_available(max_records.max(1))?;
            }
            if !out.is_empty() {
                return Ok(out);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(out);
            }
            if self.part.is_read_only() {
                std::thread::sleep(left.min(READ_ONLY_POLL));
            } else if self.part.durable_offset() <= self.next {
                self.part.wait_beyond(self.next, left);
            }
        }
    }

    fn position(&self) -> u64 {
        self.next
    }
}
