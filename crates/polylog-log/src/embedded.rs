//! The embedded backend: topics as segment files under a data directory.
//!
//! ```text
//! <data_dir>/polylog.json                 marks the directory as Polylog's (format version)
//! <data_dir>/LOCK                         flock'ed by the one process that writes
//! <data_dir>/topics/<topic>/topic.json    the topic's config
//! <data_dir>/topics/<topic>/<partition>/<base offset>.log|.index|.timeindex
//! <data_dir>/groups/<group>.json          committed consumer-group offsets
//! ```
//!
//! Two background threads run while the log is open read-write: the *syncer*, which makes
//! appended batches durable (at once with `fsync = "always"`, every `fsync_interval_ms` with
//! `"interval"`), and *maintenance*, which applies retention and compacts compacted topics.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::compaction::{self, CompactionStats};
use crate::groups::Groups;
use crate::partition::{sync_dir, Partition};
use crate::reader::PartitionReader;
use crate::{
    validate_topic_name, Appended, Log, LogError, LogReader, Record, Result, StartAt, TopicConfig,
    TopicDescription,
};

const MARKER_FILE: &str = "polylog.json";
const MARKER: &str = "{\"format\":\"polylog-data\",\"version\":1}\n";

/// When appended records are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Every batch is fsynced before it is durable (concurrent batches share an fsync).
    #[default]
    Always,
    /// Batches are fsynced together every `fsync_interval_ms`.
    Interval,
    /// Never fsync: a batch is "durable" once written to the OS. Survives a process crash, not
    /// a machine crash. For tests.
    Never,
}

/// Runtime settings of the embedded log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub fsync: FsyncPolicy,
    /// With `FsyncPolicy::Interval`: time between fsyncs.
    pub fsync_interval_ms: u64,
    /// Largest batch accepted or read (Kafka: `message.max.bytes`).
    pub batch_bytes_max: usize,
    /// Bytes of segment between two sparse index entries.
    pub index_interval_bytes: u64,
    /// Time between retention and compaction rounds; 0 turns the background round off.
    pub maintenance_interval_ms: u64,
    /// Keys one compaction pass can track; larger dirty sections take several passes.
    pub compaction_keys_max: usize,
    /// Compact a partition once this share of its sealed bytes is uncleaned.
    pub compaction_min_dirty_ratio: f64,
    /// Injected I/O failures, for tests.
    pub faults: Option<Arc<Faults>>,
}

impl LogOptions {
    /// Whether anything is fsynced at all (every policy but `never`): metadata and index files
    /// are synced exactly when data is.
    pub(crate) fn fsyncs(&self) -> bool {
        self.fsync != FsyncPolicy::Never
    }
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 200,
            batch_bytes_max: 16 << 20,
            index_interval_bytes: 4096,
            maintenance_interval_ms: 30_000,
            compaction_keys_max: 1_000_000,
            compaction_min_dirty_ratio: 0.5,
            faults: None,
        }
    }
}

/// Failures to inject at the log's durable points (writes and fsyncs), for tests.
#[derive(Debug, Default)]
pub struct Faults {
    fail_fsync: AtomicBool,
    fail_write: AtomicBool,
}

impl Faults {
    /// Makes every following fsync fail (or succeed again).
    pub fn fail_fsync(&self, on: bool) {
        self.fail_fsync.store(on, Ordering::SeqCst);
    }
    /// Makes every following segment write fail (or succeed again).
    pub fn fail_writes(&self, on: bool) {
        self.fail_write.store(on, Ordering::SeqCst);
    }
    pub(crate) fn check_fsync(&self) -> std::io::Result<()> {
        if self.fail_fsync.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected fsync failure"));
        }
        Ok(())
    }
    pub(crate) fn check_write(&self) -> std::io::Result<()> {
        if self.fail_write.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected write failure"));
        }
        Ok(())
    }
}

/// What a maintenance round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MaintenanceReport {
    pub segments_deleted: usize,
    pub compaction: CompactionStats,
}

struct TopicEntry {
    config: TopicConfig,
    partitions: Vec<Arc<Partition>>,
}

struct Inner {
    dir: PathBuf,
    opts: Arc<LogOptions>,
    read_only: bool,
    topics: RwLock<BTreeMap<String, Arc<TopicEntry>>>,
    groups: Groups,
    shutdown: AtomicBool,
    /// Wakes the background threads on shutdown.
    wake: (Mutex<bool>, Condvar),
    _lock: Option<File>,
}

/// The embedded log. Share it as `Arc<EmbeddedLog>` (or `Arc<dyn Log>`); dropping the last
/// handle stops the background threads and makes everything appended durable.
pub struct EmbeddedLog {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog").field("dir", &self.inner.dir).finish_non_exhaustive()
    }
}

impl EmbeddedLog {
    /// Opens (creating if needed) the data directory for reading and writing. Recovers every
    /// partition to its longest valid prefix. Refused if another process has it open, or if the
    /// directory holds something other than Polylog data.
    pub fn open(dir: impl Into<PathBuf>, opts: LogOptions) -> Result<EmbeddedLog> {
        let dir = dir.into();
        init_data_dir(&dir)?;
        let lock = take_lock(&dir)?;
        let opts = Arc::new(opts);
        let inner = Arc::new(Inner {
            topics: RwLock::new(load_topics(&dir, &opts, false)?),
            groups: Groups::new(dir.join("groups"), opts.fsyncs()),
            dir,
            opts,
            read_only: false,
            shutdown: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            _lock: Some(lock),
        });
        let mut threads = Vec::new();
        if inner.opts.fsyncs() {
            let i = Arc::clone(&inner);
            threads.push(spawn("polylog-syncer", move || syncer(&i))?);
        }
        if inner.opts.maintenance_interval_ms > 0 {
            let i = Arc::clone(&inner);
            threads.push(spawn("polylog-maintenance", move || maintenance(&i))?);
        }
        Ok(EmbeddedLog { inner, threads })
    }

    /// Opens an existing data directory without changing anything in it, whether or not
    /// another process is writing it. Readers see the valid prefix of each partition and,
    /// when following, pick up what the writer appends.
    pub fn open_read_only(dir: impl Into<PathBuf>, opts: LogOptions) -> Result<EmbeddedLog> {
        let dir = dir.into();
        check_marker(&dir)?;
        let opts = Arc::new(opts);
        let inner = Arc::new(Inner {
            topics: RwLock::new(load_topics(&dir, &opts, true)?),
            groups: Groups::new(dir.join("groups"), false),
            dir,
            opts,
            read_only: true,
            shutdown: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            _lock: None,
        });
        Ok(EmbeddedLog { inner, threads: Vec::new() })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Makes every appended record durable now.
    pub fn flush(&self) -> Result<()> {
        for p in self.inner.all_partitions() {
            p.sync()?;
        }
        Ok(())
    }

    /// Runs retention and a compaction pass on every partition now (compaction regardless of
    /// how dirty the partition is).
    pub fn maintain_now(&self) -> Result<MaintenanceReport> {
        self.inner.maintain(true)
    }

    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>> {
        let t = self.inner.topic(topic)?;
        t.partitions.get(partition as usize).cloned().ok_or_else(|| LogError::UnknownPartition {
            topic: topic.into(),
            partition,
            partitions: t.config.partitions,
        })
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        {
            let (m, cv) = &self.inner.wake;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if !self.inner.read_only {
            // Errors here already poisoned their partition and were reported to any waiter;
            // nothing was acknowledged on their behalf.
            let _ = self.flush();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(LogError::io("starting a background thread", PathBuf::from(name)))
}

impl Inner {
    fn topic(&self, name: &str) -> Result<Arc<TopicEntry>> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.get(name).cloned().ok_or_else(|| LogError::UnknownTopic(name.into()))
    }

    fn all_partitions(&self) -> Vec<Arc<Partition>> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.values().flat_map(|t| t.partitions.iter().cloned()).collect()
    }

    /// Sleeps up to `timeout` or until woken; true when shutting down.
    fn sleep(&self, timeout: Duration) -> bool {
        let (m, cv) = &self.wake;
        let mut woken = m.lock().unwrap_or_else(|e| e.into_inner());
        if !*woken && !self.shutdown.load(Ordering::SeqCst) {
            woken = cv.wait_timeout(woken, timeout).unwrap_or_else(|e| e.into_inner()).0;
        }
        *woken = false;
        self.shutdown.load(Ordering::SeqCst)
    }

    fn maintain(&self, force: bool) -> Result<MaintenanceReport> {
        let mut report = MaintenanceReport::default();
        let now = crate::now_ms();
        for p in self.all_partitions() {
            if self.shutdown.load(Ordering::SeqCst) {
                break;
            }
            report.segments_deleted += p.apply_retention(now)?;
            if p.config.compacted
                && (force || compaction::needs_compaction(&p, self.opts.compaction_min_dirty_ratio))
            {
                let s = compaction::compact(&p, now, force)?;
                let c = &mut report.compaction;
                c.segments_rewritten += s.segments_rewritten;
                c.records_removed += s.records_removed;
                c.bytes_before += s.bytes_before;
                c.bytes_after += s.bytes_after;
            }
        }
        Ok(report)
    }
}

/// With `fsync = "always"`, how soon a batch that no producer awaits is fsynced anyway.
const ALWAYS_SYNC_PERIOD: Duration = Duration::from_millis(10);

fn syncer(inner: &Inner) {
    let period = match inner.opts.fsync {
        FsyncPolicy::Interval => Duration::from_millis(inner.opts.fsync_interval_ms.max(1)),
        _ => ALWAYS_SYNC_PERIOD,
    };
    loop {
        let stopping = inner.sleep(period);
        for p in inner.all_partitions() {
            if p.is_dirty() {
                // A failure poisons the partition; producers waiting on it get the error.
                let _ = p.sync();
            }
        }
        if stopping {
            return;
        }
    }
}

fn maintenance(inner: &Inner) {
    let period = Duration::from_millis(inner.opts.maintenance_interval_ms);
    loop {
        // The wake condvar also fires for appends; sleep out the full period.
        let deadline = std::time::Instant::now() + period;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if inner.shutdown.load(Ordering::SeqCst) {
                return;
            }
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(200)));
        }
        if let Err(e) = inner.maintain(false) {
            tracing::warn!("log maintenance failed (will retry): {e}");
        }
    }
}

impl Log for EmbeddedLog {
    fn create_topic(&self, name: &str, config: &TopicConfig) -> Result<()> {
        validate_topic_name(name)?;
        config.validate()?;
        if self.inner.read_only {
            return Err(LogError::ReadOnly);
        }
        let mut topics = self.inner.topics.write().unwrap_or_else(|e| e.into_inner());
        if topics.contains_key(name) {
            return Err(LogError::TopicExists(name.into()));
        }
        let dir = self.inner.dir.join("topics").join(name);
        let io = |what| LogError::io(what, dir.clone());
        fs::create_dir_all(&dir).map_err(io("creating topic directory"))?;
        let mut partitions = Vec::new();
        for id in 0..config.partitions {
            let p = Partition::open(
                dir.join(id.to_string()),
                name,
                id,
                config.clone(),
                Arc::clone(&self.inner.opts),
                false,
            )?;
            partitions.push(Arc::new(p));
        }
        // topic.json last: a directory without it is an unfinished creation, removed on open.
        let json = serde_json::to_vec_pretty(config)
            .map_err(|e| LogError::InvalidTopicConfig(e.to_string()))?;
        let tmp = dir.join("topic.json.tmp");
        let mut f = File::create(&tmp).map_err(io("writing topic config"))?;
        f.write_all(&json).and_then(|()| f.sync_all()).map_err(io("writing topic config"))?;
        fs::rename(&tmp, dir.join("topic.json")).map_err(io("writing topic config"))?;
        sync_dir(&dir).map_err(io("syncing topic directory"))?;
        sync_dir(&self.inner.dir.join("topics")).map_err(io("syncing topics directory"))?;
        topics.insert(name.into(), Arc::new(TopicEntry { config: config.clone(), partitions }));
        Ok(())
    }

    fn topics(&self) -> Result<Vec<String>> {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        Ok(topics.keys().cloned().collect())
    }

    fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let t = self.inner.topic(name)?;
        let mut partitions = Vec::new();
        for p in &t.partitions {
            p.refresh()?;
            partitions.push(p.describe());
        }
        Ok(TopicDescription { name: name.into(), config: t.config.clone(), partitions })
    }

    fn append(&self, topic: &str, partition: u32, records: &[Record]) -> Result<Appended> {
        // Under `fsync = "always"` the producer awaiting durability runs the fsync itself
        // (sharing it with concurrent producers); the syncer catches batches nobody awaits
        // within `ALWAYS_SYNC_PERIOD`.
        self.partition(topic, partition)?.append(records)
    }

    fn durable_offset(&self, topic: &str, partition: u32) -> Result<u64> {
        let p = self.partition(topic, partition)?;
        p.refresh()?;
        Ok(p.durable_offset())
    }

    fn wait_durable(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        timeout: Duration,
    ) -> Result<()> {
        self.partition(topic, partition)?.wait_durable(offset, timeout)
    }

    fn reader(&self, topic: &str, partition: u32, start: StartAt) -> Result<Box<dyn LogReader>> {
        Ok(Box::new(PartitionReader::new(self.partition(topic, partition)?, start)?))
    }

    fn commit_offsets(&self, group: &str, offsets: &[(String, u32, u64)]) -> Result<()> {
        if self.inner.read_only {
            return Err(LogError::ReadOnly);
        }
        for (topic, partition, _) in offsets {
            self.partition(topic, *partition)?;
        }
        self.inner.groups.commit(group, offsets)
    }

    fn committed_offsets(&self, group: &str, topic: &str) -> Result<BTreeMap<u32, u64>> {
        self.inner.groups.committed(group, topic)
    }
}

/// Creates the data directory (and its marker) if it is new; refuses a directory that has
/// other contents.
fn init_data_dir(dir: &Path) -> Result<()> {
    let io = |what| LogError::io(what, dir);
    fs::create_dir_all(dir).map_err(io("creating the data directory"))?;
    if dir.join(MARKER_FILE).exists() {
        return check_marker(dir);
    }
    let mut entries = fs::read_dir(dir).map_err(io("reading the data directory"))?;
    if let Some(e) = entries.next() {
        let name = e.map_err(io("reading the data directory"))?.file_name();
        return Err(LogError::NotADataDir {
            path: dir.into(),
            reason: format!(
                "it is not empty (it holds {name:?}) and has no {MARKER_FILE}; point data_dir at \
                 an empty or new directory"
            ),
        });
    }
    fs::create_dir_all(dir.join("topics")).map_err(io("creating the data directory"))?;
    let tmp = dir.join(format!("{MARKER_FILE}.tmp"));
    fs::write(&tmp, MARKER).map_err(io("writing the data directory marker"))?;
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(io("writing the data directory marker"))?;
    fs::rename(&tmp, dir.join(MARKER_FILE)).map_err(io("writing the data directory marker"))?;
    sync_dir(dir).map_err(io("syncing the data directory"))
}

fn check_marker(dir: &Path) -> Result<()> {
    let path = dir.join(MARKER_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.exists() => {
            return Err(LogError::NoDataDir { path: dir.into() })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LogError::NotADataDir {
                path: dir.into(),
                reason: format!("it has no {MARKER_FILE}"),
            })
        }
        Err(e) => return Err(LogError::io("reading", path)(e)),
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if v["format"] != "polylog-data" {
        return Err(LogError::NotADataDir {
            path: dir.into(),
            reason: format!("{MARKER_FILE} does not describe Polylog data"),
        });
    }
    if v["version"] != 1 {
        return Err(LogError::NotADataDir {
            path: dir.into(),
            reason: format!(
                "it uses data format version {}, this polylog reads version 1",
                v["version"]
            ),
        });
    }
    Ok(())
}

/// Takes the data directory's lock, or names the process holding it.
fn take_lock(dir: &Path) -> Result<File> {
    let path = dir.join("LOCK");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(LogError::io("opening the lock file", &path))?;
    // A lock can outlive its holder by a moment (a child process forked by the previous holder
    // keeps the descriptor until it execs), so a busy lock is retried briefly before refusing.
    let mut tries = 0;
    let outcome = loop {
        match f.try_lock() {
            Err(fs::TryLockError::WouldBlock) if tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            other => break other,
        }
    };
    match outcome {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = Some(holder.trim().to_string()).filter(|h| !h.is_empty());
            return Err(LogError::Locked { path: dir.into(), holder });
        }
        Err(fs::TryLockError::Error(e)) => return Err(LogError::io("locking", &path)(e)),
    }
    // Who holds the lock is only for the message a second process prints: on a full disk it
    // may not fit, and that must not stop recovery, which frees space.
    let me = format!("pid {}", std::process::id());
    let _ = f.set_len(0).and_then(|()| f.write_all(me.as_bytes()));
    Ok(f)
}

fn load_topics(
    dir: &Path,
    opts: &Arc<LogOptions>,
    read_only: bool,
) -> Result<BTreeMap<String, Arc<TopicEntry>>> {
    let mut topics = BTreeMap::new();
    let root = dir.join("topics");
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(topics),
        Err(e) => return Err(LogError::io("listing topics", &root)(e)),
    };
    for entry in entries {
        let tdir = entry.map_err(LogError::io("listing topics", &root))?.path();
        let Some(name) = tdir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        if validate_topic_name(&name).is_err() || !tdir.is_dir() {
            continue;
        }
        let cfg_path = tdir.join("topic.json");
        let config: TopicConfig = match fs::read(&cfg_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| LogError::Corrupt {
                path: cfg_path.clone(),
                position: 0,
                reason: format!("topic config does not parse: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !read_only {
                    // Creation never finished, so the topic was never reported as created.
                    fs::remove_dir_all(&tdir)
                        .map_err(LogError::io("removing unfinished topic", &tdir))?;
                }
                continue;
            }
            Err(e) => return Err(LogError::io("reading topic config", &cfg_path)(e)),
        };
        let mut partitions = Vec::new();
        for id in 0..config.partitions {
            let pdir = tdir.join(id.to_string());
            let p = Partition::open(pdir, &name, id, config.clone(), Arc::clone(opts), read_only)?;
            partitions.push(Arc::new(p));
        }
        topics.insert(name, Arc::new(TopicEntry { config, partitions }));
    }
    Ok(topics)
}
