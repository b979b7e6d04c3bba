//! The `polylog` binary as a user runs it.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use polylog_testkit::TempDir;

mod api;
mod browser;
mod chaos;
mod kafka;
mod load;
mod memory;

fn polylog(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_polylog"));
    c.current_dir(dir);
    c
}

fn run(dir: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = polylog(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn polylog");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("polylog output")
}

fn ok(dir: &Path, args: &[&str], stdin: &str) -> String {
    let out = run(dir, args, stdin);
    assert!(
        out.status.success(),
        "polylog {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(dir: &Path, args: &[&str], stdin: &str) -> String {
    let out = run(dir, args, stdin);
    assert!(!out.status.success(), "polylog {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).expect("tail prints JSON lines")).collect()
}

#[test]
fn produce_then_tail_prints_the_documented_json_lines() {
    let d = TempDir::new("tail");
    ok(d.path(), &["topics", "create", "videos", "--partitions", "2"], "");
    let input = "{\"id\":1}\t{\"title\":\"a\"}\n{\"id\":2}\tplain text\nno key here\n\n{\"id\":1}\t{\"title\":\"b\"}\n";
    let out = run(d.path(), &["topics", "produce", "videos"], input);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("produced 4 record(s)"));
    let all = lines(&ok(d.path(), &["topics", "tail", "videos", "--from-beginning"], ""));
    assert_eq!(all.len(), 4);
    let first = &all.iter().find(|v| v["key"]["id"] == 1).expect("id 1");
    // Field order and shape as DESIGN 3.7 documents.
    let keys: Vec<&str> = first.as_object().expect("object").keys().map(String::as_str).collect();
    assert_eq!(keys, ["topic", "partition", "offset", "timestamp", "key", "value"]);
    assert_eq!(first["topic"], "videos");
    assert_eq!(first["value"]["title"], "a");
    assert!(first["timestamp"].as_i64().expect("ms") > 1_600_000_000_000);
    assert!(all.iter().any(|v| v["value"] == "plain text" && v["key"]["id"] == 2));
    assert!(all.iter().any(|v| v["value"] == "no key here" && v["key"].is_null()));
    // The same key always lands in the same partition, in order.
    let id1: Vec<_> = all.iter().filter(|v| v["key"]["id"] == 1).collect();
    assert_eq!(id1[0]["partition"], id1[1]["partition"]);
    assert_eq!(id1[1]["value"]["title"], "b");
    // Without --from-beginning: the last -n records per partition.
    let last = lines(&ok(
        d.path(),
        &["topics", "tail", "videos", "-n", "1", "--partition", &id1[1]["partition"].to_string()],
        "",
    ));
    assert_eq!(last.len(), 1);
    assert_eq!(last[0]["value"]["title"], "b");
    let listed = ok(d.path(), &["topics", "list"], "");
    assert!(listed.contains("videos") && listed.contains("PARTITIONS"), "{listed}");
    let described: serde_json::Value =
        serde_json::from_str(&ok(d.path(), &["topics", "describe", "videos", "--json"], ""))
            .expect("json");
    assert_eq!(described["partitions"].as_array().expect("partitions").len(), 2);
}

#[test]
fn tail_follow_sees_records_another_process_produces() {
    let d = TempDir::new("follow");
    ok(d.path(), &["topics", "create", "events"], "");
    let mut tail = polylog(d.path())
        .args(["topics", "tail", "events", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tail");
    let stdout = tail.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    ok(d.path(), &["topics", "produce", "events"], "k\tfirst\n");
    ok(d.path(), &["topics", "produce", "events"], "k\tsecond\n");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 2 && Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            got.push(l);
        }
    }
    let _ = tail.kill();
    let _ = tail.wait();
    let values: Vec<String> =
        lines(&got.join("\n")).iter().map(|v| v["value"].to_string()).collect();
    assert_eq!(values, ["\"first\"", "\"second\""]);
}

#[test]
fn config_errors_name_the_key() {
    let d = TempDir::new("config");
    std::fs::write(d.path().join("polylog.toml"), "[log]\nfsync = \"sometimes\"\n").expect("write");
    let e = fails(d.path(), &["topics", "list"], "");
    assert!(e.contains("`log.fsync`") && e.contains("sometimes") && e.contains("line 2"), "{e}");
    std::fs::write(
        d.path().join("other.toml"),
        "[sources.app]\nkind = \"postgres\"\nurl = \"postgres://x/y\"\ntabels = []\n",
    )
    .expect("write");
    // -c works before and after the subcommand.
    for args in
        [&["-c", "other.toml", "config", "check"][..], &["config", "check", "-c", "other.toml"]]
    {
        let e = fails(d.path(), args, "");
        assert!(e.contains("`sources.app`") && e.contains("unknown field `tabels`"), "{e}");
    }
    let e = fails(d.path(), &["-c", "missing.toml", "config", "check"], "");
    assert!(e.contains("missing.toml"), "{e}");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/polylog.example.toml"),
        d.path().join("example.toml"),
    )
    .expect("copy example");
    let out = ok(d.path(), &["-c", "example.toml", "config", "check"], "");
    assert!(out.contains("1 source(s), 1 view(s), 2 sink(s), 1 rollup(s), a collector"), "{out}");
}

#[test]
fn refusals_are_clear_and_change_nothing() {
    let d = TempDir::new("refuse");
    let e = fails(d.path(), &["topics", "list"], "");
    assert!(e.contains("no Polylog data directory"), "{e}");
    let e = fails(d.path(), &["topics", "create", "bad/name"], "");
    assert!(e.contains("invalid topic name"), "{e}");
    let e = fails(d.path(), &["topics", "produce", "nope"], "x\ty\n");
    assert!(e.contains("does not exist") && e.contains("--create"), "{e}");
    let e = fails(d.path(), &["topics", "tail", "nope"], "");
    assert!(e.contains("does not exist"), "{e}");
    // A directory with other contents is not taken over.
    std::fs::create_dir_all(d.path().join("mine")).expect("mkdir");
    std::fs::write(d.path().join("mine/notes.txt"), "keep").expect("write");
    let e = fails(d.path(), &["--data-dir", "mine", "topics", "create", "t"], "");
    assert!(e.contains("not a Polylog data directory"), "{e}");
    assert_eq!(std::fs::read_dir(d.path().join("mine")).expect("ls").count(), 1);
    // A second writer is refused while the first holds the directory.
    ok(d.path(), &["topics", "create", "t"], "");
    let mut holder = polylog(d.path())
        .args(["topics", "produce", "t"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn producer");
    let mut stdin = holder.stdin.take().expect("stdin");
    stdin.write_all(b"a\t1\n").expect("write");
    std::thread::sleep(Duration::from_millis(500));
    let e = fails(d.path(), &["topics", "produce", "t"], "b\t2\n");
    assert!(e.contains("in use by another polylog process") && e.contains("pid"), "{e}");
    drop(stdin);
    assert!(holder.wait().expect("producer exits").success());
    let all = lines(&ok(d.path(), &["topics", "tail", "t", "--from-beginning"], ""));
    assert_eq!(all.len(), 1, "only the first producer's record is there");
}

#[test]
fn quickstart_runs_the_whole_pipeline_and_serves_search() {
    let d = TempDir::new("quickstart");
    let port = polylog_testkit::free_port().expect("a free port");
    let listen = format!("127.0.0.1:{port}");
    let mut child = polylog(d.path())
        .args(["quickstart", "--seconds", "25", "--listen", &listen])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("quickstart");
    // Once it says what to try, the search answers with documents of the sample schema.
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = until_running(&mut lines);
    assert!(printed.contains("3. Running"), "{printed}");
    let body = http_get(&listen, "/v1/search/videos?q=title:rust&limit=2");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let json: serde_json::Value =
        serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap_or("")).expect("JSON");
    assert!(json["total"].as_u64().unwrap_or(0) > 10, "{json}");
    let hit = &json["hits"][0]["doc"];
    assert!(hit["title"].as_str().is_some_and(|t| t.contains("rust")), "{hit}");
    assert!(hit["publisher"]["name"].is_string() && hit["tags"].is_array(), "{hit}");
    let one = http_get(&listen, "/v1/search/videos/%7B%22id%22:1%7D");
    assert!(one.starts_with("HTTP/1.1 200") && one.contains("\"publisher\""), "{one}");
    let missing = http_get(&listen, "/v1/search/nope?q=x");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let bad = http_get(&listen, "/v1/search/videos?q=title:(");
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    for line in lines {
        printed.push_str(&line.expect("a line"));
        printed.push('\n');
    }
    assert!(child.wait().expect("quickstart exits").success(), "{printed}");
    assert!(printed.contains("4. Stopped"), "{printed}");
    // Running it again starts over in the same directory.
    let again = ok(d.path(), &["quickstart", "--seconds", "3", "--listen", &listen], "");
    assert!(again.contains("4. Stopped"), "{again}");
}

/// What the quickstart prints until it says what to try (it is running then).
fn until_running(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> String {
    let mut printed = String::new();
    for line in lines {
        let line = line.expect("a line");
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("Try, in another terminal") {
            break;
        }
    }
    printed
}

fn http_get(listen: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(listen).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    body
}

#[test]
fn run_captures_changes_and_status_shows_them_until_sigterm() {
    let pg = polylog_testkit::PgCluster::start().expect("postgres");
    pg.create_database("app").expect("db");
    pg.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'one');
         CREATE TABLE notes (id int PRIMARY KEY, t_id int, body text);
         INSERT INTO notes VALUES (10, 1, 'first');",
    )
    .expect("schema");
    let d = TempDir::new("run");
    let view = "[views.tv]\nroot = \"app.public.t\"\n\
        joins = [{ name = \"notes\", topic = \"app.public.notes\", on = { id = \"t_id\" }, kind = \"many\", fields = [\"body\"] }]\n";
    std::fs::write(
        d.path().join("polylog.toml"),
        format!(
            "[sources.app]\nkind = \"postgres\"\nurl = \"{}\"\nstatus_interval_ms = 100\n{view}",
            pg.url("app")
        ),
    )
    .expect("config");
    let run = polylog(d.path())
        .args(["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        assert!(Instant::now() < deadline, "run did not capture: {seen:?}");
        std::thread::sleep(Duration::from_millis(200));
        let out = run_cmd(d.path(), &["topics", "tail", "app.public.t", "--from-beginning"]);
        seen = out.lines().map(String::from).collect();
        if seen.len() == 1 {
            pg.psql("app", "INSERT INTO t VALUES (2, 'two') ON CONFLICT DO NOTHING")
                .expect("insert");
        }
    }
    let ops: Vec<serde_json::Value> =
        seen.iter().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(ops[0]["value"]["op"], "r");
    assert_eq!(ops[1]["value"]["op"], "c");
    // The running process reports its status every second.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = ok(d.path(), &["status"], "");
    while !status.contains("streaming") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        status = ok(d.path(), &["status"], "");
    }
    assert!(
        status.contains("app") && status.contains("streaming") && status.contains("SLOT LAG"),
        "{status}"
    );
    // The two one-row tables' snapshot, as progress: "2/~N rows (..%)" or "2 rows" without an
    // estimate.
    assert!(status.contains(" 2/~") || status.contains(" 2 rows"), "snapshot progress: {status}");
    // The view, after the sources: a document per row of t, with its notes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let docs = loop {
        let out = run_cmd(d.path(), &["topics", "tail", "views.tv", "--from-beginning"]);
        let docs = lines(&out);
        if docs.iter().any(|d| d["key"]["id"] == 2) || Instant::now() > deadline {
            break docs;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let one = docs.iter().rev().find(|d| d["key"]["id"] == 1).expect("t 1's document");
    assert_eq!(one["value"]["notes"], serde_json::json!([{"body": "first"}]), "{docs:?}");
    assert!(one["value"]["_version"].is_u64(), "{one}");
    let status = ok(d.path(), &["status"], "");
    assert!(
        status.contains("VIEW") && status.contains("tv") && status.contains("running"),
        "{status}"
    );
    let killed =
        Command::new("kill").args(["-TERM", &run.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let out = run.wait_with_output().expect("run exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run exits cleanly on SIGTERM: {stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
    let status = ok(d.path(), &["status"], "");
    assert!(status.contains("stopped") || status.contains("not running"), "{status}");
}

#[test]
fn run_refuses_a_view_over_a_topic_nothing_writes() {
    let d = TempDir::new("bad-view");
    std::fs::write(d.path().join("polylog.toml"), "[views.v]\nroot = \"app.public.nope\"\n")
        .expect("config");
    let err = fails(d.path(), &["run"], "");
    assert!(err.contains("view v") && err.contains("`views.v.root`"), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

fn run_cmd(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args, "");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Rows of a table as JSON, in key order, without the sink's own columns.
fn table_rows(pg: &polylog_testkit::PgCluster, db: &str, table: &str, order: &str) -> String {
    pg.psql(
        db,
        &format!(
            "SELECT COALESCE(jsonb_agg(to_jsonb(t) - '_polylog_partition' - '_polylog_position' ORDER BY {order}), '[]') FROM {table} t"
        ),
    )
    .expect("rows")
}

#[test]
fn replication_survives_kill_9_and_a_lost_replica_is_replayed() {
    let pg = polylog_testkit::PgCluster::start().expect("postgres");
    pg.create_database("app").expect("db");
    pg.create_database("replica").expect("db");
    pg.psql(
        "app",
        "CREATE TABLE items (id int PRIMARY KEY, name text, n int);
         CREATE TABLE links (a int, b int, PRIMARY KEY (a, b));
         INSERT INTO items SELECT g, 'i' || g, g FROM generate_series(1, 500) g;",
    )
    .expect("schema");
    let d = TempDir::new("replicate");
    std::fs::write(
        d.path().join("polylog.toml"),
        format!(
            "[sources.app]\nkind = \"postgres\"\nurl = \"{}\"\nstatus_interval_ms = 100\nheartbeat_interval_ms = 200\n\
             [sinks.replica]\nkind = \"postgres\"\nurl = \"{}\"\ntopics = [\"app.public.*\"]\nbatch_rows = 50\n",
            pg.url("app"),
            pg.url("replica")
        ),
    )
    .expect("config");
    let mut rng = polylog_testkit::Rng::new(1);
    let mut next = || rng.next_u64();
    for kill in 0..6 {
        let mut run = polylog(d.path())
            .args(["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run");
        for _ in 0..15 {
            let (id, v) = (next() % 800, next() % 100);
            pg.psql(
                "app",
                &format!(
                    "BEGIN;
                     INSERT INTO items VALUES ({id}, 'x{v}', {v}) ON CONFLICT (id) DO UPDATE SET n = excluded.n, name = excluded.name;
                     UPDATE items SET n = n + 1 WHERE id % 7 = {};
                     DELETE FROM items WHERE id = {};
                     INSERT INTO links VALUES ({v}, {id}) ON CONFLICT DO NOTHING;
                     {}
                     COMMIT;",
                    v % 7,
                    next() % 800,
                    if kill == 3 && v % 5 == 0 { "TRUNCATE links;" } else { "" }
                ),
            )
            .expect("workload");
        }
        std::thread::sleep(Duration::from_millis(100 + next() % 700));
        run.kill().expect("kill -9");
        run.wait().expect("reap");
    }
    let run = polylog(d.path())
        .args(["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let waited =
        run_cmd_status(d.path(), &["status", "--wait-caught-up", "replica", "--timeout", "120"]);
    assert!(waited.0, "status --wait-caught-up: {}", waited.1);
    let check = || {
        assert_eq!(
            table_rows(&pg, "replica", "items", "id"),
            table_rows(&pg, "app", "items", "id")
        );
        assert_eq!(
            table_rows(&pg, "replica", "links", "a, b"),
            table_rows(&pg, "app", "links", "a, b")
        );
    };
    check();
    let status = ok(d.path(), &["status"], "");
    assert!(
        status.contains("SINK") && status.contains("replica") && status.contains("0 records"),
        "{status}"
    );
    Command::new("kill").args(["-TERM", &run.id().to_string()]).status().expect("kill");
    let out = run.wait_with_output().expect("run exits");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The replica is lost; a replay rebuilds it from the log.
    pg.psql("replica", "DROP TABLE items; DROP TABLE links").expect("drop");
    let replayed = ok(d.path(), &["replay", "--sink", "replica"], "");
    assert!(
        replayed.contains("replayed") && replayed.contains("its lag is 0 records"),
        "{replayed}"
    );
    check();
}

fn run_cmd_status(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = run(dir, args, "");
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn run_collects_events_anonymized_and_status_counts_them() {
    let d = TempDir::new("collect");
    let port = polylog_testkit::free_port().expect("a free port");
    std::fs::write(
        d.path().join("polylog.toml"),
        format!(
            "[collector]\nlisten = \"127.0.0.1:{port}\"\ntopic = \"events.viewability\"\n\
             site_categories = {{ \"example.com\" = \"news\" }}\n"
        ),
    )
    .expect("config");
    let run = polylog(d.path())
        .args(["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    let body = format!(
        "{{\"type\":\"impression\",\"ts\":{now},\"impression_id\":\"i1\",\"campaign_id\":\"c1\",\"site_domain\":\"example.com\",\"ip\":\"192.0.2.55\",\"user_id\":\"u-canary\"}}\n{{\"type\":\"bogus\"}}\n"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::Read;
            write!(
                s,
                "POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .expect("post");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("answer");
            break out;
        }
        assert!(Instant::now() < deadline, "the collector did not listen");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("\"accepted\":1"), "{answer}");
    assert!(answer.contains("must be impression, viewability or click"), "{answer}");
    let tail = run_cmd(d.path(), &["topics", "tail", "events.viewability", "--from-beginning"]);
    let events = lines(&tail);
    assert_eq!(events.len(), 1, "{tail}");
    assert_eq!(events[0]["value"]["ip_prefix"], "192.0.2.0/24");
    assert_eq!(events[0]["value"]["site_category"], "news");
    assert!(!tail.contains("192.0.2.55") && !tail.contains("u-canary"), "{tail}");
    std::thread::sleep(Duration::from_millis(1500));
    let status = ok(d.path(), &["status"], "");
    assert!(status.contains("COLLECTOR") && status.contains("running"), "{status}");
    Command::new("kill").args(["-TERM", &run.id().to_string()]).status().expect("kill");
    let out = run.wait_with_output().expect("run exits");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Per campaign: impressions, measurable, viewable, clicks, in-view ms, invalid.
fn totals(events: &[polylog_events::Event]) -> std::collections::BTreeMap<String, [u64; 6]> {
    use polylog_events::EventKind;
    let mut out = std::collections::BTreeMap::<String, [u64; 6]>::new();
    for e in events {
        let t = out.entry(e.campaign_id.clone()).or_default();
        if e.invalid {
            t[5] += 1;
            continue;
        }
        match e.kind {
            EventKind::Impression => t[0] += 1,
            EventKind::Viewability => {
                t[1] += 1;
                t[2] += e.viewable.unwrap_or(false) as u64;
                t[4] += e.in_view_ms.unwrap_or(0);
            }
            EventKind::Click => t[3] += 1,
        }
    }
    out
}

/// A report's rows by campaign, and its late events.
type Totals = (std::collections::BTreeMap<String, [u64; 6]>, u64);

fn report_totals(listen: &str, query: &str) -> Option<Totals> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(listen).ok()?;
    write!(s, "GET /v1/reports/r?{query}&group_by=campaign_id HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let json: serde_json::Value = serde_json::from_str(body.split("\r\n\r\n").nth(1)?).ok()?;
    let mut out = std::collections::BTreeMap::new();
    for row in json["rows"].as_array()? {
        let n = |k: &str| row[k].as_u64().unwrap_or(0);
        out.insert(
            row["campaign_id"].as_str()?.to_string(),
            [
                n("impressions"),
                n("measurable"),
                n("viewable"),
                n("clicks"),
                n("in_view_ms"),
                n("invalid"),
            ],
        );
    }
    Some((out, json["late_events"].as_u64()?))
}

#[test]
fn rollup_flushes_killed_20_times_still_count_every_event_once() {
    let d = TempDir::new("rollup-kill");
    let pg = polylog_testkit::PgCluster::start().expect("postgres");
    pg.create_database("analytics").expect("db");
    let (port, collector) = (
        polylog_testkit::free_port().expect("a free port"),
        polylog_testkit::free_port().expect("a free port"),
    );
    let listen = format!("127.0.0.1:{port}");
    std::fs::write(
        d.path().join("polylog.toml"),
        format!(
            "[api]\nlisten = \"{listen}\"\n[collector]\nlisten = \"127.0.0.1:{collector}\"\n\
             topic = \"events\"\n[rollups.r]\ntopic = \"events\"\nurl = \"{}\"\n\
             dimensions = [\"campaign_id\", \"device\", \"site_domain\"]\n\
             lateness_seconds = 600\nflush_interval_ms = 10\n",
            pg.url("analytics")
        ),
    )
    .expect("config");
    // Traffic whose clock runs fast (a minute per request, from 30 days ago), so minutes close
    // and are flushed all the time; posted again until answered while Polylog is down.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poster = {
        let (stop, addr) = (std::sync::Arc::clone(&stop), format!("127.0.0.1:{collector}"));
        std::thread::spawn(move || {
            let mut g = polylog_events::gen::Generator::new(polylog_events::gen::GenOptions {
                campaigns: 30,
                sites: 20,
                users: 2_000,
                seed: 3,
            });
            let mut t = polylog_log::now_ms() - 30 * 86_400_000;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (body, _) = g.batch(300, t, t + 60_000);
                t += 60_000;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match polylog_events::gen::post(&addr, &body) {
                        Ok((200, _)) => break,
                        _ => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
        })
    };
    // A flush in progress: a statement of the flush transaction is running or just ran.
    let in_flush = |statements: &str| {
        pg.psql(
            "analytics",
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'analytics' AND \
                 xact_start IS NOT NULL AND query ~ '^({statements})'"
            ),
        )
        .map(|o| o.trim() != "0")
        .unwrap_or(false)
    };
    let any = r"INSERT INTO (r_|polylog_rollup_offsets)|SELECT extract\(epoch FROM t\.bucket|UPDATE polylog_rollups|CREATE TABLE IF NOT EXISTS r_[a-z]+_p";
    let last = r"UPDATE polylog_rollups|INSERT INTO polylog_rollup_offsets";
    let mut rng = polylog_testkit::Rng::from_env("rollup_kill");
    let (mut kills, mut attempts) = (0, 0);
    while kills < 20 {
        attempts += 1;
        assert!(attempts < 100, "only {kills} kills landed in a flush in {attempts} runs");
        let mut child =
            polylog(d.path()).args(["run"]).stderr(Stdio::piped()).spawn().expect("run");
        // Every third kill lands at the end of a flush, just before its commit; the others
        // anywhere after one began (some after it committed).
        let target = if attempts % 3 == 0 { last } else { any };
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        let until = Instant::now() + Duration::from_secs(10);
        let mut seen = false;
        while Instant::now() < until && !seen {
            seen = in_flush(target);
            if let Some(status) = child.try_wait().expect("try_wait") {
                let mut err = String::new();
                use std::io::Read;
                child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
                panic!("polylog run ended by itself ({status}) after {kills} kills: {err}");
            }
        }
        if target == any {
            std::thread::sleep(Duration::from_millis(rng.below(100)));
        }
        child.kill().expect("kill -9");
        child.wait().expect("reaped");
        kills += seen as u32;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    poster.join().expect("poster");
    let mut child = polylog(d.path()).args(["run"]).stderr(Stdio::null()).spawn().expect("run");
    let query = format!("from={}&to=now", polylog_log::now_ms() - 40 * 86_400_000);
    // What the collector stored, read beside the running process.
    let tail = ok(d.path(), &["topics", "tail", "events", "--from-beginning"], "");
    let events: Vec<polylog_events::Event> = lines(&tail)
        .into_iter()
        .map(|l| serde_json::from_value(l["value"].clone()).expect("event"))
        .collect();
    let want = totals(&events);
    // Every stored event counted once: in a bucket, or as late (which, with ten requests'
    // worth of lateness, none should be).
    let until = Instant::now() + Duration::from_secs(120);
    let mut got = None;
    while Instant::now() < until {
        got = report_totals(&listen, &query);
        if let Some((rows, late)) = &got {
            let counted: u64 = rows.values().map(|t| t[0] + t[1] + t[3] + t[5]).sum::<u64>() + late;
            if counted >= events.len() as u64 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    child.wait().expect("run exits");
    assert_eq!(
        got,
        Some((want, 0)),
        "after {kills} kills in flushes ({attempts} runs), {} events",
        events.len()
    );
    // Hours and days agree with the minutes stored.
    let sums = |t: &str| {
        pg.psql(
            "analytics",
            &format!(
                "SELECT sum(impressions), sum(measurable), sum(clicks), sum(invalid) FROM r_{t}"
            ),
        )
        .expect("sums")
    };
    assert_eq!(sums("minute"), sums("hour"));
    assert_eq!(sums("minute"), sums("day"));
}

#[test]
fn an_event_posted_is_in_the_next_report_within_2_seconds() {
    let d = TempDir::new("up-to-the-minute");
    let pg = polylog_testkit::PgCluster::start().expect("postgres");
    pg.create_database("analytics").expect("db");
    let (api, collector) =
        (polylog_testkit::free_port().expect("port"), polylog_testkit::free_port().expect("port"));
    std::fs::write(
        d.path().join("polylog.toml"),
        format!(
            "[api]\nlisten = \"127.0.0.1:{api}\"\n[collector]\nlisten = \"127.0.0.1:{collector}\"\n\
             topic = \"events\"\n[rollups.r]\ntopic = \"events\"\nurl = \"{}\"\n\
             dimensions = [\"campaign_id\"]\n",
            pg.url("analytics")
        ),
    )
    .expect("config");
    let mut child = polylog(d.path()).args(["run"]).stderr(Stdio::null()).spawn().expect("run");
    let listen = format!("127.0.0.1:{api}");
    let addr = format!("127.0.0.1:{collector}");
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let body = format!(
            "{{\"type\":\"impression\",\"ts\":{},\"impression_id\":\"i{i}\",\"campaign_id\":\"fresh-{i}\",\"site_domain\":\"example.com\",\"user_agent\":\"Mozilla/5.0 (X11; Linux x86_64) Firefox/125.0\"}}\n",
            polylog_log::now_ms()
        );
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            match polylog_events::gen::post(&addr, body.as_bytes()) {
                Ok((200, _)) => break,
                other => assert!(Instant::now() < until, "the collector: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let posted = Instant::now();
        loop {
            let r = report_totals(&listen, &format!("from=now-5m&filter=campaign_id:fresh-{i}"))
                .map(|(rows, _)| rows);
            if r.as_ref().and_then(|r| r.get(&format!("fresh-{i}"))).map(|t| t[0]) == Some(1) {
                break;
            }
            // The first report waits for the rollup to start; later ones are the measure.
            let limit = if i == 0 { Duration::from_secs(30) } else { Duration::from_secs(2) };
            assert!(
                posted.elapsed() < limit,
                "event {i} not in a report after {:?}",
                posted.elapsed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if i > 0 {
            slowest = slowest.max(posted.elapsed());
        }
    }
    eprintln!("slowest event-to-report: {slowest:?}");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(child.wait().expect("exits").success());
}
