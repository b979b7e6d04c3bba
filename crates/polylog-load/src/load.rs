//! The load itself: one reader parsing and routing rows into chunks, `parallel` workers each
//! with its own Postgres connection committing chunks, a progress line, and the resume state.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polylog_postgres::schema::quote_ident;
use polylog_postgres::wire::{ConnectParams, Connection, PgError};

use crate::encode::{copy_binary, parquet_file, parquet_schema, Chunk, RawChunk, RowRef};
use crate::output::Output;
use crate::source::{Delimited, Format, Header, ParquetSource, Record, Source, TopicSource};
use crate::target::{self, quote_table, Router, SchemaFile, Target};
use crate::types::{ColType, Column, ColumnData, Values};
use crate::LoadError;

/// A topic to load from, instead of a file.
#[derive(Clone)]
pub struct TopicInput {
    pub log: Arc<dyn polylog_log::Log>,
    pub topic: String,
}

impl std::fmt::Debug for TopicInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "topic {}", self.topic)
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The input file (unless `topic`).
    pub from: PathBuf,
    /// Load the records of a topic: each run loads what the topic got since the last finished
    /// load of the same topic into the same table.
    pub topic: Option<TopicInput>,
    /// Its format (default: from the file name).
    pub format: Option<Format>,
    pub url: String,
    pub table: String,
    /// Creates the table from this file when it does not exist.
    pub schema_file: Option<PathBuf>,
    /// A directory or `s3://bucket/prefix` for Parquet files.
    pub parquet: Option<String>,
    /// Postgres connections loading at once.
    pub parallel: usize,
    /// Rows per chunk: the unit of commit, of resume and of Parquet files.
    pub chunk_rows: usize,
    pub header: Header,
    pub delimiter: Option<u8>,
    pub null: Option<String>,
    /// Bad rows go here (in the input's format, reasons beside in `<file>.reasons`) instead of
    /// stopping the load.
    pub rejects: Option<PathBuf>,
    /// Names the load for resuming (default: from the table and the input file).
    pub load_id: Option<String>,
    /// Print progress to stderr.
    pub progress: bool,
}

impl LoadOptions {
    pub fn new(from: impl Into<PathBuf>, url: &str, table: &str) -> LoadOptions {
        LoadOptions {
            from: from.into(),
            topic: None,
            format: None,
            url: url.to_string(),
            table: table.to_string(),
            schema_file: None,
            parquet: None,
            parallel: 1,
            chunk_rows: 50_000,
            header: Header::Auto,
            delimiter: None,
            null: None,
            rejects: None,
            load_id: None,
            progress: false,
        }
    }
}

/// What a load did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub load_id: String,
    /// Rows committed by this run.
    pub rows: u64,
    /// Rows found committed by an earlier run of the same load.
    pub resumed_rows: u64,
    pub rejected: u64,
    pub chunks: u64,
    pub elapsed: Duration,
    pub input_bytes: u64,
    pub parquet_files: u64,
    pub parquet_bytes: u64,
    /// The load had already finished; nothing was done.
    pub already_done: bool,
    /// A topic had nothing new since the last load (`load_id` says so).
    pub nothing_new: bool,
    /// The tables and partitions rows went into, with their row counts.
    pub targets: Vec<(String, u64)>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.nothing_new {
            return f.write_str(&self.load_id);
        }
        if self.already_done {
            return write!(
                f,
                "load {:?} had already finished; nothing to do (give --load-id to load the same input again)",
                self.load_id
            );
        }
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "loaded {} in {:.1} s ({:.0} rows/s, {:.1} MB/s of input) in {} chunk{}",
            rows(self.rows),
            secs,
            self.rows as f64 / secs,
            self.input_bytes as f64 / secs / 1e6,
            self.chunks,
            if self.chunks == 1 { "" } else { "s" }
        )?;
        if self.resumed_rows > 0 {
            write!(f, "; {} were already in from an earlier run", rows(self.resumed_rows))?;
        }
        if self.parquet_files > 0 {
            write!(
                f,
                "; Parquet: {} files, {:.1} MB",
                self.parquet_files,
                self.parquet_bytes as f64 / 1e6
            )?;
        }
        if self.rejected > 0 {
            write!(f, "; {} rejected", rows(self.rejected))?;
        }
        for (t, n) in &self.targets {
            write!(f, "\n  {}: {}", t.replace('"', ""), rows(*n))?;
        }
        Ok(())
    }
}

/// "1 row", "1,234 rows".
fn rows(n: u64) -> String {
    format!("{} row{}", group(n), if n == 1 { "" } else { "s" })
}

/// 1234567 as 1,234,567.
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn pg(e: PgError) -> LoadError {
    LoadError::Postgres(e.to_string())
}

/// A chunk closes at this many bytes of input even before `chunk_rows` rows.
const CHUNK_BYTES_MAX: usize = 64 << 20;

const STATE_DDL: &str = "\
CREATE TABLE IF NOT EXISTS polylog_loads (
    load_id text PRIMARY KEY,
    target text NOT NULL,
    source text NOT NULL,
    columns text NOT NULL,
    chunk_rows bigint NOT NULL,
    created_table boolean NOT NULL DEFAULT false,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    rows bigint,
    rejected bigint
);
CREATE TABLE IF NOT EXISTS polylog_load_chunks (
    load_id text NOT NULL,
    chunk bigint NOT NULL,
    rows bigint NOT NULL,
    crc bigint NOT NULL,
    loaded bigint NOT NULL,
    PRIMARY KEY (load_id, chunk)
);";

/// Shared between the reader, the workers and the progress line.
#[derive(Default)]
struct Shared {
    committed_rows: AtomicU64,
    committed_chunks: AtomicU64,
    chunk0_done: AtomicBool,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    parquet_files: AtomicU64,
    parquet_bytes: AtomicU64,
    input_done: AtomicU64,
    /// Records read so far.
    input_rows: AtomicU64,
    input_total: AtomicU64,
    per_target: Mutex<HashMap<String, u64>>,
    rejected: AtomicU64,
    /// Partitions created by committed chunks.
    created: Mutex<std::collections::HashSet<String>>,
}

impl Shared {
    fn fail(&self, msg: String) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(msg);
        }
        self.failed.store(true, Ordering::SeqCst);
    }
}

/// What a worker needs for every chunk.
struct Job {
    raw: RawChunk,
    target: Target,
    /// Create the partition in the chunk's transaction (and COPY with FREEZE).
    create: Option<String>,
    /// Take the table's lock, check it is empty, truncate it and COPY with FREEZE (the first
    /// chunk into a table this load created).
    freeze_truncate: bool,
}

struct Plan {
    load_id: String,
    /// Rows come from a topic: places are partition and offset, not lines.
    topic: bool,
    columns: Vec<Column>,
    /// For each loaded column, the input field it comes from.
    fields: Vec<usize>,
    input_fields: Option<usize>,
    /// The table itself (the target of every row when rows are not routed to partitions).
    table: Target,
    parquet: Option<(Output, Arc<parquet::schema::types::Type>, String)>,
    copy_cols: String,
}

/// Runs a load to its end (or to the first bad row, when rejects are not kept).
pub fn load(opts: &LoadOptions) -> Result<Summary, LoadError> {
    let started = Instant::now();
    if opts.parallel == 0 || opts.parallel > 64 {
        return Err(LoadError::Setup("--parallel must be between 1 and 64".into()));
    }
    if opts.chunk_rows == 0 {
        return Err(LoadError::Setup("--chunk-rows must be at least 1".into()));
    }
    let params = ConnectParams::parse(&opts.url).map_err(pg)?;
    let mut conn = Connection::connect(&params, false).map_err(pg)?;
    conn.execute(STATE_DDL).map_err(pg)?;
    let (format, source_desc, load_id, input_len, ranges) = match &opts.topic {
        Some(t) => {
            let (desc, ranges) = topic_ranges(&mut conn, &opts.table, t)?;
            let Some(ranges) = ranges else {
                return Ok(Summary {
                    load_id: desc,
                    already_done: true,
                    nothing_new: true,
                    ..Summary::default()
                });
            };
            let id = opts.load_id.clone().unwrap_or_else(|| {
                format!("{}:{}:{:08x}", opts.table, t.topic, crc32c::crc32c(desc.as_bytes()))
            });
            (Format::Topic, desc, id, 0, ranges)
        }
        None => {
            let format = match opts.format {
                Some(f) => f,
                None => Format::detect(&opts.from).map_err(LoadError::Setup)?,
            };
            let meta = std::fs::metadata(&opts.from).map_err(|e| {
                LoadError::Setup(format!("cannot read {}: {e}", opts.from.display()))
            })?;
            let abs = std::fs::canonicalize(&opts.from).unwrap_or_else(|_| opts.from.clone());
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            // The same file, unchanged, is the same load: a rerun resumes it. A file written
            // again (new size or time) is a new load.
            let desc = format!("{} ({} bytes, modified {mtime})", abs.display(), meta.len());
            let id = opts.load_id.clone().unwrap_or_else(|| {
                format!("{}:{:08x}", opts.table, crc32c::crc32c(desc.as_bytes()))
            });
            (format, desc, id, meta.len(), Vec::new())
        }
    };

    // Create the table when asked and missing.
    let schema_file = opts.schema_file.as_deref().map(SchemaFile::read).transpose()?;
    let qt = quote_table(&opts.table);
    let mut created = false;
    if !target::exists(&mut conn, &opts.table)? {
        let Some(sf) = &schema_file else {
            return Err(LoadError::Setup(format!(
                "table {} does not exist; create it, or give --schema FILE to have the load create it",
                opts.table
            )));
        };
        conn.execute("BEGIN").map_err(pg)?;
        let r = conn.execute(&sf.create_sql(&qt));
        if let Err(e) = r {
            let _ = conn.execute("ROLLBACK");
            return Err(LoadError::Setup(format!("creating {}: {e}", opts.table)));
        }
        created = true;
    } else {
        conn.execute("BEGIN").map_err(pg)?;
    }
    let all_columns = target::columns(&mut conn, &opts.table);
    let all_columns = match all_columns {
        Ok(c) => c,
        Err(e) => {
            let _ = conn.execute("ROLLBACK");
            return Err(e);
        }
    };

    let mut source: Box<dyn Source> = match format {
        Format::Csv | Format::Text => Box::new(
            Delimited::open(
                &opts.from,
                format == Format::Csv,
                opts.delimiter,
                opts.null.as_deref(),
                opts.header,
                &all_columns,
            )
            .map_err(LoadError::Setup)?,
        ),
        Format::Parquet => {
            Box::new(ParquetSource::open(&opts.from, &all_columns).map_err(LoadError::Setup)?)
        }
        Format::Topic => {
            let t = opts.topic.as_ref().ok_or_else(|| LoadError::Setup("no topic".into()))?;
            Box::new(TopicSource::open(Arc::clone(&t.log), &t.topic, ranges.clone(), &all_columns))
        }
    };
    // Columns by the input's names, or all of them in order.
    let (columns, fields, input_fields) = match source.names() {
        Some(names) => {
            let mut cols = Vec::new();
            let mut fields = Vec::new();
            for (i, n) in names.iter().enumerate() {
                let c = all_columns
                    .iter()
                    .find(|c| c.name == *n)
                    .or_else(|| all_columns.iter().find(|c| c.name.eq_ignore_ascii_case(n)));
                match c {
                    Some(c) if !cols.iter().any(|x: &Column| x.name == c.name) => {
                        cols.push(c.clone());
                        fields.push(i);
                    }
                    Some(c) => {
                        let _ = conn.execute("ROLLBACK");
                        return Err(LoadError::Setup(format!(
                            "the input names column {:?} twice",
                            c.name
                        )));
                    }
                    None => {
                        let _ = conn.execute("ROLLBACK");
                        return Err(LoadError::Setup(format!(
                            "the input's column {n:?} is not a column of {}",
                            opts.table
                        )));
                    }
                }
            }
            (cols, fields, Some(names.len()))
        }
        None => {
            let n = all_columns.len();
            (all_columns.clone(), (0..n).collect(), Some(n))
        }
    };
    let copy_cols = columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");

    // The load's state: new, resumed, or finished.
    let rows = conn
        .query_params(
            "SELECT target, source, columns, chunk_rows, finished_at IS NOT NULL, created_table \
             FROM polylog_loads WHERE load_id = $1",
            &[load_id.as_bytes()],
        )
        .map_err(pg)?;
    let mut committed: HashMap<u64, (u64, u32)> = HashMap::new();
    let mut resumed_rows = 0u64;
    let mut freeze_first;
    if created && !rows.is_empty() {
        // The table of an unfinished load was dropped: its chunks went with it; start over.
        conn.query_params(
            "DELETE FROM polylog_load_chunks WHERE load_id = $1",
            &[load_id.as_bytes()],
        )
        .map_err(pg)?;
        conn.query_params("DELETE FROM polylog_loads WHERE load_id = $1", &[load_id.as_bytes()])
            .map_err(pg)?;
    }
    let rows = if created { Vec::new() } else { rows };
    if let Some(r) = rows.first() {
        let get = |i: usize| r[i].clone().unwrap_or_default();
        let _ = conn.execute("ROLLBACK");
        if get(4) == "t" {
            return Ok(Summary {
                load_id,
                already_done: true,
                elapsed: started.elapsed(),
                ..Summary::default()
            });
        }
        if get(0) != opts.table || get(2) != copy_cols || get(3) != opts.chunk_rows.to_string() {
            return Err(LoadError::Setup(format!(
                "load {load_id:?} was begun into {} with columns ({}) and {} rows per chunk; \
                 resume it with the same table, input and --chunk-rows, or give another --load-id",
                get(0),
                get(2),
                get(3)
            )));
        }
        let chunks = conn
            .query_params(
                "SELECT chunk, rows, crc, loaded FROM polylog_load_chunks WHERE load_id = $1",
                &[load_id.as_bytes()],
            )
            .map_err(pg)?;
        for c in chunks {
            let n = |i: usize| c[i].as_deref().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            committed.insert(n(0), (n(1), n(2) as u32));
            resumed_rows += n(3);
        }
        freeze_first = get(5) == "t" && !committed.contains_key(&0);
    } else {
        conn.query_params(
            "INSERT INTO polylog_loads (load_id, target, source, columns, chunk_rows, created_table) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                load_id.as_bytes(),
                opts.table.as_bytes(),
                source_desc.as_bytes(),
                copy_cols.as_bytes(),
                opts.chunk_rows.to_string().as_bytes(),
                if created { b"true" } else { b"false" },
            ],
        )
        .map_err(pg)?;
        conn.execute("COMMIT").map_err(pg)?;
        freeze_first = created;
    }

    let auto = schema_file.as_ref().and_then(|s| s.partition.as_ref()).map(|p| p.interval);
    let mut router = Router::discover(&mut conn, &opts.table, &columns, auto)?;
    if router.is_some() {
        freeze_first = false; // the parent holds no rows; its partitions get FREEZE instead
    }
    let parquet = match &opts.parquet {
        Some(spec) => {
            let out = Output::open(spec).map_err(LoadError::Setup)?;
            let schema = parquet_schema(&columns).map_err(LoadError::Setup)?;
            let base = load_id.clone();
            Some((out, schema, base))
        }
        None => None,
    };
    let plan = Arc::new(Plan {
        load_id: load_id.clone(),
        topic: format == Format::Topic,
        columns,
        fields,
        input_fields,
        table: Target { sql: qt.clone(), create: None },
        parquet,
        copy_cols,
    });
    if opts.progress && !committed.is_empty() {
        let rows = resumed_rows;
        eprintln!(
            "resuming load {load_id:?}: {} chunks ({} rows) are already in",
            committed.len(),
            group(rows)
        );
    }

    let shared = Arc::new(Shared::default());
    let progress_total = source.progress().total;
    shared.input_total.store(progress_total, Ordering::Relaxed);

    // Bad rows go to the rejects file (appended to when resuming) before their chunk commits.
    let rejects = match &opts.rejects {
        Some(p) => Some(Arc::new(Mutex::new(
            Rejects::create(p, format != Format::Text, !committed.is_empty())
                .map_err(LoadError::Setup)?,
        ))),
        None => None,
    };
    // Workers, each with its own connection and a queue of one chunk.
    let mut senders: Vec<SyncSender<Job>> = Vec::new();
    let mut handles = Vec::new();
    for w in 0..opts.parallel {
        let (tx, rx) = sync_channel::<Job>(1);
        senders.push(tx);
        let (plan, shared, params) = (Arc::clone(&plan), Arc::clone(&shared), params.clone());
        let rejects = rejects.clone();
        let h = std::thread::Builder::new()
            .name(format!("load-{w}"))
            .spawn(move || {
                let mut conn = match Connection::connect(&params, false) {
                    Ok(c) => c,
                    Err(e) => {
                        return shared.fail(format!("worker {w} cannot connect to Postgres: {e}"))
                    }
                };
                for job in rx {
                    if shared.failed.load(Ordering::SeqCst) {
                        continue; // drain: the reader stops soon
                    }
                    // A panic (a bug) must stop the load, not leave it waiting or "finished".
                    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        parse_chunk(&plan, &job.raw, rejects.is_some()).and_then(|(chunk, bad)| {
                            commit_chunk(&mut conn, &plan, &job, &chunk, &bad, rejects.as_deref())
                                .map(|pq| (chunk.len() as u64, bad.len() as u64, pq))
                        })
                    }))
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "internal error loading chunk {} (a bug; please report it)",
                            job.raw.no
                        ))
                    });
                    match done {
                        Ok((n, bad, parquet_bytes)) => {
                            shared.parquet_bytes.fetch_add(parquet_bytes, Ordering::Relaxed);
                            shared.rejected.fetch_add(bad, Ordering::SeqCst);
                            *shared
                                .per_target
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(job.target.sql.clone())
                                .or_default() += n;
                            shared.committed_rows.fetch_add(n, Ordering::SeqCst);
                            shared.committed_chunks.fetch_add(1, Ordering::SeqCst);
                            if job.create.is_some() {
                                shared
                                    .created
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .insert(job.target.sql.clone());
                            }
                            if job.raw.no == 0 {
                                shared.chunk0_done.store(true, Ordering::SeqCst);
                            }
                            if plan.parquet.is_some() && n > 0 {
                                shared.parquet_files.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            let _ = conn.execute("ROLLBACK");
                            shared.fail(e);
                        }
                    }
                }
            })
            .map_err(|e| LoadError::Setup(format!("starting a worker: {e}")))?;
        handles.push(h);
    }

    // Progress line.
    let done = Arc::new(AtomicBool::new(false));
    let progress = opts.progress.then(|| {
        let (shared, done) = (Arc::clone(&shared), Arc::clone(&done));
        let resumed = resumed_rows;
        let unit_rows = matches!(format, Format::Parquet | Format::Topic);
        std::thread::spawn(move || progress_loop(&shared, &done, started, resumed, unit_rows))
    });

    let read = read_all(
        source.as_mut(),
        opts,
        &plan,
        router.as_mut(),
        &committed,
        freeze_first,
        &senders,
        &shared,
    );
    drop(senders);
    for h in handles {
        if h.join().is_err() {
            shared.fail("a load worker stopped unexpectedly (a bug; please report it)".into());
        }
    }
    done.store(true, Ordering::SeqCst);
    if let Some(p) = progress {
        let _ = p.join();
    }
    let committed_rows = shared.committed_rows.load(Ordering::SeqCst);
    let all_committed = committed_rows + resumed_rows;
    let stopped = |why: String| {
        LoadError::Stopped(format!(
            "{why}\n{} rows are committed (load {load_id:?}); nothing of the failed chunk is. Run the \
             same command again to go on from there{}",
            group(all_committed),
            if opts.rejects.is_none() { ", or add --rejects FILE to set aside rows whose values do not parse" } else { "" }
        ))
    };
    // A worker's error is the cause when there is one (the reader then only saw it stop).
    if let Some(e) = shared.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(stopped(e));
    }
    if let Err(e) = read {
        return Err(stopped(e));
    }
    let rejected = shared.rejected.load(Ordering::SeqCst);
    conn.query_params(
        "UPDATE polylog_loads SET finished_at = now(), rows = $2, rejected = $3 WHERE load_id = $1",
        &[
            load_id.as_bytes(),
            all_committed.to_string().as_bytes(),
            rejected.to_string().as_bytes(),
        ],
    )
    .map_err(pg)?;
    let per_target = shared.per_target.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut targets: Vec<(String, u64)> = per_target.into_iter().collect();
    targets.sort();
    Ok(Summary {
        load_id,
        rows: committed_rows,
        resumed_rows,
        rejected,
        chunks: shared.committed_chunks.load(Ordering::SeqCst),
        elapsed: started.elapsed(),
        input_bytes: match format {
            Format::Csv | Format::Text => shared.input_done.load(Ordering::SeqCst),
            _ => input_len,
        },
        parquet_files: shared.parquet_files.load(Ordering::SeqCst),
        parquet_bytes: shared.parquet_bytes.load(Ordering::SeqCst),
        already_done: false,
        nothing_new: false,
        targets,
    })
}

/// Offsets `from..to` of one partition.
type Range = (u32, u64, u64);

/// The offset ranges a topic load reads: those of an unfinished load of the same topic into
/// the same table (resumed), else from where the finished ones ended to the topic's end.
/// `None` when there is nothing new; the text is the source's description (or why nothing).
fn topic_ranges(
    conn: &mut Connection,
    table: &str,
    t: &TopicInput,
) -> Result<(String, Option<Vec<Range>>), LoadError> {
    let prefix = format!("topic {} partitions ", t.topic);
    let parse = |desc: &str| -> Vec<(u32, u64, u64)> {
        desc.strip_prefix(&prefix)
            .unwrap_or("")
            .split(',')
            .filter_map(|r| {
                let (p, range) = r.split_once(':')?;
                let (a, b) = range.split_once('-')?;
                Some((p.parse().ok()?, a.parse().ok()?, b.parse().ok()?))
            })
            .collect()
    };
    let rows = conn
        .query_params(
            "SELECT source, finished_at IS NOT NULL FROM polylog_loads \
             WHERE target = $1 AND starts_with(source, $2) ORDER BY started_at",
            &[table.as_bytes(), prefix.as_bytes()],
        )
        .map_err(pg)?;
    if let Some(r) = rows.iter().find(|r| r[1].as_deref() == Some("f")) {
        let desc = r[0].clone().unwrap_or_default();
        let ranges = parse(&desc);
        return Ok((desc, Some(ranges)));
    }
    let mut from: std::collections::BTreeMap<u32, u64> = Default::default();
    for r in &rows {
        for (p, _, end) in parse(r[0].as_deref().unwrap_or("")) {
            let e = from.entry(p).or_default();
            *e = (*e).max(end);
        }
    }
    let d = t
        .log
        .describe_topic(&t.topic)
        .map_err(|e| LoadError::Setup(format!("topic {}: {e}", t.topic)))?;
    let ranges: Vec<(u32, u64, u64)> = d
        .partitions
        .iter()
        .map(|p| {
            (
                p.partition,
                from.get(&p.partition).copied().unwrap_or(0).max(p.start_offset),
                p.durable_offset,
            )
        })
        .filter(|r| r.2 > r.1)
        .collect();
    if ranges.is_empty() {
        return Ok((
            format!("nothing new in topic {} since the last load into {table}", t.topic),
            None,
        ));
    }
    let list: Vec<String> = ranges.iter().map(|(p, a, b)| format!("{p}:{a}-{b}")).collect();
    Ok((format!("{prefix}{}", list.join(",")), Some(ranges)))
}

/// Reads every record, routes it and builds raw chunks per target, and hands them to the
/// workers.
#[allow(clippy::too_many_arguments)]
fn read_all(
    source: &mut dyn Source,
    opts: &LoadOptions,
    plan: &Plan,
    mut router: Option<&mut Router>,
    committed: &HashMap<u64, (u64, u32)>,
    freeze_first: bool,
    senders: &[SyncSender<Job>],
    shared: &Shared,
) -> Result<(), String> {
    let cols = &plan.columns;
    let fields_per_row = plan.input_fields.unwrap_or(cols.len());
    let mut open: Vec<Option<RawChunk>> = Vec::new(); // per target
    let mut buffered = 0usize;
    let mut next_no = 0u64;
    let mut rr = 0usize;
    let mut rec = Record::default();
    let mut row = 0u64;
    // Routing parses the partition key here; the rest of the row is parsed by a worker.
    let key = router.as_ref().map(|r| r.key());
    let mut key_col = ColumnData::new(key.map_or(&ColType::Bool, |k| &cols[k].ty));
    // The size of the last chunk sent, to allocate the next one at once.
    let mut hint = (0usize, 0usize);
    let mut creators: HashMap<usize, usize> = HashMap::new();
    let mut dispatch = |chunk: RawChunk, target: Target, shared: &Shared| -> Result<(), String> {
        let no = chunk.no;
        if let Some(&(rows, crc)) = committed.get(&no) {
            if rows != chunk.len() as u64 || crc != chunk.crc {
                return Err(format!(
                    "the input changed since this load began: chunk {no} (from row {}) is not what \
                     was committed. Give a new --load-id to load it as a new load",
                    chunk.rows.first().map_or(0, |r| r.0)
                ));
            }
            return Ok(());
        }
        // The first chunk of a partition this load creates carries the CREATE; the next ones
        // queue behind it on the same worker until it has committed, then any worker goes.
        let mut create = None;
        let created =
            |sql: &str| shared.created.lock().unwrap_or_else(|p| p.into_inner()).contains(sql);
        let w = match &target.create {
            Some(sql) => match creators.get(&chunk.target) {
                None => {
                    rr += 1;
                    creators.insert(chunk.target, rr % senders.len());
                    create = Some(sql.clone());
                    rr % senders.len()
                }
                Some(&w) if !created(&target.sql) => w,
                Some(_) => {
                    rr += 1;
                    rr % senders.len()
                }
            },
            None => {
                rr += 1;
                rr % senders.len()
            }
        };
        let first = freeze_first && no == 0;
        if senders[w].send(Job { raw: chunk, target, create, freeze_truncate: first }).is_err() {
            return Err("a worker stopped".into());
        }
        if first {
            // Nothing else may go in before the first chunk has committed into the table
            // this load created: it truncates the (empty) table to use FREEZE.
            while !shared.chunk0_done.load(Ordering::SeqCst)
                && !shared.failed.load(Ordering::SeqCst)
            {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    };
    loop {
        if shared.failed.load(Ordering::Relaxed) {
            return Ok(()); // the worker's error is reported
        }
        let got = source.next(&mut rec).map_err(|e| format!("input row {}: {e}", row + 1))?;
        if row.is_multiple_of(4096) {
            shared.input_done.store(source.progress().done, Ordering::Relaxed);
            shared.input_rows.store(row, Ordering::Relaxed);
        }
        if !got {
            break;
        }
        row += 1;
        let mut bad = None;
        let mut target = 0;
        if let Some(why) = rec.bad.take() {
            bad = Some((String::new(), why));
        } else if rec.fields.len() != fields_per_row {
            bad = Some((
                String::new(),
                format!("has {} fields where {fields_per_row} were expected", rec.fields.len()),
            ));
        } else if let (Some(r), Some(k)) = (&mut router, key) {
            key_col.truncate_rows(0);
            let parsed = match rec.field(plan.fields[k]) {
                None => {
                    key_col.push_null();
                    Ok(())
                }
                Some(text) => key_col.push_text(&cols[k].ty, text),
            };
            match parsed.and_then(|()| r.route(&key_col, &cols[k].ty)) {
                Ok(t) => target = t,
                Err(why) => bad = Some((cols[k].name.clone(), why)),
            }
        }
        if open.len() <= target {
            open.resize_with(target + 1, || None);
        }
        let chunk = open[target].get_or_insert_with(|| RawChunk::new(target, fields_per_row, hint));
        if let Some((column, why)) = bad {
            chunk.bad.push((chunk.len(), column, why));
        }
        chunk.push(row, rec.line, &rec.data, &rec.fields);
        buffered += 1;
        let full = chunk.len() >= opts.chunk_rows || chunk.data.len() >= CHUNK_BYTES_MAX;
        let flush = if full {
            Some(target)
        } else if buffered >= opts.chunk_rows * 2 {
            // Too many rows waiting across partitions: send the largest.
            open.iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    c.as_ref()
                        .map(|c| (c.len(), std::cmp::Reverse(c.rows.first().map_or(0, |r| r.0)), i))
                })
                .max()
                .map(|x| x.2)
        } else {
            None
        };
        if let Some(t) = flush {
            if let Some(mut c) = open[t].take() {
                buffered -= c.len();
                hint = (c.len(), c.data.len());
                c.no = next_no;
                next_no += 1;
                let t = target_of(&router, plan, c.target);
                dispatch(c, t, shared)?;
            }
        }
    }
    shared.input_done.store(source.progress().done, Ordering::Relaxed);
    shared.input_rows.store(row, Ordering::Relaxed);
    // The rest, oldest first row first.
    let mut rest: Vec<RawChunk> = open.into_iter().flatten().filter(|c| !c.is_empty()).collect();
    rest.sort_by_key(|c| c.rows.first().map_or(0, |r| r.0));
    for mut c in rest {
        c.no = next_no;
        next_no += 1;
        let t = target_of(&router, plan, c.target);
        dispatch(c, t, shared)?;
    }
    Ok(())
}

/// The Parquet file of a chunk: named by the load (several loads can share a directory) and
/// the chunk (a chunk loaded again replaces its file).
pub fn parquet_name(load_id: &str, chunk: u64) -> String {
    let id: String = load_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' })
        .collect();
    format!("{id}-{chunk:06}.parquet")
}

/// A bad row: where it is, and why.
struct BadRow {
    /// Index in the raw chunk.
    index: usize,
    message: String,
}

/// Parses a raw chunk into columns. Bad rows stop it (the first one is the error) unless they
/// are kept aside (`rejecting`), in which case they are returned.
fn parse_chunk(
    plan: &Plan,
    raw: &RawChunk,
    rejecting: bool,
) -> Result<(Chunk, Vec<BadRow>), String> {
    let cols = &plan.columns;
    let mut chunk = Chunk::with_capacity(raw.no, cols, raw.len());
    let mut bad = Vec::new();
    let mut known_bad = raw.bad.iter().peekable();
    // One UTF-8 check for the whole chunk instead of one per field.
    let utf8 = std::str::from_utf8(&raw.data).ok();
    for i in 0..raw.len() {
        let r = raw.row(i, utf8);
        let result = match known_bad.peek() {
            Some((at, column, why)) if *at == i => {
                known_bad.next();
                Err((column.clone(), why.clone()))
            }
            _ => parse_row(r, plan, &mut chunk.cols, chunk.rows.len(), plan.parquet.is_some()),
        };
        match result {
            Ok(()) => chunk.rows.push(r.row),
            Err((column, why)) => {
                let place = if plan.topic {
                    format!("partition {}, offset {}", r.line >> 48, r.line & ((1 << 48) - 1))
                } else {
                    format!("line {}", r.line)
                };
                let message = if column.is_empty() {
                    format!("row {} ({place}): the record {why}", r.row)
                } else {
                    let value = column_value(r, plan, &column);
                    format!("row {} ({place}), column {column:?}: {value} {why}", r.row)
                };
                if !rejecting {
                    return Err(message);
                }
                bad.push(BadRow { index: i, message });
            }
        }
    }
    Ok((chunk, bad))
}

fn target_of(router: &Option<&mut Router>, plan: &Plan, t: usize) -> Target {
    match router {
        Some(r) => r.targets[t].clone(),
        None => plan.table.clone(),
    }
}

/// Parses one record onto the end of a chunk's columns, which hold `rows` rows. On error the
/// columns are as they were and the error names the column.
fn parse_row(
    rec: RowRef<'_>,
    plan: &Plan,
    cols: &mut [ColumnData],
    rows: usize,
    parquet: bool,
) -> Result<(), (String, String)> {
    for (c, col) in plan.columns.iter().enumerate() {
        let r = match rec.field(plan.fields[c]) {
            None if col.not_null => Err("is NULL, but the column is NOT NULL".to_string()),
            None => {
                cols[c].push_null();
                Ok(())
            }
            Some(text) => cols[c]
                .push_field(&col.ty, text, rec.field_str(plan.fields[c]))
                .and_then(|()| if parquet { nan_check(&cols[c], &col.ty) } else { Ok(()) }),
        };
        if let Err(why) = r {
            for done in &mut cols[..=c] {
                done.truncate_rows(rows);
            }
            return Err((col.name.clone(), why));
        }
    }
    Ok(())
}

/// NaN has no Parquet DECIMAL form: refuse it for numeric(p,s) columns going to Parquet.
fn nan_check(col: &ColumnData, ty: &ColType) -> Result<(), String> {
    if let (ColType::Numeric(Some((p, _))), Values::Bytes { .. }) = (ty, &col.values) {
        if *p <= 38 && col.values.bytes(col.values.len() - 1) == b"NaN" {
            return Err("is NaN, which a Parquet DECIMAL cannot hold".into());
        }
    }
    Ok(())
}

/// The field of `column` in a record, quoted and shortened for a message.
fn column_value(rec: RowRef<'_>, plan: &Plan, column: &str) -> String {
    let Some(c) = plan.columns.iter().position(|c| c.name == column) else {
        return "the row".into();
    };
    match rec.field(plan.fields[c]) {
        None => "NULL".into(),
        Some(field) => {
            let text = String::from_utf8_lossy(field);
            let short: String = text.chars().take(80).collect();
            let more = if text.chars().count() > 80 { "..." } else { "" };
            format!("{short:?}{more}")
        }
    }
}

/// Copies one chunk into its table or partition and commits it with its resume entry; the
/// Parquet file is in place before the commit.
fn commit_chunk(
    conn: &mut Connection,
    plan: &Plan,
    job: &Job,
    chunk: &Chunk,
    bad: &[BadRow],
    rejects: Option<&Mutex<Rejects>>,
) -> Result<u64, String> {
    let target = &job.target;
    let fail = |what: &str, e: PgError| -> String {
        // Postgres names the COPY line: map it back to the input row.
        let row = match &e {
            PgError::Server { context: Some(ctx), .. } => ctx
                .split("line ")
                .nth(1)
                .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|l| chunk.rows.get(l.wrapping_sub(1)))
                .map(|r| format!("row {r}: ")),
            _ => None,
        };
        format!("{}{what} {}: {e}", row.unwrap_or_default(), target.sql)
    };
    conn.execute("BEGIN").map_err(|e| fail("starting a transaction for", e))?;
    let mut freeze = false;
    if let Some(create) = &job.create {
        conn.execute(create).map_err(|e| fail("creating", e))?;
        freeze = true;
    }
    if job.freeze_truncate {
        conn.execute(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", target.sql))
            .map_err(|e| fail("locking", e))?;
        let rows = conn
            .query(&format!("SELECT 1 FROM {} LIMIT 1", target.sql))
            .map_err(|e| fail("reading", e))?;
        if rows.is_empty() {
            conn.execute(&format!("TRUNCATE {}", target.sql)).map_err(|e| fail("truncating", e))?;
            freeze = true;
        }
    }
    let sql = format!(
        "COPY {} ({}) FROM STDIN (FORMAT binary{})",
        target.sql,
        plan.copy_cols,
        if freeze { ", FREEZE" } else { "" }
    );
    // The Parquet file is encoded and stored while Postgres takes the rows.
    let parquet = |chunk: &Chunk| -> Result<u64, String> {
        match (&plan.parquet, chunk.is_empty()) {
            (Some((out, schema, base)), false) => {
                let bytes = parquet_file(chunk, &plan.columns, schema)?;
                let n = bytes.len() as u64;
                out.put(&parquet_name(base, chunk.no), bytes)?;
                Ok(n)
            }
            _ => Ok(0),
        }
    };
    let (copied, parquet_bytes) = std::thread::scope(|scope| {
        let pq = scope.spawn(|| parquet(chunk));
        let copied = (|| -> Result<u64, String> {
            conn.copy_in_start(&sql).map_err(|e| fail("starting COPY into", e))?;
            let sent = copy_binary(chunk, &plan.columns, 1 << 20, |b| conn.copy_in_send(b));
            let done = conn.copy_in_finish();
            sent.map_err(|e| fail("sending rows to", e))?;
            done.map_err(|e| fail("copying into", e))
        })();
        let pq = pq.join().unwrap_or_else(|_| Err("writing Parquet failed (panic)".into()));
        (copied, pq)
    });
    let n = copied?;
    let parquet_bytes = parquet_bytes?;
    if n != chunk.len() as u64 {
        return Err(format!(
            "Postgres stored {n} of the {} rows sent to {}",
            chunk.len(),
            target.sql
        ));
    }
    conn.query_params(
        "INSERT INTO polylog_load_chunks (load_id, chunk, rows, crc, loaded) VALUES ($1, $2, $3, $4, $5)",
        &[
            plan.load_id.as_bytes(),
            chunk.no.to_string().as_bytes(),
            job.raw.len().to_string().as_bytes(),
            job.raw.crc.to_string().as_bytes(),
            chunk.len().to_string().as_bytes(),
        ],
    )
    .map_err(|e| fail("recording the chunk of", e))?;
    // Rejected rows are written (and flushed) before the commit: a crash in between writes
    // them again on resume rather than losing them.
    if let (Some(r), false) = (rejects, bad.is_empty()) {
        let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
        for b in bad {
            r.write(job.raw.row(b.index, None), &b.message)?;
        }
        r.flush()?;
    }
    conn.execute("COMMIT").map_err(|e| fail("committing", e))?;
    Ok(parquet_bytes)
}

fn progress_loop(
    shared: &Shared,
    done: &AtomicBool,
    started: Instant,
    resumed: u64,
    unit_rows: bool,
) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(10) };
    let mut last = Instant::now();
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        if last.elapsed() < every {
            continue;
        }
        last = Instant::now();
        let rows = shared.committed_rows.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64();
        let rate = rows as f64 / secs.max(1e-9);
        let (d, t) =
            (shared.input_done.load(Ordering::Relaxed), shared.input_total.load(Ordering::Relaxed));
        // Rows in so far against the rows the input holds (estimated from what was read: the
        // reader runs ahead of the commits).
        let read = shared.input_rows.load(Ordering::Relaxed);
        let total_rows = if unit_rows {
            t as f64
        } else if d > 0 {
            read as f64 * t as f64 / d as f64
        } else {
            0.0
        };
        let processed = (rows + resumed + shared.rejected.load(Ordering::Relaxed)) as f64;
        let frac = if total_rows > 0.0 { (processed / total_rows).min(1.0) } else { 0.0 };
        let eta = if rate > 0.0 && total_rows > 0.0 {
            (total_rows - processed).max(0.0) / rate
        } else {
            f64::NAN
        };
        let width = 30;
        let filled = (frac * width as f64) as usize;
        let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
        let eta = if eta.is_finite() {
            format!("{}:{:02}", eta as u64 / 60, eta as u64 % 60)
        } else {
            "?".into()
        };
        let of = if unit_rows {
            format!("{}/{} records read", group(d), group(t))
        } else {
            format!("{:.0}/{:.0} MB read", d as f64 / 1e6, t as f64 / 1e6)
        };
        let line = format!(
            "[{bar}] {:>3.0}%  {} rows in{}  {:.0} rows/s  ETA {eta}  ({of})",
            frac * 100.0,
            group(rows + resumed),
            if resumed > 0 { format!(" ({} resumed)", group(resumed)) } else { String::new() },
            rate
        );
        if tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }
    if tty {
        eprintln!();
    }
}

/// Bad rows set aside: the records in the input's format, and a `.reasons` file beside.
struct Rejects {
    rows: BufWriter<File>,
    reasons: BufWriter<File>,
    csv: bool,
    path: PathBuf,
}

impl Rejects {
    fn create(path: &Path, csv: bool, append: bool) -> Result<Rejects, String> {
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .open(p)
                .map(BufWriter::new)
                .map_err(|e| format!("cannot create {}: {e}", p.display()))
        };
        let mut reasons = path.as_os_str().to_owned();
        reasons.push(".reasons");
        Ok(Rejects {
            rows: open(path)?,
            reasons: open(Path::new(&reasons))?,
            csv,
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, rec: RowRef<'_>, why: &str) -> Result<(), String> {
        let mut line = Vec::with_capacity(rec.data.len() + rec.fields.len() * 3);
        for i in 0..rec.fields.len() {
            if i > 0 {
                line.push(if self.csv { b',' } else { b'\t' });
            }
            match rec.field(i) {
                None if self.csv => {}
                None => line.extend_from_slice(b"\\N"),
                Some(f) if self.csv => {
                    line.push(b'"');
                    for &b in f {
                        if b == b'"' {
                            line.push(b'"');
                        }
                        line.push(b);
                    }
                    line.push(b'"');
                }
                Some(f) => {
                    for &b in f {
                        match b {
                            b'\\' => line.extend_from_slice(b"\\\\"),
                            b'\t' => line.extend_from_slice(b"\\t"),
                            b'\n' => line.extend_from_slice(b"\\n"),
                            b'\r' => line.extend_from_slice(b"\\r"),
                            _ => line.push(b),
                        }
                    }
                }
            }
        }
        line.push(b'\n');
        let err = |e: std::io::Error| format!("writing {}: {e}", self.path.display());
        self.rows.write_all(&line).map_err(err)?;
        writeln!(self.reasons, "{why}")
            .map_err(|e| format!("writing {}.reasons: {e}", self.path.display()))
    }

    fn flush(&mut self) -> Result<(), String> {
        let path = self.path.display().to_string();
        self.rows.flush().map_err(|e| format!("writing {path}: {e}"))?;
        self.reasons.flush().map_err(|e| format!("writing {path}.reasons: {e}"))
    }
}
