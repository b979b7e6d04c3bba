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
    /// Opened while it was the active segment, so it may still grow.
    opened_active: bool,
    /// Length of the file when opened (a sealed file never changes; compaction replaces it).
    file_len: u64,
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
            let (limit, seg_next, still_active) = match self.part.segment_state(c.base) {
                Some((meta, active)) if c.opened_active => (meta.size, meta.next_offset, active),
                Some((meta, _)) => (c.file_len, meta.next_offset, false),
                None => (c.file_len, 0, false),
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
            // Removed by retention or replaced between the lookup and the open: look again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.part.refresh()?;
                return Ok(Open::Retry);
            }
            Err(e) => return Err(LogError::io("opening", loc.path)(e)),
        };
        let file_len = file.metadata().map_err(LogError::io("reading", &loc.path))?.len();
        let opened_active =
            self.part.segment_state(loc.meta.base).is_some_and(|(_, active)| active);
        let start = if loc.start_pos < file_len { loc.start_pos } else { 0 };
        self.cur = Some(Cursor {
            base: loc.meta.base,
            cursor: BatchCursor::new(file, start, self.part.opts.batch_bytes_max),
            opened_active,
            file_len,
        });
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
