//! Running a sink: its topics (patterns, re-resolved as topics appear), read from the
//! consumer group `sink.<name>`, written in batches, offsets committed after each write.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polylog_log::{GroupMember, Log, LogReader, StartAt};
use polylog_postgres::config::glob_match;
use serde::{Deserialize, Serialize};

use crate::config::SinkConfig;
use crate::search::{SearchIndex, SearchIndexes, SearchWriter};
use crate::{Item, SinkError, Writer};

/// Topics are looked up again this often, so a sink picks up topics created after it started.
const TOPICS_REFRESH: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What `polylog status` shows for a sink.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SinkStatus {
    /// `starting`, `running`, `retrying`, `stopped` or `failed`.
    pub state: String,
    /// Records in its topics not yet written.
    pub lag: u64,
    /// When `lag` was measured (ms since the epoch).
    #[serde(default)]
    pub lag_ms: i64,
    pub records: u64,
    pub batches: u64,
    /// When the newest record written was appended to the log (ms since the epoch): how far
    /// behind the sink is while it has lag.
    #[serde(default)]
    pub written_ms: i64,
    /// Records the target rejected, written to the dead-letter topic.
    #[serde(default)]
    pub dead_letters: u64,
    pub topics: Vec<String>,
    pub last_error: Option<String>,
    /// Errors met since start (each retry's cause counts once).
    #[serde(default)]
    pub errors: u64,
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy)]
pub enum StartFrom {
    Beginning,
    /// The first record at or after this time (ms since the epoch).
    Time(i64),
}

pub struct Sink {
    pub name: String,
    pub cfg: SinkConfig,
    log: Arc<dyn Log>,
    pub status: Mutex<SinkStatus>,
    /// Where `search` sinks keep their index (`<dir>/<name>`), and the process's indexes.
    search: Option<(PathBuf, SearchIndexes)>,
    dead_letters: Arc<std::sync::atomic::AtomicU64>,
    /// Share the topics' partitions with other processes running this sink (group
    /// `sink.<name>.members`): each writes the partitions it owns.
    share: bool,
}

/// A sink process's membership in the group sharing the sink's partitions.
#[derive(Default)]
struct Share {
    /// The membership, and the topics it was joined with.
    member: Option<(Vec<String>, Box<dyn GroupMember>)>,
    /// The partitions owned; `None` until known (and while the group rebalances).
    owned: Option<BTreeSet<(String, u32)>>,
    asked: Option<Instant>,
    topics_at: Option<Instant>,
}

struct Input {
    topic: String,
    partition: u32,
    reader: Box<dyn LogReader>,
}

impl Sink {
    pub fn new(name: &str, cfg: SinkConfig, log: Arc<dyn Log>) -> Result<Sink, SinkError> {
        cfg.validate().map_err(|e| {
            SinkError::Config(format!("`sinks.{name}.{}", e.trim_start_matches('`')))
        })?;
        let status = SinkStatus { state: "starting".into(), ..SinkStatus::default() };
        Ok(Sink {
            name: name.to_string(),
            cfg,
            log,
            status: Mutex::new(status),
            search: None,
            dead_letters: Arc::default(),
            share: false,
        })
    }

    /// Shares the sink's partitions with the other processes that run it (Kafka group
    /// membership): each process writes the partitions it owns and takes over those of a
    /// process that stops, from the group's committed offsets.
    pub fn shared(mut self, share: bool) -> Sink {
        self.share = share;
        self
    }

    /// Where a `search` sink keeps its index (`<dir>/<name>`), and the registry the API
    /// serves indexes from.
    pub fn with_search(mut self, dir: PathBuf, indexes: SearchIndexes) -> Sink {
        self.search = Some((dir, indexes));
        self
    }

    /// The index of a `search` sink (opened and registered on first use).
    pub fn search_index(&self) -> Result<Arc<SearchIndex>, SinkError> {
        let Some((dir, indexes)) = &self.search else {
            return Err(SinkError::Config(format!(
                "sink {}: no directory for its search index",
                self.name
            )));
        };
        let mut map = indexes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ix) = map.get(&self.name) {
            return Ok(Arc::clone(ix));
        }
        let ix = Arc::new(SearchIndex::open(&self.name, &dir.join(&self.name))?);
        map.insert(self.name.clone(), Arc::clone(&ix));
        Ok(ix)
    }

    /// The consumer group holding the sink's offsets.
    pub fn group(&self) -> String {
        format!("sink.{}", self.name)
    }

    fn set_status(&self, f: impl FnOnce(&mut SinkStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn writer(&self) -> Result<Box<dyn Writer>, SinkError> {
        Ok(match &self.cfg {
            SinkConfig::Postgres(p) => {
                Box::new(crate::postgres::PostgresWriter::new(p.clone(), Arc::clone(&self.log)))
            }
            SinkConfig::File(f) => Box::new(crate::file::FileWriter::new(f.clone())),
            SinkConfig::Elasticsearch(e) => {
                Box::new(crate::elasticsearch::ElasticsearchWriter::new(
                    &self.name,
                    e.clone(),
                    Arc::clone(&self.log),
                    Arc::clone(&self.dead_letters),
                )?)
            }
            SinkConfig::Search(_) => Box::new(SearchWriter::new(self.search_index()?)),
        })
    }

    fn batch_rows(&self) -> usize {
        match &self.cfg {
            SinkConfig::Postgres(p) => p.batch_rows,
            _ => 5_000,
        }
    }

    /// The topics the sink's patterns match now.
    pub fn topics(&self) -> Result<Vec<String>, SinkError> {
        let patterns = self.cfg.topics();
        Ok(self
            .log
            .topics()?
            .into_iter()
            .filter(|t| patterns.iter().any(|p| glob_match(p, t)))
            .collect())
    }

    /// Moves the sink's offsets back (or forward) to `from`, for a replay.
    pub fn reset(&self, from: StartFrom) -> Result<(), SinkError> {
        let mut offsets = Vec::new();
        for topic in self.topics()? {
            let d = self.log.describe_topic(&topic)?;
            for p in &d.partitions {
                let at = match from {
                    StartFrom::Beginning => p.start_offset,
                    StartFrom::Time(ms) => {
                        self.log.reader(&topic, p.partition, StartAt::Timestamp(ms))?.position()
                    }
                };
                offsets.push((topic.clone(), p.partition, at));
            }
        }
        self.log.commit_offsets(&self.group(), &offsets)?;
        Ok(())
    }

    /// Records not yet written, and records in the sink's topics.
    pub fn lag(&self) -> Result<(u64, u64), SinkError> {
        let (mut lag, mut total) = (0, 0);
        for topic in self.topics()? {
            let committed = self.log.committed_offsets(&self.group(), &topic)?;
            for p in self.log.describe_topic(&topic)?.partitions {
                let at = committed
                    .get(&p.partition)
                    .copied()
                    .unwrap_or(p.start_offset)
                    .max(p.start_offset);
                lag += p.durable_offset.saturating_sub(at);
                total += p.durable_offset.saturating_sub(p.start_offset);
            }
        }
        Ok((lag, total))
    }

    /// Runs until `stop` is set or a fatal error; with `until_caught_up`, returns once every
    /// record durable at the start is written.
    pub fn run(&self, stop: &AtomicBool, until_caught_up: bool) -> Result<(), SinkError> {
        let r = self.run_inner(stop, until_caught_up);
        self.set_status(|s| match &r {
            Ok(()) => s.state = "stopped".into(),
            Err(e) => {
                s.state = "failed".into();
                s.last_error = Some(e.to_string());
                s.errors += 1;
            }
        });
        r
    }

    fn run_inner(&self, stop: &AtomicBool, until_caught_up: bool) -> Result<(), SinkError> {
        let mut writer = self.writer()?;
        let mut inputs: Vec<Input> = Vec::new();
        let mut targets: BTreeMap<(String, u32), u64> = BTreeMap::new();
        let mut refreshed: Option<Instant> = None;
        let mut lag_at = Instant::now();
        let mut share = (self.share && !until_caught_up).then(Share::default);
        self.set_status(|s| s.state = "running".into());
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if let Some(sh) = share.as_mut() {
                if !self.share_poll(sh, &mut inputs, &mut refreshed)? {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
            if refreshed.is_none_or(|r| r.elapsed() >= TOPICS_REFRESH) {
                self.open_new_inputs(
                    &mut inputs,
                    &mut targets,
                    until_caught_up && refreshed.is_none(),
                    share.as_ref().and_then(|sh| sh.owned.as_ref()),
                )?;
                refreshed = Some(Instant::now());
            }
            let mut batch: Vec<Item> = Vec::new();
            // Each round starts at the next input, so a partition with a backlog does not keep
            // the others waiting.
            if !inputs.is_empty() {
                inputs.rotate_left(1);
            }
            for input in &mut inputs {
                let room = self.batch_rows().saturating_sub(batch.len());
                if room == 0 {
                    break;
                }
                for record in input.reader.poll(room, Duration::ZERO)? {
                    batch.push(Item { topic: input.topic.clone(), record });
                }
            }
            if batch.is_empty() {
                if until_caught_up
                    && inputs.iter().all(|i| {
                        targets
                            .get(&(i.topic.clone(), i.partition))
                            .is_none_or(|&t| i.reader.position() >= t)
                    })
                {
                    return Ok(());
                }
                self.refresh_lag(&mut lag_at)?;
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            if !self.write_with_retry(&mut *writer, &batch, stop)? {
                return Ok(()); // stopped while the target was failing: nothing committed
            }
            let mut ends: BTreeMap<(String, u32), u64> = BTreeMap::new();
            for item in &batch {
                ends.insert((item.topic.clone(), item.record.partition), item.record.offset + 1);
            }
            let mut offsets: Vec<(String, u32, u64)> =
                ends.into_iter().map(|((t, p), o)| (t, p, o)).collect();
            if let Some(sh) = share.as_mut() {
                // The write may have outlasted this process's hold on some partitions: their
                // offsets are the new owner's to commit (what was written again is absorbed
                // by the target's versioning).
                sh.asked = None;
                self.share_poll(sh, &mut inputs, &mut refreshed)?;
                let owned = sh.owned.clone().unwrap_or_default();
                offsets.retain(|(t, p, _)| owned.contains(&(t.clone(), *p)));
            }
            self.log.commit_offsets(&self.group(), &offsets)?;
            let n = batch.len() as u64;
            let newest = batch.iter().map(|i| i.record.timestamp_ms).max().unwrap_or(0);
            let dead = self.dead_letters.load(Ordering::SeqCst);
            self.set_status(|s| {
                s.written_ms = s.written_ms.max(newest);
                s.records += n;
                s.batches += 1;
                s.dead_letters = dead;
                s.state = "running".into();
            });
            self.refresh_lag(&mut lag_at)?;
        }
    }

    /// With `share`: asks the group (at most every 200 ms) which partitions this process
    /// owns, drops the inputs of partitions it lost and has those it gained opened (from the
    /// group's committed offsets). `false` while the group rebalances: hold nothing.
    fn share_poll(
        &self,
        sh: &mut Share,
        inputs: &mut Vec<Input>,
        refreshed: &mut Option<Instant>,
    ) -> Result<bool, SinkError> {
        if sh.asked.is_some_and(|a| a.elapsed() < Duration::from_millis(200)) {
            return Ok(true);
        }
        if sh.topics_at.is_none_or(|t| t.elapsed() >= TOPICS_REFRESH) {
            let topics = self.topics()?;
            sh.topics_at = Some(Instant::now());
            if sh.member.as_ref().map(|(t, _)| t) != Some(&topics) {
                // New topics: join again with all of them (no topics yet: nothing to own).
                sh.member = None;
                if !topics.is_empty() {
                    let group = format!("{}.members", self.group());
                    sh.member = Some((topics.clone(), self.log.join_group(&group, &topics)?));
                }
            }
        }
        let now = match sh.member.as_mut() {
            None => Some(BTreeSet::new()),
            Some((_, m)) => m.owned(&*self.log)?,
        };
        let Some(now) = now else {
            inputs.clear();
            sh.owned = None;
            sh.asked = None;
            self.set_status(|s| s.state = "rebalancing".into());
            return Ok(false);
        };
        sh.asked = Some(Instant::now());
        inputs.retain(|i| now.contains(&(i.topic.clone(), i.partition)));
        if sh.owned.as_ref() != Some(&now) {
            sh.owned = Some(now);
            *refreshed = None;
            self.set_status(|s| s.state = "running".into());
        }
        Ok(true)
    }

    /// Measures the lag for the status, at most once a second.
    fn refresh_lag(&self, at: &mut Instant) -> Result<(), SinkError> {
        if at.elapsed() >= Duration::from_secs(1) {
            let (lag, _) = self.lag()?;
            self.set_status(|s| {
                s.lag = lag;
                s.lag_ms = polylog_log::now_ms();
            });
            *at = Instant::now();
        }
        Ok(())
    }

    fn open_new_inputs(
        &self,
        inputs: &mut Vec<Input>,
        targets: &mut BTreeMap<(String, u32), u64>,
        record_targets: bool,
        owned: Option<&BTreeSet<(String, u32)>>,
    ) -> Result<(), SinkError> {
        let topics = self.topics()?;
        self.set_status(|s| s.topics = topics.clone());
        for topic in topics {
            let committed = self.log.committed_offsets(&self.group(), &topic)?;
            let d = self.log.describe_topic(&topic)?;
            for p in &d.partitions {
                if inputs.iter().any(|i| i.topic == topic && i.partition == p.partition)
                    || owned.is_some_and(|o| !o.contains(&(topic.clone(), p.partition)))
                {
                    continue;
                }
                let start = match committed.get(&p.partition) {
                    Some(&o) if o > p.start_offset => StartAt::Offset(o),
                    _ => StartAt::Beginning,
                };
                if record_targets {
                    targets.insert((topic.clone(), p.partition), p.durable_offset);
                }
                inputs.push(Input {
                    topic: topic.clone(),
                    partition: p.partition,
                    reader: self.log.reader(&topic, p.partition, start)?,
                });
            }
        }
        Ok(())
    }

    /// Writes a batch, retrying with backoff while the target fails in a way that may pass;
    /// nothing is skipped. `false`: stopped before the batch was written.
    fn write_with_retry(
        &self,
        writer: &mut dyn Writer,
        batch: &[Item],
        stop: &AtomicBool,
    ) -> Result<bool, SinkError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match writer.write(batch) {
                Ok(()) => return Ok(true),
                Err(e) if e.is_retryable() => {
                    tracing::warn!("sink {}: {e}; retrying in {backoff:?}", self.name);
                    self.set_status(|s| {
                        s.state = "retrying".into();
                        s.last_error = Some(e.to_string());
                        s.errors += 1;
                    });
                    let until = Instant::now() + backoff;
                    while Instant::now() < until {
                        if stop.load(Ordering::SeqCst) {
                            return Ok(false);
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }
}
