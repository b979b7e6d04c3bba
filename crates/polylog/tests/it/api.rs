//! The HTTP API of `polylog run` against a real Postgres: status and metrics that match the
//! positions a known workload leaves (the metrics parsed by the Prometheus client's parser),
//! the live change feed with its filters, and producing to and reading a topic.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use polylog_testkit::TempDir;
use serde_json::{json, Value};

use crate::polylog;

pub(crate) const TOKEN: &str = "t0ken-for-tests";

pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `polylog <args>` in `dir` and waits until its API listens on `addr`.
fn run_api(dir: &std::path::Path, addr: &str, args: &[&str], stderr: Stdio) -> Running {
    let run =
        Running(polylog(dir).args(args).stdout(Stdio::null()).stderr(stderr).spawn().expect("run"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the API never listened");
        std::thread::sleep(Duration::from_millis(100));
    }
    run
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Sends a request with the token; returns the status code and the body.
pub(crate) fn call(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    try_call(addr, method, path, body).expect("request")
}

/// [`call`], with an error when nothing answers (within a minute).
pub(crate) fn try_call(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

fn get_json(addr: &str, path: &str) -> Value {
    let (code, body) = call(addr, "GET", path, "");
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

/// Waits until `cond` holds over `/v1/status`.
fn wait_status(addr: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = get_json(addr, "/v1/status");
        if cond(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Parses the exposition with `prometheus_client`'s parser (it raises on anything that is
/// not Prometheus text) into sample name → [(labels, value)].
fn parse_metrics(text: &str) -> Vec<(String, Value, f64)> {
    let script = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = []\n\
        for fam in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in fam.samples:\n\
        \x20       out.append([s.name, s.labels, s.value])\n\
        print(json.dumps(out))\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("parser");
    assert!(
        out.status.success(),
        "not Prometheus text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, Value, f64)> =
        serde_json::from_slice(&out.stdout).expect("parser output");
    samples
}

fn sample(samples: &[(String, Value, f64)], name: &str, labels: Value) -> Option<f64> {
    samples.iter().find(|(n, l, _)| n == name && *l == labels).map(|s| s.2)
}

#[test]
fn status_and_metrics_match_the_positions_of_a_known_workload() {
    let pg = polylog_testkit::PgCluster::start().expect("postgres");
    pg.create_database("app").expect("db");
    pg.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'seed' FROM generate_series(1, 100) g;",
    )
    .expect("schema");
    let d = TempDir::new("api-metrics");
    let addr = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        d.path().join("polylog.toml"),
        format!(
            "[api]\nlisten = \"{addr}\"\ntoken = \"{TOKEN}\"\n\
             [sources.app]\nkind = \"postgres\"\nurl = \"{}\"\nstatus_interval_ms = 100\n\
             [sinks.files]\nkind = \"file\"\npath = \"out\"\ntopics = [\"app.public.*\"]\n",
            pg.url("app")
        ),
    )
    .expect("config");
    let _run = run_api(d.path(), &addr, &["run"], Stdio::null());
    // Health answers without the token.
    let mut s = TcpStream::connect(&addr).expect("connect");
    write!(s, "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("request");
    let mut health = String::new();
    s.read_to_string(&mut health).expect("health");
    assert!(health.starts_with("HTTP/1.1 200") && health.contains("\"ok\""), "{health}");

    // The workload: 100 snapshot rows, then 50 inserts, 10 updates and 5 deletes.
    wait_status(&addr, "the source streams", |s| s["sources"]["app"]["state"] == "streaming");
    pg.psql(
        "app",
        "INSERT INTO t SELECT g, 'new' FROM generate_series(101, 150) g;
         UPDATE t SET v = 'changed' WHERE id <= 10;
         DELETE FROM t WHERE id > 145;",
    )
    .expect("workload");
    let status = wait_status(&addr, "every change captured and written", |s| {
        s["sources"]["app"]["events"] == 65
            && s["sinks"]["files"]["records"] == 170
            && s["sinks"]["files"]["lag"] == 0
    });
    assert_eq!(status["sources"]["app"]["snapshot_rows"], 100);
    assert_eq!(status["sources"]["app"]["slot"]["state"], "reserved", "{status:#}");
    assert!(status["sources"]["app"]["slot"]["lag_bytes"].is_u64(), "{status:#}");

    let (code, text) = call(&addr, "GET", "/metrics", "");
    assert_eq!(code, 200);
    let m = parse_metrics(&text);
    let app = json!({"source": "app"});
    assert_eq!(sample(&m, "polylog_source_events_total", app.clone()), Some(65.0));
    assert_eq!(sample(&m, "polylog_source_snapshot_rows_total", app.clone()), Some(100.0));
    assert_eq!(sample(&m, "polylog_source_errors_total", app.clone()), Some(0.0));
    assert!(sample(&m, "polylog_source_slot_lag_bytes", app).is_some());
    // The topic holds what the log says it holds: 100 + 50 + 10 + 5 deletes and their
    // tombstones, over its partitions.
    let offsets: f64 = m
        .iter()
        .filter(|(n, l, _)| n == "polylog_topic_end_offset" && l["topic"] == "app.public.t")
        .map(|s| s.2)
        .sum();
    assert_eq!(offsets, 170.0, "{text}");
    let described = get_json(&addr, "/v1/topics/app.public.t");
    let ends: u64 = described["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["end_offset"].as_u64().expect("end"))
        .sum();
    assert_eq!(ends, 170);
    let files = json!({"sink": "files"});
    assert_eq!(sample(&m, "polylog_sink_records_total", files.clone()), Some(170.0), "{text}");
    assert_eq!(sample(&m, "polylog_sink_lag_records", files.clone()), Some(0.0));
    assert_eq!(sample(&m, "polylog_sink_lag_seconds", files), Some(0.0), "caught up");
    let behind = sample(&m, "polylog_source_lag_seconds", json!({"source": "app"}));
    assert!(behind.is_some_and(|s| (0.0..60.0).contains(&s)), "{behind:?}");
    assert_eq!(
        sample(&m, "polylog_component_up", json!({"kind": "source", "name": "app"})),
        Some(1.0)
    );
    // The log fsyncs every append by default.
    assert!(sample(&m, "polylog_log_fsync_seconds_count", json!({})).unwrap_or(0.0) > 0.0);
    let status_calls =
        sample(&m, "polylog_http_requests_total", json!({"route": "/v1/status", "code": "200"}));
    assert!(status_calls >= Some(2.0), "{text}");
}

/// Reads Server-Sent Events until `n` `change` events arrived (or 30 s passed).
fn read_events(reader: &mut BufReader<TcpStream>, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    let mut line = String::new();
    while out.len() < n && Instant::now() < deadline {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {
                if let Some(data) = line.strip_prefix("data: ") {
                    out.push(serde_json::from_str(data.trim()).expect("event JSON"));
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("reading the feed: {e}"),
        }
    }
    out
}

fn open_feed(addr: &str, query: &str) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    write!(
        s,
        "GET /v1/changes?{query} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    .expect("request");
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).expect("status line");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut line = String::new();
    while r.read_line(&mut line).expect("head") > 2 {
        line.clear();
    }
    r
}

#[test]
fn the_change_feed_filters_and_topics_take_and_give_records() {
    let pg = polylog_testkit::PgCluster::start().expect("postgres");
    pg.create_database("app").expect("db");
    pg.psql(
        "app",
        "CREATE TABLE videos (id int PRIMARY KEY, title text);
         CREATE TABLE tags (id int PRIMARY KEY, name text);
         INSERT INTO videos VALUES (1, 'one'), (2, 'two');",
    )
    .expect("schema");
    let d = TempDir::new("api-feed");
    let addr = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        d.path().join("polylog.toml"),
        format!(
            "[api]\nlisten = \"{addr}\"\ntoken = \"{TOKEN}\"\n\
             [sources.app]\nkind = \"postgres\"\nurl = \"{}\"\nstatus_interval_ms = 100\n",
            pg.url("app")
        ),
    )
    .expect("config");
    // Logs as JSON lines, for log collectors.
    let log = std::fs::File::create(d.path().join("stderr.log")).expect("log file");
    let _run = run_api(d.path(), &addr, &["--log-format", "json", "run"], log.into());
    wait_status(&addr, "the source streams", |s| s["sources"]["app"]["state"] == "streaming");
    let logged = std::fs::read_to_string(d.path().join("stderr.log")).expect("log");
    let lines: Vec<Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "INFO"
            && l["message"].as_str().is_some_and(|m| m.starts_with("source app: starting"))
            && l["timestamp"].is_string()),
        "{logged}"
    );

    // Everything, from the last record of each partition back: the snapshot reads are there.
    let mut all = open_feed(&addr, "from=beginning");
    let snap = read_events(&mut all, 2);
    assert!(snap.iter().all(|e| e["op"] == "r" && e["table"] == "public.videos"), "{snap:?}");
    // Only updates of videos with key 2, from now on.
    let mut some = open_feed(&addr, "table=videos&op=u&key=2");
    pg.psql(
        "app",
        "INSERT INTO tags VALUES (5, 'rust');
         UPDATE videos SET title = 'uno' WHERE id = 1;
         UPDATE videos SET title = 'dos' WHERE id = 2;",
    )
    .expect("changes");
    let got = read_events(&mut some, 1);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["after"], json!({"id": 2, "title": "dos"}));
    assert_eq!(
        (got[0]["op"].as_str(), got[0]["topic"].as_str()),
        (Some("u"), Some("app.public.videos"))
    );
    let rest = read_events(&mut all, 3);
    let ops: Vec<(&str, &str)> = rest
        .iter()
        .map(|e| (e["table"].as_str().unwrap_or(""), e["op"].as_str().unwrap_or("")))
        .collect();
    assert!(
        ops.contains(&("public.tags", "c")) && ops.contains(&("public.videos", "u")),
        "{ops:?}"
    );
    assert!(
        rest.iter().all(|e| e["topic"] != "app.transaction"),
        "transaction markers are not changes"
    );
    let (code, body) = call(&addr, "GET", "/v1/changes?op=x", "");
    assert_eq!(code, 400, "{body}");

    // A service keeps its own records in a compacted topic through the API.
    let (code, body) =
        call(&addr, "PUT", "/v1/topics/profiles", r#"{"partitions": 2, "compacted": true}"#);
    assert_eq!(code, 201, "{body}");
    let (code, body) = call(&addr, "PUT", "/v1/topics/profiles", "");
    assert_eq!(code, 409, "{body}");
    let (code, body) = call(
        &addr,
        "POST",
        "/v1/topics/profiles/records",
        r#"{"records": [{"key": {"user": 1}, "value": {"name": "Ada"}, "headers": {"source": "api"}},
                        {"key": {"user": 2}, "value": {"name": "Bob"}},
                        {"key": {"user": 1}, "value": null}]}"#,
    );
    assert_eq!(code, 200, "{body}");
    let offsets: Value = serde_json::from_str(&body).expect("JSON");
    let first = &offsets["offsets"][0];
    assert_eq!(offsets["offsets"][2]["partition"], first["partition"], "one key, one partition");
    assert_eq!(offsets["offsets"][2]["offset"].as_u64(), first["offset"].as_u64().map(|o| o + 1));
    let p = first["partition"].as_u64().expect("partition");
    let read = get_json(&addr, &format!("/v1/topics/profiles/records?partition={p}&offset=0"));
    let recs = read["records"].as_array().expect("records");
    assert_eq!(recs[0]["key"], json!({"user": 1}));
    assert_eq!(recs[0]["value"], json!({"name": "Ada"}));
    assert_eq!(recs[0]["headers"], json!({"source": "api"}));
    assert!(recs.last().is_some_and(|r| r["value"].is_null()), "the tombstone: {recs:?}");
    // The CLI reads what the API wrote.
    let tail = ok_cmd(d.path(), &["topics", "tail", "profiles", "--from-beginning"]);
    assert!(tail.contains("Bob"), "{tail}");
    // Refusals are clear and write nothing.
    for (path, body, code, says) in [
        (
            "/v1/topics/nope/records",
            r#"{"records":[{"key":1,"value":1}]}"#,
            404,
            "polylog topics create",
        ),
        ("/v1/topics/profiles/records", r#"{"records":[{"value":1}]}"#, 400, "compacted"),
        (
            "/v1/topics/profiles/records",
            r#"{"records":[{"key":1,"vaule":1}]}"#,
            400,
            "unknown field",
        ),
        ("/v1/topics/profiles/records", "not json", 400, "not JSON"),
        (
            "/v1/topics/profiles/records",
            r#"{"records":[{"key":1,"partition":9}]}"#,
            400,
            "partition",
        ),
    ] {
        let (c, b) = call(&addr, "POST", path, body);
        assert_eq!(c, code, "{path} {body}: {b}");
        assert!(b.contains(says), "{b}");
    }
    let list = get_json(&addr, "/v1/topics");
    let profiles = list["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .find(|t| t["name"] == "profiles")
        .cloned()
        .expect("profiles listed");
    assert_eq!(profiles["records"], 3, "{profiles}");
}

fn ok_cmd(dir: &std::path::Path, args: &[&str]) -> String {
    let out = polylog(dir).args(args).output().expect("polylog");
    assert!(out.status.success(), "polylog {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
