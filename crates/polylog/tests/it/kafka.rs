//! The binary with `[log] backend = "kafka"` against a Kafka-protocol broker (tansu): the topics
//! CLI, `polylog run` capturing Postgres and keeping a view, and what a standard Kafka client
//! reads of the change events.

use std::process::Stdio;
use std::time::{Duration, Instant};

use polylog_testkit::{KafkaBroker, TempDir};

use crate::{fails, lines, ok, polylog, run_cmd};

fn kafka_config(broker: &KafkaBroker, rest: &str) -> String {
    format!(
        // No replication_factor: topics get the cluster's default (replication factor -1).
        "[log]\nbackend = \"kafka\"\nbrokers = \"{}\"\npartitions = 2\n{rest}",
        broker.brokers()
    )
}

#[test]
fn the_topics_commands_work_on_kafka() {
    let broker = KafkaBroker::start().expect("Kafka broker");
    let d = TempDir::new("kafka-topics");
    std::fs::write(d.path().join("polylog.toml"), kafka_config(&broker, "")).expect("config");
    ok(d.path(), &["topics", "create", "videos", "--partitions", "2", "--compacted"], "");
    let input = "{\"id\":1}\t{\"title\":\"a\"}\n{\"id\":2}\tplain\n{\"id\":1}\t{\"title\":\"b\"}\n";
    let out = crate::run(d.path(), &["topics", "produce", "videos"], input);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all = lines(&ok(d.path(), &["topics", "tail", "videos", "--from-beginning"], ""));
    assert_eq!(all.len(), 3, "{all:?}");
    let id1: Vec<_> = all.iter().filter(|v| v["key"]["id"] == 1).collect();
    assert_eq!(id1[0]["partition"], id1[1]["partition"], "a key stays in its partition");
    assert_eq!(id1[1]["value"]["title"], "b");
    let listed = ok(d.path(), &["topics", "list"], "");
    assert!(listed.contains("videos"), "{listed}");
    let described: serde_json::Value =
        serde_json::from_str(&ok(d.path(), &["topics", "describe", "videos", "--json"], ""))
            .expect("json");
    assert_eq!(described["partitions"].as_array().expect("partitions").len(), 2);
    assert_eq!(described["config"]["compacted"], true, "{described}");
    // The same key lands in the same partition on either backend (Kafka's murmur2).
    let e = fails(d.path(), &["topics", "create", "videos"], "");
    assert!(e.contains("videos") && e.contains("exists"), "{e}");
}

#[test]
fn kafka_settings_are_checked_and_an_unreachable_cluster_is_named() {
    let d = TempDir::new("kafka-config");
    let write = |text: &str| std::fs::write(d.path().join("polylog.toml"), text).expect("config");
    write("[log]\nbackend = \"kafka\"\n");
    let e = fails(d.path(), &["topics", "list"], "");
    assert!(e.contains("`log.brokers`"), "{e}");
    write("[log]\nbackend = \"kafka\"\nbrokers = \"127.0.0.1:9\"\nsasl_mechanism = \"GSSAPI\"\n");
    let e = fails(d.path(), &["config", "check"], "");
    assert!(e.contains("`log.sasl_mechanism`") && e.contains("SCRAM-SHA-256"), "{e}");
    write("[log]\nbackend = \"kafka\"\nbrokers = \"127.0.0.1:9\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"u\"\n");
    let e = fails(d.path(), &["config", "check"], "");
    assert!(e.contains("`log.sasl_password`") && e.contains("POLYLOG_KAFKA_PASSWORD"), "{e}");
    write(
        "[log]\nbackend = \"kafka\"\nbrokers = \"127.0.0.1:9\"\ntls_ca = \"/nonexistent/ca.pem\"\n",
    );
    let e = fails(d.path(), &["config", "check"], "");
    assert!(e.contains("`log.tls_ca`") && e.contains("/nonexistent/ca.pem"), "{e}");
    write("[log]\nscale_out = true\n");
    let e = fails(d.path(), &["config", "check"], "");
    assert!(e.contains("`log.scale_out`") && e.contains("kafka"), "{e}");
    write("[log]\nbackend = \"kafka\"\nbrokers = \"127.0.0.1:9\"\n");
    let started = Instant::now();
    let e = fails(d.path(), &["topics", "list"], "");
    assert!(e.contains("127.0.0.1:9") && e.contains("Kafka"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(30), "an unreachable cluster fails in time");
}

#[test]
fn run_captures_into_kafka_and_a_standard_client_reads_debezium_events() {
    let broker = KafkaBroker::start().expect("Kafka broker");
    let pg = polylog_testkit::PgCluster::start().expect("postgres");
    pg.create_database("app").expect("db");
    pg.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'one');
         CREATE TABLE notes (id int PRIMARY KEY, t_id int, body text);
         INSERT INTO notes VALUES (10, 1, 'first');",
    )
    .expect("schema");
    let d = TempDir::new("kafka-run");
    let rest = format!(
        "[sources.app]\nkind = \"postgres\"\nurl = \"{}\"\nstatus_interval_ms = 100\n\
         [views.tv]\nroot = \"app.public.t\"\n\
         joins = [{{ name = \"notes\", topic = \"app.public.notes\", on = {{ id = \"t_id\" }}, kind = \"many\", fields = [\"body\"] }}]\n\
         [sinks.out]\nkind = \"file\"\ntopics = [\"views.tv\"]\npath = \"out\"\n",
        pg.url("app")
    );
    std::fs::write(d.path().join("polylog.toml"), kafka_config(&broker, &rest)).expect("config");
    let mut run = polylog(d.path())
        .args(["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut inserted = false;
    let docs = loop {
        if Instant::now() > deadline {
            let _ = run.kill();
            let out = run.wait_with_output().expect("run output");
            panic!(
                "run on Kafka did not keep the view; its stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
        let docs = lines(&run_cmd(d.path(), &["topics", "tail", "views.tv", "--from-beginning"]));
        if !inserted && !docs.is_empty() {
            pg.psql(
                "app",
                "INSERT INTO t VALUES (2, 'two'); INSERT INTO notes VALUES (11, 2, 'x')",
            )
            .expect("insert");
            inserted = true;
        }
        let two = docs.iter().rev().find(|d| d["key"]["id"] == 2);
        if two.is_some_and(|d| d["value"]["notes"] == serde_json::json!([{"body": "x"}])) {
            break docs;
        }
    };
    let one = docs.iter().rev().find(|d| d["key"]["id"] == 1).expect("t 1's document");
    assert_eq!(one["value"]["notes"], serde_json::json!([{"body": "first"}]), "{docs:?}");

    // A standard client reads the change events: Debezium's envelope, keys as JSON objects.
    let events: Vec<serde_json::Value> =
        polylog_testkit::confluent_read(&broker.brokers(), "app.public.t", 2)
            .expect("confluent-kafka reads the topic")
            .iter()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    let parsed: Vec<(serde_json::Value, serde_json::Value)> = events
        .iter()
        .map(|e| {
            let key = serde_json::from_str(e["key"].as_str().expect("key")).expect("key JSON");
            let value =
                serde_json::from_str(e["value"].as_str().expect("value")).expect("value JSON");
            (key, value)
        })
        .collect();
    let (_, snap) = parsed.iter().find(|(k, _)| k["id"] == 1).expect("the snapshot row");
    assert_eq!(snap["op"], "r");
    assert_eq!(snap["after"]["v"], "one");
    assert!(snap["before"].is_null());
    assert_eq!(snap["source"]["table"], "t");
    assert_eq!(snap["source"]["connector"], "postgresql");
    assert_eq!(snap["source"]["schema"], "public");
    let (_, created) = parsed.iter().find(|(k, _)| k["id"] == 2).expect("the insert");
    assert_eq!(created["op"], "c");
    assert_eq!(created["after"]["v"], "two");
    assert!(created["source"]["lsn"].is_u64(), "{created}");
    assert!(created["ts_ms"].is_i64() || created["ts_ms"].is_u64(), "{created}");

    // The file sink wrote the documents it read from Kafka.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = std::fs::read_dir(d.path().join("out"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect::<String>()
            })
            .unwrap_or_default();
        if out.contains("\"x\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the file sink wrote no document from Kafka: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let killed = std::process::Command::new("kill").args(["-TERM", &run.id().to_string()]).status();
    assert!(killed.expect("kill").success());
    let status = run.wait().expect("run exits");
    assert!(status.success(), "run on Kafka exits cleanly on SIGTERM");
}
