//! The Postgres source: manages the publication and the slot, takes the initial snapshot, and
//! streams committed changes into topics.
//!
//! # Exactly the committed changes
//! Postgres sends each committed transaction whole, in commit order (pgoutput without
//! `streaming`; Postgres itself spills large transactions to disk, so our memory stays bounded).
//! Every record carries its [`Position`] in a header. Postgres is told a transaction is flushed
//! only after every partition it touched has made its records durable. After a crash Postgres
//! replays from the last flushed transaction, and a change is dropped if its partition already
//! holds its position: nothing is lost, nothing is written twice.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polylog_log::{partition_for_key, Log, LogError, Record, StartAt, TopicConfig};
use serde_json::{json, Value};

use crate::config::{PostgresSourceConfig, SnapshotMode};
use crate::error::SourceError;
use crate::event::{
    self, envelope, envelope_tail, key_object, row_object, write_row_object, Converter, Position,
    Raw, SourceInfo,
};
use crate::images::{RowImages, TOAST_ROW_BYTES_MIN};
use crate::pgoutput::{self, format_lsn, parse_lsn, Message, TupleValue};
use crate::schema::{self, quote_ident, quote_literal, ColumnSchema, TableSchema};
use crate::state::{RangeProgress, SnapshotStatus, SourceState, TableProgress};
use crate::types::PgType;
use crate::wire::{ConnectParams, Connection, ReplicationMessage, ReplicationStream};

/// Records gathered before they are appended (per partition, and in all), bounding memory.
const PENDING_RECORDS_MAX: usize = 2000;
const DURABLE_TIMEOUT: Duration = Duration::from_secs(120);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const RECV_TIMEOUT: Duration = Duration::from_millis(200);
/// With nothing at all from the server for this long (despite asking), the connection is
/// taken for dead and the source reconnects.
const SILENCE_MAX: Duration = Duration::from_secs(120);

/// What `polylog status` shows of a source.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceStatus {
    /// `starting`, `snapshotting`, `streaming`, `retrying`, `failed`, `stopped`.
    pub state: String,
    pub last_error: Option<String>,
    /// Errors met since start (each retry's cause counts once).
    #[serde(default)]
    pub errors: u64,
    /// Last WAL position received.
    pub received_lsn: Option<String>,
    /// Last WAL position Postgres was told is durably stored.
    pub flushed_lsn: Option<String>,
    pub events: u64,
    pub transactions: u64,
    /// How long after its commit the last transaction was captured (ms): how far behind the
    /// source is (Debezium's `MilliSecondsBehindSource`); 0 once the server's keepalive says it
    /// has sent everything.
    #[serde(default)]
    pub behind_ms: i64,
    pub snapshot_rows: u64,
    pub snapshot_rows_estimate: u64,
}

/// Where the source keeps its state and how topics are laid out.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Directory of this source's state file.
    pub state_dir: PathBuf,
    /// Partitions of the table topics it creates.
    pub partitions: u32,
    /// Print snapshot progress on stderr.
    pub progress: bool,
}

/// A running (or runnable) Postgres source.
pub struct PostgresSource {
    name: String,
    cfg: PostgresSourceConfig,
    params: ConnectParams,
    log: Arc<dyn Log>,
    opts: SourceOptions,
    prefix: String,
    slot: String,
    publication: String,
    mask_key: Option<Vec<u8>>,
    /// Shared with whoever reports status.
    pub status: Arc<Mutex<SourceStatus>>,
}

/// The default name of a source's replication slot and publication: `polylog_<source>`, in
/// the lower case letters, digits and underscores slot names allow.
pub fn default_object_name(source: &str) -> String {
    format!("polylog_{}", topic_safe(source).replace(['.', '-'], "_").to_lowercase())
}

/// For a table topic `<prefix>.<schema>.<table>` written by a Polylog source, the source's
/// topic `<prefix>.<suffix>` (`transaction`, `schema-history`) found among `topics`, and the
/// table's name as the topic spells it (`schema.table`). The longest prefix that has one wins.
pub fn sibling_topic(
    topics: &[String],
    table_topic: &str,
    suffix: &str,
) -> Option<(String, String)> {
    let dots: Vec<usize> = table_topic.match_indices('.').map(|(i, _)| i).collect();
    dots.iter().rev().find_map(|&i| {
        let sibling = format!("{}.{suffix}", &table_topic[..i]);
        topics.contains(&sibling).then(|| (sibling, table_topic[i + 1..].to_string()))
    })
}

/// A name as it appears in topic names: characters Kafka does not allow become `_`.
pub fn topic_safe(s: &str) -> String {
    s.chars()
        .map(
            |c| if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' { c } else { '_' },
        )
        .collect()
}

impl PostgresSource {
    /// Checks the config and prepares a source named `name`.
    pub fn new(
        name: &str,
        cfg: PostgresSourceConfig,
        log: Arc<dyn Log>,
        opts: SourceOptions,
    ) -> Result<PostgresSource, SourceError> {
        cfg.validate().map_err(|e| SourceError::Setup(format!("sources.{name}: {e}")))?;
        let params = ConnectParams::parse(&cfg.url)?;
        let mask_key = if cfg.mask_columns.is_empty() {
            None
        } else {
            let k = std::env::var(&cfg.mask_key_env).map_err(|_| {
                SourceError::Setup(format!(
                    "sources.{name}: mask_columns is set, so the masking key must be in ${}",
                    cfg.mask_key_env
                ))
            })?;
            Some(k.into_bytes())
        };
        let default_name = default_object_name(name);
        Ok(PostgresSource {
            prefix: cfg.topic_prefix.clone().unwrap_or_else(|| name.to_string()),
            slot: cfg.slot.clone().unwrap_or_else(|| default_name.clone()),
            publication: cfg.publication.clone().unwrap_or(default_name),
            name: name.to_string(),
            cfg,
            params,
            log,
            opts,
            mask_key,
            status: Arc::new(Mutex::new(SourceStatus {
                state: "starting".into(),
                ..Default::default()
            })),
        })
    }

    /// The topic of a table.
    pub fn table_topic(&self, schema: &str, table: &str) -> String {
        topic_safe(&format!("{}.{schema}.{table}", self.prefix))
    }
    /// The transaction metadata topic (BEGIN/END markers with event counts).
    pub fn transaction_topic(&self) -> String {
        topic_safe(&format!("{}.transaction", self.prefix))
    }
    /// The schema history topic (one record per table schema seen).
    pub fn schema_topic(&self) -> String {
        topic_safe(&format!("{}.schema-history", self.prefix))
    }
    /// The replication slot's name.
    pub fn slot_name(&self) -> &str {
        &self.slot
    }

    fn set_status(&self, f: impl FnOnce(&mut SourceStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Runs until `stop` is set or a fatal error. Retryable errors (Postgres unreachable or
    /// restarting) are retried with exponential backoff and shown in the status.
    pub fn run(&self, stop: &AtomicBool) -> Result<(), SourceError> {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.run_once(stop) {
                Ok(()) => {
                    self.set_status(|s| s.state = "stopped".into());
                    return Ok(());
                }
                Err(e) if e.is_retryable() && !stop.load(Ordering::SeqCst) => {
                    tracing::warn!("source {}: {e}; retrying in {backoff:?}", self.name);
                    self.set_status(|s| {
                        s.state = "retrying".into();
                        s.last_error = Some(e.to_string());
                        s.errors += 1;
                    });
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                // Asked to stop while retrying: that is a clean stop.
                Err(e) if e.is_retryable() => {
                    self.set_status(|s| {
                        s.state = "stopped".into();
                        s.last_error = Some(e.to_string());
                        s.errors += 1;
                    });
                    return Ok(());
                }
                Err(e) => {
                    self.set_status(|s| {
                        s.state = "failed".into();
                        s.last_error = Some(e.to_string());
                        s.errors += 1;
                    });
                    return Err(e);
                }
            }
        }
    }

    fn state_path(&self) -> PathBuf {
        self.opts.state_dir.join("state.json")
    }

    fn run_once(&self, stop: &AtomicBool) -> Result<(), SourceError> {
        let mut conn = Connection::connect(&self.params, false)?;
        schema::check_server(&mut conn)?;
        let tables = schema::discover(&mut conn, &self.cfg)?;
        schema::ensure_publication(
            &mut conn,
            &self.publication,
            &tables,
            self.cfg.signal_table.as_deref(),
        )?;
        self.ensure_topics(&tables)?;
        self.record_schemas(&tables)?;
        let mut state = SourceState::load(&self.state_path())?;
        let images = Mutex::new(RowImages::open(&self.opts.state_dir.join("row-images.redb"))?);
        let slot = self.slot_info(&mut conn)?;
        if let Some((_, wal_status)) = &slot {
            if wal_status == "lost" {
                return Err(self.slot_lost("lost the WAL it needs (wal_status = lost)"));
            }
        }
        let snapshot_wanted = self.cfg.snapshot != SnapshotMode::Never;
        let mut repl =
            Connection::connect(&self.params, true).map_err(|e| self.replication_hint(e))?;
        let start_lsn = match (&slot, state.snapshot) {
            // The slot we streamed from is gone: changes were lost to us.
            (None, SnapshotStatus::Done | SnapshotStatus::Skipped)
                if state.slot.as_deref() == Some(&self.slot) =>
            {
                return Err(self.slot_lost("was dropped"));
            }
            // Resume an interrupted snapshot (with a new snapshot: the exported one died with
            // the old connection; the stream that follows brings every row up to date).
            (Some((lsn, _)), SnapshotStatus::InProgress)
                if self.cfg.snapshot != SnapshotMode::Always =>
            {
                self.snapshot(&tables, &mut state, None, *lsn, &images)?;
                *lsn
            }
            (Some((lsn, _)), SnapshotStatus::Done | SnapshotStatus::Skipped)
                if self.cfg.snapshot != SnapshotMode::Always
                    && state.slot.as_deref() == Some(&self.slot) =>
            {
                *lsn
            }
            // Without a snapshot, a slot that exists (created by hand, say) is streamed from
            // where it stands rather than replaced: replacing it would skip its backlog.
            (Some((lsn, _)), _) if self.cfg.snapshot == SnapshotMode::Never => {
                state = SourceState {
                    slot: Some(self.slot.clone()),
                    snapshot: SnapshotStatus::Skipped,
                    ..SourceState::default()
                };
                state.save(&self.state_path())?;
                *lsn
            }
            // A new slot: with `always`, on every start; otherwise when there is none that we
            // know to have streamed from.
            (existing, _) => {
                if existing.is_some() {
                    conn.execute(&format!(
                        "SELECT pg_drop_replication_slot({})",
                        quote_literal(&self.slot)
                    ))?;
                }
                let mode = if snapshot_wanted { "export" } else { "nothing" };
                let rows = repl.query(&format!(
                    "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT '{mode}')",
                    quote_ident(&self.slot)
                ))?;
                let row = rows.first().ok_or_else(|| {
                    SourceError::Setup("CREATE_REPLICATION_SLOT returned nothing".into())
                })?;
                let lsn = row.get(1).cloned().flatten().and_then(|l| parse_lsn(&l)).unwrap_or(0);
                let snapshot_name = row.get(2).cloned().flatten();
                state = SourceState {
                    slot: Some(self.slot.clone()),
                    consistent_point: Some(format_lsn(lsn)),
                    ..SourceState::default()
                };
                if snapshot_wanted {
                    state.snapshot = SnapshotStatus::InProgress;
                    state.save(&self.state_path())?;
                    self.snapshot(&tables, &mut state, snapshot_name.as_deref(), lsn, &images)?;
                } else {
                    state.snapshot = SnapshotStatus::Skipped;
                    state.save(&self.state_path())?;
                }
                lsn
            }
        };
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {}, messages 'true')",
            quote_ident(&self.slot),
            format_lsn(start_lsn),
            quote_literal(&quote_ident(&self.publication))
        );
        let stream = repl.start_replication(&command).map_err(|e| match e.code() {
            // Dropped between the check above and here: the same loud stop.
            Some("42704") => self.slot_lost(&format!("was dropped ({e})")),
            Some("55000") => self.slot_lost(&e.to_string()),
            _ => e.into(),
        })?;
        self.set_status(|s| s.state = "streaming".into());
        tracing::info!("source {}: streaming from {}", self.name, format_lsn(start_lsn));
        let images = images.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut streamer = Streamer::new(self, tables, conn, stream, images, state);
        streamer.run(stop)
    }

    fn slot_lost(&self, why: &str) -> SourceError {
        SourceError::SlotLost {
            slot: self.slot.clone(),
            why: why.into(),
            state: self.state_path().display().to_string(),
        }
    }

    fn replication_hint(&self, e: crate::wire::PgError) -> SourceError {
        match e.code() {
            Some("42501") | Some("28000") => SourceError::Setup(format!(
                "{e}. Logical replication needs the REPLICATION privilege: ALTER ROLE {} REPLICATION; \
                 (and pg_hba.conf must allow replication connections)",
                quote_ident(&self.params.user)
            )),
            _ => e.into(),
        }
    }

    /// The slot's confirmed flush LSN and `wal_status`, if it exists.
    fn slot_info(&self, conn: &mut Connection) -> Result<Option<(u64, String)>, SourceError> {
        let rows = conn.query(&format!(
            "SELECT confirmed_flush_lsn, COALESCE(wal_status, ''), plugin, database FROM pg_replication_slots \
             WHERE slot_name = {}",
            quote_literal(&self.slot)
        ))?;
        let Some(r) = rows.first() else { return Ok(None) };
        let plugin = r.get(2).cloned().flatten().unwrap_or_default();
        let db = r.get(3).cloned().flatten().unwrap_or_default();
        if plugin != "pgoutput" || db != self.params.dbname {
            return Err(SourceError::Setup(format!(
                "replication slot {:?} exists but belongs to {plugin:?} on database {db:?}; name another \
                 slot for this source (slot = \"...\")",
                self.slot
            )));
        }
        let lsn = r.first().cloned().flatten().and_then(|l| parse_lsn(&l)).unwrap_or(0);
        Ok(Some((lsn, r.get(1).cloned().flatten().unwrap_or_default())))
    }

    /// Records in the schema history every captured table whose shape it does not hold yet,
    /// before the snapshot, so consumers (views checking their columns) know every table from
    /// the start, not only after its first change. These records carry no position: the stream
    /// records shape changes at their place in the WAL.
    fn record_schemas(&self, tables: &[TableSchema]) -> Result<(), SourceError> {
        let topic = self.schema_topic();
        let recorded = read_recorded_schemas(&*self.log, &topic)?;
        let records: Vec<Record> = tables
            .iter()
            .filter_map(|t| {
                let columns = schema_columns(t);
                (recorded.get(&t.qualified()) != Some(&columns)).then(|| {
                    let value = schema_history_value(&self.name, &t.qualified(), 0, columns);
                    Record::new(
                        serde_json::to_vec(&json!({"table": t.qualified()})).unwrap_or_default(),
                        serde_json::to_vec(&value).unwrap_or_default(),
                    )
                })
            })
            .collect();
        if !records.is_empty() {
            let a = self.log.append(&topic, 0, &records)?;
            self.log.wait_durable(&topic, 0, a.last_offset + 1, DURABLE_TIMEOUT)?;
        }
        Ok(())
    }

    fn ensure_topics(&self, tables: &[TableSchema]) -> Result<(), SourceError> {
        let mut wanted: Vec<(String, u32)> = tables
            .iter()
            .map(|t| (self.table_topic(&t.schema, &t.name), self.opts.partitions))
            .collect();
        wanted.push((self.transaction_topic(), 1));
        wanted.push((self.schema_topic(), 1));
        for (topic, partitions) in wanted {
            match self.log.create_topic(&topic, &TopicConfig::new(partitions)) {
                Ok(()) | Err(LogError::TopicExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Snapshots every table not yet done, in chunks by key, `snapshot_parallelism` tables at a
    /// time; progress is saved after every chunk.
    fn snapshot(
        &self,
        tables: &[TableSchema],
        state: &mut SourceState,
        exported: Option<&str>,
        lsn: u64,
        images: &Mutex<RowImages>,
    ) -> Result<(), SourceError> {
        self.set_status(|s| s.state = "snapshotting".into());
        let todo: Vec<&TableSchema> = tables
            .iter()
            .filter(|t| !state.tables.get(&t.qualified()).is_some_and(|p| p.done))
            .collect();
        let mut estimate = 0u64;
        {
            let mut conn = Connection::connect(&self.params, false)?;
            for t in &todo {
                let rows = conn.query(&format!(
                    "SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE oid = {}",
                    t.oid
                ))?;
                estimate += rows
                    .first()
                    .and_then(|r| r.first().cloned().flatten())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            }
        }
        let done_rows: u64 = state.tables.values().map(|p| p.rows).sum();
        self.set_status(|s| {
            s.snapshot_rows = done_rows;
            s.snapshot_rows_estimate = estimate + done_rows;
        });
        // Key ranges: planned once per table and kept in the state, so a resumed snapshot
        // continues each range where it stopped.
        let mut units: Vec<(&TableSchema, usize)> = Vec::new();
        {
            let mut conn = Connection::connect(&self.params, false)?;
            for t in &todo {
                let p = state.tables.entry(t.qualified()).or_default();
                if p.ranges.is_empty() {
                    p.ranges = self.plan_ranges(&mut conn, t, p)?;
                }
                units.extend(
                    p.ranges.iter().enumerate().filter(|(_, r)| !r.done).map(|(i, _)| (*t, i)),
                );
            }
            state.save(&self.state_path())?;
        }
        let shared = Mutex::new((state.clone(), 0usize));
        let failure: Mutex<Option<SourceError>> = Mutex::new(None);
        let progress_stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            if self.opts.progress {
                scope.spawn(|| self.print_progress(&progress_stop));
            }
            let workers: Vec<_> = (0..self.cfg.snapshot_parallelism.min(units.len()).max(1))
                .map(|_| {
                    scope.spawn(|| loop {
                        let next = {
                            let mut g = shared.lock().unwrap_or_else(|e| e.into_inner());
                            let i = g.1;
                            g.1 += 1;
                            units.get(i).copied()
                        };
                        let Some((table, range)) = next else { return };
                        if failure.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                            return;
                        }
                        let r = self.snapshot_range(table, range, exported, lsn, &shared, images);
                        if let Err(e) = r {
                            failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                            return;
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = w.join();
            }
            progress_stop.store(true, Ordering::SeqCst);
        });
        if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        *state = shared.into_inner().unwrap_or_else(|e| e.into_inner()).0;
        state.snapshot = SnapshotStatus::Done;
        state.save(&self.state_path())?;
        Ok(())
    }

    /// Splits a table with a single integer key into `snapshot_parallelism` key ranges, read
    /// in parallel; any other table is one range. A table whose snapshot had already started
    /// (before ranges existed) continues as one range.
    fn plan_ranges(
        &self,
        conn: &mut Connection,
        table: &TableSchema,
        started: &TableProgress,
    ) -> Result<Vec<RangeProgress>, SourceError> {
        let whole = RangeProgress {
            last_key: started.last_key.clone(),
            rows: started.rows,
            done: started.done,
            ..RangeProgress::default()
        };
        let parts = self.cfg.snapshot_parallelism as i128;
        let integer_key = table.key.len() == 1
            && matches!(table.columns[table.key[0]].ty, PgType::Int2 | PgType::Int4 | PgType::Int8);
        // A table keyed by all its columns is read in one piece (see `snapshot_range`).
        let chunked = table.replica_identity != 'f' || table.key.len() < table.columns.len();
        if parts < 2 || !integer_key || !chunked || started.rows > 0 || started.last_key.is_some() {
            return Ok(vec![whole]);
        }
        let k = quote_ident(&table.columns[table.key[0]].name);
        let rows = conn
            .query(&format!("SELECT min({k})::text, max({k})::text FROM {}", table.sql_name()))?;
        let bound = |i: usize| {
            rows.first()
                .and_then(|r| r.get(i).cloned().flatten())
                .and_then(|v| v.parse::<i128>().ok())
        };
        let (Some(min), Some(max)) = (bound(0), bound(1)) else { return Ok(vec![whole]) };
        let width = (max - min) / parts + 1;
        // Bounds stay within [min, max], so they fit the key's type (ranges past max are empty).
        let at = |n: i128| (min + n * width - 1).min(max).to_string();
        Ok((0..parts)
            .map(|i| RangeProgress {
                lower: (i > 0).then(|| vec![at(i)]),
                upper: (i < parts - 1).then(|| vec![at(i + 1)]),
                ..RangeProgress::default()
            })
            .collect())
    }

    fn print_progress(&self, stop: &AtomicBool) {
        use std::io::Write;
        let started = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(250));
            let s = self.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let pct = if s.snapshot_rows_estimate > 0 {
                100.0 * s.snapshot_rows as f64 / s.snapshot_rows_estimate as f64
            } else {
                0.0
            };
            let rate = s.snapshot_rows as f64 / started.elapsed().as_secs_f64().max(1e-3);
            let width = 30usize;
            let filled = ((pct / 100.0) * width as f64).min(width as f64) as usize;
            eprint!(
                "\rsnapshot {}: [{}{}] {}/~{} rows ({pct:.0}%), {rate:.0} rows/s   ",
                self.name,
                "#".repeat(filled),
                "-".repeat(width - filled),
                s.snapshot_rows,
                s.snapshot_rows_estimate
            );
            let _ = std::io::stderr().flush();
        }
        eprintln!();
    }

    /// Reads one key range of a table, chunk by chunk.
    #[allow(clippy::too_many_arguments)]
    fn snapshot_range(
        &self,
        table: &TableSchema,
        range: usize,
        exported: Option<&str>,
        lsn: u64,
        shared: &Mutex<(SourceState, usize)>,
        images: &Mutex<RowImages>,
    ) -> Result<(), SourceError> {
        let mut conn = Connection::connect(&self.params, false)?;
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
        if let Some(name) = exported {
            conn.execute(&format!("SET TRANSACTION SNAPSHOT {}", quote_literal(name)))?;
        }
        let topic = self.table_topic(&table.schema, &table.name);
        // Chunking needs an ordered key; a table keyed by all its columns goes in one piece.
        let chunked = table.replica_identity != 'f' || table.key.len() < table.columns.len();
        let mut progress = {
            let g = shared.lock().unwrap_or_else(|e| e.into_inner());
            let t = g.0.tables.get(&table.qualified());
            t.and_then(|t| t.ranges.get(range)).cloned().unwrap_or_default()
        };
        let mut conv = Converter::new(self.mask_key.clone());
        let mut row = Vec::new();
        let mut pending: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
        let mut pending_n = 0usize;
        let mut ends: HashMap<u32, u64> = HashMap::new();
        let mut unsaved: Option<(RangeProgress, HashMap<u32, u64>)> = None;
        let db = self.params.dbname.clone();
        let mut last_key: Vec<String> = Vec::new();
        let mut value_len = 256;
        loop {
            let limit = chunked.then_some(self.cfg.snapshot_chunk_rows);
            let start = progress.last_key.as_deref().or(progress.lower.as_deref());
            let sql = chunk_sql(table, start, progress.upper.as_deref(), limit);
            let mut in_chunk = 0u64;
            // One clock reading per chunk: the rows of a chunk are read at one moment anyway,
            // so every envelope of the chunk ends the same way.
            let read_ms = polylog_log::now_ms();
            let src = SourceInfo {
                name: &self.name,
                db: &db,
                lsn: Some(lsn),
                tx_id: None,
                ts_ms: read_ms,
                snapshot: "true",
                processed_ms: read_ms,
            };
            let tail = envelope_tail(table, "r", &src);
            let copied = conn.copy_out(&sql, |line: &[u8]| -> Result<(), SourceError> {
                event::parse_copy_row(line, &mut row);
                // Values in table column order (excluded columns were not selected).
                let raws = copy_raws(table, &row);
                let key_bytes = key_object(&mut conv, table, &raws);
                let mut value = Vec::with_capacity(value_len + 16);
                value.extend_from_slice(b"{\"before\":null,\"after\":");
                let after_at = value.len();
                write_row_object(&mut conv, table, &raws, None, &mut value);
                let after_end = value.len();
                value.extend_from_slice(&tail);
                value_len = value.len();
                if row_len(&raws) >= TOAST_ROW_BYTES_MIN {
                    let after = value[after_at..after_end].to_vec();
                    let mut images = images.lock().unwrap_or_else(|e| e.into_inner());
                    images.set(&topic, &key_bytes, Position::default(), Some(after))?;
                }
                let p = match self.opts.partitions {
                    1 => 0,
                    n => partition_for_key(&key_bytes, n),
                };
                pending.entry(p).or_default().push(Record::new(key_bytes, value));
                pending_n += 1;
                set_key_text(table, &raws, &mut last_key);
                in_chunk += 1;
                if pending_n >= PENDING_RECORDS_MAX {
                    self.append_pending(&topic, &mut pending, &mut ends)?;
                    pending_n = 0;
                }
                Ok(())
            })?;
            self.append_pending(&topic, &mut pending, &mut ends)?;
            pending_n = 0;
            progress.rows += copied;
            if in_chunk > 0 {
                progress.last_key = Some(last_key.clone());
            }
            let finished = !chunked || in_chunk < self.cfg.snapshot_chunk_rows;
            progress.done = finished;
            // A chunk's progress is saved once its records are durable, which is checked after
            // the next chunk is read: reading goes on while the records reach the disk.
            if let Some((prev, prev_ends)) = unsaved.replace((progress.clone(), ends.clone())) {
                self.save_progress(table, range, &topic, prev, &prev_ends, shared, images)?;
            }
            self.set_status(|s| s.snapshot_rows += copied);
            if finished {
                break;
            }
        }
        if let Some((last, last_ends)) = unsaved.take() {
            self.save_progress(table, range, &topic, last, &last_ends, shared, images)?;
        }
        conn.execute("COMMIT")?;
        Ok(())
    }

    /// Waits until a chunk's records are durable, then records its range's progress.
    #[allow(clippy::too_many_arguments)]
    fn save_progress(
        &self,
        table: &TableSchema,
        range: usize,
        topic: &str,
        progress: RangeProgress,
        ends: &HashMap<u32, u64>,
        shared: &Mutex<(SourceState, usize)>,
        images: &Mutex<RowImages>,
    ) -> Result<(), SourceError> {
        for (&p, &end) in ends {
            self.log.wait_durable(topic, p, end, DURABLE_TIMEOUT)?;
        }
        images.lock().unwrap_or_else(|e| e.into_inner()).commit(true)?;
        let mut g = shared.lock().unwrap_or_else(|e| e.into_inner());
        let t = g.0.tables.entry(table.qualified()).or_default();
        if let Some(r) = t.ranges.get_mut(range) {
            *r = progress;
        }
        t.rows = t.ranges.iter().map(|r| r.rows).sum();
        t.done = t.ranges.iter().all(|r| r.done);
        g.0.save(&self.state_path())
    }

    fn append_pending(
        &self,
        topic: &str,
        pending: &mut BTreeMap<u32, Vec<Record>>,
        ends: &mut HashMap<u32, u64>,
    ) -> Result<(), SourceError> {
        for (&p, batch) in pending.iter_mut() {
            if batch.is_empty() {
                continue;
            }
            let a = self.log.append(topic, p, batch)?;
            ends.insert(p, a.last_offset + 1);
            batch.clear();
        }
        Ok(())
    }
}

impl Drop for Streamer<'_> {
    /// Whatever this stream appended becomes durable before the next one (a retry in this
    /// process) reads the partitions' last positions: otherwise it could write them again.
    fn drop(&mut self) {
        for ((topic, p), end) in self.unsynced.drain() {
            let _ = self.src.log.wait_durable(&topic, p, end, Duration::from_secs(10));
        }
    }
}

/// A table as the stream knows it: its schema (updated by Relation messages) and topic.
struct StreamTable {
    schema: TableSchema,
    topic: String,
}

/// The streaming half: decodes pgoutput, writes events, acknowledges durable positions.
struct Streamer<'a> {
    src: &'a PostgresSource,
    by_name: HashMap<String, TableSchema>,
    relations: HashMap<u32, StreamTable>,
    conn: Connection,
    stream: ReplicationStream,
    conv: Converter,
    /// Last position each partition holds (loaded on first use), for dropping replays.
    last_stored: HashMap<(String, u32), Position>,
    /// Records waiting to be appended, by (topic, partition).
    pending: BTreeMap<(String, u32), Vec<Record>>,
    pending_n: usize,
    /// Offsets to await before the next acknowledgement.
    unsynced: HashMap<(String, u32), u64>,
    tx: Option<Tx>,
    /// End LSN of the last transaction fully written.
    committed_end: u64,
    /// Highest LSN safe to acknowledge while no transaction is open (keepalives, heartbeats).
    idle_lsn: u64,
    acked: u64,
    last_status: Instant,
    /// When the last captured message or heartbeat arrived.
    last_activity: Instant,
    /// When anything last arrived from the server.
    last_recv: Instant,
    heartbeat_failed: bool,
    last_wal: u64,
    last_sub: u32,
    images: RowImages,
    /// The source's state: incremental snapshot progress, saved once what it records is durable.
    state: SourceState,
    state_dirty: bool,
    /// The incremental snapshot chunk between its watermarks.
    chunk: Option<Chunk>,
    chunk_seq: u64,
    /// Distinguishes this run's watermarks from replayed ones of earlier runs.
    run_token: String,
    /// The last shape recorded in the schema history topic, by table.
    recorded_schemas: HashMap<String, Value>,
}

/// One chunk of an incremental snapshot (DBLog), read in a snapshot and held until the high
/// watermark written after it comes back through the stream. A row that a transaction the
/// snapshot could not see changes before then is dropped from the chunk (the stream has the
/// newer version); the rest are emitted at the watermark. (Visibility, not WAL position,
/// decides: a transaction's commit record can precede a watermark in the WAL and still be
/// invisible to a snapshot taken after it.)
struct Chunk {
    id: u64,
    table: String,
    rows: BTreeMap<Vec<u8>, Vec<u8>>,
    snapshot: XidSnapshot,
    last_key: Option<Vec<String>>,
    read: u64,
}

/// `pg_current_snapshot()`: which transactions a snapshot sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct XidSnapshot {
    xmin: u64,
    xmax: u64,
    in_progress: std::collections::HashSet<u64>,
}

impl XidSnapshot {
    /// Parses `xmin:xmax:xip,xip,...`.
    fn parse(s: &str) -> Option<XidSnapshot> {
        let mut parts = s.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let in_progress = parts
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|x| !x.is_empty())
            .filter_map(|x| x.parse().ok())
            .collect();
        Some(XidSnapshot { xmin, xmax, in_progress })
    }

    /// Whether the snapshot sees the (committed) transaction `xid`, a 32-bit xid as pgoutput
    /// sends it, widened with the snapshot's epoch.
    fn sees(&self, xid: u32) -> bool {
        // The 64-bit xid nearest xmax with these low 32 bits (xids are compared modulo 2^32
        // within half the range, as Postgres does).
        let delta = i64::from(xid.wrapping_sub(self.xmax as u32) as i32);
        let Ok(full) = u64::try_from(self.xmax as i64 + delta) else { return true };
        full < self.xmin || (full < self.xmax && !self.in_progress.contains(&full))
    }
}

/// Prefix of the watermark messages written to the WAL.
const WATERMARK_PREFIX: &str = "polylog-watermark";

struct Tx {
    commit_lsn: u64,
    xid: u32,
    commit_time_ms: i64,
    counts: BTreeMap<String, u64>,
}

/// Fills the unchanged TOAST columns of `after` from the row's last image. Returns the image
/// and whether every column has its real value (else the documented placeholder remains).
fn fill_unchanged_toast(
    after: Vec<u8>,
    table: &TableSchema,
    raws: &[Raw<'_>],
    stored: Option<&[u8]>,
) -> (Vec<u8>, bool) {
    let missing: Vec<&str> = table
        .columns
        .iter()
        .zip(raws)
        .filter(|(c, r)| !c.excluded && **r == Raw::UnchangedToast)
        .map(|(c, _)| c.name.as_str())
        .collect();
    if missing.is_empty() {
        return (after, true);
    }
    let stored: Option<Value> = stored.and_then(|s| serde_json::from_slice(s).ok());
    let Ok(mut image) = serde_json::from_slice::<Value>(&after) else { return (after, false) };
    let mut complete = true;
    for name in missing {
        match stored.as_ref().and_then(|s| s.get(name)) {
            Some(v) => image[name] = v.clone(),
            None => complete = false,
        }
    }
    (serde_json::to_vec(&image).unwrap_or(after), complete)
}

/// `COPY (SELECT <captured columns> ...) TO STDOUT` for the rows after `last_key` in key order,
/// at most `limit` of them (all of them, unordered, without a limit).
fn chunk_sql(
    table: &TableSchema,
    last_key: Option<&[String]>,
    upper: Option<&[String]>,
    limit: Option<u64>,
) -> String {
    let select: Vec<String> =
        table.columns.iter().filter(|c| !c.excluded).map(|c| quote_ident(&c.name)).collect();
    let key_cols: Vec<String> =
        table.key.iter().map(|&i| quote_ident(&table.columns[i].name)).collect();
    let mut sql = format!("COPY (SELECT {} FROM {}", select.join(", "), table.sql_name());
    let literals = |values: &[String]| -> String {
        let lits: Vec<String> = table
            .key
            .iter()
            .zip(values)
            .map(|(&i, v)| format!("{}::{}", quote_literal(v), table.columns[i].type_name))
            .collect();
        lits.join(", ")
    };
    if let Some(limit) = limit {
        let mut conditions = Vec::new();
        if let Some(last) = last_key {
            conditions.push(format!("({}) > ({})", key_cols.join(", "), literals(last)));
        }
        if let Some(upper) = upper {
            conditions.push(format!("({}) <= ({})", key_cols.join(", "), literals(upper)));
        }
        if !conditions.is_empty() {
            sql.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
        }
        sql.push_str(&format!(" ORDER BY {} LIMIT {limit}", key_cols.join(", ")));
    }
    sql.push_str(") TO STDOUT");
    sql
}

/// A row's values from a COPY row of the captured columns, in table column order.
fn copy_raws<'r>(table: &TableSchema, row: &'r [Option<Vec<u8>>]) -> Vec<Raw<'r>> {
    let mut raws = vec![Raw::Null; table.columns.len()];
    let captured = table.columns.iter().enumerate().filter(|(_, c)| !c.excluded).map(|(i, _)| i);
    for (i, v) in captured.zip(row) {
        raws[i] = v.as_deref().map_or(Raw::Null, Raw::Text);
    }
    raws
}

/// A table's columns as the schema history records them.
fn schema_columns(table: &TableSchema) -> Value {
    table
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "name": c.name, "type": c.type_name, "type_oid": c.type_oid,
                "key": table.key.contains(&i), "excluded": c.excluded, "masked": c.masked,
            })
        })
        .collect()
}

fn schema_history_value(source: &str, table: &str, lsn: u64, columns: Value) -> Value {
    json!({
        "source": source,
        "table": table,
        "lsn": lsn,
        "ts_ms": polylog_log::now_ms(),
        "columns": columns,
    })
}

/// The latest columns the schema history topic holds per table (it holds a record per shape
/// change, so it stays small).
pub fn read_recorded_schemas(
    log: &dyn Log,
    topic: &str,
) -> Result<HashMap<String, Value>, LogError> {
    let mut out = HashMap::new();
    let end = log.durable_offset(topic, 0)?;
    let mut reader = log.reader(topic, 0, StartAt::Beginning)?;
    while reader.position() < end {
        let records = reader.poll(1000, Duration::ZERO)?;
        if records.is_empty() {
            break;
        }
        for r in records {
            let v: Value =
                r.value.as_deref().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default();
            if let Some(table) = v["table"].as_str() {
                out.insert(table.to_string(), v["columns"].clone());
            }
        }
    }
    Ok(out)
}

/// Sets `out` to the key columns of a row as text, for resuming after it (reusing its buffers:
/// this runs for every row of a snapshot).
fn set_key_text(table: &TableSchema, raws: &[Raw<'_>], out: &mut Vec<String>) {
    out.resize(table.key.len(), String::new());
    for (&i, s) in table.key.iter().zip(out.iter_mut()) {
        s.clear();
        if let Raw::Text(t) = raws[i] {
            match std::str::from_utf8(t) {
                Ok(t) => s.push_str(t),
                Err(_) => s.push_str(&String::from_utf8_lossy(t)),
            }
        }
    }
}

/// Bytes of a row's values in text form (to tell rows that may have TOASTed values).
fn row_len(raws: &[Raw<'_>]) -> usize {
    raws.iter().map(|r| if let Raw::Text(t) = r { t.len() } else { 0 }).sum()
}

fn raws(v: &[TupleValue]) -> Vec<Raw<'_>> {
    v.iter()
        .map(|x| match x {
            TupleValue::Null => Raw::Null,
            TupleValue::UnchangedToast => Raw::UnchangedToast,
            TupleValue::Text(t) | TupleValue::Binary(t) => Raw::Text(t),
        })
        .collect()
}

fn pg_time_to_ms(us: i64) -> i64 {
    (us + crate::wire::PG_EPOCH_OFFSET_US) / 1000
}

impl<'a> Streamer<'a> {
    fn new(
        src: &'a PostgresSource,
        tables: Vec<TableSchema>,
        conn: Connection,
        stream: ReplicationStream,
        images: RowImages,
        state: SourceState,
    ) -> Self {
        Streamer {
            src,
            by_name: tables.into_iter().map(|t| (t.qualified(), t)).collect(),
            relations: HashMap::new(),
            conn,
            stream,
            conv: Converter::new(src.mask_key.clone()),
            last_stored: HashMap::new(),
            pending: BTreeMap::new(),
            pending_n: 0,
            unsynced: HashMap::new(),
            tx: None,
            committed_end: 0,
            idle_lsn: 0,
            acked: 0,
            last_status: Instant::now(),
            last_activity: Instant::now(),
            last_recv: Instant::now(),
            heartbeat_failed: false,
            last_wal: 0,
            last_sub: 0,
            images,
            state,
            state_dirty: false,
            chunk: None,
            chunk_seq: 0,
            recorded_schemas: HashMap::new(),
            run_token: format!(
                "{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ),
        }
    }

    fn load_recorded_schemas(&mut self) -> Result<(), SourceError> {
        self.recorded_schemas = read_recorded_schemas(&*self.src.log, &self.src.schema_topic())?;
        Ok(())
    }

    fn run(&mut self, stop: &AtomicBool) -> Result<(), SourceError> {
        self.load_recorded_schemas()?;
        let interval = Duration::from_millis(self.src.cfg.status_interval_ms.max(10));
        loop {
            if stop.load(Ordering::SeqCst) {
                // Leave cleanly: what is written becomes durable and acknowledged; an open
                // transaction is replayed next time and its stored part dropped.
                self.acknowledge()?;
                return Ok(());
            }
            let mut reply = false;
            let received = self.stream.recv(RECV_TIMEOUT)?;
            if received.is_some() {
                self.last_recv = Instant::now();
            } else if self.last_recv.elapsed() > SILENCE_MAX {
                // We ask for a keepalive after a quiet spell; none came: the peer is gone.
                return Err(crate::wire::PgError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no message from the server for {SILENCE_MAX:?}"),
                ))
                .into());
            }
            match received {
                Some(ReplicationMessage::XLogData { wal_start, data, .. }) => {
                    self.last_activity = Instant::now();
                    let msg = pgoutput::decode(&data, false)
                        .map_err(|e| SourceError::Decode(e.to_string()))?;
                    self.handle(wal_start, msg)?;
                    self.src.set_status(|s| s.received_lsn = Some(format_lsn(wal_start)));
                }
                Some(ReplicationMessage::Keepalive { wal_end, reply_requested, .. }) => {
                    if self.tx.is_none() {
                        self.idle_lsn = self.idle_lsn.max(wal_end);
                        // Between transactions, a keepalive says the server has sent
                        // everything: the source is not behind.
                        self.src.set_status(|s| s.behind_ms = 0);
                    }
                    reply = reply_requested;
                }
                None => {}
            }
            if reply || self.last_status.elapsed() >= interval {
                self.acknowledge()?;
            }
            self.heartbeat()?;
            self.next_chunk()?;
        }
    }

    /// Writes a heartbeat into the WAL when nothing captured has arrived for a while: other
    /// tables' (or databases') changes otherwise hold the slot back and WAL piles up. The
    /// message comes back through the stream, and its position is acknowledged.
    fn heartbeat(&mut self) -> Result<(), SourceError> {
        let every = self.src.cfg.heartbeat_interval_ms;
        if every == 0
            || self.tx.is_some()
            || self.last_activity.elapsed() < Duration::from_millis(every)
        {
            return Ok(());
        }
        self.last_activity = Instant::now();
        match self.conn.execute("SELECT pg_logical_emit_message(false, 'polylog-heartbeat', '')") {
            Ok(()) => Ok(()),
            Err(e) if e.code().is_some() => {
                // A privilege problem is worth one warning, not a stop.
                if !self.heartbeat_failed {
                    tracing::warn!("source {}: heartbeats disabled: {e}", self.src.name);
                    self.heartbeat_failed = true;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes everything written durable, then tells Postgres how far that reaches.
    fn acknowledge(&mut self) -> Result<(), SourceError> {
        if self.tx.is_none() {
            self.flush_pending()?;
        }
        for ((topic, p), end) in self.unsynced.drain() {
            self.src.log.wait_durable(&topic, p, end, DURABLE_TIMEOUT)?;
        }
        // Row images and snapshot progress become durable only now that the log is, and only
        // between transactions (inside one, some of its records are still in memory).
        if self.tx.is_none() && self.pending_n == 0 {
            self.images.commit(true)?;
            if self.state_dirty {
                self.state.save(&self.src.state_path())?;
                self.state_dirty = false;
            }
        }
        let mut flushed = self.committed_end;
        if self.tx.is_none() && self.pending_n == 0 {
            flushed = flushed.max(self.idle_lsn);
        }
        flushed = flushed.max(self.acked);
        // After a quiet spell, ask the server to answer, so a dead connection shows.
        let ask = self.last_recv.elapsed() > SILENCE_MAX / 4;
        self.stream.send_status(flushed, flushed, flushed, ask)?;
        self.acked = flushed;
        self.last_status = Instant::now();
        self.src.set_status(|s| s.flushed_lsn = Some(format_lsn(flushed)));
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<(), SourceError> {
        for ((topic, p), batch) in self.pending.iter_mut() {
            if batch.is_empty() {
                continue;
            }
            let a = self.src.log.append(topic, *p, batch)?;
            self.unsynced.insert((topic.clone(), *p), a.last_offset + 1);
            batch.clear();
        }
        self.pending_n = 0;
        Ok(())
    }

    /// The last position stored in a partition (read once, then tracked).
    fn stored(&mut self, topic: &str, p: u32) -> Result<Position, SourceError> {
        let k = (topic.to_string(), p);
        if let Some(pos) = self.last_stored.get(&k) {
            return Ok(*pos);
        }
        let end = self.src.log.durable_offset(topic, p)?;
        let mut pos = Position::default();
        if end > 0 {
            // Read to the end: a Kafka reader fetches over the network (nothing is there at
            // once), and a cluster may report an end below what it holds; the last record
            // read carries the position.
            let mut r = self.src.log.reader(topic, p, StartAt::Offset(end - 1))?;
            let deadline = Instant::now() + DURABLE_TIMEOUT;
            loop {
                let wait = if r.position() < end {
                    deadline.saturating_duration_since(Instant::now())
                } else {
                    Duration::ZERO
                };
                let got = r.poll(1000, wait)?;
                let Some(rec) = got.last() else {
                    if r.position() < end {
                        return Err(SourceError::Log(polylog_log::LogError::Timeout(
                            DURABLE_TIMEOUT,
                        )));
                    }
                    break;
                };
                pos = Position::from_headers(&rec.headers).unwrap_or_default();
            }
        }
        self.last_stored.insert(k, pos);
        Ok(pos)
    }

    /// Queues records for a partition unless the partition already holds `pos`.
    fn emit(
        &mut self,
        topic: &str,
        key: Option<Vec<u8>>,
        records: Vec<Record>,
        pos: Position,
    ) -> Result<bool, SourceError> {
        let p = key.as_deref().map_or(0, |k| partition_for_key(k, self.partitions_of(topic)));
        self.emit_to(topic, p, records, pos)
    }

    fn partitions_of(&self, topic: &str) -> u32 {
        if topic == self.src.transaction_topic() || topic == self.src.schema_topic() {
            1
        } else {
            self.src.opts.partitions
        }
    }

    fn emit_to(
        &mut self,
        topic: &str,
        p: u32,
        records: Vec<Record>,
        pos: Position,
    ) -> Result<bool, SourceError> {
        if pos <= self.stored(topic, p)? {
            return Ok(false); // already stored before a crash: a replay
        }
        self.last_stored.insert((topic.to_string(), p), pos);
        let header = pos.to_header();
        let queue = self.pending.entry((topic.to_string(), p)).or_default();
        for mut r in records {
            r.headers.push(header.clone());
            queue.push(r);
            self.pending_n += 1;
        }
        if self.pending_n >= PENDING_RECORDS_MAX {
            self.flush_pending()?;
        }
        Ok(true)
    }

    fn position(&mut self, wal: u64) -> Position {
        let commit_lsn = self.tx.as_ref().map_or(wal, |t| t.commit_lsn);
        if wal == self.last_wal {
            self.last_sub += 1;
        } else {
            self.last_wal = wal;
            self.last_sub = 0;
        }
        Position { commit_lsn, change_lsn: wal, sub: self.last_sub }
    }

    fn handle(&mut self, wal: u64, msg: Message) -> Result<(), SourceError> {
        match msg {
            Message::Begin { final_lsn, commit_time_us, xid } => {
                self.tx = Some(Tx {
                    commit_lsn: final_lsn,
                    xid,
                    commit_time_ms: pg_time_to_ms(commit_time_us),
                    counts: BTreeMap::new(),
                });
                self.last_wal = 0;
                self.last_sub = 0;
                let id = format!("{xid}:{final_lsn}");
                let value = json!({"status": "BEGIN", "id": id, "event_count": null, "data_collections": null, "ts_ms": pg_time_to_ms(commit_time_us)});
                let pos = Position { commit_lsn: final_lsn, change_lsn: 0, sub: 0 };
                self.emit_json(&self.src.transaction_topic(), json!({"id": id}), Some(value), pos)?;
            }
            Message::Commit { end_lsn, commit_lsn, .. } => {
                let Some(tx) = self.tx.take() else { return Ok(()) };
                let id = format!("{}:{}", tx.xid, tx.commit_lsn);
                let total: u64 = tx.counts.values().sum();
                let collections: Vec<Value> = tx
                    .counts
                    .iter()
                    .map(|(t, n)| json!({"data_collection": t, "event_count": n}))
                    .collect();
                let value = json!({"status": "END", "id": id, "event_count": total, "data_collections": collections, "ts_ms": tx.commit_time_ms});
                let pos = Position {
                    commit_lsn: tx.commit_lsn.max(commit_lsn),
                    change_lsn: u64::MAX,
                    sub: 0,
                };
                self.emit_json(&self.src.transaction_topic(), json!({"id": id}), Some(value), pos)?;
                self.flush_pending()?;
                self.committed_end = end_lsn;
                self.idle_lsn = self.idle_lsn.max(end_lsn);
                let behind = (polylog_log::now_ms() - tx.commit_time_ms).max(0);
                self.src.set_status(|s| {
                    s.transactions += 1;
                    s.events += total;
                    s.behind_ms = behind;
                });
            }
            Message::Relation(r) => self.relation(wal, r)?,
            Message::Insert { relation, new } => {
                self.row_change(wal, relation, "c", None, Some(new))?
            }
            Message::Update { relation, key, old, new } => {
                let old_image = old.map(|o| (o, false)).or(key.map(|k| (k, true)));
                self.row_change(wal, relation, "u", old_image, Some(new))?
            }
            Message::Delete { relation, key, old } => {
                let old_image = old.map(|o| (o, false)).or(key.map(|k| (k, true)));
                self.row_change(wal, relation, "d", old_image, None)?
            }
            Message::Truncate { relations, .. } => {
                for rel in relations {
                    let Some(t) = self.relations.get(&rel) else { continue };
                    let (schema, topic) = (t.schema.clone(), t.topic.clone());
                    let pos = self.position(wal);
                    let src = self.source_info(wal);
                    let value = envelope(&schema, "t", None, None, &src);
                    let rec = Record { key: None, value: Some(value), ..Record::default() };
                    self.images.clear_topic(&topic)?;
                    let xid = self.tx.as_ref().map_or(0, |t| t.xid);
                    if let Some(ch) = self
                        .chunk
                        .as_mut()
                        .filter(|c| c.table == schema.qualified() && !c.snapshot.sees(xid))
                    {
                        ch.rows.clear();
                    }
                    // One in every partition, so each partition's changes are ordered around
                    // it (a consumer of one partition drops the rows of that partition).
                    // Counted whether written now or before a crash: END tells the whole story.
                    for p in 0..self.partitions_of(&topic) {
                        self.emit_to(&topic, p, vec![rec.clone()], pos)?;
                        self.count(&schema);
                    }
                }
            }
            Message::LogicalMessage { lsn, prefix, content, .. } => {
                if self.tx.is_none() {
                    self.idle_lsn = self.idle_lsn.max(lsn);
                }
                if prefix == WATERMARK_PREFIX {
                    self.watermark(lsn, &String::from_utf8_lossy(&content))?;
                }
            }
            Message::Type { .. } | Message::Origin { .. } => {}
            Message::StreamStart { .. }
            | Message::StreamStop
            | Message::StreamCommit { .. }
            | Message::StreamAbort { .. } => {
                return Err(SourceError::Decode("streamed transactions were not requested".into()));
            }
        }
        Ok(())
    }

    /// A row inserted into the signal table: `execute-snapshot` queues tables for an
    /// incremental snapshot.
    fn signal(&mut self, table: &TableSchema, row: &[Raw<'_>]) -> Result<(), SourceError> {
        let field = |name: &str| {
            table.columns.iter().position(|c| c.name == name).and_then(|i| match row.get(i) {
                Some(Raw::Text(t)) => Some(String::from_utf8_lossy(t).into_owned()),
                _ => None,
            })
        };
        let (id, kind) = (field("id").unwrap_or_default(), field("type").unwrap_or_default());
        if kind != "execute-snapshot" {
            tracing::warn!(
                "source {}: ignoring signal {id:?} of unknown type {kind:?}",
                self.src.name
            );
            return Ok(());
        }
        if self.state.signals_done.contains(&id) {
            return Ok(()); // replayed after a restart
        }
        let data: Value =
            field("data").and_then(|d| serde_json::from_str(&d).ok()).unwrap_or_default();
        let wanted: Vec<String> = data["data-collections"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let inc = self.state.incremental.get_or_insert_with(Default::default);
        for t in wanted {
            if !self.by_name.contains_key(&t) {
                tracing::warn!(
                    "source {}: signal {id:?}: {t} is not a captured table",
                    self.src.name
                );
            } else if !inc.queue.contains(&t) {
                tracing::info!("source {}: incremental snapshot of {t} requested", self.src.name);
                inc.queue.push(t);
            }
        }
        self.state.signals_done.push(id);
        let excess = self.state.signals_done.len().saturating_sub(100);
        self.state.signals_done.drain(..excess);
        self.state_dirty = true;
        Ok(())
    }

    /// Starts the next chunk of an incremental snapshot, if one is due: reads the chunk in a
    /// snapshot, noting which transactions it sees, then writes the high watermark. The stream
    /// decides, until the watermark comes back, which rows of the chunk stand.
    fn next_chunk(&mut self) -> Result<(), SourceError> {
        if self.chunk.is_some() || self.tx.is_some() {
            return Ok(());
        }
        let Some(inc) = self.state.incremental.as_mut() else { return Ok(()) };
        let Some(name) = inc.queue.first().cloned() else {
            tracing::info!("source {}: incremental snapshot done", self.src.name);
            self.state.incremental = None;
            self.state_dirty = true;
            return Ok(());
        };
        let Some(table) = self.by_name.get(&name).cloned() else {
            inc.queue.remove(0);
            inc.last_key = None;
            return Ok(());
        };
        let last_key = inc.last_key.clone();
        self.chunk_seq += 1;
        let id = self.chunk_seq;
        let mark = |kind: &str| {
            let token = &self.run_token;
            format!("SELECT pg_logical_emit_message(false, '{WATERMARK_PREFIX}', '{kind}:{token}:{id}')")
        };
        let sql =
            chunk_sql(&table, last_key.as_deref(), None, Some(self.src.cfg.snapshot_chunk_rows));
        let rows = self.conn.query(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT pg_current_snapshot()::text",
        )?;
        let snapshot = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|s| XidSnapshot::parse(&s));
        let Some(snapshot) = snapshot else {
            self.conn.execute("ROLLBACK")?;
            return Err(SourceError::Decode(
                "pg_current_snapshot() returned something unexpected".into(),
            ));
        };
        let mut chunk =
            Chunk { id, table: name, rows: BTreeMap::new(), snapshot, last_key: None, read: 0 };
        let mut row = Vec::new();
        let conv = &mut self.conv;
        self.conn.copy_out(&sql, |line: &[u8]| -> Result<(), SourceError> {
            event::parse_copy_row(line, &mut row);
            let raws = copy_raws(&table, &row);
            let key = key_object(conv, &table, &raws);
            chunk.rows.insert(key, row_object(conv, &table, &raws, None));
            let mut last = Vec::new();
            set_key_text(&table, &raws, &mut last);
            chunk.last_key = Some(last);
            chunk.read += 1;
            Ok(())
        })?;
        self.conn.execute("COMMIT")?;
        self.conn.execute(&mark("high"))?;
        self.chunk = Some(chunk);
        Ok(())
    }

    /// A watermark came back through the stream.
    fn watermark(&mut self, lsn: u64, content: &str) -> Result<(), SourceError> {
        let mut parts = content.splitn(3, ':');
        let (Some(kind), Some(token), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            return Ok(());
        };
        let ours = token == self.run_token
            && kind == "high"
            && self.chunk.as_ref().is_some_and(|c| id.parse() == Ok(c.id));
        if !ours {
            return Ok(()); // a watermark of a chunk from before a restart
        }
        let Some(chunk) = self.chunk.take() else { return Ok(()) };
        let Some(table) = self.by_name.get(&chunk.table).cloned() else { return Ok(()) };
        let topic = self.src.table_topic(&table.schema, &table.name);
        let src = SourceInfo {
            name: &self.src.name,
            db: &self.src.params.dbname,
            lsn: Some(lsn),
            tx_id: None,
            ts_ms: polylog_log::now_ms(),
            snapshot: "incremental",
            processed_ms: polylog_log::now_ms(),
        };
        let mut emitted = Vec::with_capacity(chunk.rows.len());
        for (i, (key, after)) in chunk.rows.into_iter().enumerate() {
            let value = envelope(&table, "r", None, Some(&after), &src);
            emitted.push((key, value, i));
        }
        for (key, value, i) in emitted {
            // `lsn` is the end of the watermark message: a transaction may commit right there,
            // and its changes (change LSN > 0) must sort after these rows.
            let pos = Position { commit_lsn: lsn, change_lsn: 0, sub: i as u32 };
            self.emit_bytes(&topic, key, Some(value), pos, false)?;
        }
        let done = chunk.read < self.src.cfg.snapshot_chunk_rows;
        if let Some(inc) = self.state.incremental.as_mut() {
            inc.rows += chunk.read;
            inc.last_key = chunk.last_key;
            if done {
                inc.queue.retain(|t| *t != chunk.table);
                inc.last_key = None;
            }
        }
        self.state_dirty = true;
        Ok(())
    }

    fn source_info(&self, wal: u64) -> SourceInfo<'a> {
        SourceInfo {
            name: &self.src.name,
            db: &self.src.params.dbname,
            lsn: Some(wal),
            tx_id: self.tx.as_ref().map(|t| t.xid),
            ts_ms: self.tx.as_ref().map_or(0, |t| t.commit_time_ms),
            snapshot: "false",
            processed_ms: polylog_log::now_ms(),
        }
    }

    fn count(&mut self, t: &TableSchema) {
        if let Some(tx) = self.tx.as_mut() {
            *tx.counts.entry(t.qualified()).or_default() += 1;
        }
    }

    fn emit_json(
        &mut self,
        topic: &str,
        key: Value,
        value: Option<Value>,
        pos: Position,
    ) -> Result<bool, SourceError> {
        let value = value.map(|v| serde_json::to_vec(&v).unwrap_or_default());
        self.emit_bytes(topic, serde_json::to_vec(&key).unwrap_or_default(), value, pos, false)
    }

    fn emit_bytes(
        &mut self,
        topic: &str,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        pos: Position,
        tombstone: bool,
    ) -> Result<bool, SourceError> {
        let mut records = vec![Record { key: Some(key.clone()), value, ..Record::default() }];
        if tombstone {
            records.push(Record::tombstone(key.clone()));
        }
        self.emit(topic, Some(key), records, pos)
    }

    /// A Relation message: the table's current shape. Types the catalog knows better (enums,
    /// domains) are taken from the discovered schema; a changed shape is recorded in the
    /// schema history topic.
    fn relation(&mut self, wal: u64, r: pgoutput::Relation) -> Result<(), SourceError> {
        let namespace =
            if r.namespace.is_empty() { "pg_catalog".to_string() } else { r.namespace.clone() };
        let qualified = format!("{namespace}.{}", r.name);
        let known = self.by_name.get(&qualified).cloned();
        let mut columns = Vec::with_capacity(r.columns.len());
        for c in &r.columns {
            let prior = known.as_ref().and_then(|k| {
                k.columns.iter().find(|kc| kc.name == c.name && kc.type_oid == c.type_oid)
            });
            let full = format!("{qualified}.{}", c.name);
            let (ty, type_name) = match prior {
                Some(p) => (p.ty.clone(), p.type_name.clone()),
                None => self.lookup_type(c.type_oid, c.type_modifier)?,
            };
            columns.push(ColumnSchema {
                name: c.name.clone(),
                type_oid: c.type_oid,
                type_name,
                ty,
                excluded: self
                    .src
                    .cfg
                    .exclude_columns
                    .iter()
                    .any(|p| crate::config::glob_match(p, &full)),
                masked: self
                    .src
                    .cfg
                    .mask_columns
                    .iter()
                    .any(|p| crate::config::glob_match(p, &full)),
            });
        }
        let mut key: Vec<usize> = r
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.flags & 1 == 1)
            .map(|(i, _)| i)
            .collect();
        if let Some(k) = &known {
            // The primary key, by name, when the table has one (the relation flags the replica
            // identity, which is every column under REPLICA IDENTITY FULL).
            let by_name: Vec<usize> = k
                .key
                .iter()
                .filter_map(|&i| columns.iter().position(|c| c.name == k.columns[i].name))
                .collect();
            if by_name.len() == k.key.len() {
                key = by_name;
            }
        }
        let schema = TableSchema {
            oid: r.oid,
            schema: namespace.clone(),
            name: r.name.clone(),
            replica_identity: r.replica_identity as char,
            columns,
            key,
        };
        let columns = schema_columns(&schema);
        // Recorded once per shape, not once per (re)start.
        if self.recorded_schemas.get(&qualified) != Some(&columns) {
            self.recorded_schemas.insert(qualified.clone(), columns.clone());
            let history = schema_history_value(&self.src.name, &qualified, wal, columns);
            let pos = self.position(wal);
            self.emit_json(
                &self.src.schema_topic(),
                json!({"table": qualified}),
                Some(history),
                pos,
            )?;
        }
        let topic = self.src.table_topic(&namespace, &r.name);
        self.by_name.insert(qualified, schema.clone());
        self.relations.insert(r.oid, StreamTable { schema, topic });
        Ok(())
    }

    /// How to convert a column type the catalog scan did not see (a new column), and its name
    /// as SQL writes it (for key literals in snapshot queries).
    fn lookup_type(&mut self, oid: u32, typmod: i32) -> Result<(PgType, String), SourceError> {
        let rows = self.conn.query(&format!(
            "SELECT t.typtype, t.typbasetype, COALESCE(e.typtype, ''), COALESCE(e.oid, 0), \
             format_type(t.oid, {typmod}) FROM pg_type t \
             LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A' WHERE t.oid = {oid}"
        ))?;
        let Some(r) = rows.first() else { return Ok((PgType::from_oid(oid), oid.to_string())) };
        let f = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        let ty = schema::column_type(
            oid,
            &f(0),
            f(1).parse().unwrap_or(0),
            &f(2),
            f(3).parse().unwrap_or(0),
        );
        Ok((ty, f(4)))
    }

    fn row_change(
        &mut self,
        wal: u64,
        relation: u32,
        op: &str,
        old: Option<(Vec<TupleValue>, bool)>,
        new: Option<Vec<TupleValue>>,
    ) -> Result<(), SourceError> {
        let Some(t) = self.relations.get(&relation) else {
            return Err(SourceError::Decode(format!("change for unknown relation {relation}")));
        };
        let (table, topic) = (t.schema.clone(), t.topic.clone());
        if self.src.cfg.signal_table.as_deref() == Some(table.qualified().as_str()) {
            if let (Some(n), "c") = (&new, op) {
                self.signal(&table, &raws(n))?;
            }
            return Ok(());
        }
        let xid = self.tx.as_ref().map_or(0, |t| t.xid);
        if let Some(ch) =
            self.chunk.as_mut().filter(|c| c.table == table.qualified() && !c.snapshot.sees(xid))
        {
            // Changed by a transaction the chunk's snapshot did not see: the stream's version
            // wins over the chunk's.
            for image in old.iter().map(|(v, _)| v).chain(new.iter()) {
                let key = key_object(&mut self.conv, &table, &raws(image));
                ch.rows.remove(&key);
            }
        }
        let src = self.source_info(wal);
        let new_raws = new.as_deref().map(raws);
        let old_raws = old.as_ref().map(|(v, _)| raws(v));
        let key_of = |conv: &mut Converter, r: &[Raw<'_>]| key_object(conv, &table, r);
        let image = |conv: &mut Converter, r: &[Raw<'_>], key_only: bool| {
            row_object(conv, &table, r, key_only.then_some(table.key.as_slice()))
        };
        // (key, value, tombstone after)
        let mut out: Vec<(Vec<u8>, Vec<u8>, bool)> = Vec::new();
        let key_only_old = old.as_ref().is_some_and(|(_, k)| *k);
        // The version of row images this change reads and writes.
        let version = Position {
            commit_lsn: self.tx.as_ref().map_or(wal, |t| t.commit_lsn),
            change_lsn: wal,
            sub: 0,
        };
        match (op, &old_raws, &new_raws) {
            ("c", _, Some(n)) => {
                let key = key_of(&mut self.conv, n);
                let after = image(&mut self.conv, n, false);
                if row_len(n) >= TOAST_ROW_BYTES_MIN {
                    self.images.set(&topic, &key, version, Some(after.clone()))?;
                }
                out.push((key, envelope(&table, "c", None, Some(&after), &src), false));
            }
            ("u", o, Some(n)) => {
                let new_key = key_of(&mut self.conv, n);
                let old_key = o.as_ref().map(|o| key_of(&mut self.conv, o));
                let before = o.as_ref().map(|o| image(&mut self.conv, o, key_only_old));
                let after = image(&mut self.conv, n, false);
                // Unchanged TOASTed columns are not sent: take them from the last image.
                let image_key = old_key.clone().unwrap_or_else(|| new_key.clone());
                let stored = if n.contains(&Raw::UnchangedToast) {
                    self.images.get(&topic, &image_key, version)?
                } else {
                    None
                };
                let (after, complete) = fill_unchanged_toast(after, &table, n, stored.as_deref());
                if complete && (row_len(n) >= TOAST_ROW_BYTES_MIN || stored.is_some()) {
                    self.images.set(&topic, &new_key, version, Some(after.clone()))?;
                }
                match old_key {
                    // The key changed: a delete (and tombstone) of the old key, then a create.
                    Some(ok) if ok != new_key => {
                        self.images.set(&topic, &ok, version, None)?;
                        out.push((ok, envelope(&table, "d", before.as_deref(), None, &src), true));
                        out.push((new_key, envelope(&table, "c", None, Some(&after), &src), false));
                    }
                    _ => {
                        let value = envelope(&table, "u", before.as_deref(), Some(&after), &src);
                        out.push((new_key, value, false))
                    }
                }
            }
            ("d", Some(o), _) => {
                let key = key_of(&mut self.conv, o);
                self.images.set(&topic, &key, version, None)?;
                let before = image(&mut self.conv, o, key_only_old);
                out.push((key, envelope(&table, "d", Some(&before), None, &src), true));
            }
            _ => return Err(SourceError::Decode(format!("{op} message without the row it needs"))),
        }
        for (key, value, tombstone) in out {
            let pos = self.position(wal);
            self.emit_bytes(&topic, key, Some(value), pos, tombstone)?;
            self.count(&table);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_slot_names_are_valid_slot_names() {
        assert_eq!(default_object_name("app"), "polylog_app");
        assert_eq!(default_object_name("Orders-EU.v2"), "polylog_orders_eu_v2");
        assert_eq!(default_object_name("a b"), "polylog_a_b");
    }

    #[test]
    fn snapshot_visibility_follows_xmin_xmax_and_in_progress() {
        let s = XidSnapshot::parse("100:105:101,103").expect("snapshot");
        for (xid, seen) in [
            (99, true),
            (100, true),
            (101, false),
            (102, true),
            (103, false),
            (104, true),
            (105, false),
            (200, false),
        ] {
            assert_eq!(s.sees(xid), seen, "xid {xid}");
        }
        // Across an epoch: xids near the top of the previous epoch are old.
        let e = (1u64 << 32) + 10;
        let s = XidSnapshot::parse(&format!("{e}:{}:", e + 5)).expect("snapshot");
        assert!(s.sees(u32::MAX - 3), "from the previous epoch");
        assert!(s.sees(12), "committed between xmin and xmax");
        assert!(!s.sees(16), "at or after xmax");
        assert!(XidSnapshot::parse("garbage").is_none());
    }
}
