//! The chaos harness: `polylog run` capturing a real Postgres into a view, a Postgres sink (the
//! tables and the view's documents) and the embedded search index, under a mixed workload,
//! while faults are injected:
//!
//! - `kill -9` of Polylog at random moments, `POLYLOG_CHAOS_KILLS` times (default 100);
//! - the source Postgres stopped with an immediate shutdown mid-stream, then restarted;
//! - the target Postgres down for a while;
//! - write and fsync errors at the log's and the state stores' durable points (failpoints,
//!   `POLYLOG_FAILPOINTS`) in every fourth run of Polylog;
//! - at the end, the replication slot dropped under Polylog: it must stop, say why, and not
//!   take a new slot (which would skip what was committed meanwhile).
//!
//! Once the faults stop, every derived store must equal its source. What differs is reported
//! in the anomaly vocabulary:
//! - **lost**: a row, document or change the source has and the store lacks;
//! - **duplicate**: one change stored twice (a position twice in a topic, an id twice in the
//!   index, a ledger row captured twice);
//! - **reordered**: a key's changes out of position order within its partition;
//! - **stale**: the store holds an older version than the source, or a row the source deleted.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use polylog_log::{EmbeddedLog, Log, LogOptions, StartAt};
use polylog_postgres::event::Position;
use polylog_testkit::videos::{transaction, ORACLE, SCHEMA, VIEW};
use polylog_testkit::{PgCluster, Rng, TempDir};
use serde_json::Value;

use crate::api::{call, free_port, try_call, TOKEN};
use crate::polylog;

/// The captured tables and their primary keys.
const TABLES: [(&str, &[&str]); 6] = [
    ("countries", &["code"]),
    ("publishers", &["id"]),
    ("videos", &["id"]),
    ("tags", &["id"]),
    ("video_tags", &["video_id", "tag_id"]),
    ("ledger", &["id"]),
];

/// Failpoints armed in every fourth run: chances per hit of each durable point.
const FAILPOINTS: &str =
    "log.write=0.004,log.fsync=0.004,state.commit=0.05,source.state=0.03,search.commit=0.05";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Lost,
    Duplicate,
    Reordered,
    Stale,
}

#[derive(Debug)]
struct Anomaly {
    kind: Kind,
    store: String,
    key: String,
    detail: String,
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = format!("{:?}", self.kind).to_lowercase();
        write!(f, "{kind:9} {} {}: {}", self.store, self.key, self.detail)
    }
}

/// A store's contents against the source's, by key.
fn compare(
    store: &str,
    source: &BTreeMap<String, Value>,
    stored: &BTreeMap<String, Value>,
    out: &mut Vec<Anomaly>,
) {
    let mut add = |kind, key: &String, detail: String| {
        out.push(Anomaly { kind, store: store.to_string(), key: key.clone(), detail })
    };
    for (k, want) in source {
        match stored.get(k) {
            None => add(Kind::Lost, k, format!("missing; the source has {want}")),
            Some(got) if got != want => {
                add(Kind::Stale, k, format!("holds {got}; the source has {want}"))
            }
            Some(_) => {}
        }
    }
    for (k, got) in stored {
        if !source.contains_key(k) {
            add(Kind::Stale, k, format!("holds {got}, deleted at the source"));
        }
    }
}

/// `SELECT` of rows as key → row (JSON), without the sink's own columns; `None` if the table
/// cannot be read.
fn rows(pg: &PgCluster, db: &str, table: &str, key: &[&str]) -> Option<BTreeMap<String, Value>> {
    let sql = format!(
        "SELECT to_jsonb(t) - '_polylog_position' - '_polylog_partition' FROM public.{table} t"
    );
    let out = pg.psql(db, &sql).ok()?;
    let rows = out
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let row: Value = serde_json::from_str(l).expect("row JSON");
            let k: Vec<String> = key.iter().map(|c| row[*c].to_string()).collect();
            (k.join(","), row)
        })
        .collect();
    Some(rows)
}

/// `{"id": 1}` however it is spaced.
fn key_text(k: &str) -> String {
    serde_json::from_str::<Value>(k).map_or_else(|_| k.to_string(), |v| v.to_string())
}

fn without_version(mut d: Value) -> Value {
    if let Some(o) = d.as_object_mut() {
        o.remove("_version");
    }
    d
}

/// Everything a store holds, against the source, once.
fn check_stores(source: &PgCluster, target: &PgCluster, api: &str) -> Vec<Anomaly> {
    let mut out = Vec::new();
    for (table, key) in TABLES {
        let want = rows(source, "app", table, key).expect("the source table");
        // A replica table not created yet holds nothing.
        let got = rows(target, "replica", table, key).unwrap_or_default();
        compare(&format!("replica.{table}"), &want, &got, &mut out);
    }
    let oracle: BTreeMap<String, Value> = source
        .psql("app", ORACLE)
        .expect("the oracle query")
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, d) = l.split_once('\t').expect("key and document");
            (key_text(k), serde_json::from_str(d).expect("document"))
        })
        .collect();
    let docs: BTreeMap<String, Value> = target
        .psql("replica", "SELECT id::text || chr(9) || doc::text FROM views_videos")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, d) = l.split_once('\t').expect("id and document");
            (key_text(k), without_version(serde_json::from_str(d).expect("document")))
        })
        .collect();
    compare("replica.views_videos", &oracle, &docs, &mut out);
    // The search index: every document once.
    let (code, body) = call(api, "GET", "/v1/search/videos?q=*&limit=1000", "");
    if code != 200 {
        out.push(Anomaly {
            kind: Kind::Lost,
            store: "search.videos".into(),
            key: "*".into(),
            detail: format!("the index did not answer: {code} {body}"),
        });
        return out;
    }
    let found: Value = serde_json::from_str(&body).expect("search JSON");
    let mut indexed = BTreeMap::new();
    for hit in found["hits"].as_array().expect("hits") {
        let id = hit["id"].to_string();
        if indexed.insert(id.clone(), without_version(hit["doc"].clone())).is_some() {
            out.push(Anomaly {
                kind: Kind::Duplicate,
                store: "search.videos".into(),
                key: id,
                detail: "indexed twice".into(),
            });
        }
    }
    if found["total"].as_u64() != Some(indexed.len() as u64) {
        out.push(Anomaly {
            kind: Kind::Duplicate,
            store: "search.videos".into(),
            key: "*".into(),
            detail: format!("{} matches for {} ids", found["total"], indexed.len()),
        });
    }
    compare("search.videos", &oracle, &indexed, &mut out);
    out
}

/// The change topics: no change twice, in position order per partition, and every ledger row
/// (inserted once, never changed) captured exactly once.
fn check_topics(data_dir: &std::path::Path, source: &PgCluster) -> Vec<Anomaly> {
    let mut out = Vec::new();
    let o = LogOptions { maintenance_interval_ms: 0, ..LogOptions::default() };
    let log = EmbeddedLog::open_read_only(data_dir, o).expect("read the log");
    let mut ledger: HashMap<String, u32> = HashMap::new();
    for (table, _) in TABLES {
        let topic = format!("app.public.{table}");
        let d = log.describe_topic(&topic).expect("the topic exists");
        for p in &d.partitions {
            let mut r = log.reader(&topic, p.partition, StartAt::Beginning).expect("reader");
            let mut last: Option<Position> = None;
            loop {
                let got = r.poll(10_000, Duration::ZERO).expect("poll");
                if got.is_empty() {
                    break;
                }
                for rec in got {
                    let Some(value) = rec.value else { continue }; // tombstones share positions
                    let key = String::from_utf8_lossy(rec.key.as_deref().unwrap_or_default())
                        .into_owned();
                    if let Some(pos) = Position::from_headers(&rec.headers) {
                        if let Some(l) = last {
                            let (kind, what) = if l == pos {
                                (Kind::Duplicate, "again")
                            } else {
                                (Kind::Reordered, "after a later position")
                            };
                            if l >= pos {
                                out.push(Anomaly {
                                    kind,
                                    store: format!("{topic}[{}]", p.partition),
                                    key: key.clone(),
                                    detail: format!(
                                        "offset {}: position {pos:?} {what}",
                                        rec.offset
                                    ),
                                });
                            }
                        }
                        last = Some(pos);
                    }
                    if table == "ledger" {
                        let v: Value = serde_json::from_slice(&value).expect("event JSON");
                        if matches!(v["op"].as_str(), Some("c" | "r")) {
                            *ledger.entry(key_text(&key)).or_default() += 1;
                        }
                    }
                }
            }
        }
    }
    let rows =
        source.psql("app", "SELECT json_build_object('id', id) FROM ledger").expect("ledger");
    let want: Vec<String> = rows.lines().filter(|l| !l.is_empty()).map(key_text).collect();
    for k in &want {
        match ledger.get(k).copied().unwrap_or(0) {
            1 => {}
            0 => out.push(Anomaly {
                kind: Kind::Lost,
                store: "app.public.ledger".into(),
                key: k.clone(),
                detail: "a committed insert never captured".into(),
            }),
            n => out.push(Anomaly {
                kind: Kind::Duplicate,
                store: "app.public.ledger".into(),
                key: k.clone(),
                detail: format!("captured {n} times"),
            }),
        }
    }
    assert!(want.len() > 100, "the workload committed only {} transactions", want.len());
    out
}

fn config(dir: &std::path::Path, source: &PgCluster, target: &PgCluster, api: &str) -> String {
    let view = VIEW.replace("[[joins]]", "[[views.videos.joins]]");
    format!(
        r#"data_dir = "{data}"

[log]
fsync = "always"
partitions = 2

[api]
listen = "{api}"
token = "{TOKEN}"

[sources.app]
kind = "postgres"
url = "{source}"
status_interval_ms = 200

[sinks.replica]
kind = "postgres"
url = "{target}"
topics = ["app.public.*"]
mode = "table"

[sinks.documents]
kind = "postgres"
url = "{target}"
topics = ["views.videos"]
mode = "document"

[sinks.videos]
kind = "search"
topic = "views.videos"

[views.videos]
{view}
"#,
        data = dir.join("data").display(),
        source = source.url("app"),
        target = target.url("replica"),
    )
}

/// A run of `polylog run`, its stderr in `log`; killed when dropped.
struct Child9 {
    child: Child,
    log: std::path::PathBuf,
}

impl Child9 {
    fn start(dir: &std::path::Path, failpoints: bool, round: u32) -> Child9 {
        let log = dir.join(format!("run-{round:03}.log"));
        let mut cmd = polylog(dir);
        cmd.args(["-c", "chaos.toml", "run"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("child log"));
        if failpoints {
            cmd.env("POLYLOG_FAILPOINTS", FAILPOINTS);
        }
        Child9 { child: cmd.spawn().expect("spawn polylog run"), log }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, once it exits by itself within 60 s (else the test fails with `what`).
    fn wait_exit(&mut self, what: &str) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(code) = self.child.try_wait().expect("try_wait") {
                return code;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{what}:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -9`; whether it was still running.
    fn kill_9(&mut self) -> bool {
        let running = self.child.try_wait().expect("try_wait").is_none();
        let _ = self.child.kill();
        let _ = self.child.wait();
        running
    }
}

impl Drop for Child9 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// `/v1/status`, or `None` while nothing answers.
fn status(api: &str) -> Option<Value> {
    match try_call(api, "GET", "/v1/status", "") {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kill_9_crashes_outages_and_failpoints_leave_every_store_equal_to_the_source() {
    let kills: u32 =
        std::env::var("POLYLOG_CHAOS_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(100);
    let dir = TempDir::new("chaos");
    let source = PgCluster::start().expect("start the source Postgres");
    source.create_database("app").expect("database");
    source.psql("app", SCHEMA).expect("schema");
    source
        .psql("app", "CREATE TABLE ledger (id bigserial PRIMARY KEY, txn bigint NOT NULL)")
        .expect("ledger");
    let mut target = PgCluster::start().expect("start the target Postgres");
    target.create_database("replica").expect("database");
    let api = format!("127.0.0.1:{}", free_port());
    std::fs::write(dir.path().join("chaos.toml"), config(dir.path(), &source, &target, &api))
        .expect("config");
    let mut rng = Rng::from_env("chaos");
    for n in 0..50 {
        let tx = transaction(&mut rng)
            .replace("COMMIT;", &format!("INSERT INTO ledger (txn) VALUES ({n}); COMMIT;"));
        source.psql("app", &tx).expect("workload");
    }

    // The workload: transactions as fast as psql goes, through every fault. A transaction
    // that fails (Postgres down, a conflict) is not retried: the checks read what committed.
    let source = Arc::new(RwLock::new(source));
    let stop = Arc::new(AtomicBool::new(false));
    // However the test ends, the workload stops (it holds the source cluster, which is
    // stopped and removed when the last holder drops it).
    let _stop_workload = StopOnDrop(stop.clone());
    let committed = Arc::new(AtomicU64::new(0));
    let workload = {
        let (source, stop, committed) = (source.clone(), stop.clone(), committed.clone());
        let mut rng = Rng::new(rng.next_u64());
        std::thread::spawn(move || {
            let mut n = 1000u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let tx = transaction(&mut rng)
                    .replace("COMMIT;", &format!("INSERT INTO ledger (txn) VALUES ({n}); COMMIT;"));
                let pg = source.read().expect("source");
                if pg.psql("app", &tx).is_ok() {
                    committed.fetch_add(1, Ordering::Relaxed);
                } else {
                    drop(pg);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };

    // The first run takes the snapshot; kills start once it streams.
    let mut child = Child9::start(dir.path(), false, 0);
    wait_for("the first run to stream", Duration::from_secs(120), || {
        status(&api).is_some_and(|s| s["sources"]["app"]["state"] == "streaming")
    });
    let (mut killed, mut failpoint_exits, mut pg_crashes, mut target_outages) = (0, 0, 0, 0);
    // Kills of a run whose source was streaming (the others were still starting).
    let mut killed_streaming = 0;
    let mut fired: BTreeMap<String, u32> = BTreeMap::new();
    let started = Instant::now();
    let mut round = 0;
    while killed < kills {
        round += 1;
        // Faults beside the kills, while Polylog runs.
        if round % 40 == 10 {
            std::thread::sleep(Duration::from_millis(rng.below(800)));
            let mut pg = source.write().expect("source");
            pg.crash().expect("immediate shutdown of the source");
            std::thread::sleep(Duration::from_millis(1500));
            pg.restart().expect("restart the source");
            pg_crashes += 1;
        }
        if round % 40 == 25 {
            target.stop().expect("stop the target");
            std::thread::sleep(Duration::from_secs(4));
            target.restart().expect("restart the target");
            target_outages += 1;
        }
        std::thread::sleep(Duration::from_millis(150 + rng.below(1200)));
        let was_running = child.kill_9();
        let err = child.stderr();
        for line in err.lines() {
            if let Some(name) =
                line.split("failpoint ").nth(1).and_then(|r| r.strip_suffix(" fired"))
            {
                *fired.entry(name.to_string()).or_default() += 1;
            }
        }
        if was_running {
            killed += 1;
            if err.contains("source app: streaming from") {
                killed_streaming += 1;
            }
        } else {
            assert!(
                err.contains("injected failure at failpoint"),
                "round {round}: polylog run exited by itself, not from a failpoint:\n{err}"
            );
            failpoint_exits += 1;
        }
        let failpoints = round % 4 == 3;
        child = Child9::start(dir.path(), failpoints, round);
        if failpoints {
            // Long enough for a failpoint to fire.
            std::thread::sleep(Duration::from_millis(1500));
        }
    }
    // A fault-free run catches up; every store must then equal the source.
    drop(child);
    stop.store(true, Ordering::SeqCst);
    workload.join().expect("workload");
    let chaos_secs = started.elapsed().as_secs();
    let mut last = Child9::start(dir.path(), false, round + 1);
    let mut anomalies = Vec::new();
    let mut checked = false;
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            last.child.try_wait().expect("try_wait").is_none(),
            "the fault-free run stopped:\n{}",
            last.stderr()
        );
        if status(&api).is_none() {
            continue;
        }
        anomalies = check_stores(&source.read().expect("source"), &target, &api);
        checked = true;
        if anomalies.is_empty() {
            break;
        }
    }
    assert!(
        checked,
        "the fault-free run never answered, so no store was checked:\n{}",
        last.stderr()
    );
    anomalies.extend(check_topics(&dir.path().join("data"), &source.read().expect("source")));
    let mut counts: BTreeMap<Kind, usize> = BTreeMap::new();
    for a in &anomalies {
        *counts.entry(a.kind).or_default() += 1;
    }
    eprintln!(
        "chaos: {round} runs in {chaos_secs} s: {killed} kill -9 ({killed_streaming} while streaming), {failpoint_exits} exits at failpoints \
         (fired: {fired:?}), {pg_crashes} source crashes, {target_outages} target outages; \
         {} transactions committed; anomalies: lost {}, duplicate {}, reordered {}, stale {}",
        committed.load(Ordering::Relaxed),
        counts.get(&Kind::Lost).unwrap_or(&0),
        counts.get(&Kind::Duplicate).unwrap_or(&0),
        counts.get(&Kind::Reordered).unwrap_or(&0),
        counts.get(&Kind::Stale).unwrap_or(&0),
    );
    for a in anomalies.iter().take(20) {
        eprintln!("  {a}");
    }
    assert!(anomalies.is_empty(), "{} anomalies (the first are above)", anomalies.len());
    assert!(
        killed_streaming * 2 >= killed,
        "only {killed_streaming} of {killed} kills met a streaming source: the rest hit start-up"
    );
    if kills >= 100 {
        // About 30 runs with failpoints armed: one of them at least fails.
        assert!(failpoint_exits > 0, "no failpoint fired: the fault injection did not happen");
    }

    // The slot dropped under a running Polylog: it stops and says why, and does not take a new
    // slot (which would skip what was committed meanwhile).
    let pg = source.read().expect("source");
    wait_for("streaming before the slot is dropped", Duration::from_secs(60), || {
        status(&api).is_some_and(|s| s["sources"]["app"]["state"] == "streaming")
    });
    wait_for("the slot to be dropped", Duration::from_secs(30), || {
        let _ = pg.psql(
            "app",
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = 'polylog_app' AND active_pid IS NOT NULL",
        );
        pg.psql("app", "SELECT pg_drop_replication_slot('polylog_app')").is_ok()
    });
    pg.psql("app", "INSERT INTO ledger (txn) VALUES (-1)").expect("a change after the drop");
    let code = last.wait_exit("polylog kept running without its slot");
    let err = last.stderr();
    assert!(!code.success(), "polylog exited 0 without its slot");
    assert!(err.contains("replication slot \"polylog_app\" was dropped"), "{err}");
    // Started again, it refuses the same way (and does not take a new slot).
    let mut again = Child9::start(dir.path(), false, round + 2);
    let code = again.wait_exit("restarted without its slot, polylog kept running");
    let again_err = again.stderr();
    assert!(!code.success() && again_err.contains("was dropped"), "{again_err}");
    let slots = pg.psql("app", "SELECT count(*) FROM pg_replication_slots").expect("slots");
    assert_eq!(slots, "0", "a new slot was taken after the old one was dropped");
}
