//! The [`Log`] interface over a Kafka cluster, through librdkafka (the `rdkafka` crate).
//!
//! Kafka's model is the log's model, one to one: a topic's partitions, offsets, tombstones,
//! compaction (`cleanup.policy=compact`) and consumer-group offsets. Appends go through one
//! idempotent producer with `acks=all`: [`Log::append`] returns once the cluster has
//! acknowledged the batch, so its records are durable (replicated to every in-sync replica)
//! when it returns. Readers are assigned consumers that see records up to the high watermark,
//! as the embedded log's readers see only durable records.
//!
//! `[log] backend = "kafka"` selects it; tested against a Kafka-protocol broker (tansu) and
//! librdkafka's mock cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use polylog_log::{
    Appended, GroupMember, Log, LogError, LogReader, PartitionDescription, Record, Result, StartAt,
    StoredRecord, TopicConfig, TopicDescription,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

/// How to reach the cluster.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `host:port,host:port`.
    pub brokers: String,
    /// Replication factor of the topics the log creates.
    pub replication_factor: i32,
    /// Further librdkafka settings (TLS: `security.protocol`, `ssl.ca.location`; SASL:
    /// `sasl.mechanism`, `sasl.username`, `sasl.password`), applied to every client.
    pub settings: Vec<(String, String)>,
    /// How long a request to the cluster may take.
    pub timeout: Duration,
    /// How long a silent group member keeps its partitions before the others take them over.
    pub session_timeout: Duration,
}

impl KafkaOptions {
    pub fn new(brokers: &str) -> KafkaOptions {
        KafkaOptions {
            brokers: brokers.to_string(),
            replication_factor: 1,
            settings: Vec::new(),
            timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(10),
        }
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.settings {
            c.set(k, v);
        }
        c
    }
}

fn kafka(e: KafkaError) -> LogError {
    LogError::Backend(format!("Kafka: {e}"))
}

/// Where one append's delivery reports go.
#[derive(Default)]
struct Batch {
    state: Mutex<BatchState>,
    done: Condvar,
}

#[derive(Default)]
struct BatchState {
    pending: usize,
    first: Option<i64>,
    last: Option<i64>,
    error: Option<String>,
}

struct Deliveries;

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Arc<Batch>;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: Arc<Batch>) {
        let mut st = batch.state.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(m) => {
                let o = m.offset();
                st.first = Some(st.first.map_or(o, |f| f.min(o)));
                st.last = Some(st.last.map_or(o, |l| l.max(o)));
            }
            Err((e, _)) => {
                if st.error.is_none() {
                    st.error = Some(e.to_string());
                }
            }
        }
        st.pending = st.pending.saturating_sub(1);
        if st.pending == 0 {
            batch.done.notify_all();
        }
    }
}

/// Topics on a Kafka cluster.
pub struct KafkaLog {
    opts: KafkaOptions,
    producer: ThreadedProducer<Deliveries>,
    admin: AdminClient<DefaultClientContext>,
    /// For metadata and watermarks.
    meta: BaseConsumer,
    /// One consumer per group, for committing and reading its offsets.
    groups: Mutex<BTreeMap<String, Arc<BaseConsumer>>>,
    /// Partition counts seen, so that appends do not ask the cluster every time (a count only
    /// grows; an unknown partition is checked again against fresh metadata).
    partition_counts: Mutex<BTreeMap<String, u32>>,
    /// Topic settings read from the cluster (they change only through an admin), so that
    /// `describe_topic`, which callers use for offsets every second, asks once per topic.
    configs: Mutex<BTreeMap<String, TopicConfig>>,
    configs_refused: std::sync::atomic::AtomicBool,
    /// The end of what this process appended to each partition and the cluster acknowledged
    /// (`acks=all`: committed). Some Kafka-protocol brokers report a high watermark short of
    /// it (tansu 0.6: the last batch's first offset + 1, and under concurrent appends to one
    /// partition an older batch's), so the durable end is the larger of the two. A topic this
    /// process creates starts again from nothing; one deleted and recreated by someone else
    /// while it runs is not followed.
    acked: Mutex<BTreeMap<(String, u32), u64>>,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KafkaLog({})", self.opts.brokers)
    }
}

impl KafkaLog {
    pub fn connect(opts: KafkaOptions) -> Result<KafkaLog> {
        // An append waits for its acknowledgement, so lingering only adds latency: the batch
        // is sent at once (the user's settings may say otherwise).
        let mut producer = ClientConfig::new();
        producer.set("linger.ms", "0");
        for (k, v) in opts.client().config_map().iter() {
            producer.set(*k, *v);
        }
        let producer = producer
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create_with_context(Deliveries)
            .map_err(kafka)?;
        let admin = opts.client().create().map_err(kafka)?;
        let meta = opts.client().set("enable.auto.commit", "false").create().map_err(kafka)?;
        let log = KafkaLog {
            opts,
            producer,
            admin,
            meta,
            groups: Mutex::new(BTreeMap::new()),
            partition_counts: Mutex::new(BTreeMap::new()),
            configs: Mutex::new(BTreeMap::new()),
            configs_refused: std::sync::atomic::AtomicBool::new(false),
            acked: Mutex::new(BTreeMap::new()),
        };
        // Fail now, with the cause, when the cluster cannot be reached.
        let probe = log.opts.timeout.min(Duration::from_secs(10));
        log.meta.fetch_metadata(None, probe).map_err(|e| {
            LogError::Backend(format!(
                "cannot reach the Kafka cluster at {}: {e}",
                log.opts.brokers
            ))
        })?;
        Ok(log)
    }

    fn partitions(&self, topic: &str) -> Result<u32> {
        let md = self.meta.fetch_metadata(Some(topic), self.opts.timeout).map_err(kafka)?;
        let t = md.topics().iter().find(|t| t.name() == topic);
        match t {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                Ok(t.partitions().len() as u32)
            }
            _ => Err(LogError::UnknownTopic(topic.to_string())),
        }
    }

    fn check_partition(&self, topic: &str, partition: u32) -> Result<()> {
        let known =
            self.partition_counts.lock().unwrap_or_else(|p| p.into_inner()).get(topic).copied();
        if known.is_some_and(|n| partition < n) {
            return Ok(());
        }
        let n = self.partitions(topic)?;
        self.partition_counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_string(), n);
        if partition >= n {
            return Err(LogError::UnknownPartition {
                topic: topic.to_string(),
                partition,
                partitions: n,
            });
        }
        Ok(())
    }

    /// `hi`, or the end of what this process appended there and the cluster acknowledged.
    fn floored(&self, topic: &str, partition: u32, hi: u64) -> u64 {
        let acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        acked.get(&(topic.to_string(), partition)).map_or(hi, |&end| end.max(hi))
    }

    fn watermarks(&self, topic: &str, partition: u32) -> Result<(u64, u64)> {
        let (lo, hi) = self
            .meta
            .fetch_watermarks(topic, partition as i32, self.opts.timeout)
            .map_err(kafka)?;
        Ok((lo.max(0) as u64, hi.max(0) as u64))
    }

    fn group(&self, group: &str) -> Result<Arc<BaseConsumer>> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = groups.get(group) {
            return Ok(Arc::clone(c));
        }
        let c: BaseConsumer = self
            .opts
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(kafka)?;
        let c = Arc::new(c);
        groups.insert(group.to_string(), Arc::clone(&c));
        Ok(c)
    }
}

impl Log for KafkaLog {
    fn create_topic(&self, name: &str, config: &TopicConfig) -> Result<()> {
        polylog_log::validate_topic_name(name)?;
        config.validate()?;
        let retention_ms = config.retention_ms.map(|v| v.to_string());
        let retention_bytes = config.retention_bytes.map(|v| v.to_string());
        let segment_bytes = config.segment_bytes.to_string();
        let tombstones = config.tombstone_retention_ms.to_string();
        let mut t = NewTopic::new(
            name,
            config.partitions as i32,
            TopicReplication::Fixed(self.opts.replication_factor),
        )
        .set("cleanup.policy", if config.compacted { "compact" } else { "delete" })
        .set("segment.bytes", &segment_bytes)
        .set("delete.retention.ms", &tombstones);
        // No retention means keep forever, as on the embedded log (not Kafka's 7 days).
        t = t.set("retention.ms", retention_ms.as_deref().unwrap_or("-1"));
        t = t.set("retention.bytes", retention_bytes.as_deref().unwrap_or("-1"));
        let opts = AdminOptions::new().operation_timeout(Some(self.opts.timeout));
        let results =
            futures_executor::block_on(self.admin.create_topics([&t], &opts)).map_err(kafka)?;
        for r in results {
            match r {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    return Err(LogError::TopicExists(name.to_string()))
                }
                Err((_, code)) => {
                    return Err(LogError::Backend(format!("creating topic {name}: {code}")))
                }
            }
        }
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).retain(|(t, _), _| t != name);
        // Creation is asynchronous in Kafka: wait until the metadata shows every partition.
        let deadline = Instant::now() + self.opts.timeout;
        while self.partitions(name).ok() != Some(config.partitions) {
            if Instant::now() > deadline {
                return Err(LogError::Backend(format!("topic {name} did not appear in time")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn topics(&self) -> Result<Vec<String>> {
        let md = self.meta.fetch_metadata(None, self.opts.timeout).map_err(kafka)?;
        let mut names: Vec<String> = md
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|n| !n.starts_with("__"))
            .collect();
        names.sort();
        Ok(names)
    }

    fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let n = self.partitions(name)?;
        let mut partitions = Vec::new();
        for p in 0..n {
            let (lo, hi) = self.watermarks(name, p)?;
            let hi = self.floored(name, p, hi);
            partitions.push(PartitionDescription {
                partition: p,
                start_offset: lo,
                end_offset: hi,
                durable_offset: hi,
                segments: 0,
                size_bytes: 0,
            });
        }
        Ok(TopicDescription {
            name: name.to_string(),
            config: self.topic_config(name, n),
            partitions,
        })
    }

    fn append(&self, topic: &str, partition: u32, records: &[Record]) -> Result<Appended> {
        if records.is_empty() {
            return Err(LogError::InvalidAppend("no records".into()));
        }
        self.check_partition(topic, partition)?;
        let batch = Arc::new(Batch::default());
        batch.state.lock().unwrap_or_else(|p| p.into_inner()).pending = records.len();
        for r in records {
            let mut rec: BaseRecord<'_, [u8], [u8], Arc<Batch>> =
                BaseRecord::with_opaque_to(topic, Arc::clone(&batch)).partition(partition as i32);
            if let Some(k) = &r.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(v) = &r.value {
                rec = rec.payload(v.as_slice());
            }
            if let Some(ts) = r.timestamp_ms {
                rec = rec.timestamp(ts);
            }
            if !r.headers.is_empty() {
                let mut h = OwnedHeaders::new_with_capacity(r.headers.len());
                for (k, v) in &r.headers {
                    h = h.insert(Header { key: k, value: Some(v.as_slice()) });
                }
                rec = rec.headers(h);
            }
            let mut rec = rec;
            loop {
                match self.producer.send(rec) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    // The records sent so far still report, to a batch nobody waits for.
                    Err((e, _)) => return Err(kafka(e)),
                }
            }
        }
        let mut st = batch.state.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + self.opts.timeout * 2;
        while st.pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LogError::Timeout(self.opts.timeout * 2));
            }
            st = self.done_wait(&batch, st, left);
        }
        if let Some(e) = &st.error {
            return Err(LogError::Backend(format!(
                "Kafka refused records of {topic}/{partition}: {e}"
            )));
        }
        match (st.first, st.last) {
            (Some(f), Some(l)) => {
                let mut acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
                let end = acked.entry((topic.to_string(), partition)).or_default();
                *end = (*end).max(l as u64 + 1);
                Ok(Appended { partition, base_offset: f as u64, last_offset: l as u64 })
            }
            _ => Err(LogError::Backend("Kafka reported no offsets".into())),
        }
    }

    fn durable_offset(&self, topic: &str, partition: u32) -> Result<u64> {
        self.check_partition(topic, partition)?;
        let hi = self.watermarks(topic, partition)?.1;
        Ok(self.floored(topic, partition, hi))
    }

    fn wait_durable(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.durable_offset(topic, partition)? >= offset {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LogError::Timeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn reader(&self, topic: &str, partition: u32, start: StartAt) -> Result<Box<dyn LogReader>> {
        self.check_partition(topic, partition)?;
        let (lo, hi) = self.watermarks(topic, partition)?;
        let at = match start {
            StartAt::Beginning => lo,
            StartAt::End => hi,
            StartAt::Offset(o) if o < lo => {
                return Err(LogError::OffsetOutOfRange {
                    topic: topic.to_string(),
                    partition,
                    requested: o,
                    start: lo,
                })
            }
            StartAt::Offset(o) => o,
            StartAt::Timestamp(ts) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(topic, partition as i32, Offset::Offset(ts))
                    .map_err(kafka)?;
                let found = self.meta.offsets_for_times(tpl, self.opts.timeout).map_err(kafka)?;
                match found.elements().first().map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o.max(0) as u64,
                    _ => hi,
                }
            }
        };
        let consumer: BaseConsumer = self
            .opts
            .client()
            // assign() needs a group id; an assigned consumer never joins or commits to it.
            .set("group.id", "polylog.reader")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "error")
            .create()
            .map_err(kafka)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(at as i64))
            .map_err(kafka)?;
        consumer.assign(&tpl).map_err(kafka)?;
        Ok(Box::new(KafkaReader {
            consumer,
            topic: topic.to_string(),
            partition,
            next: at,
            low: lo,
            from: at,
            verified: at <= lo,
            started: Instant::now(),
        }))
    }

    fn commit_offsets(&self, group: &str, offsets: &[(String, u32, u64)]) -> Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let c = self.group(group)?;
        let mut tpl = TopicPartitionList::new();
        for (t, p, o) in offsets {
            tpl.add_partition_offset(t, *p as i32, Offset::Offset(*o as i64)).map_err(kafka)?;
        }
        c.commit(&tpl, CommitMode::Sync).map_err(kafka)
    }

    fn join_group(&self, group: &str, topics: &[String]) -> Result<Box<dyn GroupMember>> {
        let state = Arc::new(Mutex::new(None));
        let consumer: BaseConsumer<Membership> = self
            .opts
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", self.opts.session_timeout.as_millis().to_string())
            .set(
                "heartbeat.interval.ms",
                (self.opts.session_timeout.as_millis() / 5).max(100).to_string(),
            )
            // Members never read: little is queued if a fetch slips in before the pause.
            .set("queued.max.messages.kbytes", "64")
            .create_with_context(Membership { state: Arc::clone(&state) })
            .map_err(kafka)?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(kafka)?;
        Ok(Box::new(KafkaMember { consumer, state }))
    }

    fn committed_offsets(&self, group: &str, topic: &str) -> Result<BTreeMap<u32, u64>> {
        let n = self.partitions(topic)?;
        let c = self.group(group)?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..n {
            tpl.add_partition(topic, p as i32);
        }
        let got = c.committed_offsets(tpl, self.opts.timeout).map_err(kafka)?;
        let mut out = BTreeMap::new();
        for e in got.elements() {
            if let Offset::Offset(o) = e.offset() {
                out.insert(e.partition() as u32, o as u64);
            }
        }
        Ok(out)
    }
}

impl KafkaLog {
    /// The topic's settings as the cluster reports them (what it does not report keeps the
    /// log's defaults).
    ///
    /// Nothing Polylog does depends on them (they are shown by `topics describe`), so a cluster
    /// that refuses to say (no DescribeConfigs permission) gets a warning, once, and the log's
    /// defaults are shown.
    fn topic_config(&self, name: &str, partitions: u32) -> TopicConfig {
        let cached = self.configs.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned();
        let c = match cached {
            Some(c) => c,
            None => {
                // A cluster that did not answer once is not asked again.
                let refused = self.configs_refused.load(std::sync::atomic::Ordering::Relaxed);
                let read = if refused { None } else { Some(self.read_topic_config(name)) };
                let c = match read {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        self.configs_refused.store(true, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!("{e}; topic settings are shown as the defaults");
                        TopicConfig::new(partitions)
                    }
                    None => TopicConfig::new(partitions),
                };
                self.configs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_string(), c.clone());
                c
            }
        };
        TopicConfig { partitions, ..c }
    }

    fn read_topic_config(&self, name: &str) -> Result<TopicConfig> {
        let mut c = TopicConfig::new(1);
        let wait = self.opts.timeout.min(Duration::from_secs(5));
        let opts = AdminOptions::new().request_timeout(Some(wait));
        let spec = ResourceSpecifier::Topic(name);
        let results = futures_executor::block_on(self.admin.describe_configs([&spec], &opts))
            .map_err(|e| LogError::Backend(format!("reading the settings of topic {name}: {e}")))?;
        let res = match results.into_iter().next() {
            Some(Ok(res)) => res,
            Some(Err(code)) => {
                return Err(LogError::Backend(format!(
                    "reading the settings of topic {name}: {code}"
                )))
            }
            None => return Err(LogError::Backend(format!("no settings for topic {name}"))),
        };
        let value = |k: &str| res.get(k).and_then(|e| e.value.as_deref());
        let number = |k: &str| value(k).and_then(|v| v.parse::<i64>().ok());
        c.compacted = value("cleanup.policy").is_some_and(|v| v.contains("compact"));
        c.retention_ms = number("retention.ms").filter(|v| *v >= 0).map(|v| v as u64);
        c.retention_bytes = number("retention.bytes").filter(|v| *v >= 0).map(|v| v as u64);
        if let Some(v) = number("segment.bytes").filter(|v| *v > 0) {
            c.segment_bytes = v as u64;
        }
        if let Some(v) = number("delete.retention.ms").filter(|v| *v >= 0) {
            c.tombstone_retention_ms = v as u64;
        }
        Ok(c)
    }

    fn done_wait<'a>(
        &self,
        batch: &'a Batch,
        st: std::sync::MutexGuard<'a, BatchState>,
        left: Duration,
    ) -> std::sync::MutexGuard<'a, BatchState> {
        match batch.done.wait_timeout(st, left) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        }
    }
}

/// The member's view of its assignment, kept by the rebalance callbacks (which librdkafka runs
/// inside `poll`): `None` from a revocation until the next assignment.
type Owned = Arc<Mutex<Option<BTreeSet<(String, u32)>>>>;

struct Membership {
    state: Owned,
}

impl ClientContext for Membership {}

impl ConsumerContext for Membership {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) | Rebalance::Error(_) = rebalance {
            *self.state.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let owned: BTreeSet<(String, u32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition().max(0) as u32))
                .collect();
            // A member never reads its partitions: it only owns them.
            let _ = consumer.pause(tpl);
            *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(owned);
        }
    }
}

struct KafkaMember {
    consumer: BaseConsumer<Membership>,
    state: Owned,
}

impl GroupMember for KafkaMember {
    fn owned(&mut self, _: &dyn Log) -> Result<Option<BTreeSet<(String, u32)>>> {
        // Runs the rebalance callbacks; a record fetched before the pause is dropped.
        match self.consumer.poll(Duration::ZERO) {
            Some(Err(e)) if !matches!(e, KafkaError::PartitionEOF(_)) => {
                return Err(LogError::Backend(format!("group membership: {e}")))
            }
            _ => {}
        }
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Reads one partition from an offset: an assigned consumer, no group.
struct KafkaReader {
    consumer: BaseConsumer,
    topic: String,
    partition: u32,
    next: u64,
    /// The partition's first offset when the reader was made.
    low: u64,
    /// Where the consumer was told to start.
    from: u64,
    /// Whether the reader is known to see every record from its start on. Kafka answers a
    /// fetch from inside a record batch with that whole batch (the client drops what is below
    /// the offset); some Kafka-protocol brokers (tansu 0.6) answer with the next batch
    /// instead, which would skip records. A first record past the start, or none at all for
    /// a while, makes a reader whose start is not the partition's first offset start
    /// earlier and drop what is below the offset asked for; a record below it shows the
    /// reader is reading from before its start.
    verified: bool,
    /// When the consumer was last told where to start.
    started: Instant,
}

impl KafkaReader {
    fn start_at(&mut self, from: u64) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, self.partition as i32, Offset::Offset(from as i64))
            .map_err(kafka)?;
        self.consumer.assign(&tpl).map_err(kafka)?;
        self.from = from;
        self.started = Instant::now();
        Ok(())
    }

    /// Starts earlier than the last start, when the broker may have skipped records.
    fn back_off(&mut self) -> Result<()> {
        let back = (self.next - self.from.min(self.next)).max(128) * 4;
        self.start_at(self.next.saturating_sub(back).max(self.low))
    }
}

fn stored(m: &BorrowedMessage<'_>, partition: u32) -> StoredRecord {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    StoredRecord {
        partition,
        offset: m.offset().max(0) as u64,
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
    }
}

impl LogReader for KafkaReader {
    fn poll(&mut self, max_records: usize, timeout: Duration) -> Result<Vec<StoredRecord>> {
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        while out.len() < max_records.max(1) {
            let wait = if !out.is_empty() {
                Duration::ZERO
            } else if !self.verified {
                // Look again soon: the broker may have skipped what was asked for.
                deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(100))
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            match self.consumer.poll(wait) {
                None => {
                    let quiet = self.started.elapsed() >= Duration::from_millis(500);
                    if !self.verified && self.from > self.low && quiet {
                        self.back_off()?;
                    }
                    if !out.is_empty() || Instant::now() >= deadline {
                        break;
                    }
                    continue;
                }
                Some(Ok(m)) => {
                    let r = stored(&m, self.partition);
                    drop(m);
                    if r.offset < self.next {
                        // Below the start: from a batch read whole, or an earlier start.
                        self.verified = true;
                        if Instant::now() >= deadline {
                            break;
                        }
                        continue;
                    }
                    if !self.verified && r.offset > self.next && self.from > self.low {
                        self.back_off()?;
                        if Instant::now() >= deadline {
                            break;
                        }
                        continue;
                    }
                    self.verified = true;
                    self.next = r.offset + 1;
                    out.push(r);
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => {
                    return Err(LogError::Backend(format!(
                        "reading {}/{}: {e}",
                        self.topic, self.partition
                    )))
                }
            }
            if out.is_empty() && Instant::now() >= deadline {
                break;
            }
        }
        Ok(out)
    }

    fn position(&self) -> u64 {
        self.next
    }
}
