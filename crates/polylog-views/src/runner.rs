//! Running a view: reading its topics, grouping changes by source transaction, checkpointing
//! state with input offsets, writing documents.
//!
//! **Transactions.** A CDC source writes each transaction's changes to the table topics and
//! then an END event to its transaction topic, with the number of events per table. The view
//! takes END events in order; for each it applies every change of that transaction from every
//! input partition (partitions are ordered by position, so these are the changes at the head
//! up to the transaction's commit LSN) until the counts are met, and only then rebuilds and
//! emits the affected documents: once per transaction, never half-applied. Snapshot reads and
//! topics without a transaction topic are applied in batches as they come.
//!
//! **Checkpoints.** Changes are applied inside one redb write transaction; every
//! `checkpoint_interval`, between source transactions, the documents written so far are made
//! durable in the log and the redb transaction commits together with the input offsets. After a
//! crash the view resumes from the last checkpoint, re-emits the same documents for what it
//! replays, and ends in the same state as an uninterrupted run.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polylog_log::{
    partition_for_key, GroupMember, Log, LogError, LogReader, Record, StartAt, TopicConfig,
};
use polylog_postgres::source::sibling_topic;
use redb::{Database, Durability};
use serde::Serialize;
use serde_json::Value;

use crate::change::{Change, Op};
use crate::config::ViewConfig;
use crate::core::{store_err, Core, Dirty, Handover, StateTable, STATE};
use crate::spec::{ColumnInfo, ViewSpec};
use crate::ViewError;

/// Changes outside transactions applied before their documents are emitted.
const BATCH_CHANGES: usize = 10_000;
/// Documents gathered before they are appended to the output topic.
const OUTPUT_BATCH: usize = 2_000;
/// Records read from one input at a time.
const READ_BATCH: usize = 1_000;
const DURABLE_TIMEOUT: Duration = Duration::from_secs(60);
pub use polylog_postgres::event::VERSION_HEADER;

#[derive(Debug, Clone)]
pub struct ViewOptions {
    /// Where the view keeps its state (`state.redb`).
    pub state_dir: PathBuf,
    /// How often state and input offsets are committed.
    pub checkpoint_interval: Duration,
    /// How long a transaction may wait for changes its END event announced before it is
    /// applied without them (with a warning); they cannot go missing unless a topic was cut
    /// by retention.
    pub transaction_wait: Duration,
    /// Share the output partitions with other processes running the same view (Kafka group
    /// membership): each emits the documents of the partitions it owns, and emits every
    /// document of a partition it takes over. Every process keeps the whole view's state.
    pub share: bool,
}

impl ViewOptions {
    pub fn new(state_dir: PathBuf) -> Self {
        ViewOptions {
            state_dir,
            checkpoint_interval: Duration::from_millis(500),
            transaction_wait: Duration::from_secs(30),
            share: false,
        }
    }
}

/// What `polylog status` shows for a view.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct ViewStatus {
    /// `starting`, `running`, `stopped` or `failed`.
    pub state: String,
    /// Input records not yet applied.
    pub lag: u64,
    pub changes: u64,
    pub transactions: u64,
    pub documents: u64,
    pub tombstones: u64,
    /// Input records that were not changes (a value that is not JSON, say).
    pub skipped: u64,
    /// Highest source LSN applied.
    pub version: u64,
    /// When the newest input record applied was written to the log (ms since the epoch): how
    /// far behind the view is while it has lag.
    #[serde(default)]
    pub applied_ms: i64,
    /// With shared work: the output partitions this process owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<u32>>,
    pub last_error: Option<String>,
    /// Errors met since start (each retry's cause counts once).
    #[serde(default)]
    pub errors: u64,
}

/// A view over the log.
pub struct View {
    pub spec: ViewSpec,
    log: Arc<dyn Log>,
    opts: ViewOptions,
    pub status: Mutex<ViewStatus>,
}

impl View {
    /// Checks the view's definition (shape only: see [`View::check`]).
    pub fn new(
        name: &str,
        cfg: &ViewConfig,
        log: Arc<dyn Log>,
        opts: ViewOptions,
    ) -> Result<View, ViewError> {
        let spec = ViewSpec::new(name, cfg)?;
        let status = ViewStatus { state: "starting".into(), ..ViewStatus::default() };
        Ok(View { spec, log, opts, status: Mutex::new(status) })
    }

    fn set_status(&self, f: impl FnOnce(&mut ViewStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Checks that the view's topics exist and, where a CDC source recorded their tables'
    /// schemas, that every column it names exists and joined columns compare.
    pub fn check(&self) -> Result<(), ViewError> {
        let topics = self.log.topics()?;
        for n in &self.spec.nodes {
            if !topics.contains(&n.topic) {
                let field = if n.parent.is_none() { "root" } else { "topic" };
                return Err(ViewError::MissingTopic(format!(
                    "`{}.{field}`: topic {:?} does not exist (is the source that writes it configured?)",
                    n.path, n.topic
                )));
            }
        }
        // Each topic's schema history and table name, and what the histories record.
        let mut tables: HashMap<&str, (String, String)> = HashMap::new();
        let mut histories: HashMap<String, HashMap<String, Value>> = HashMap::new();
        for topic in self.spec.topics() {
            let Some((history, table)) = sibling_topic(&topics, topic, "schema-history") else {
                continue;
            };
            if !histories.contains_key(&history) {
                let recorded =
                    polylog_postgres::source::read_recorded_schemas(&*self.log, &history)?;
                histories.insert(history.clone(), recorded);
            }
            tables.insert(topic, (history, table));
        }
        self.spec.check_columns(|topic| {
            let (history, table) = tables.get(topic)?;
            let columns = histories.get(history)?.get(table)?;
            Some(
                columns
                    .as_array()?
                    .iter()
                    .filter(|c| c["excluded"] != Value::Bool(true))
                    .map(|c| ColumnInfo {
                        name: c["name"].as_str().unwrap_or_default().to_string(),
                        type_name: c["type"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect(),
            )
        })
    }

    /// Runs until `stop` is set or an error.
    pub fn run(&self, stop: &AtomicBool) -> Result<(), ViewError> {
        let r = self.run_inner(stop);
        match &r {
            Ok(()) => self.set_status(|s| s.state = "stopped".into()),
            Err(e) => self.set_status(|s| {
                s.state = "failed".into();
                s.last_error = Some(e.to_string());
                s.errors += 1;
            }),
        }
        r
    }

    fn run_inner(&self, stop: &AtomicBool) -> Result<(), ViewError> {
        self.check()?;
        let db = self.open_state()?;
        let out_topic = self.spec.output_topic();
        let root_partitions = self.log.describe_topic(&self.spec.nodes[0].topic)?.partitions.len();
        let config = TopicConfig::new(root_partitions.max(1) as u32).compacted();
        // Created only when missing: a cluster may let the view write a topic it may not create.
        match self.log.describe_topic(&out_topic) {
            Ok(_) => {}
            Err(LogError::UnknownTopic(_)) => match self.log.create_topic(&out_topic, &config) {
                Ok(()) | Err(LogError::TopicExists(_)) => {}
                Err(e) => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        }
        let out_partitions = self.log.describe_topic(&out_topic)?.partitions.len().max(1) as u32;
        let offsets = read_offsets(&db)?;
        let mut w = Worker::new(self, offsets, out_topic, out_partitions)?;
        self.set_status(|s| s.state = "running".into());
        let mut last_lag = Instant::now();
        loop {
            let mut wtx = db.begin_write().map_err(store_err)?;
            wtx.set_durability(Durability::Immediate);
            let started = Instant::now();
            let mut stopping = false;
            let applied_before = w.applied;
            {
                let mut t = wtx.open_table(STATE).map_err(store_err)?;
                loop {
                    if stop.load(Ordering::SeqCst) {
                        stopping = true;
                        break;
                    }
                    if w.open.is_none() && !w.check_membership(&mut t)? {
                        if started.elapsed() >= self.opts.checkpoint_interval {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    let progressed = w.step(&mut t)?;
                    if w.open.is_none() && started.elapsed() >= self.opts.checkpoint_interval {
                        break;
                    }
                    if !progressed {
                        w.flush_output()?;
                        if last_lag.elapsed() >= Duration::from_secs(1) {
                            w.update_lag()?;
                            w.attach_feeds()?;
                            last_lag = Instant::now();
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                if w.open.is_some() {
                    // Stopping inside a transaction: what it applied rolls back with this
                    // checkpoint's work, which is read again on the next start.
                    drop(t);
                    wtx.abort().map_err(store_err)?;
                    return Ok(());
                }
                if w.applied != applied_before {
                    w.save_offsets(&mut t)?;
                }
            }
            if w.applied == applied_before {
                wtx.abort().map_err(store_err)?;
            } else {
                w.flush_output()?;
                w.wait_output_durable()?;
                polylog_log::failpoint::check("state.commit").map_err(store_err)?;
                wtx.commit().map_err(store_err)?;
                w.update_lag()?;
                last_lag = Instant::now();
            }
            if stopping {
                return Ok(());
            }
        }
    }

    /// Opens the state store; a changed view definition starts over from empty state.
    fn open_state(&self) -> Result<Database, ViewError> {
        std::fs::create_dir_all(&self.opts.state_dir).map_err(store_err)?;
        let path = self.opts.state_dir.join("state.redb");
        let open = || {
            Database::builder()
                .set_cache_size(self.spec.cache_mb as usize * 1024 * 1024)
                .create(&path)
                .map_err(store_err)
        };
        let mut db = open()?;
        let stored = {
            let rtx = db.begin_read().map_err(store_err)?;
            match rtx.open_table(STATE) {
                Ok(t) => t.get(&b"Mspec"[..]).map_err(store_err)?.map(|v| v.value().to_vec()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(store_err(e)),
            }
        };
        let fingerprint = self.spec.fingerprint.as_bytes();
        if stored.as_deref() != Some(fingerprint) {
            if stored.is_some() {
                tracing::info!(
                    "view {}: its definition changed; rebuilding it from the beginning of its topics",
                    self.spec.name
                );
                drop(db);
                std::fs::remove_file(&path).map_err(store_err)?;
                db = open()?;
            }
            let wtx = db.begin_write().map_err(store_err)?;
            {
                let mut t = wtx.open_table(STATE).map_err(store_err)?;
                t.insert(&b"Mspec"[..], fingerprint).map_err(store_err)?;
            }
            wtx.commit().map_err(store_err)?;
        }
        Ok(db)
    }
}

#[derive(Default, Serialize, serde::Deserialize)]
struct Offsets {
    /// Next offset to read, by `topic/partition`.
    inputs: BTreeMap<String, u64>,
    /// Highest commit LSN of a transaction's change applied, by `topic/partition`.
    #[serde(default)]
    orders: BTreeMap<String, u64>,
    /// Next offset to read, by transaction topic.
    feeds: BTreeMap<String, u64>,
    /// Commit LSN up to which transactions are applied, by transaction topic.
    #[serde(default)]
    done: BTreeMap<String, u64>,
}

fn read_offsets(db: &Database) -> Result<Offsets, ViewError> {
    let rtx = db.begin_read().map_err(store_err)?;
    let t = rtx.open_table(STATE).map_err(store_err)?;
    let Some(v) = t.get(&b"Moffsets"[..]).map_err(store_err)? else {
        return Ok(Offsets::default());
    };
    serde_json::from_slice(v.value()).map_err(store_err)
}

struct Input {
    topic: String,
    partition: u32,
    partitions: u32,
    nodes: Vec<usize>,
    /// The transaction topic (index into the feeds) and this table's name in its END events.
    tx: Option<(usize, String)>,
    reader: Box<dyn LogReader>,
    buf: VecDeque<Change>,
    /// Offset after the last applied record.
    applied: u64,
    /// Highest commit LSN among the transactions' changes applied.
    last_tx: u64,
    warned: bool,
}

/// A source's transaction topic.
struct Feed {
    topic: String,
    reader: Box<dyn LogReader>,
    buf: VecDeque<polylog_log::StoredRecord>,
    consumed: u64,
    /// Transactions committed at or below this LSN are applied.
    done: u64,
}

/// A transaction being applied.
struct Open {
    feed: usize,
    commit: u64,
    counts: BTreeMap<String, u64>,
    seen: BTreeMap<String, u64>,
    since: Instant,
}

struct Worker<'v> {
    view: &'v View,
    core: Core<'v>,
    inputs: Vec<Input>,
    feeds: Vec<Feed>,
    open: Option<Open>,
    dirty: Dirty,
    out_topic: String,
    out_partitions: u32,
    pending: BTreeMap<u32, Vec<Record>>,
    pending_n: usize,
    out_ends: HashMap<u32, u64>,
    /// Input records applied (moves with every record, for deciding to checkpoint).
    applied: u64,
    /// Alternates between changes outside transactions and the next transaction, so neither
    /// starves the other.
    transaction_first: bool,
    saved: Offsets,
    /// With `share`: this process's place in the view's group, the output partitions it
    /// owns, and when it last asked.
    member: Option<Box<dyn GroupMember>>,
    owned: Option<BTreeSet<u32>>,
    member_checked: Option<Instant>,
    /// The inputs' ends when the view started: with `share`, it joins its group once it
    /// has applied them.
    join_at: Option<Vec<u64>>,
}

impl<'v> Worker<'v> {
    fn new(
        view: &'v View,
        offsets: Offsets,
        out_topic: String,
        out_partitions: u32,
    ) -> Result<Worker<'v>, ViewError> {
        let log = &view.log;
        let mut inputs = Vec::new();
        for topic in view.spec.topics() {
            let partitions = log.describe_topic(topic)?.partitions.len() as u32;
            for p in 0..partitions {
                let name = format!("{topic}/{p}");
                let at = offsets.inputs.get(&name).copied();
                inputs.push(Input {
                    topic: topic.to_string(),
                    partition: p,
                    partitions,
                    nodes: view.spec.nodes_of(topic),
                    tx: None,
                    reader: log.reader(topic, p, at.map_or(StartAt::Beginning, StartAt::Offset))?,
                    buf: VecDeque::new(),
                    applied: at.unwrap_or(0),
                    last_tx: offsets.orders.get(&name).copied().unwrap_or(0),
                    warned: false,
                });
            }
        }
        let mut w = Worker {
            view,
            core: Core { spec: &view.spec },
            inputs,
            feeds: Vec::new(),
            open: None,
            dirty: Dirty::default(),
            out_topic,
            out_partitions,
            pending: BTreeMap::new(),
            pending_n: 0,
            out_ends: HashMap::new(),
            applied: 0,
            transaction_first: false,
            saved: offsets,
            member: None,
            owned: view.opts.share.then(BTreeSet::new),
            member_checked: None,
            join_at: None,
        };
        w.attach_feeds()?;
        Ok(w)
    }

    /// Finds the transaction topics of inputs that have none yet (a source may create it a
    /// moment after its table topics). A transaction topic found late is read from where
    /// the view's changes already are: older transactions count as applied.
    fn attach_feeds(&mut self) -> Result<(), ViewError> {
        if self.inputs.iter().all(|i| i.tx.is_some()) {
            return Ok(());
        }
        let topics = self.view.log.topics()?;
        for i in 0..self.inputs.len() {
            if self.inputs[i].tx.is_some() {
                continue;
            }
            let Some((feed_topic, table)) =
                sibling_topic(&topics, &self.inputs[i].topic, "transaction")
            else {
                continue;
            };
            let f = match self.feeds.iter().position(|f| f.topic == feed_topic) {
                Some(f) => f,
                None => {
                    let at = self.saved.feeds.get(&feed_topic).copied();
                    let start = at.map_or(StartAt::Beginning, StartAt::Offset);
                    let done = match self.saved.done.get(&feed_topic) {
                        Some(&d) => d,
                        None => self.inputs.iter().map(|i| i.last_tx).max().unwrap_or(0),
                    };
                    self.feeds.push(Feed {
                        reader: self.view.log.reader(&feed_topic, 0, start)?,
                        topic: feed_topic,
                        buf: VecDeque::new(),
                        consumed: at.unwrap_or(0),
                        done,
                    });
                    self.feeds.len() - 1
                }
            };
            self.inputs[i].tx = Some((f, table));
        }
        Ok(())
    }

    fn head(&mut self, i: usize) -> Result<Option<&Change>, ViewError> {
        let input = &mut self.inputs[i];
        if input.buf.is_empty() {
            input.buf.extend(
                input.reader.poll(READ_BATCH, Duration::ZERO)?.into_iter().map(Change::parse),
            );
        }
        Ok(input.buf.front())
    }

    /// Applies at most one unit of work: a batch of changes outside transactions, or (part of)
    /// the next source transaction. Returns whether anything moved.
    fn step(&mut self, t: &mut StateTable<'_>) -> Result<bool, ViewError> {
        if self.open.is_some() {
            return self.continue_transaction(t);
        }
        self.transaction_first = !self.transaction_first;
        let tx_first = self.transaction_first;
        let moved = if tx_first { self.open_transaction(t)? } else { self.apply_batch(t)? };
        if moved {
            return Ok(true);
        }
        if tx_first {
            self.apply_batch(t)
        } else {
            self.open_transaction(t)
        }
    }

    /// The next END event of a transaction topic (earlier records, BEGIN events, are passed).
    fn next_end(&mut self, f: usize) -> Result<Option<End>, ViewError> {
        let feed = &mut self.feeds[f];
        loop {
            if feed.buf.is_empty() {
                feed.buf.extend(feed.reader.poll(READ_BATCH, Duration::ZERO)?);
            }
            let Some(r) = feed.buf.front() else { return Ok(None) };
            if let Some(end) = parse_end(r) {
                return Ok(Some(end));
            }
            feed.consumed = r.offset + 1;
            feed.buf.pop_front();
        }
    }

    /// Applies the changes at the inputs' heads that belong to no pending transaction.
    fn apply_batch(&mut self, t: &mut StateTable<'_>) -> Result<bool, ViewError> {
        let mut next_end = Vec::with_capacity(self.feeds.len());
        for f in 0..self.feeds.len() {
            next_end.push(self.next_end(f)?.map(|(commit, _)| commit));
        }
        let mut n = 0;
        let mut version = 0;
        for i in 0..self.inputs.len() {
            let feed = self.inputs[i].tx.as_ref().map(|(f, _)| *f);
            while n < BATCH_CHANGES {
                let Some(c) = self.head(i)? else { break };
                let ready = match (feed, c.commit) {
                    (None, _) => true,
                    // A snapshot read: before the transaction that follows its position.
                    (Some(f), None) => c.order == 0 || next_end[f].is_none_or(|e| e >= c.order),
                    // A straggler of a transaction already applied.
                    (Some(f), Some(commit)) => commit <= self.feeds[f].done,
                };
                if !ready {
                    break;
                }
                let c = self.inputs[i].buf.pop_front().ok_or_else(|| store_err("empty input"))?;
                version = version.max(c.lsn);
                self.apply(t, i, c)?;
                n += 1;
            }
        }
        if n > 0 {
            self.finish(t, version)?;
        }
        Ok(n > 0)
    }

    fn open_transaction(&mut self, t: &mut StateTable<'_>) -> Result<bool, ViewError> {
        for f in 0..self.feeds.len() {
            if let Some((commit, counts)) = self.next_end(f)? {
                let counts = counts
                    .into_iter()
                    .map(|(k, v)| (polylog_postgres::source::topic_safe(&k), v))
                    .collect();
                self.open = Some(Open {
                    feed: f,
                    commit,
                    counts,
                    seen: BTreeMap::new(),
                    since: Instant::now(),
                });
                self.continue_transaction(t)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn continue_transaction(&mut self, t: &mut StateTable<'_>) -> Result<bool, ViewError> {
        let Some(open) = self.open.as_ref() else { return Ok(false) };
        let (feed, commit) = (open.feed, open.commit);
        let mut progressed = false;
        let mut beyond = vec![false; self.inputs.len()];
        #[allow(clippy::needless_range_loop)] // `head` and `apply` borrow `self` mutably
        for i in 0..self.inputs.len() {
            if self.inputs[i].tx.as_ref().map(|(f, _)| *f) != Some(feed) {
                continue;
            }
            loop {
                match self.head(i)? {
                    None => break,
                    Some(c) if c.order > commit => {
                        beyond[i] = true;
                        break;
                    }
                    Some(_) => {}
                }
                let c = self.inputs[i].buf.pop_front().ok_or_else(|| store_err("empty input"))?;
                if c.counted && c.commit == Some(commit) {
                    let table =
                        self.inputs[i].tx.as_ref().map(|(_, t)| t.clone()).unwrap_or_default();
                    if let Some(open) = self.open.as_mut() {
                        *open.seen.entry(table).or_default() += 1;
                    }
                }
                self.apply(t, i, c)?;
                progressed = true;
            }
        }
        let Some(open) = self.open.as_ref() else { return Ok(progressed) };
        let already = commit <= self.feeds[feed].done;
        let complete = already
            || open.counts.iter().all(|(table, &n)| {
                let ours: Vec<usize> = (0..self.inputs.len())
                    .filter(|&i| {
                        self.inputs[i].tx.as_ref().is_some_and(|(f, t)| *f == feed && t == table)
                    })
                    .collect();
                ours.is_empty()
                    || open.seen.get(table).copied().unwrap_or(0) >= n
                    || ours.iter().all(|&i| beyond[i])
            });
        if !complete && open.since.elapsed() < self.view.opts.transaction_wait {
            return Ok(progressed);
        }
        if !complete {
            tracing::warn!(
                "view {}: transaction {} announced changes that did not arrive within {:?}; applying it without them",
                self.view.spec.name, commit, self.view.opts.transaction_wait
            );
        }
        self.finish(t, commit)?;
        let f = &mut self.feeds[feed];
        if let Some(r) = f.buf.pop_front() {
            f.consumed = r.offset + 1;
        }
        f.done = f.done.max(commit);
        self.open = None;
        if !already {
            self.view.set_status(|s| s.transactions += 1);
        }
        Ok(true)
    }

    fn apply(&mut self, t: &mut StateTable<'_>, i: usize, c: Change) -> Result<(), ViewError> {
        let input = &mut self.inputs[i];
        input.applied = c.offset + 1;
        if let Some(commit) = c.commit {
            input.last_tx = input.last_tx.max(commit);
        }
        self.applied += 1;
        if let Op::Skip(why) = &c.op {
            if !input.warned {
                input.warned = true;
                tracing::warn!(
                    "view {}: skipping record {} of {}/{}: {why} (further ones are counted in status)",
                    self.view.spec.name, c.offset, input.topic, input.partition
                );
            }
            self.view.set_status(|s| s.skipped += 1);
            return Ok(());
        }
        for &node in &input.nodes {
            match &c.op {
                Op::Set(row) => self.core.apply(t, &mut self.dirty, node, &c.key, Some(row))?,
                Op::Delete => self.core.apply(t, &mut self.dirty, node, &c.key, None)?,
                Op::Truncate => {
                    let partition = Some((input.partition, input.partitions));
                    self.core.truncate(t, &mut self.dirty, node, partition)?
                }
                Op::Skip(_) => {}
            }
        }
        self.view.set_status(|s| {
            s.changes += 1;
            s.version = s.version.max(c.lsn);
            s.applied_ms = s.applied_ms.max(c.timestamp_ms);
        });
        Ok(())
    }

    /// Emits the documents of every root the applied changes touched.
    fn finish(&mut self, t: &mut StateTable<'_>, version: u64) -> Result<(), ViewError> {
        while !self.dirty.is_empty() {
            let docs = self.core.emit(t, &mut self.dirty, version, OUTPUT_BATCH)?;
            let (mut documents, mut tombstones) = (0, 0);
            for (key, doc) in docs {
                let p = partition_for_key(&key, self.out_partitions);
                if !self.owns(p) {
                    self.core.skipped(t, &key, doc.is_none().then_some(version))?;
                    continue;
                }
                let record = match doc {
                    Some(d) => {
                        documents += 1;
                        Record::new(key, d)
                    }
                    None => {
                        tombstones += 1;
                        tombstone(key, version)
                    }
                };
                self.queue(p, record);
            }
            self.view.set_status(|s| {
                s.documents += documents;
                s.tombstones += tombstones;
            });
            if self.pending_n >= OUTPUT_BATCH {
                self.flush_output()?;
            }
        }
        Ok(())
    }

    /// Adds a record to what the next flush appends to output partition `p`.
    fn queue(&mut self, p: u32, record: Record) {
        self.pending.entry(p).or_default().push(record);
        self.pending_n += 1;
    }

    fn owns(&self, p: u32) -> bool {
        self.owned.as_ref().is_none_or(|o| o.contains(&p))
    }

    /// With `share`, between transactions: asks the group which output partitions this
    /// process owns (at most every 200 ms) and writes every document of partitions it just
    /// took over. `false` while the group rebalances: nothing may be applied until it is done,
    /// or documents of partitions changing hands could be emitted by nobody.
    fn check_membership(&mut self, t: &mut StateTable<'_>) -> Result<bool, ViewError> {
        if !self.view.opts.share
            || self.member_checked.is_some_and(|at| at.elapsed() < Duration::from_millis(200))
        {
            return Ok(true);
        }
        if self.member.is_none() {
            // Join once caught up with what the inputs held when the view started: a process
            // taking partitions over writes its documents, which must not be those of a state
            // still replaying old changes.
            if self.join_at.is_none() {
                let mut ends = Vec::with_capacity(self.inputs.len());
                for i in &self.inputs {
                    ends.push(self.view.log.durable_offset(&i.topic, i.partition)?);
                }
                self.join_at = Some(ends);
            }
            let caught_up = self
                .join_at
                .as_ref()
                .is_some_and(|ends| self.inputs.iter().zip(ends).all(|(i, &end)| i.applied >= end));
            if !caught_up {
                self.member_checked = Some(Instant::now());
                return Ok(true);
            }
            let group = format!("polylog.view.{}", self.view.spec.name);
            let topics = std::slice::from_ref(&self.out_topic);
            self.member = Some(self.view.log.join_group(&group, topics)?);
        }
        // Nothing buffered may reach the output after this process lets a partition go: the
        // next owner's documents must come last.
        self.flush_output()?;
        self.wait_output_durable()?;
        let Some(member) = self.member.as_mut() else { return Ok(true) };
        let owned = member.owned(&*self.view.log)?;
        let Some(owned) = owned else {
            self.member_checked = None;
            self.view.set_status(|s| s.state = "rebalancing".into());
            return Ok(false);
        };
        self.member_checked = Some(Instant::now());
        let owned: BTreeSet<u32> =
            owned.into_iter().filter(|(t, _)| *t == self.out_topic).map(|(_, p)| p).collect();
        let before = self.owned.replace(owned.clone()).unwrap_or_default();
        let gained: BTreeSet<u32> = owned.difference(&before).copied().collect();
        self.view.set_status(|s| {
            s.state = "running".into();
            s.partitions = Some(owned.iter().copied().collect());
        });
        if !gained.is_empty() {
            self.hand_over(t, &gained)?;
        }
        Ok(true)
    }

    /// Writes every document (and every deletion not yet written) of output partitions this
    /// process took over: whatever their previous owner had not written yet is then there.
    fn hand_over(
        &mut self,
        t: &mut StateTable<'_>,
        gained: &BTreeSet<u32>,
    ) -> Result<(), ViewError> {
        let parts = self.out_partitions;
        let mine = |pk: &[u8]| gained.contains(&partition_for_key(pk, parts));
        let mut cursor = Vec::new();
        let mut written = 0u64;
        loop {
            let (batch, next) = self.core.handover(t, &cursor, OUTPUT_BATCH, &mine)?;
            for h in batch {
                let record = match h {
                    Handover::Document(pk, doc) => Record::new(pk, doc),
                    Handover::Deleted(pk, version) => tombstone(pk, version),
                };
                let key = record.key.as_deref().unwrap_or_default();
                self.queue(partition_for_key(key, parts), record);
                written += 1;
            }
            if self.pending_n >= OUTPUT_BATCH {
                self.flush_output()?;
            }
            match next {
                Some(c) => cursor = c,
                None => break,
            }
        }
        self.flush_output()?;
        tracing::info!(
            "view {}: took over output partitions {gained:?}: wrote their {written} documents",
            self.view.spec.name
        );
        Ok(())
    }

    fn flush_output(&mut self) -> Result<(), ViewError> {
        for (&p, batch) in self.pending.iter_mut() {
            if batch.is_empty() {
                continue;
            }
            let a = self.view.log.append(&self.out_topic, p, batch)?;
            self.out_ends.insert(p, a.last_offset + 1);
            batch.clear();
        }
        self.pending_n = 0;
        Ok(())
    }

    fn wait_output_durable(&mut self) -> Result<(), ViewError> {
        for (p, end) in self.out_ends.drain() {
            self.view.log.wait_durable(&self.out_topic, p, end, DURABLE_TIMEOUT)?;
        }
        Ok(())
    }

    fn save_offsets(&self, t: &mut StateTable<'_>) -> Result<(), ViewError> {
        let name = |i: &Input| format!("{}/{}", i.topic, i.partition);
        let offsets = Offsets {
            inputs: self.inputs.iter().map(|i| (name(i), i.applied)).collect(),
            orders: self.inputs.iter().map(|i| (name(i), i.last_tx)).collect(),
            feeds: self.feeds.iter().map(|f| (f.topic.clone(), f.consumed)).collect(),
            done: self.feeds.iter().map(|f| (f.topic.clone(), f.done)).collect(),
        };
        let bytes = serde_json::to_vec(&offsets).map_err(store_err)?;
        t.insert(&b"Moffsets"[..], bytes.as_slice()).map_err(store_err)?;
        Ok(())
    }

    fn update_lag(&self) -> Result<(), ViewError> {
        let mut lag = 0;
        for i in &self.inputs {
            let end = self.view.log.durable_offset(&i.topic, i.partition)?;
            lag += end.saturating_sub(i.applied);
        }
        self.view.set_status(|s| s.lag = lag);
        Ok(())
    }
}

/// A root's tombstone. It has no `_version`: a header says which change removed it.
fn tombstone(key: Vec<u8>, version: u64) -> Record {
    let mut t = Record::tombstone(key);
    t.headers.push((VERSION_HEADER.into(), version.to_string().into_bytes()));
    t
}

/// A transaction topic's END event: the commit LSN and the number of changes per table.
type End = (u64, BTreeMap<String, u64>);

fn parse_end(r: &polylog_log::StoredRecord) -> Option<End> {
    let v: Value = serde_json::from_slice(r.value.as_deref()?).ok()?;
    if v["status"] != "END" {
        return None;
    }
    let commit = v["id"].as_str()?.rsplit(':').next()?.parse().ok()?;
    let counts = v["data_collections"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| {
                    Some((c["data_collection"].as_str()?.to_string(), c["event_count"].as_u64()?))
                })
                .collect()
        })
        .unwrap_or_default();
    Some((commit, counts))
}
