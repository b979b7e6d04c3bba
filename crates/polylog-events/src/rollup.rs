//! Rollups (`[rollups.<name>]`): events of a topic counted into per-minute buckets by the
//! configured dimensions, flushed into Postgres once closed, and rolled up to hours and days.
//!
//! Each bucket holds, for billable (valid) traffic: `impressions`, `measurable` (viewability
//! events), `viewable` (those meeting the MRC rule), `clicks`, `in_view_ms` (summed), `users`
//! (a HyperLogLog of the user hashes), and `invalid` (events from bots and crawlers, counted
//! nowhere else).
//!
//! **Closing.** A minute closes once the watermark is `lateness` past its end. The watermark is
//! the newest event time seen, advancing with the wall clock while no newer event arrives, and
//! never ahead of the wall clock: a backlog of old events closes its minutes as it is read, and
//! a quiet stream still closes them. An event for a minute already flushed is late: it is
//! counted (`late_events`, in status and reports) and not added.
//!
//! **Exactly once.** A flush writes the closed buckets, adds them into the hour and day rows,
//! and records per partition where reading must resume (the oldest event still in an open
//! bucket) and how far it had read, all in one Postgres transaction. On restart (or after any
//! Postgres error) the open buckets are rebuilt by reading again from the resume offsets;
//! events of already flushed minutes read before the recorded position are skipped, so every
//! event is counted once: in a bucket or as late.
//!
//! **Tables** (created, with a partition per month created as needed): `<table>_minute`,
//! `<table>_hour`, `<table>_day`, each `(bucket timestamptz, <dimensions> text, impressions,
//! measurable, viewable, clicks, in_view_ms, invalid bigint, users bytea)` keyed by the bucket
//! and the dimensions (an absent value is the empty string); `polylog_rollups` and
//! `polylog_rollup_offsets` hold the state. Days and months are UTC. User hashes change key
//! every day, so distinct users are distinct within a day; over longer ranges a user counts
//! once per day they were seen.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use polylog_log::{Log, LogError, StartAt};
use polylog_postgres::schema::quote_literal;
use polylog_postgres::wire::{ConnectParams, Connection, PgError};
use serde::{Deserialize, Serialize};

use crate::hll::Hll;
use crate::model::{AdFormat, EventKind};
use crate::time::{format_ms, month_bounds};

#[derive(Debug, Clone)]
pub struct RollupOptions {
    pub name: String,
    pub topic: String,
    pub url: String,
    /// Prefix of the tables (`<table>_minute`, ...).
    pub table: String,
    pub dimensions: Vec<String>,
    /// How long after its end a minute still takes events.
    pub lateness: Duration,
    /// How often closed minutes are looked for and flushed.
    pub flush_interval: Duration,
    /// Most open buckets held in memory; reading pauses above it until a flush.
    pub open_max: usize,
    /// Rows per statement in a flush.
    pub rows_per_statement: usize,
}

impl RollupOptions {
    pub fn new(name: &str, topic: &str, url: &str, dimensions: &[&str]) -> RollupOptions {
        RollupOptions {
            name: name.into(),
            topic: topic.into(),
            url: url.into(),
            table: name.into(),
            dimensions: dimensions.iter().map(|d| d.to_string()).collect(),
            lateness: Duration::from_secs(60),
            flush_interval: Duration::from_secs(1),
            open_max: 2_000_000,
            rows_per_statement: 2_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RollupError {
    #[error("{0}")]
    Config(String),
    #[error("postgres: {0}")]
    Pg(#[from] PgError),
    #[error("the log: {0}")]
    Log(#[from] LogError),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    State(String),
}

impl RollupError {
    fn retryable(&self) -> bool {
        match self {
            // Also deadlocks, serialization failures, lock and statement timeouts, a full disk.
            RollupError::Pg(e) => {
                e.is_retryable()
                    || e.code()
                        .is_some_and(|c| ["40P01", "40001", "55P03", "57014", "53100"].contains(&c))
            }
            RollupError::Busy(_) => true,
            _ => false,
        }
    }
}

/// A field buckets can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Type,
    Campaign,
    Creative,
    Placement,
    SiteDomain,
    SiteCategory,
    Device,
    Browser,
    Country,
    AdFormat,
    AdSize,
}

pub const DIMENSIONS: &[(&str, Dim)] = &[
    ("type", Dim::Type),
    ("campaign_id", Dim::Campaign),
    ("creative_id", Dim::Creative),
    ("placement_id", Dim::Placement),
    ("site_domain", Dim::SiteDomain),
    ("site_category", Dim::SiteCategory),
    ("device", Dim::Device),
    ("browser", Dim::Browser),
    ("country", Dim::Country),
    ("ad_format", Dim::AdFormat),
    ("ad_size", Dim::AdSize),
];

pub fn parse_dims(names: &[String]) -> Result<Vec<Dim>, String> {
    if names.is_empty() {
        return Err("`dimensions` is empty: name at least one, such as campaign_id".into());
    }
    let mut out = Vec::new();
    for n in names {
        let d = DIMENSIONS.iter().find(|(k, _)| k == n).map(|(_, d)| *d).ok_or_else(|| {
            format!(
                "unknown dimension {n:?}; the dimensions are {}",
                DIMENSIONS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
            )
        })?;
        if out.contains(&d) {
            return Err(format!("dimension {n:?} is named twice"));
        }
        out.push(d);
    }
    Ok(out)
}

/// The fields of a stored event a rollup reads (borrowed from the record).
#[derive(Debug, Deserialize)]
pub(crate) struct Slim<'a> {
    #[serde(rename = "type")]
    kind: EventKind,
    ts_ms: i64,
    #[serde(borrow)]
    campaign_id: Cow<'a, str>,
    #[serde(borrow, default)]
    creative_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    placement_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    site_domain: Cow<'a, str>,
    #[serde(borrow, default)]
    site_category: Option<Cow<'a, str>>,
    #[serde(borrow)]
    device: Cow<'a, str>,
    #[serde(borrow)]
    browser: Cow<'a, str>,
    #[serde(borrow, default)]
    country: Option<Cow<'a, str>>,
    #[serde(default)]
    ad_format: Option<AdFormat>,
    #[serde(borrow, default)]
    ad_size: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_hash: Option<Cow<'a, str>>,
    invalid: bool,
    #[serde(default)]
    in_view_ms: Option<u64>,
    #[serde(default)]
    viewable: Option<bool>,
}

/// Longest dimension value kept (longer ones are cut at a character boundary): the key of
/// a bucket row must fit a Postgres index entry.
const DIM_MAX: usize = 200;

impl Dim {
    /// The event's value, cut to [`DIM_MAX`] bytes, up to any NUL (which Postgres text refuses).
    fn of<'a>(self, e: &'a Slim<'a>) -> &'a str {
        let v = self.raw(e);
        let v = v.split('\0').next().unwrap_or("");
        if v.len() <= DIM_MAX {
            return v;
        }
        let mut end = DIM_MAX;
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        &v[..end]
    }

    fn raw<'a>(self, e: &'a Slim<'a>) -> &'a str {
        let opt = |v: &'a Option<Cow<'a, str>>| v.as_deref().unwrap_or("");
        match self {
            Dim::Type => match e.kind {
                EventKind::Impression => "impression",
                EventKind::Viewability => "viewability",
                EventKind::Click => "click",
            },
            Dim::Campaign => &e.campaign_id,
            Dim::Creative => opt(&e.creative_id),
            Dim::Placement => opt(&e.placement_id),
            Dim::SiteDomain => &e.site_domain,
            Dim::SiteCategory => opt(&e.site_category),
            Dim::Device => &e.device,
            Dim::Browser => &e.browser,
            Dim::Country => opt(&e.country),
            Dim::AdFormat => match e.ad_format {
                Some(AdFormat::Display) => "display",
                Some(AdFormat::Video) => "video",
                None => "",
            },
            Dim::AdSize => opt(&e.ad_size),
        }
    }
}

/// What a bucket counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Agg {
    pub impressions: u64,
    pub measurable: u64,
    pub viewable: u64,
    pub clicks: u64,
    pub in_view_ms: u64,
    pub invalid: u64,
    pub users: Hll,
}

impl Agg {
    fn add(&mut self, e: &Slim<'_>) {
        if e.invalid {
            self.invalid += 1;
            return;
        }
        match e.kind {
            EventKind::Impression => self.impressions += 1,
            EventKind::Viewability => {
                self.measurable += 1;
                self.viewable += e.viewable.unwrap_or(false) as u64;
                self.in_view_ms = (self.in_view_ms.saturating_add(e.in_view_ms.unwrap_or(0)))
                    .min(i64::MAX as u64);
            }
            EventKind::Click => self.clicks += 1,
        }
        if let Some(u) = &e.user_hash {
            self.users.add(u.as_bytes());
        }
    }

    pub fn merge(&mut self, o: &Agg) {
        self.impressions += o.impressions;
        self.measurable += o.measurable;
        self.viewable += o.viewable;
        self.clicks += o.clicks;
        self.in_view_ms = self.in_view_ms.saturating_add(o.in_view_ms).min(i64::MAX as u64);
        self.invalid += o.invalid;
        self.users.merge(&o.users);
    }
}

/// An open bucket: one minute of one combination of dimension values.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    pub(crate) minute: i64,
    pub(crate) dims: Vec<String>,
    pub(crate) agg: Agg,
    /// Per partition, the offset of the bucket's first event (`u64::MAX`: none).
    first: Vec<u64>,
}

/// The in-memory side, shared with reports.
#[derive(Debug, Default)]
pub(crate) struct Open {
    pub(crate) buckets: HashMap<Vec<u8>, Bucket>,
    /// Closed buckets being written: not in Postgres until the flush commits.
    pub(crate) flushing: Arc<Vec<Bucket>>,
    /// Every minute up to this one is in Postgres (`None`: nothing flushed yet).
    pub(crate) flushed_through: Option<i64>,
    pub(crate) late_total: u64,
    /// Late events not recorded in Postgres yet (the next flush does).
    pub(crate) late_pending: u64,
    /// Whether the state was loaded from Postgres (reports wait for it).
    pub(crate) ready: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RollupStatus {
    /// `starting`, `running`, `waiting` (for the topic), `retrying`, `failed`, `stopped`.
    pub state: String,
    pub error: Option<String>,
    /// Errors met since start (each retry's cause counts once).
    #[serde(default)]
    pub errors: u64,
    pub topic: String,
    /// Events counted (into buckets or as late) since start.
    pub events: u64,
    /// Events for minutes already flushed (over all time).
    pub late_events: u64,
    /// Records that are not events (skipped).
    pub skipped: u64,
    pub open_buckets: usize,
    /// Events up to this time (the end of the newest stored minute) are in Postgres.
    pub flushed_through: Option<String>,
    pub flushes: u64,
    /// Durable records of the topic not read yet.
    pub lag_records: u64,
}

pub struct Rollup {
    pub opts: RollupOptions,
    pub(crate) dims: Vec<Dim>,
    log: Arc<dyn Log>,
    pub(crate) params: ConnectParams,
    pub(crate) open: Mutex<Open>,
    pub status: Mutex<RollupStatus>,
    /// Idle connections for reports.
    pub(crate) pool: Mutex<Vec<Connection>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn valid_table(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 40
        && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !t.as_bytes()[0].is_ascii_digit()
}

/// Records read from a partition at a time.
const POLL_MAX: usize = 4096;

pub(crate) const GRAINS: [(&str, i64); 3] =
    [("minute", 60_000), ("hour", 3_600_000), ("day", 86_400_000)];

/// Where reading stands, per partition.
struct Reading {
    /// Next offset to read.
    next: Vec<u64>,
    /// Where the last flush had read to: events below it of flushed minutes are counted.
    consumed: Vec<u64>,
    /// Newest event time read, over all partitions, and when it was read.
    max_ts: Option<i64>,
    raised: Instant,
    /// Per partition: newest event time read, and whether it has more to read.
    partition_max: Vec<Option<i64>>,
    behind: Vec<bool>,
}

impl Rollup {
    pub fn new(opts: RollupOptions, log: Arc<dyn Log>) -> Result<Rollup, RollupError> {
        let dims = parse_dims(&opts.dimensions).map_err(RollupError::Config)?;
        if !valid_table(&opts.table) {
            return Err(RollupError::Config(format!(
                "table prefix {:?} must be lowercase letters, digits and _ (at most 40), \
                 not starting with a digit",
                opts.table
            )));
        }
        let params = ConnectParams::parse(&opts.url).map_err(RollupError::Pg)?;
        let status = RollupStatus {
            state: "starting".into(),
            topic: opts.topic.clone(),
            ..RollupStatus::default()
        };
        Ok(Rollup {
            opts,
            dims,
            log,
            params,
            open: Mutex::default(),
            status: Mutex::new(status),
            pool: Mutex::default(),
        })
    }

    pub fn dimension_names(&self) -> &[String] {
        &self.opts.dimensions
    }

    fn table(&self, grain: &str) -> String {
        format!("{}_{grain}", self.opts.table)
    }

    pub(crate) fn connect(&self) -> Result<Connection, RollupError> {
        let mut c = Connection::connect(&self.params, false)?;
        c.execute("SET TIME ZONE 'UTC'")?;
        Ok(c)
    }

    /// Counts the topic's events until `stop` is set; Postgres and connection errors are
    /// retried with backoff (reported in status), configuration errors end it.
    pub fn run(&self, stop: &AtomicBool) -> Result<(), RollupError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            let started = Instant::now();
            let result = self.run_once(stop);
            if result.is_err() {
                // What is in memory may be in Postgres too (a commit whose answer was lost):
                // reports wait until it is rebuilt from the recorded state.
                *lock(&self.open) = Open::default();
            }
            match result {
                Ok(()) => {
                    lock(&self.status).state = "stopped".into();
                    return Ok(());
                }
                Err(e) if e.retryable() => {
                    {
                        let mut st = lock(&self.status);
                        st.state = "retrying".into();
                        st.error = Some(e.to_string());
                        st.errors += 1;
                    }
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = Duration::from_millis(200);
                    }
                    let until = Instant::now() + backoff;
                    while Instant::now() < until {
                        if stop.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    let mut st = lock(&self.status);
                    st.state = "failed".into();
                    st.error = Some(e.to_string());
                    st.errors += 1;
                    return Err(e);
                }
            }
        }
    }

    /// Creates the tables and checks the recorded state matches this rollup's definition.
    fn setup(&self, c: &mut Connection) -> Result<(), RollupError> {
        let dims: Vec<String> =
            self.opts.dimensions.iter().map(|d| format!("{d} text NOT NULL")).collect();
        let key = self.opts.dimensions.join(", ");
        let mut sql = String::new();
        for (grain, _) in GRAINS {
            sql.push_str(&format!(
                "CREATE TABLE IF NOT EXISTS {} (bucket timestamptz NOT NULL, {}, \
                 impressions bigint NOT NULL, measurable bigint NOT NULL, viewable bigint NOT NULL, \
                 clicks bigint NOT NULL, in_view_ms bigint NOT NULL, invalid bigint NOT NULL, \
                 users bytea NOT NULL, PRIMARY KEY (bucket, {key})) PARTITION BY RANGE (bucket);",
                self.table(grain),
                dims.join(", ")
            ));
        }
        sql.push_str(
            "CREATE TABLE IF NOT EXISTS polylog_rollups (name text PRIMARY KEY, topic text NOT NULL, \
             table_prefix text NOT NULL, dimensions text NOT NULL, flushed_through bigint, \
             late_events bigint NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now());\
             CREATE TABLE IF NOT EXISTS polylog_rollup_offsets (name text NOT NULL, partition int NOT NULL, \
             resume bigint NOT NULL, consumed bigint NOT NULL, PRIMARY KEY (name, partition));",
        );
        c.execute(&sql)?;
        let rows = c.query_params(
            "SELECT topic, table_prefix, dimensions FROM polylog_rollups WHERE name = $1",
            &[self.opts.name.as_bytes()],
        )?;
        let want =
            (self.opts.topic.clone(), self.opts.table.clone(), self.opts.dimensions.join(","));
        match rows.first() {
            None => {
                // A new rollup (or one whose state was deleted to rebuild it): from the start.
                c.query_params(
                    "DELETE FROM polylog_rollup_offsets WHERE name = $1",
                    &[self.opts.name.as_bytes()],
                )?;
                c.query_params(
                    "INSERT INTO polylog_rollups (name, topic, table_prefix, dimensions) VALUES ($1, $2, $3, $4)",
                    &[self.opts.name.as_bytes(), want.0.as_bytes(), want.1.as_bytes(), want.2.as_bytes()],
                )?;
            }
            Some(r) => {
                let got = (
                    r[0].clone().unwrap_or_default(),
                    r[1].clone().unwrap_or_default(),
                    r[2].clone().unwrap_or_default(),
                );
                if got != want {
                    return Err(RollupError::Config(format!(
                        "rollup {} was built from topic {} into tables {}_* by [{}]; it is now \
                         topic {} into {}_* by [{}]: give the changed rollup a new name, or drop \
                         its tables and DELETE FROM polylog_rollups WHERE name = '{}' to rebuild it",
                        self.opts.name, got.0, got.1, got.2, want.0, want.1, want.2, self.opts.name
                    )));
                }
            }
        }
        Ok(())
    }

    fn run_once(&self, stop: &AtomicBool) -> Result<(), RollupError> {
        {
            // Whatever was open is rebuilt from the log from the recorded state.
            let mut open = lock(&self.open);
            *open = Open::default();
        }
        let mut c = self.connect()?;
        let got = c.query_params(
            "SELECT pg_try_advisory_lock(7700, hashtext($1))",
            &[format!("polylog rollup {}", self.opts.name).as_bytes()],
        )?;
        if got.first().and_then(|r| r[0].as_deref()) != Some("t") {
            return Err(RollupError::Busy(format!(
                "another process is writing rollup {} into this database; waiting for it to stop",
                self.opts.name
            )));
        }
        self.setup(&mut c)?;
        let rows = c.query_params(
            "SELECT flushed_through, late_events FROM polylog_rollups WHERE name = $1",
            &[self.opts.name.as_bytes()],
        )?;
        let flushed_through = rows[0][0].as_deref().and_then(|v| v.parse::<i64>().ok());
        let late_total: u64 = rows[0][1].as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
        let offsets = c.query_params(
            "SELECT partition, resume, consumed FROM polylog_rollup_offsets WHERE name = $1",
            &[self.opts.name.as_bytes()],
        )?;
        let mut stored: HashMap<u32, (u64, u64)> = HashMap::new();
        for r in offsets {
            let n = |i: usize| r[i].as_deref().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            stored.insert(n(0) as u32, (n(1), n(2)));
        }
        // The topic: the collector creates it; wait while it does not exist.
        let partitions = loop {
            match self.log.describe_topic(&self.opts.topic) {
                Ok(d) => break d.partitions.len() as u32,
                Err(LogError::UnknownTopic(_)) => {
                    lock(&self.status).state = "waiting".into();
                    if stop.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut readers = Vec::new();
        let mut reading = Reading {
            next: Vec::new(),
            consumed: Vec::new(),
            max_ts: None,
            raised: Instant::now(),
            partition_max: vec![None; partitions as usize],
            behind: vec![true; partitions as usize],
        };
        for p in 0..partitions {
            let (resume, consumed) = stored.get(&p).copied().unwrap_or((0, 0));
            let reader = match self.log.reader(&self.opts.topic, p, StartAt::Offset(resume)) {
                Ok(r) => r,
                Err(LogError::OffsetOutOfRange { start, .. }) => {
                    tracing::warn!(
                        "rollup {}: partition {p} of {} starts at {start}, after the \
                         recorded offset {resume}: retention removed events before they were counted",
                        self.opts.name, self.opts.topic
                    );
                    self.log.reader(&self.opts.topic, p, StartAt::Beginning)?
                }
                Err(e) => return Err(e.into()),
            };
            reading.next.push(reader.position());
            reading.consumed.push(consumed);
            readers.push(reader);
        }
        // Reports wait until the open buckets are rebuilt: until reading reaches where the log
        // ended at start.
        let mut catch_up = Vec::new();
        for p in 0..partitions {
            catch_up.push(self.log.durable_offset(&self.opts.topic, p)?);
        }
        {
            let mut open = lock(&self.open);
            open.flushed_through = flushed_through;
            open.late_total = late_total;
            let mut st = lock(&self.status);
            st.state = "running".into();
            st.error = None;
            st.late_events = late_total;
            st.flushed_through = flushed_through.map(|m| format_ms(m * 60_000 + 59_999));
        }
        let mut ready = false;
        let mut created: HashSet<String> = HashSet::new();
        let mut last_flush = Instant::now();
        let mut last_lag = Instant::now() - Duration::from_secs(10);
        let mut key = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let full = lock(&self.open).buckets.len() >= self.opts.open_max;
            // When full, only the partitions holding the watermark back are read (so minutes
            // can close and make room).
            let holding = reading
                .behind
                .iter()
                .zip(&reading.partition_max)
                .filter(|(b, _)| **b)
                .map(|(_, m)| m.unwrap_or(i64::MIN))
                .min();
            let mut got = 0;
            for (p, reader) in readers.iter_mut().enumerate() {
                if full
                    && !(reading.behind[p]
                        && Some(reading.partition_max[p].unwrap_or(i64::MIN)) == holding)
                {
                    continue;
                }
                let records = reader.poll(POLL_MAX, Duration::ZERO)?;
                got += records.len();
                self.add_records(p, &records, &mut reading, &mut key);
                reading.behind[p] =
                    self.log.durable_offset(&self.opts.topic, p as u32)? > reading.next[p];
            }
            if got == 0 {
                if full {
                    std::thread::sleep(Duration::from_millis(20));
                } else {
                    let records = readers[0].poll(POLL_MAX, Duration::from_millis(50))?;
                    self.add_records(0, &records, &mut reading, &mut key);
                    reading.behind[0] =
                        self.log.durable_offset(&self.opts.topic, 0)? > reading.next[0];
                }
            }
            if !ready && reading.next.iter().zip(&catch_up).all(|(n, c)| n >= c) {
                ready = true;
                lock(&self.open).ready = true;
            }
            if last_flush.elapsed() >= self.opts.flush_interval || full {
                last_flush = Instant::now();
                self.maybe_flush(&mut c, &mut reading, &mut created)?;
            }
            if last_lag.elapsed() >= Duration::from_secs(1) {
                last_lag = Instant::now();
                let d = self.log.describe_topic(&self.opts.topic)?;
                let lag = d
                    .partitions
                    .iter()
                    .zip(&reading.next)
                    .map(|(p, n)| p.durable_offset.saturating_sub(*n))
                    .sum();
                let open_buckets = lock(&self.open).buckets.len();
                let mut st = lock(&self.status);
                st.lag_records = lag;
                st.open_buckets = open_buckets;
            }
        }
        Ok(())
    }

    fn add_records(
        &self,
        p: usize,
        records: &[polylog_log::StoredRecord],
        reading: &mut Reading,
        key: &mut Vec<u8>,
    ) {
        if records.is_empty() {
            return;
        }
        let (mut counted, mut skipped) = (0u64, 0u64);
        let partitions = reading.next.len();
        let late = {
            let mut open = lock(&self.open);
            let open = &mut *open;
            for r in records {
                reading.next[p] = r.offset + 1;
                let Some(e) =
                    r.value.as_deref().and_then(|v| serde_json::from_slice::<Slim>(v).ok())
                else {
                    skipped += 1;
                    continue;
                };
                let minute = e.ts_ms.div_euclid(60_000);
                if reading.max_ts.is_none_or(|m| e.ts_ms > m) {
                    reading.max_ts = Some(e.ts_ms);
                    reading.raised = Instant::now();
                }
                if reading.partition_max[p].is_none_or(|m| e.ts_ms > m) {
                    reading.partition_max[p] = Some(e.ts_ms);
                }
                if open.flushed_through.is_some_and(|f| minute <= f) {
                    if r.offset >= reading.consumed[p] {
                        open.late_pending += 1;
                        counted += 1;
                    }
                    continue;
                }
                counted += 1;
                key.clear();
                key.extend_from_slice(&minute.to_be_bytes());
                for d in &self.dims {
                    let v = d.of(&e);
                    key.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    key.extend_from_slice(v.as_bytes());
                }
                let b = match open.buckets.get_mut(key.as_slice()) {
                    Some(b) => b,
                    None => open.buckets.entry(key.clone()).or_insert_with(|| Bucket {
                        minute,
                        dims: self.dims.iter().map(|d| d.of(&e).to_string()).collect(),
                        agg: Agg::default(),
                        first: vec![u64::MAX; partitions],
                    }),
                };
                b.first[p] = b.first[p].min(r.offset);
                b.agg.add(&e);
            }
            open.late_total + open.late_pending
        };
        let mut st = lock(&self.status);
        st.events += counted;
        st.skipped += skipped;
        st.late_events = late;
    }

    /// The watermark: the newest event time, advancing with the clock since it was seen, never
    /// ahead of the clock; while partitions have a backlog, no further than the slowest of
    /// them has read (so reading a backlog partition by partition makes nothing late).
    fn watermark(reading: &Reading) -> Option<i64> {
        let max = reading.max_ts?;
        let mut w = (max + reading.raised.elapsed().as_millis() as i64).min(polylog_log::now_ms());
        for (behind, m) in reading.behind.iter().zip(&reading.partition_max) {
            if *behind {
                w = w.min(m.unwrap_or(i64::MIN));
            }
        }
        (w > i64::MIN).then_some(w)
    }

    fn maybe_flush(
        &self,
        c: &mut Connection,
        reading: &mut Reading,
        created: &mut HashSet<String>,
    ) -> Result<(), RollupError> {
        let Some(w) = Self::watermark(reading) else { return Ok(()) };
        let through = (w - self.opts.lateness.as_millis() as i64).div_euclid(60_000) - 1;
        // Take out the closed buckets (reports still see them, in `flushing`), and note where
        // reading resumes: the oldest event still open.
        let (resume, late) = {
            let mut open = lock(&self.open);
            if open.flushed_through.is_some_and(|f| through <= f) {
                return Ok(());
            }
            let closed: Vec<Vec<u8>> = open
                .buckets
                .iter()
                .filter(|(_, b)| b.minute <= through)
                .map(|(k, _)| k.clone())
                .collect();
            if closed.is_empty() && open.late_pending == 0 && open.flushed_through.is_some() {
                // The closed minutes are empty: nothing to record until there is.
                return Ok(());
            }
            let mut flushing = Vec::with_capacity(closed.len());
            for k in closed {
                if let Some(b) = open.buckets.remove(&k) {
                    flushing.push(b);
                }
            }
            open.flushing = Arc::new(flushing);
            let mut resume = reading.next.clone();
            for b in open.buckets.values() {
                for (r, f) in resume.iter_mut().zip(&b.first) {
                    *r = (*r).min(*f);
                }
            }
            (resume, open.late_pending)
        };
        let (flushing, prev) = {
            let open = lock(&self.open);
            (Arc::clone(&open.flushing), open.flushed_through)
        };
        let result =
            self.write_flush(c, &flushing, (prev, through), &resume, &reading.next, late, created);
        let mut open = lock(&self.open);
        match result {
            Ok(()) => {
                // Committed under the lock: a report sees these buckets either in Postgres or
                // in memory, never both, never neither.
                let commit = c.execute("COMMIT");
                commit?;
                open.flushing = Arc::default();
                open.flushed_through = Some(through);
                open.late_pending -= late;
                open.late_total += late;
                reading.consumed = reading.next.clone();
                let mut st = lock(&self.status);
                st.flushes += 1;
                st.late_events = open.late_total + open.late_pending;
                st.flushed_through = Some(format_ms(through * 60_000 + 59_999));
                st.open_buckets = open.buckets.len();
                Ok(())
            }
            Err(e) => {
                let _ = c.execute("ROLLBACK");
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_flush(
        &self,
        c: &mut Connection,
        closed: &[Bucket],
        (prev, through): (Option<i64>, i64),
        resume: &[u64],
        consumed: &[u64],
        late: u64,
        created: &mut HashSet<String>,
    ) -> Result<(), RollupError> {
        c.execute("BEGIN")?;
        // Partitions for every month touched.
        let mut months: Vec<i64> =
            closed.iter().map(|b| month_bounds(b.minute * 60_000).0).collect();
        months.sort_unstable();
        months.dedup();
        for m in months {
            let (start, end) = month_bounds(m);
            for (grain, _) in GRAINS {
                let parent = self.table(grain);
                let name = format!("{parent}_p{}", &format_ms(start)[..7].replace('-', ""));
                if created.contains(&name) {
                    continue;
                }
                c.execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {parent} FOR VALUES FROM ('{}') TO ('{}')",
                    format_ms(start),
                    format_ms(end)
                ))?;
                created.insert(name);
            }
        }
        // A conflict on a new row: somebody else wrote the tables.
        let conflict = |e: RollupError| match e {
            RollupError::Pg(ref p) if p.code() == Some("23505") => RollupError::State(format!(
                "the tables {}_* already hold buckets that polylog_rollups does not record as \
                 written ({p}); drop the rollup's tables and its row in polylog_rollups to rebuild",
                self.opts.table
            )),
            e => e,
        };
        // Minutes: new rows.
        for chunk in closed.chunks(self.opts.rows_per_statement.max(1)) {
            let rows: Vec<(i64, &[String], &Agg)> =
                chunk.iter().map(|b| (b.minute * 60, b.dims.as_slice(), &b.agg)).collect();
            self.insert_rows(c, "minute", &rows, false).map_err(conflict)?;
        }
        // Hours and days: add the minutes into what is stored. Only the period holding the last
        // flushed minute can have rows already (every closed minute is after it): those are
        // read, added to and written back; the later periods are new rows.
        for (grain, ms) in &GRAINS[1..] {
            let mut sums: HashMap<(i64, &[String]), Agg> = HashMap::new();
            for b in closed {
                let period = (b.minute * 60_000).div_euclid(*ms) * ms / 1000;
                sums.entry((period, b.dims.as_slice())).or_default().merge(&b.agg);
            }
            let boundary = prev.map(|f| (f * 60_000).div_euclid(*ms) * ms / 1000);
            let mut keys: Vec<(i64, &[String])> = sums.keys().copied().collect();
            keys.sort_unstable();
            let (known, new): (Vec<_>, Vec<_>) =
                keys.into_iter().partition(|k| Some(k.0) == boundary);
            for chunk in known.chunks(self.opts.rows_per_statement.max(1)) {
                let stored: HashMap<(i64, Vec<String>), Agg> = self
                    .stored_rows(c, grain, chunk)?
                    .into_iter()
                    .map(|(period, dims, agg)| ((period, dims), agg))
                    .collect();
                for k in chunk {
                    if let Some(old) = stored.get(&(k.0, k.1.to_vec())) {
                        if let Some(a) = sums.get_mut(k) {
                            a.merge(old);
                        }
                    }
                }
                let rows: Vec<(i64, &[String], &Agg)> =
                    chunk.iter().map(|k| (k.0, k.1, &sums[k])).collect();
                self.insert_rows(c, grain, &rows, true)?;
            }
            for chunk in new.chunks(self.opts.rows_per_statement.max(1)) {
                let rows: Vec<(i64, &[String], &Agg)> =
                    chunk.iter().map(|k| (k.0, k.1, &sums[k])).collect();
                self.insert_rows(c, grain, &rows, false).map_err(conflict)?;
            }
        }
        let name = self.opts.name.as_bytes();
        c.query_params(
            "UPDATE polylog_rollups SET flushed_through = $2, late_events = late_events + $3, \
             updated_at = now() WHERE name = $1",
            &[name, through.to_string().as_bytes(), late.to_string().as_bytes()],
        )?;
        let mut sql = String::from(
            "INSERT INTO polylog_rollup_offsets (name, partition, resume, consumed) VALUES ",
        );
        for (p, (r, n)) in resume.iter().zip(consumed).enumerate() {
            if p > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("({}, {p}, {r}, {n})", quote_literal(&self.opts.name)));
        }
        sql.push_str(" ON CONFLICT (name, partition) DO UPDATE SET resume = excluded.resume, consumed = excluded.consumed");
        c.execute(&sql)?;
        Ok(())
    }

    /// The SQL that turns `json_to_recordset($1)` rows into a grain's columns.
    fn recordset(&self) -> String {
        let dims: Vec<String> = (0..self.dims.len()).map(|i| format!("d{i} text")).collect();
        format!(
            "json_to_recordset($1) AS x(b bigint, {}, i bigint, m bigint, v bigint, c bigint, \
             ms bigint, inv bigint, u text)",
            dims.join(", ")
        )
    }

    fn insert_rows(
        &self,
        c: &mut Connection,
        grain: &str,
        rows: &[(i64, &[String], &Agg)],
        upsert: bool,
    ) -> Result<(), RollupError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut json = Vec::with_capacity(rows.len() * 128);
        json.push(b'[');
        for (i, (secs, dims, a)) in rows.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            key_json(&mut json, *secs, dims)?;
            json.extend_from_slice(
                format!(
                    ",\"i\":{},\"m\":{},\"v\":{},\"c\":{},\"ms\":{},\"inv\":{},\"u\":\"",
                    a.impressions, a.measurable, a.viewable, a.clicks, a.in_view_ms, a.invalid
                )
                .as_bytes(),
            );
            hex(&a.users.to_bytes(), &mut json);
            json.extend_from_slice(b"\"}");
        }
        json.push(b']');
        let cols = self.opts.dimensions.join(", ");
        let xs: Vec<String> = (0..self.dims.len()).map(|i| format!("x.d{i}")).collect();
        let mut sql = format!(
            "INSERT INTO {} (bucket, {cols}, impressions, measurable, viewable, clicks, in_view_ms, \
             invalid, users) SELECT to_timestamp(x.b), {}, x.i, x.m, x.v, x.c, x.ms, x.inv, \
             decode(x.u, 'hex') FROM {}",
            self.table(grain),
            xs.join(", "),
            self.recordset()
        );
        if upsert {
            sql.push_str(&format!(
                " ON CONFLICT (bucket, {cols}) DO UPDATE SET impressions = excluded.impressions, \
                 measurable = excluded.measurable, viewable = excluded.viewable, clicks = \
                 excluded.clicks, in_view_ms = excluded.in_view_ms, invalid = excluded.invalid, \
                 users = excluded.users"
            ));
        }
        c.query_params(&sql, &[&json])?;
        Ok(())
    }

    /// The stored rows of `grain` for these (period start in seconds, dimensions) keys.
    fn stored_rows(
        &self,
        c: &mut Connection,
        grain: &str,
        keys: &[(i64, &[String])],
    ) -> Result<Vec<(i64, Vec<String>, Agg)>, RollupError> {
        let mut json = Vec::with_capacity(keys.len() * 64);
        json.push(b'[');
        for (i, (secs, dims)) in keys.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            key_json(&mut json, *secs, dims)?;
            json.extend_from_slice(
                b",\"i\":0,\"m\":0,\"v\":0,\"c\":0,\"ms\":0,\"inv\":0,\"u\":\"\"}",
            );
        }
        json.push(b']');
        let on: Vec<String> = self
            .opts
            .dimensions
            .iter()
            .enumerate()
            .map(|(i, d)| format!(" AND t.{d} = x.d{i}"))
            .collect();
        let cols: Vec<String> = self.opts.dimensions.iter().map(|d| format!("t.{d}")).collect();
        let sql = format!(
            "SELECT extract(epoch FROM t.bucket)::bigint, {}, t.impressions, t.measurable, \
             t.viewable, t.clicks, t.in_view_ms, t.invalid, encode(t.users, 'hex') FROM {} t \
             JOIN {} ON t.bucket = to_timestamp(x.b){}",
            cols.join(", "),
            self.table(grain),
            self.recordset(),
            on.join("")
        );
        let n = self.dims.len();
        let mut out = Vec::new();
        for r in c.query_params(&sql, &[&json])? {
            let text = |i: usize| r[i].clone().unwrap_or_default();
            let num = |i: usize| r[i].as_deref().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let users = unhex(r[n + 7].as_deref().unwrap_or(""))
                .and_then(|b| Hll::from_bytes(&b))
                .map_err(|e| {
                    RollupError::State(format!("{}: a stored sketch: {e}", self.table(grain)))
                })?;
            out.push((
                r[0].as_deref().and_then(|v| v.parse().ok()).unwrap_or(0),
                (1..=n).map(text).collect(),
                Agg {
                    impressions: num(n + 1),
                    measurable: num(n + 2),
                    viewable: num(n + 3),
                    clicks: num(n + 4),
                    in_view_ms: num(n + 5),
                    invalid: num(n + 6),
                    users,
                },
            ));
        }
        Ok(out)
    }
}

/// Starts a row of the recordset: `{"b":<secs>,"d0":<dimension>,...`.
fn key_json(json: &mut Vec<u8>, secs: i64, dims: &[String]) -> Result<(), RollupError> {
    json.extend_from_slice(format!("{{\"b\":{secs}").as_bytes());
    for (j, d) in dims.iter().enumerate() {
        json.extend_from_slice(format!(",\"d{j}\":").as_bytes());
        serde_json::to_writer(&mut *json, d).map_err(|e| RollupError::State(e.to_string()))?;
    }
    Ok(())
}

pub(crate) fn hex(bytes: &[u8], out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize]);
        out.push(DIGITS[(b & 15) as usize]);
    }
}

pub(crate) fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.strip_prefix("\\x").unwrap_or(s);
    if !s.len().is_multiple_of(2) {
        return Err("odd hex length".into());
    }
    let val = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("{:?} is not hex", c as char)),
    };
    s.as_bytes().chunks_exact(2).map(|p| Ok(val(p[0])? << 4 | val(p[1])?)).collect()
}
