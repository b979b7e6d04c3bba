//! `cdc_stream` and `cdc_snapshot`: the Postgres source against Postgres's own tools, on a
//! throwaway cluster, in the same run.
//!
//! - `cdc_stream`: a backlog of row updates waiting in two identical pgoutput slots; Polylog
//!   drains one into the embedded log (`fsync = "always"`, done when every change is durable),
//!   `pg_recvlogical` drains the other to /dev/null.
//! - `cdc_snapshot`: Polylog's initial snapshot of a table into the embedded log, against
//!   `psql -c "\copy (SELECT * FROM t) TO '/dev/null'"`.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions};
use polylog_postgres::{PostgresSource, PostgresSourceConfig, SourceOptions};
use polylog_testkit::PgCluster;

use crate::{Opts, ScratchDir};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn setup(rows: u64) -> Result<PgCluster, String> {
    println!("  starting a throwaway Postgres and loading {rows} rows ...");
    let pg = PgCluster::start().map_err(err)?;
    pg.create_database("bench").map_err(err)?;
    pg.psql(
        "bench",
        &format!(
            "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL, pad text NOT NULL);
             INSERT INTO t SELECT g, g, md5(g::text) FROM generate_series(1, {rows}) g;"
        ),
    )
    .map_err(err)?;
    pg.psql("bench", "VACUUM ANALYZE t").map_err(err)?;
    Ok(pg)
}

fn source(
    pg: &PgCluster,
    scratch: &std::path::Path,
    fsync: FsyncPolicy,
    extra: &str,
) -> Result<(Arc<PostgresSource>, Arc<dyn Log>), String> {
    let o = LogOptions { fsync, maintenance_interval_ms: 0, ..LogOptions::default() };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(scratch.join("log"), o).map_err(err)?);
    let text = format!("url = \"{}\"\nstatus_interval_ms = 50\n{extra}", pg.url("bench"));
    let cfg: PostgresSourceConfig = toml::from_str(&text).map_err(err)?;
    let opts = SourceOptions { state_dir: scratch.join("state"), partitions: 1, progress: false };
    let src = PostgresSource::new("bench", cfg, Arc::clone(&log), opts).map_err(err)?;
    Ok((Arc::new(src), log))
}

/// Runs the source until `done` says so (or it fails); returns the elapsed time.
fn run_until(
    src: &Arc<PostgresSource>,
    done: impl Fn(&polylog_postgres::SourceStatus) -> bool,
) -> Result<f64, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handle = {
        let (src, stop) = (Arc::clone(src), Arc::clone(&stop));
        std::thread::spawn(move || src.run(&stop))
    };
    let secs = loop {
        let st = src.status.lock().map_err(err)?.clone();
        if done(&st) {
            break started.elapsed().as_secs_f64();
        }
        if handle.is_finished() || st.state == "failed" {
            return Err(format!("the source stopped: {:?}", st.last_error));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    stop.store(true, Ordering::SeqCst);
    handle.join().map_err(|_| "source thread panicked".to_string())?.map_err(err)?;
    Ok(secs)
}

/// A Postgres client program connecting to the benchmark database.
fn client(pg: &PgCluster, program: &str) -> Command {
    let mut c = Command::new(pg.bin_dir().join(program));
    c.args(["-h", "127.0.0.1", "-p", &pg.port().to_string(), "-U", "postgres", "-d", "bench"]);
    c
}

fn lsn(s: &str) -> u64 {
    polylog_postgres::pgoutput::parse_lsn(s).unwrap_or(0)
}

pub fn stream(opts: &Opts) -> Result<(), String> {
    let rows: u64 = opts.get("rows", if opts.quick { 40_000 } else { 200_000 })?;
    let rounds: u64 = opts.get("rounds", 10)?;
    let changes = rows * rounds;
    println!("cdc_stream: a backlog of {changes} row updates ({rounds} transactions of {rows})");
    let pg = setup(rows)?;
    for sql in [
        "CREATE PUBLICATION polylog_bench FOR TABLE t",
        "SELECT pg_create_logical_replication_slot('polylog_bench', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('baseline', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('warmup', 'pgoutput')",
    ] {
        pg.psql("bench", sql).map_err(err)?;
    }
    for _ in 0..rounds {
        pg.psql("bench", "UPDATE t SET v = v + 1").map_err(err)?;
    }
    let end = pg.psql("bench", "SELECT pg_current_wal_lsn()").map_err(err)?;
    let recvlogical = |slot: &str| -> Result<f64, String> {
        let started = Instant::now();
        let out = client(&pg, "pg_recvlogical")
            .args(["-S", slot, "--start", "-E", &end, "-o", "proto_version=1"])
            .args(["-o", "publication_names=polylog_bench", "-f", "/dev/null"])
            .output()
            .map_err(err)?;
        if !out.status.success() {
            return Err(format!("pg_recvlogical failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(started.elapsed().as_secs_f64())
    };
    // A first, untimed drain warms the WAL into the page cache, so neither timed side pays
    // for reading it from disk.
    recvlogical("warmup")?;
    let baseline_secs = recvlogical("baseline")?;
    let scratch = ScratchDir::new(opts, "cdc-stream")?;
    let (src, _log) = source(&pg, &scratch.0, FsyncPolicy::Always, "snapshot = \"never\"")?;
    let polylog_secs = run_until(&src, |st| {
        st.events >= changes
            && st.flushed_lsn.as_deref().map(lsn) >= st.received_lsn.as_deref().map(lsn)
    })?;
    let (p, b) = (changes as f64 / polylog_secs, changes as f64 / baseline_secs);
    println!("  polylog: {polylog_secs:.2} s into the log, every change durable; pg_recvlogical: {baseline_secs:.2} s to /dev/null");
    println!(
        "RESULT cdc_stream polylog={p:.0}changes/s baseline={b:.0}changes/s ratio={:.2}",
        p / b
    );
    Ok(())
}

pub fn snapshot(opts: &Opts) -> Result<(), String> {
    let rows: u64 = opts.get("rows", if opts.quick { 300_000 } else { 5_000_000 })?;
    let parallelism: usize = opts.get("parallelism", 2)?;
    let fsync: String = opts.get("fsync", "always".to_string())?;
    let fsync = match fsync.as_str() {
        "always" => FsyncPolicy::Always,
        "never" => FsyncPolicy::Never,
        other => return Err(format!("--fsync: {other:?} is not always or never")),
    };
    println!(
        "cdc_snapshot: a table of {rows} rows ({parallelism} parallel readers, fsync {fsync:?})"
    );
    let pg = setup(rows)?;
    let started = Instant::now();
    let out = client(&pg, "psql")
        .args(["-X", "-q", "-c", "\\copy (SELECT * FROM t) TO '/dev/null'"])
        .output()
        .map_err(err)?;
    let baseline_secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!("psql failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let scratch = ScratchDir::new(opts, "cdc-snapshot")?;
    let (src, _log) =
        source(&pg, &scratch.0, fsync, &format!("snapshot_parallelism = {parallelism}"))?;
    let polylog_secs = run_until(&src, |st| st.state == "streaming")?;
    let (p, b) = (rows as f64 / polylog_secs, rows as f64 / baseline_secs);
    println!("  polylog: {polylog_secs:.2} s into the log (durable, chunked, resumable); psql \\copy: {baseline_secs:.2} s to /dev/null");
    println!("RESULT cdc_snapshot polylog={p:.0}rows/s baseline={b:.0}rows/s ratio={:.2}", p / b);
    Ok(())
}
