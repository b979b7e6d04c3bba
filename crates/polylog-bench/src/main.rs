//! Polylog's benchmark scenarios. Each runs Polylog's code and its baseline on the same data in
//! the same run and ends with a machine-readable line:
//! `RESULT <scenario> polylog=<value><unit> baseline=<value><unit> ratio=<polylog/baseline>`.
//!
//! ```text
//! cargo run --release -p polylog-bench -- <scenario> [--quick] [--dir DIR] [options]
//! ```

mod bulk_load;
mod cdc;
mod events_ingest;
mod kafka_produce;
mod log_append;
mod report_latency;
mod sink_postgres;
mod sink_search;
mod view_join;

use std::path::PathBuf;
use std::process::ExitCode;

/// Options every scenario understands.
#[derive(Debug, Clone)]
pub struct Opts {
    /// A small data set that finishes in well under a minute.
    pub quick: bool,
    /// Where scenario data is written (removed afterwards).
    pub dir: PathBuf,
    /// Scenario-specific `--name value` pairs.
    pub extra: Vec<(String, String)>,
}

impl Opts {
    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.extra.iter().rev().find(|(k, _)| k == name) {
            None => Ok(default),
            Some((_, v)) => v.parse().map_err(|_| format!("--{name}: cannot parse {v:?}")),
        }
    }
}

const SCENARIOS: &[(&str, &str)] = &[
    (
        "log_append",
        "records/s appending 200-byte records in fsync'ed batches, vs write+fsync of the same bytes \
         (options: --records N, --batch N)",
    ),
    (
        "cdc_stream",
        "changes/s draining a backlog of updates into the log, vs pg_recvlogical to /dev/null \
         (options: --rows N, --rounds N)",
    ),
    (
        "cdc_snapshot",
        "rows/s snapshotting a table into the log, vs psql \\copy to /dev/null \
         (options: --rows N, --parallelism N, --fsync always|never)",
    ),
    (
        "sink_postgres",
        "changes/s replicating a backlog of row changes into a replica with the postgres sink, vs \
         psql \\copy of the same final rows (options: --changes N)",
    ),
    (
        "sink_search",
        "documents/s the search sink indexes from a view topic, vs the same documents written \
         straight into an index in one batch (options: --documents N)",
    ),
    (
        "events_ingest",
        "events/s through the HTTP collector (validate, anonymize, categorize, durable append), vs \
         write+fsync of the same request bytes (options: --requests N, --events-per-request N, --clients N)",
    ),
    (
        "report_latency",
        "median latency of a six-month report by campaign from a rollup (stored + open buckets), vs \
         the same aggregation over the raw events in Postgres (options: --events N, --campaigns N, --runs N)",
    ),
    (
        "bulk_load",
        "rows/s loading 120-column rows from CSV into Postgres (one stream; two streams into two \
         partitions; with Parquet), vs psql \\copy ... FREEZE of the same CSV (options: --rows N, \
         --columns N, --chunk-rows N)",
    ),
    (
        "kafka_produce",
        "records/s appending batches through the Kafka backend, vs a bare rdkafka producer loop \
         acknowledging the same batches, on a tansu broker it starts (options: --records N, \
         --batch N, --partitions N, --appenders N)",
    ),
    (
        "view_join",
        "input changes/s through a videos+publisher+tags view, vs querying Postgres for each \
         change's documents (options: --videos N, --changes N, --baseline-changes N, --cache-mb N)",
    ),
];

fn usage() -> String {
    let mut s = String::from(
        "usage: polylog-bench <scenario> [--quick] [--dir DIR] [--<option> VALUE]...\n\nscenarios:\n",
    );
    for (name, what) in SCENARIOS {
        s.push_str(&format!("  {name:<12} {what}\n"));
    }
    s
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(scenario) = args.next().filter(|a| !a.starts_with('-')) else {
        eprint!("{}", usage());
        return ExitCode::from(2);
    };
    let mut opts = Opts { quick: false, dir: std::env::temp_dir(), extra: Vec::new() };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--dir" => match args.next() {
                Some(d) => opts.dir = PathBuf::from(d),
                None => {
                    eprintln!("--dir needs a directory");
                    return ExitCode::from(2);
                }
            },
            flag if flag.starts_with("--") => match args.next() {
                Some(v) => opts.extra.push((flag[2..].to_string(), v)),
                None => {
                    eprintln!("{flag} needs a value\n{}", usage());
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("unexpected argument {other:?}\n{}", usage());
                return ExitCode::from(2);
            }
        }
    }
    let result = match scenario.as_str() {
        "log_append" => log_append::run(&opts),
        "cdc_stream" => cdc::stream(&opts),
        "cdc_snapshot" => cdc::snapshot(&opts),
        "view_join" => view_join::run(&opts),
        "events_ingest" => events_ingest::run(&opts),
        "report_latency" => report_latency::run(&opts),
        "sink_postgres" => sink_postgres::run(&opts),
        "sink_search" => sink_search::run(&opts),
        "bulk_load" => bulk_load::run(&opts),
        "kafka_produce" => kafka_produce::run(&opts),
        other => Err(format!("unknown scenario {other:?}\n{}", usage())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A directory for one scenario's data, removed when dropped.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(opts: &Opts, tag: &str) -> Result<ScratchDir, String> {
        let p = opts.dir.join(format!("polylog-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|e| format!("creating {}: {e}", p.display()))?;
        Ok(ScratchDir(p))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
