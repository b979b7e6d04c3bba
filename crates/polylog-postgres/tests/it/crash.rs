//! Crash tests: the source runs in a child process that is `kill -9`ed at random moments while
//! Postgres takes a mixed workload; afterwards the topics, folded into table state, equal the
//! tables, and no position appears twice.

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions};
use polylog_postgres::event::Position;
use polylog_postgres::{PostgresSource, SourceOptions};
use polylog_testkit::PgCluster;
use serde_json::{json, Value};

use crate::support::{cluster, fold, read_topic, TempDir};

const CHILD_ENV: &str = "POLYLOG_CDC_CHILD";

/// The child's side: runs a source until killed, when started by a crash test.
#[test]
fn child_source_for_kill_tests() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    // What the source reports (retries, say) goes to the child's log.
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).try_init();
    let spec: Value = serde_json::from_str(&spec).expect("child spec");
    let dir = std::path::PathBuf::from(spec["dir"].as_str().expect("dir"));
    let log: Arc<dyn Log> = match spec["kafka"].as_str() {
        Some(brokers) => kafka_log(brokers),
        None => {
            let o = LogOptions {
                fsync: FsyncPolicy::Always,
                maintenance_interval_ms: 0,
                ..LogOptions::default()
            };
            Arc::new(EmbeddedLog::open(dir.join("log"), o).expect("child: open log"))
        }
    };
    let cfg = toml::from_str(spec["config"].as_str().expect("config")).expect("child: config");
    let opts = SourceOptions {
        state_dir: dir.join("sources").join("app"),
        partitions: 3,
        progress: false,
    };
    let src = PostgresSource::new("app", cfg, log, opts).expect("child: source");
    let stop = AtomicBool::new(false);
    src.run(&stop).expect("child: source failed");
}

fn kafka_log(brokers: &str) -> Arc<dyn Log> {
    let mut o = polylog_kafka::KafkaOptions::new(brokers);
    o.replication_factor = 1;
    Arc::new(polylog_kafka::KafkaLog::connect(o).expect("connect to Kafka"))
}

/// A child source, killed when dropped (a failing test leaves none behind).
struct Running(Child);

impl Running {
    fn kill_9(&mut self) {
        self.0.kill().expect("kill -9");
        self.0.wait().expect("reap");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The child's log: the embedded log under `dir`, or the Kafka broker at `kafka`. What it
/// prints goes to `dir/child.log`.
fn spawn_child(dir: &std::path::Path, config: &str, kafka: Option<&str>) -> Running {
    let spec = json!({"dir": dir, "config": config, "kafka": kafka}).to_string();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("child.log"))
        .expect("child log");
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["crash::child_source_for_kill_tests", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, spec)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn child");
    Running(child)
}

/// The last lines the children printed.
fn child_log(dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(dir.join("child.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// `SELECT` of a table as id → {column: value} with the values as text (for comparison with
/// events, whose JSON values are compared through their text form).
fn table_state(pg: &PgCluster, table: &str) -> BTreeMap<i64, Value> {
    let out = pg.psql("app", &format!("SELECT row_to_json(t) FROM {table} t")).expect("select");
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("row json");
            (v["id"].as_i64().expect("id"), v)
        })
        .collect()
}

fn folded(log: &dyn Log, topic: &str) -> BTreeMap<i64, Value> {
    fold(&read_topic(log, topic))
        .into_values()
        .map(|v| (v["id"].as_i64().expect("id"), v))
        .collect()
}

/// No position appears twice in any partition (tombstones share their delete's).
fn assert_no_duplicates(log: &dyn Log, topic: &str) {
    let mut last: HashMap<u32, Position> = HashMap::new();
    let mut seen = 0;
    for e in read_topic(log, topic) {
        if e.value.is_null() {
            continue;
        }
        let Some(pos) = Position::from_headers(&e.headers) else { continue }; // snapshot rows
        assert!(
            last.get(&e.partition).is_none_or(|l| *l < pos),
            "{topic}: position {pos:?} repeated or out of order"
        );
        last.insert(e.partition, pos);
        seen += 1;
    }
    assert!(seen > 0, "{topic} has no streamed events: the kills never met a streaming source");
}

/// Waits until the folded topics equal the tables.
fn wait_converged(pg: &PgCluster, log_dir: &std::path::Path, kafka: Option<&str>, tables: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log: Arc<dyn Log> = match kafka {
            Some(brokers) => kafka_log(brokers),
            None => {
                let o = LogOptions { maintenance_interval_ms: 0, ..LogOptions::default() };
                Arc::new(EmbeddedLog::open_read_only(log_dir, o).expect("read log"))
            }
        };
        let diff: Vec<String> = tables
            .iter()
            .filter(|t| folded(&*log, &format!("app.public.{t}")) != table_state(pg, t))
            .map(|t| t.to_string())
            .collect();
        if diff.is_empty() {
            for t in tables {
                assert_no_duplicates(&*log, &format!("app.public.{t}"));
            }
            return;
        }
        if Instant::now() > deadline {
            let t = diff[0].clone();
            let (want, got) = (table_state(pg, &t), folded(&*log, &format!("app.public.{t}")));
            let missing: Vec<_> =
                want.keys().filter(|k| got.get(k) != want.get(k)).take(5).collect();
            let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(k)).take(5).collect();
            panic!("{diff:?} never converged; in {t}: {} rows vs {} folded; wrong or missing {missing:?}, extra {extra:?}", want.len(), got.len());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn kill_9_at_random_loses_and_duplicates_nothing() {
    kill_9_at_random(None);
}

/// The same on the Kafka backend: the source acknowledges a LSN to Postgres only once Kafka
/// acknowledged what it wrote up to there.
#[test]
fn kill_9_at_random_loses_and_duplicates_nothing_on_kafka() {
    let broker = polylog_testkit::KafkaBroker::start().expect("Kafka broker");
    kill_9_at_random(Some(&broker.brokers()));
}

fn kill_9_at_random(kafka: Option<&str>) {
    let pg = cluster();
    pg.psql(
        "app",
        "CREATE TABLE t1 (id int PRIMARY KEY, v int, pad text);
         CREATE TABLE t2 (id bigint PRIMARY KEY, name text);
         CREATE TABLE excluded (id int PRIMARY KEY);
         INSERT INTO t1 SELECT g, g, 'seed' FROM generate_series(1, 500) g;",
    )
    .expect("schema");
    let dir = TempDir::new("crash");
    let config = format!(
        "url = \"{}\"\nstatus_interval_ms = 50\nexclude_tables = [\"public.excluded\"]\n",
        pg.url("app")
    );
    let done = Arc::new(AtomicBool::new(false));
    let workload = {
        let (done, url) = (Arc::clone(&done), pg.port());
        let pg_bin = pg.bin_dir().to_path_buf();
        std::thread::spawn(move || {
            let psql = |sql: &str| {
                let ok = Command::new(pg_bin.join("psql"))
                    .args([
                        "-X",
                        "-q",
                        "-v",
                        "ON_ERROR_STOP=1",
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &url.to_string(),
                        "-U",
                        "postgres",
                        "-d",
                        "app",
                        "-c",
                        sql,
                    ])
                    .stdout(Stdio::null())
                    .status()
                    .expect("psql")
                    .success();
                assert!(ok, "workload statement failed: {sql}");
            };
            let mut next = 1000;
            for round in 0..60 {
                match round % 6 {
                    0 => psql(&format!("INSERT INTO t1 SELECT g, g, 'multi' FROM generate_series({next}, {}) g", next + 200)),
                    1 => psql(&format!("UPDATE t1 SET v = v + 1, pad = 'u{round}' WHERE id % 7 = {}", round % 7)),
                    2 => psql(&format!("BEGIN; DELETE FROM t1 WHERE id % 11 = {}; INSERT INTO t2 VALUES ({next}, 'x'); COMMIT", round % 11)),
                    3 => psql(&format!("INSERT INTO excluded SELECT g FROM generate_series({next}, {}) g", next + 100)),
                    4 => psql(&format!("UPDATE t2 SET name = name || '{round}'; UPDATE t1 SET id = id + 100000 WHERE id = {}", next - 1000 + 5)),
                    _ if round == 35 => psql(&format!(
                        "BEGIN; INSERT INTO t1 SELECT g, 0, repeat('L', 100) FROM generate_series({next}, {}) g; \
                         UPDATE t1 SET v = -1 WHERE id >= {next}; COMMIT",
                        next + 30_000
                    )),
                    _ => psql(&format!("COPY t2 (id) FROM PROGRAM 'seq {next} {}'", next + 150)),
                }
                next += 40_000;
                std::thread::sleep(Duration::from_millis(20));
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    // The first run is left to finish its snapshot (kills before it only replace the slot, and
    // a snapshot taken at the end would leave nothing streamed to test); how long its start took
    // widens the kill window, so that on a slow machine kills still land while streaming.
    let state_path = dir.path().join("sources").join("app").join("state.json");
    let started = Instant::now();
    let mut child = spawn_child(dir.path(), &config, kafka);
    while !std::fs::read_to_string(&state_path).is_ok_and(|s| s.contains("\"snapshot\": \"done\""))
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the first snapshot never finished; the child printed:\n{}",
            child_log(dir.path())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let window = 600 + started.elapsed().as_millis() as u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
    let mut kills = 0;
    while kills < 30 || !(done.load(Ordering::SeqCst) || workload.is_finished()) {
        if kills > 0 {
            child = spawn_child(dir.path(), &config, kafka);
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(150 + rng % window));
        child.kill_9();
        kills += 1;
    }
    workload.join().expect("workload");
    // A last run, left to catch up.
    child = spawn_child(dir.path(), &config, kafka);
    wait_converged(&pg, &dir.path().join("log"), kafka, &["t1", "t2"]);
    child.kill_9();
    eprintln!(
        "crash test ({}): {kills} kills, in windows of 150-{} ms",
        if kafka.is_some() { "Kafka" } else { "embedded log" },
        150 + window
    );
}

#[test]
fn a_killed_snapshot_resumes_from_its_last_chunk() {
    let pg = cluster();
    pg.psql("app", "CREATE TABLE big (id int PRIMARY KEY, pad text); INSERT INTO big SELECT g, repeat('p', 200) FROM generate_series(1, 200000) g;")
        .expect("schema");
    let dir = TempDir::new("snapcrash");
    let config = format!("url = \"{}\"\nsnapshot_chunk_rows = 5000\n", pg.url("app"));
    let state_path = dir.path().join("sources").join("app").join("state.json");
    let mut child = spawn_child(dir.path(), &config, None);
    // Kill it once some chunks are stored, but before the end.
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows_done = |p: &std::path::Path| -> u64 {
        std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .map_or(0, |v| v["tables"]["public.big"]["rows"].as_u64().unwrap_or(0))
    };
    while rows_done(&state_path) < 20_000 {
        assert!(Instant::now() < deadline, "the snapshot made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill_9();
    let at_kill = rows_done(&state_path);
    assert!(at_kill < 200_000, "killed before the end ({at_kill} rows stored)");
    let mut child = spawn_child(dir.path(), &config, None);
    wait_converged_snapshot(dir.path(), 200_000);
    child.kill_9();
    let o = LogOptions { maintenance_interval_ms: 0, ..LogOptions::default() };
    let log = EmbeddedLog::open_read_only(dir.path().join("log"), o).expect("read log");
    let events = read_topic(&log, "app.public.big");
    // Resumed, not restarted: at most the chunks in flight at the kill are read twice (per
    // key range read in parallel: the one being read and the one becoming durable).
    assert!(
        events.len() <= 200_000 + 5_000 * 2 * 2,
        "{} snapshot events for 200000 rows",
        events.len()
    );
    assert_eq!(fold(&events).len(), 200_000);
}

fn wait_converged_snapshot(dir: &std::path::Path, rows: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let state =
            std::fs::read(dir.join("sources").join("app").join("state.json")).unwrap_or_default();
        let v: Value = serde_json::from_slice(&state).unwrap_or_default();
        if v["snapshot"] == "done" {
            let o = LogOptions { maintenance_interval_ms: 0, ..LogOptions::default() };
            let log = EmbeddedLog::open_read_only(dir.join("log"), o).expect("read log");
            let n = fold(&read_topic(&log, "app.public.big")).len();
            assert_eq!(n, rows);
            return;
        }
        assert!(Instant::now() < deadline, "the snapshot never finished: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_five_million_row_transaction_streams_in_bounded_memory() {
    const ROWS: u64 = 5_000_000;
    const RSS_BOUND_KIB: u64 = 256 * 1024;
    let pg = cluster();
    pg.psql("app", "CREATE TABLE big (id int PRIMARY KEY, v int)").expect("schema");
    let dir = TempDir::new("bigtx");
    let config = format!("url = \"{}\"\n", pg.url("app"));
    let mut child = spawn_child(dir.path(), &config, None);
    // Wait until it streams (its state file says the snapshot is done).
    let state = dir.path().join("sources").join("app").join("state.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&state).is_ok_and(|s| s.contains("\"done\"")) {
        assert!(Instant::now() < deadline, "the source did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    pg.psql("app", &format!("INSERT INTO big SELECT g, g FROM generate_series(1, {ROWS}) g"))
        .expect("one big transaction");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let o = LogOptions { maintenance_interval_ms: 0, ..LogOptions::default() };
        let log = EmbeddedLog::open_read_only(dir.path().join("log"), o).expect("read log");
        let d = log.describe_topic("app.public.big").expect("topic");
        let n: u64 = d.partitions.iter().map(|p| p.end_offset).sum();
        if n >= ROWS {
            assert_eq!(n, ROWS, "every row once");
            break;
        }
        assert!(Instant::now() < deadline, "only {n} of {ROWS} rows arrived");
        std::thread::sleep(Duration::from_secs(1));
    }
    let peak = peak_rss_kib(child.0.id());
    child.kill_9();
    eprintln!("5M-row transaction: peak RSS of the source process {} MiB", peak / 1024);
    assert!(peak > 0 && peak < RSS_BOUND_KIB, "peak RSS {peak} KiB exceeds {RSS_BOUND_KIB} KiB");
}
