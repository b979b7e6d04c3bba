//! `sink_postgres`: changes/s replicating a backlog of row changes (inserts, then updates of
//! random rows) from a table topic into a replica database with the `postgres` sink, against
//! `psql \copy` of the same final rows into an empty table, in the same run.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use polylog_log::{
    partition_for_key, EmbeddedLog, FsyncPolicy, Log, LogOptions, Record, TopicConfig,
};
use polylog_postgres::event::Position;
use polylog_sinks::{Sink, SinkConfig};
use polylog_testkit::{PgCluster, Rng};

use crate::{Opts, ScratchDir};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

const PARTITIONS: u32 = 2;

fn row(id: u64, v: u64) -> String {
    format!(r#"{{"id":{id},"v":{v},"pad":"{:032x}"}}"#, id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ v)
}

pub fn run(opts: &Opts) -> Result<(), String> {
    let n: u64 = opts.get("changes", if opts.quick { 100_000 } else { 1_000_000 })?;
    let inserts = n * 6 / 10;
    println!("sink_postgres: {n} changes ({inserts} inserts, then updates of random rows) into a replica");
    let scratch = ScratchDir::new(opts, "sink-postgres")?;
    let o = LogOptions {
        fsync: FsyncPolicy::Always,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(scratch.0.join("log"), o).map_err(err)?);
    log.create_topic("app.public.t", &TopicConfig::new(PARTITIONS)).map_err(err)?;
    log.create_topic("app.schema-history", &TopicConfig::new(1)).map_err(err)?;
    let history = r#"{"source":"app","table":"public.t","lsn":0,"ts_ms":0,"columns":[
        {"name":"id","type":"integer","type_oid":23,"key":true,"excluded":false,"masked":false},
        {"name":"v","type":"bigint","type_oid":20,"key":false,"excluded":false,"masked":false},
        {"name":"pad","type":"text","type_oid":25,"key":false,"excluded":false,"masked":false}]}"#;
    log.append("app.schema-history", 0, &[Record::new(r#"{"table":"public.t"}"#, history)])
        .map_err(err)?;

    let mut finals: BTreeMap<u64, u64> = BTreeMap::new();
    let mut rng = Rng::new(7);
    let mut pending: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
    for i in 0..n {
        let id = if i < inserts { i + 1 } else { rng.below(inserts) + 1 };
        let v = i;
        finals.insert(id, v);
        let commit = 1_000_000 + (i / 10) * 100;
        let value = format!(
            r#"{{"before":null,"after":{},"op":"{}","ts_ms":0,"source":{{"connector":"postgresql","lsn":{commit}}}}}"#,
            row(id, v),
            if i < inserts { "c" } else { "u" }
        );
        let key = format!(r#"{{"id":{id}}}"#);
        let p = partition_for_key(key.as_bytes(), PARTITIONS);
        let mut r = Record::new(key, value);
        r.headers
            .push(Position { commit_lsn: commit, change_lsn: commit + i % 10, sub: 0 }.to_header());
        let batch = pending.entry(p).or_default();
        batch.push(r);
        if batch.len() >= 5000 {
            log.append("app.public.t", p, batch).map_err(err)?;
            batch.clear();
        }
    }
    for (p, batch) in &pending {
        if !batch.is_empty() {
            log.append("app.public.t", *p, batch).map_err(err)?;
        }
    }

    println!("  starting a throwaway Postgres ...");
    let pg = PgCluster::start().map_err(err)?;
    pg.create_database("replica").map_err(err)?;
    pg.create_database("baseline").map_err(err)?;
    let text = format!(
        "kind = \"postgres\"\nurl = \"{}\"\ntopics = [\"app.public.t\"]",
        pg.url("replica")
    );
    let cfg: SinkConfig = toml::from_str(&text).map_err(err)?;
    let sink = Sink::new("replica", cfg, Arc::clone(&log)).map_err(err)?;
    let started = Instant::now();
    sink.run(&AtomicBool::new(false), true).map_err(err)?;
    let polylog_secs = started.elapsed().as_secs_f64();
    let count = pg.psql("replica", "SELECT count(*) FROM public.t").map_err(err)?;
    if count.trim() != finals.len().to_string() {
        return Err(format!("the replica has {count} rows, expected {}", finals.len()));
    }

    // The baseline: the same final rows, loaded with \copy into an empty table with its key.
    let file = scratch.0.join("rows.txt");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).map_err(err)?);
        for (id, v) in &finals {
            let pad = format!("{:032x}", id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ v);
            writeln!(f, "{id}\t{v}\t{pad}").map_err(err)?;
        }
    }
    std::fs::set_permissions(&scratch.0, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(err)?;
    pg.psql("baseline", "CREATE TABLE t (id int PRIMARY KEY, v bigint, pad text)").map_err(err)?;
    let started = Instant::now();
    let out = std::process::Command::new(pg.bin_dir().join("psql"))
        .args([
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
            "-d",
            "baseline",
        ])
        .args(["-c", &format!("\\copy t FROM '{}'", file.display())])
        .output()
        .map_err(err)?;
    let baseline_secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!("psql failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let (p, b) = (n as f64 / polylog_secs, finals.len() as f64 / baseline_secs);
    println!(
        "  polylog: {n} changes in {polylog_secs:.2} s ({} final rows, each batch one transaction); psql \\copy: {} rows in {baseline_secs:.2} s",
        finals.len(),
        finals.len()
    );
    println!(
        "RESULT sink_postgres polylog={p:.0}changes/s baseline={b:.0}rows/s ratio={:.2}",
        p / b
    );
    Ok(())
}
