//! One partition: its segments, the append path, group commit, recovery and retention.
//!
//! Locking: `state` guards the segment list and the writer. It is held while a batch is
//! written to the page cache, never during an fsync of the active segment: the syncer takes the
//! file handle, releases the lock, syncs, and then publishes the new durable offset, so appends
//! continue while earlier batches are being made durable (group commit).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::embedded::{FsyncPolicy, LogOptions};
use crate::error::is_disk_full;
use crate::format;
use crate::index::{self, IndexBuilder, SegmentSummary};
use crate::segment::{self, log_path, Scan, SegmentMeta};
use crate::{Appended, LogError, PartitionDescription, Record, Result, TopicConfig};

pub(crate) struct Partition {
    pub topic: String,
    pub id: u32,
    pub dir: PathBuf,
    pub config: TopicConfig,
    pub opts: Arc<LogOptions>,
    read_only: bool,
    state: Mutex<State>,
    /// Signalled when the durable offset moves, a sync ends, or the writer is poisoned.
    changed: Condvar,
    /// Held by compaction so only one runs per partition.
    pub compaction: Mutex<()>,
}

struct State {
    sealed: Vec<SegmentMeta>,
    active: Active,
    /// Records below this offset are durable and visible to readers.
    durable: u64,
    syncing: bool,
    poisoned: Option<(String, &'static str)>,
    /// Compaction has cleaned every record below this offset.
    pub first_dirty: u64,
    /// Encoding buffer reused across appends.
    buf: Vec<u8>,
}

struct Active {
    meta: SegmentMeta,
    file: Arc<File>,
    index: IndexBuilder,
    /// Inode of the file, to notice a read-only view going stale.
    ino: u64,
}

/// Where a reader should start reading to find `offset`.
#[derive(Debug, Clone)]
pub(crate) struct Location {
    pub meta: SegmentMeta,
    pub path: PathBuf,
    pub start_pos: u64,
}

/// File holding the offset below which compaction has cleaned the partition.
const CLEANER_CHECKPOINT: &str = "cleaner-checkpoint";

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves state that was fully updated or not at all (every
    // mutation is a plain assignment after the I/O it records), so the data is still valid.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Partition {
    pub fn name(&self) -> String {
        format!("{}/{}", self.topic, self.id)
    }

    /// Opens (creating if needed) a partition directory. Read-write: recovers the longest valid
    /// prefix, truncating a torn or corrupt tail and rebuilding damaged indexes. Read-only:
    /// changes nothing and serves the valid prefix.
    pub fn open(
        dir: PathBuf,
        topic: &str,
        id: u32,
        config: TopicConfig,
        opts: Arc<LogOptions>,
        read_only: bool,
    ) -> Result<Partition> {
        let (sealed, active) = load(&dir, &opts, read_only)?;
        let end = active.meta.next_offset;
        // Compaction resumes where it left off; without a checkpoint it starts at the beginning.
        let start = sealed.first().map_or(active.meta.base, |s| s.base);
        let first_dirty = std::fs::read_to_string(dir.join(CLEANER_CHECKPOINT))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .map_or(start, |c| c.clamp(start, active.meta.base));
        let state = State {
            sealed,
            active,
            durable: end,
            syncing: false,
            poisoned: None,
            first_dirty,
            buf: Vec::new(),
        };
        Ok(Partition {
            topic: topic.to_string(),
            id,
            dir,
            config,
            opts,
            read_only,
            state: Mutex::new(state),
            changed: Condvar::new(),
            compaction: Mutex::new(()),
        })
    }

    fn poison(&self, st: &mut State, what: &str, e: &std::io::Error) -> LogError {
        let hint = if is_disk_full(e) { " (free disk space)" } else { "" };
        let cause = format!("{what}: {e}");
        st.poisoned.get_or_insert((cause, hint));
        self.changed.notify_all();
        self.poisoned_error(st)
    }

    fn poisoned_error(&self, st: &State) -> LogError {
        let (cause, hint) = st.poisoned.clone().unwrap_or_default();
        LogError::Poisoned { partition: self.name(), cause, hint }
    }

    /// Writes `records` as one batch; see [`crate::Log::append`].
    pub fn append(&self, records: &[Record]) -> Result<Appended> {
        if self.read_only {
            return Err(LogError::ReadOnly);
        }
        if records.is_empty() {
            return Err(LogError::InvalidAppend("a batch needs at least one record".into()));
        }
        let bound: usize = records.iter().map(format::record_bytes_upper_bound).sum();
        let max = self.opts.batch_bytes_max;
        if bound + format::BATCH_HEADER_BYTES > max {
            return Err(LogError::InvalidAppend(format!(
                "a batch of {} records and about {bound} bytes exceeds batch_bytes_max ({max} bytes); \
                 split it",
                records.len()
            )));
        }
        if self.config.compacted && records.iter().any(|r| r.key.is_none()) {
            return Err(LogError::InvalidAppend(format!(
                "topic {} is compacted: every record needs a key",
                self.topic
            )));
        }
        let now = crate::now_ms();
        let mut st = lock(&self.state);
        loop {
            if st.poisoned.is_some() {
                return Err(self.poisoned_error(&st));
            }
            // A roll fsyncs the active file; it must not overlap the syncer's fsync of the same
            // file, or one of them could see an error the other swallowed (Linux reports a
            // failed writeback once per file description).
            if !(st.syncing && self.must_roll(&st.active.meta, bound as u64, records.len() as u64))
            {
                break;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let base = st.active.meta.next_offset;
        let n = records.len() as u32;
        let mut buf = std::mem::take(&mut st.buf);
        buf.clear();
        let items =
            records.iter().enumerate().map(|(i, r)| (i as u32, r.timestamp_ms.unwrap_or(now), r));
        let encoded = format::encode_batch(&mut buf, base, n - 1, items);
        let result = self.write_batch(&mut st, &buf, base, encoded);
        st.buf = buf;
        result?;
        Ok(Appended { partition: self.id, base_offset: base, last_offset: base + u64::from(n) - 1 })
    }

    fn write_batch(
        &self,
        st: &mut State,
        batch: &[u8],
        base: u64,
        e: format::Encoded,
    ) -> Result<()> {
        let len = batch.len() as u64;
        let a = &st.active.meta;
        let rel_end = e.next_offset - a.base;
        if a.size > 0 && (a.size + len > self.config.segment_bytes || rel_end > u64::from(u32::MAX))
        {
            self.roll(st)?;
        }
        let pos = st.active.meta.size;
        let file = Arc::clone(&st.active.file);
        if let Err(e) = self.faults_write(&file, batch, pos) {
            return Err(self.poison(st, "writing a batch", &e));
        }
        let a = &mut st.active;
        let rel = (base - a.meta.base) as u32;
        a.index.on_batch(rel, pos as u32, len, e.max_timestamp, self.opts.index_interval_bytes);
        a.meta.size = pos + len;
        a.meta.next_offset = e.next_offset;
        a.meta.max_timestamp = a.meta.max_timestamp.max(e.max_timestamp);
        if !self.opts.fsyncs() {
            st.durable = st.active.meta.next_offset;
            self.changed.notify_all();
        }
        Ok(())
    }

    /// Whether a batch of `bytes` holding `offsets` offsets needs a new segment.
    fn must_roll(&self, active: &SegmentMeta, bytes: u64, offsets: u64) -> bool {
        let rel_end = active.next_offset - active.base + offsets;
        active.size > 0
            && (active.size + bytes > self.config.segment_bytes || rel_end > u64::from(u32::MAX))
    }

    fn faults_write(&self, file: &File, batch: &[u8], pos: u64) -> std::io::Result<()> {
        if let Some(f) = &self.opts.faults {
            f.check_write()?;
        }
        if crate::failpoint::fires("log.write") {
            // A torn write: part of the batch reaches the file, then the error.
            file.write_all_at(&batch[..batch.len() / 2], pos)?;
            return Err(std::io::Error::other("injected failure at failpoint log.write"));
        }
        file.write_all_at(batch, pos)
    }

    fn faults_sync(&self, file: &File) -> std::io::Result<()> {
        if let Some(f) = &self.opts.faults {
            f.check_fsync()?;
        }
        crate::failpoint::check("log.fsync")?;
        let started = std::time::Instant::now();
        let synced = file.sync_data();
        crate::metrics::FSYNC.observe(started.elapsed());
        synced
    }

    /// Seals the active segment (durably, unless `fsync = "never"`) and starts a new one.
    fn roll(&self, st: &mut State) -> Result<()> {
        let syncing = self.opts.fsyncs();
        let old = &st.active;
        let path = log_path(&self.dir, old.meta.base);
        if syncing {
            if let Err(e) = self.faults_sync(&old.file) {
                return Err(self.poison(st, "syncing a full segment", &e));
            }
        }
        let summary = SegmentSummary {
            segment_len: old.meta.size,
            next_offset: old.meta.next_offset,
            max_timestamp: old.meta.max_timestamp,
        };
        if let Err(e) = old.index.write_files(&path, summary, syncing) {
            return Err(self.poison(st, "writing a segment index", &e));
        }
        let next = old.meta.next_offset;
        let new_path = log_path(&self.dir, next);
        let created = OpenOptions::new().read(true).write(true).create_new(true).open(&new_path);
        let file = match created {
            Ok(f) => f,
            Err(e) => return Err(self.poison(st, "creating a segment", &e)),
        };
        if syncing {
            if let Err(e) = sync_dir(&self.dir) {
                return Err(self.poison(st, "syncing the partition directory", &e));
            }
            st.durable = st.durable.max(next);
            self.changed.notify_all();
        }
        let ino = file.metadata().map(|m| m.ino()).unwrap_or_default();
        let new = Active {
            meta: SegmentMeta { base: next, next_offset: next, size: 0, max_timestamp: i64::MIN },
            file: Arc::new(file),
            index: IndexBuilder::new(),
            ino,
        };
        let old = std::mem::replace(&mut st.active, new);
        st.sealed.push(old.meta);
        Ok(())
    }

    /// Whether records are written but not yet durable.
    pub fn is_dirty(&self) -> bool {
        let st = lock(&self.state);
        st.poisoned.is_none() && st.durable < st.active.meta.next_offset
    }

    /// Makes everything written so far durable (group commit: concurrent callers share one
    /// fsync). A failed fsync poisons the partition.
    pub fn sync(&self) -> Result<()> {
        let mut st = lock(&self.state);
        loop {
            if st.poisoned.is_some() {
                return Err(self.poisoned_error(&st));
            }
            if st.durable >= st.active.meta.next_offset {
                return Ok(());
            }
            if !st.syncing {
                break;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.syncing = true;
        let target = st.active.meta.next_offset;
        let file = Arc::clone(&st.active.file);
        drop(st);
        let r = self.faults_sync(&file);
        let mut st = lock(&self.state);
        st.syncing = false;
        match r {
            // Once poisoned, nothing more is published: the error may have been for our pages.
            Ok(()) if st.poisoned.is_some() => {
                self.changed.notify_all();
                Err(self.poisoned_error(&st))
            }
            Ok(()) => {
                st.durable = st.durable.max(target);
                self.changed.notify_all();
                Ok(())
            }
            Err(e) => Err(self.poison(&mut st, "fsync of the active segment", &e)),
        }
    }

    pub fn durable_offset(&self) -> u64 {
        lock(&self.state).durable
    }

    /// Blocks until every record below `offset` is durable.
    pub fn wait_durable(&self, offset: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            if st.durable >= offset {
                return Ok(());
            }
            if st.poisoned.is_some() {
                return Err(self.poisoned_error(&st));
            }
            if offset > st.active.meta.next_offset {
                return Err(LogError::InvalidAppend(format!(
                    "cannot wait for offset {offset} of {}: only {} records were appended",
                    self.name(),
                    st.active.meta.next_offset
                )));
            }
            if self.opts.fsync == FsyncPolicy::Always && !st.syncing {
                drop(st);
                self.sync()?;
                st = lock(&self.state);
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LogError::Timeout(timeout));
            }
            st = self.changed.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Waits up to `timeout` for the durable offset to pass `offset`; returns the durable offset.
    pub fn wait_beyond(&self, offset: u64, timeout: Duration) -> u64 {
        let st = lock(&self.state);
        if st.durable > offset || timeout.is_zero() {
            return st.durable;
        }
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |st| st.durable <= offset && st.poisoned.is_none())
            .unwrap_or_else(|p| p.into_inner());
        st.durable
    }

    /// A segment's current metadata and whether it is the active one; `None` once removed.
    pub fn segment_state(&self, base: u64) -> Option<(SegmentMeta, bool)> {
        let st = lock(&self.state);
        if st.active.meta.base == base {
            return Some((st.active.meta, true));
        }
        let i = st.sealed.binary_search_by_key(&base, |s| s.base).ok()?;
        Some((st.sealed[i], false))
    }

    pub fn start_offset(&self) -> u64 {
        let st = lock(&self.state);
        st.sealed.first().map_or(st.active.meta.base, |s| s.base)
    }

    /// Where to read `offset` from: the segment holding it (or the first one after it, when
    /// compaction removed it) and the indexed position at or before it.
    pub fn locate(&self, offset: u64) -> Option<Location> {
        let st = lock(&self.state);
        let all = st.sealed.iter().chain(std::iter::once(&st.active.meta));
        let meta = *all.clone().find(|m| offset < m.next_offset && m.size > 0)?;
        let path = log_path(&self.dir, meta.base);
        let rel = offset.saturating_sub(meta.base).min(u64::from(u32::MAX)) as u32;
        if meta.base == st.active.meta.base {
            let start_pos = u64::from(st.active.index.position_for(rel));
            return Some(Location { meta, path, start_pos });
        }
        drop(st);
        let pos = self.sealed_lookup(meta, |p| index::sealed_position_for(p, meta.size, rel));
        Some(Location { meta, path, start_pos: u64::from(pos.unwrap_or(0)) })
    }

    /// The offset to scan from to find the first record at or after `ts`, or `None` if every
    /// record is older.
    pub fn locate_time(&self, ts: i64) -> Option<u64> {
        let st = lock(&self.state);
        let all = st.sealed.iter().chain(std::iter::once(&st.active.meta));
        let meta = *all.clone().find(|m| m.size > 0 && m.max_timestamp >= ts)?;
        if meta.base == st.active.meta.base {
            return Some(meta.base + u64::from(st.active.index.scan_start_for_time(ts)));
        }
        drop(st);
        let rel = self.sealed_lookup(meta, |p| index::sealed_scan_start_for_time(p, meta.size, ts));
        Some(meta.base + u64::from(rel.unwrap_or(0)))
    }

    /// Looks something up in a sealed segment's index files; if they are damaged, rebuilds
    /// them from the segment (read-write, and not while compaction runs) and looks again.
    fn sealed_lookup<T>(&self, meta: SegmentMeta, f: impl Fn(&Path) -> Option<T>) -> Option<T> {
        let path = log_path(&self.dir, meta.base);
        if let Some(v) = f(&path) {
            return Some(v);
        }
        if self.read_only {
            return None;
        }
        let _exclusive = self.compaction.try_lock().ok()?;
        let opts = &self.opts;
        let scan =
            segment::scan(&path, meta.base, 0, opts.batch_bytes_max, opts.index_interval_bytes)
                .ok()?;
        if scan.meta.size != meta.size {
            return None; // the segment itself is damaged: readers will report it
        }
        let summary = SegmentSummary {
            segment_len: scan.meta.size,
            next_offset: meta.next_offset,
            max_timestamp: scan.meta.max_timestamp,
        };
        scan.index.write_files(&path, summary, self.opts.fsyncs()).ok()?;
        f(&path)
    }

    /// Sealed segments (oldest first) and the first offset compaction has not cleaned.
    pub fn sealed_segments(&self) -> (Vec<SegmentMeta>, u64) {
        let st = lock(&self.state);
        (st.sealed.clone(), st.first_dirty)
    }

    /// Replaces a sealed segment by its compacted version (`None`: it became empty).
    pub fn swap_compacted(
        &self,
        base: u64,
        cleaned: Option<(SegmentMeta, &Path, &IndexBuilder)>,
    ) -> Result<()> {
        let st = lock(&self.state);
        let Some(i) = st.sealed.iter().position(|s| s.base == base) else {
            return Ok(()); // removed by retention meanwhile
        };
        drop(st);
        let path = log_path(&self.dir, base);
        let durable = self.opts.fsyncs();
        match cleaned {
            Some((meta, tmp, idx)) => {
                fs::rename(tmp, &path)
                    .map_err(LogError::io("installing a compacted segment", &path))?;
                // The segment list follows the file at once; until the new index is written, the
                // old one is rejected (its segment length differs) or checked by readers.
                self.replace_sealed(i, base, Some(meta));
                let summary = SegmentSummary {
                    segment_len: meta.size,
                    next_offset: meta.next_offset,
                    max_timestamp: meta.max_timestamp,
                };
                idx.write_files(&path, summary, durable)
                    .map_err(LogError::io("writing a compacted segment's index", &path))?;
            }
            None => {
                self.replace_sealed(i, base, None);
                remove_segment_files(&path);
            }
        }
        if durable {
            sync_dir(&self.dir)
                .map_err(LogError::io("syncing the partition directory", &self.dir))?;
        }
        Ok(())
    }

    fn replace_sealed(&self, i: usize, base: u64, meta: Option<SegmentMeta>) {
        let mut st = lock(&self.state);
        if st.sealed.get(i).map(|s| s.base) == Some(base) {
            match meta {
                Some(m) => st.sealed[i] = m,
                None => {
                    st.sealed.remove(i);
                }
            }
        }
    }

    /// Records that compaction has cleaned everything below `offset`, durably, so a restart
    /// does not clean it all again.
    pub fn set_first_dirty(&self, offset: u64) -> Result<()> {
        let path = self.dir.join(CLEANER_CHECKPOINT);
        let tmp = path.with_extension("tmp");
        let durable = self.opts.fsyncs();
        let write = || -> std::io::Result<()> {
            let f = File::create(&tmp)?;
            (&f).write_all(format!("{offset}\n").as_bytes())?;
            if durable {
                f.sync_all()?;
            }
            fs::rename(&tmp, &path)
        };
        write().map_err(LogError::io("writing the cleaner checkpoint", &path))?;
        let mut st = lock(&self.state);
        st.first_dirty = st.first_dirty.max(offset);
        Ok(())
    }

    /// Deletes whole sealed segments past the topic's time or size retention. Returns how many.
    pub fn apply_retention(&self, now_ms: i64) -> Result<usize> {
        if self.config.retention_ms.is_none() && self.config.retention_bytes.is_none() {
            return Ok(0);
        }
        // Never at the same time as compaction, which could reinstall a segment removed here.
        let _exclusive = self.compaction.lock().unwrap_or_else(|e| e.into_inner());
        let mut doomed = Vec::new();
        {
            let mut st = lock(&self.state);
            let mut total: u64 =
                st.sealed.iter().map(|s| s.size).sum::<u64>() + st.active.meta.size;
            while let Some(first) = st.sealed.first().copied() {
                let too_old = self.config.retention_ms.is_some_and(|ms| {
                    first.max_timestamp
                        < now_ms.saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX))
                });
                let too_big =
                    self.config.retention_bytes.is_some_and(|max| total - first.size >= max);
                if !(too_old || too_big) {
                    break;
                }
                total -= first.size;
                st.sealed.remove(0);
                doomed.push(first.base);
            }
        }
        for base in &doomed {
            remove_segment_files(&log_path(&self.dir, *base));
        }
        if !doomed.is_empty() && self.opts.fsyncs() {
            sync_dir(&self.dir)
                .map_err(LogError::io("syncing the partition directory", &self.dir))?;
        }
        Ok(doomed.len())
    }

    pub fn describe(&self) -> PartitionDescription {
        let st = lock(&self.state);
        PartitionDescription {
            partition: self.id,
            start_offset: st.sealed.first().map_or(st.active.meta.base, |s| s.base),
            end_offset: st.active.meta.next_offset,
            durable_offset: st.durable,
            segments: st.sealed.len() + 1,
            size_bytes: st.sealed.iter().map(|s| s.size).sum::<u64>() + st.active.meta.size,
        }
    }

    /// Read-only view: picks up what the writing process appended since the last look.
    pub fn refresh(&self) -> Result<()> {
        if !self.read_only {
            return Ok(());
        }
        let bases =
            segment::list_segments(&self.dir).map_err(LogError::io("listing", &self.dir))?;
        let mut st = lock(&self.state);
        let path = log_path(&self.dir, st.active.meta.base);
        let same_file = std::fs::metadata(&path).ok().filter(|m| m.ino() == st.active.ino);
        let unchanged = bases.last() == Some(&st.active.meta.base)
            && bases.first() == Some(&st.sealed.first().map_or(st.active.meta.base, |s| s.base));
        if let (Some(m), true) = (same_file, unchanged) {
            if m.len() > st.active.meta.size {
                let file = File::open(&path).map_err(LogError::io("opening", &path))?;
                let prev = Scan {
                    meta: st.active.meta,
                    index: std::mem::take(&mut st.active.index),
                    stop: None,
                };
                let scan = segment::scan_from(
                    file,
                    m.len(),
                    prev,
                    0,
                    self.opts.batch_bytes_max,
                    self.opts.index_interval_bytes,
                )
                .map_err(LogError::io("reading", &path))?;
                st.active.meta = scan.meta;
                st.active.index = scan.index;
                st.durable = scan.meta.next_offset;
            }
            return Ok(());
        }
        drop(st);
        self.reload()
    }

    /// Read-only view: reads the partition's segment list and files again from scratch.
    pub fn reload(&self) -> Result<()> {
        if !self.read_only {
            return Ok(());
        }
        let (sealed, active) = load(&self.dir, &self.opts, true)?;
        let mut st = lock(&self.state);
        st.durable = active.meta.next_offset;
        st.sealed = sealed;
        st.active = active;
        Ok(())
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// Loads a partition directory: sealed segments from their index headers (scanning those whose
/// index is missing or stale), the last segment by a full scan. Read-write, it truncates the
/// first invalid batch and everything after it: the log is always a prefix.
fn load(dir: &Path, opts: &LogOptions, read_only: bool) -> Result<(Vec<SegmentMeta>, Active)> {
    let io = |what| LogError::io(what, dir);
    if !read_only {
        fs::create_dir_all(dir).map_err(io("creating partition directory"))?;
        for entry in fs::read_dir(dir).map_err(io("listing partition directory"))? {
            let path = entry.map_err(io("listing partition directory"))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.ends_with(".tmp") || name.ends_with(".cleaned") {
                // Left by a crash mid-compaction or mid-index-write; the originals are intact.
                fs::remove_file(&path).map_err(LogError::io("removing leftover", &path))?;
            }
        }
    }
    let mut bases = segment::list_segments(dir).map_err(io("listing partition directory"))?;
    if bases.is_empty() {
        if read_only {
            return Ok((Vec::new(), empty_active(dir, 0, None)?));
        }
        let path = log_path(dir, 0);
        File::create(&path).map_err(LogError::io("creating segment", &path))?;
        sync_dir(dir).map_err(io("syncing partition directory"))?;
        bases.push(0);
    }
    let mut sealed = Vec::new();
    let mut min_offset = 0u64;
    let last = bases.len() - 1;
    for (i, &base) in bases.iter().enumerate() {
        let path = log_path(dir, base);
        let len = fs::metadata(&path).map_err(LogError::io("reading", &path))?.len();
        if base < min_offset {
            return Err(LogError::Corrupt {
                path,
                position: 0,
                reason: format!(
                    "segment overlaps the previous one, which ends at offset {min_offset}"
                ),
            });
        }
        if i < last {
            if let Some(s) = index::read_summary(&path, len) {
                if s.next_offset >= base {
                    sealed.push(SegmentMeta {
                        base,
                        next_offset: s.next_offset,
                        size: len,
                        max_timestamp: s.max_timestamp,
                    });
                    min_offset = s.next_offset;
                    continue;
                }
            }
        }
        let scan =
            segment::scan(&path, base, min_offset, opts.batch_bytes_max, opts.index_interval_bytes)
                .map_err(LogError::io("scanning", &path))?;
        let torn = scan.meta.size < len;
        if read_only {
            if i < last && !torn {
                sealed.push(scan.meta);
                min_offset = scan.meta.next_offset;
                continue;
            }
            // The writer has not recovered this yet; the view ends at its valid prefix.
            let file = File::open(&path).map_err(LogError::io("opening", &path))?;
            return Ok((sealed, active_from(file, scan)));
        }
        if torn {
            let (pos, why) = scan.stop.clone().unwrap_or_default();
            tracing::warn!(
                "recovering {}: keeping the first {} bytes (offsets up to {}), dropping \
                 {} bytes from byte {pos}: {why}",
                path.display(),
                scan.meta.size,
                scan.meta.next_offset,
                len - scan.meta.size
            );
        }
        let durable = opts.fsyncs();
        if i < last && !torn {
            let summary = SegmentSummary {
                segment_len: scan.meta.size,
                next_offset: scan.meta.next_offset,
                max_timestamp: scan.meta.max_timestamp,
            };
            scan.index
                .write_files(&path, summary, durable)
                .map_err(LogError::io("rebuilding index", &path))?;
            sealed.push(scan.meta);
            min_offset = scan.meta.next_offset;
            continue;
        }
        // The last segment, or a torn one: it becomes the active segment and everything after
        // it goes, so that the log stays a prefix of what was written.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(LogError::io("opening", &path))?;
        if torn {
            file.set_len(scan.meta.size).map_err(LogError::io("truncating", &path))?;
        }
        // The previous process may have written batches it never fsynced (so never
        // acknowledged): make them durable before readers see them, since the durable offset
        // starts at the end of what is there.
        if durable || torn {
            file.sync_all().map_err(LogError::io("syncing", &path))?;
        }
        if torn {
            for &later in &bases[i + 1..] {
                tracing::warn!("recovering: removing segment {later} after the torn one");
                remove_segment_files(&log_path(dir, later));
            }
            sync_dir(dir).map_err(io("syncing partition directory"))?;
        }
        for ext in ["index", "timeindex"] {
            let _ = fs::remove_file(path.with_extension(ext)); // rebuilt when sealed
        }
        return Ok((sealed, active_from(file, scan)));
    }
    // `bases` is not empty, and its last element always returns above.
    Err(LogError::Corrupt { path: dir.into(), position: 0, reason: "no segment to open".into() })
}

fn active_from(file: File, scan: Scan) -> Active {
    let ino = file.metadata().map(|m| m.ino()).unwrap_or_default();
    Active { meta: scan.meta, file: Arc::new(file), index: scan.index, ino }
}

fn empty_active(dir: &Path, base: u64, file: Option<File>) -> Result<Active> {
    let file = match file {
        Some(f) => f,
        None => File::open("/dev/null").map_err(LogError::io("opening", dir))?,
    };
    Ok(active_from(file, Scan::empty(base)))
}

fn remove_segment_files(log: &Path) {
    for ext in ["log", "index", "timeindex"] {
        let _ = fs::remove_file(log.with_extension(ext));
    }
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
