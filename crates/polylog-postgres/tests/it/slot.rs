//! The slot: kept moving while captured tables are quiet; a lost slot is a loud error.

use std::time::{Duration, Instant};

use crate::support::{cluster, config, open_log, wait_for, Running, TempDir};

fn lsn(s: &str) -> u64 {
    polylog_postgres::pgoutput::parse_lsn(s.trim()).expect("an LSN")
}

#[test]
fn heartbeats_advance_the_slot_while_other_tables_churn() {
    let pg = cluster();
    pg.psql(
        "app",
        "CREATE TABLE quiet (id int PRIMARY KEY); CREATE TABLE busy (id int PRIMARY KEY, pad text)",
    )
    .expect("schema");
    pg.create_database("other").expect("another database");
    pg.psql("other", "CREATE TABLE busy (id int PRIMARY KEY, pad text)").expect("schema");
    let dir = TempDir::new("heartbeat");
    let cfg = config(&pg, "tables = [\"public.quiet\"]\nheartbeat_interval_ms = 200");
    let src = Running::start("app", cfg, open_log(dir.path()), dir.path());
    src.wait_streaming();
    for i in 0..50 {
        // Churn in a table the source does not capture, and in another database.
        let db = if i % 2 == 0 { "app" } else { "other" };
        pg.psql(
            db,
            &format!(
                "INSERT INTO busy SELECT g, repeat('x', 500) FROM generate_series({}, {}) g",
                i * 100,
                i * 100 + 99
            ),
        )
        .expect("churn");
    }
    let target = lsn(&pg.psql("app", "SELECT pg_current_wal_lsn()").expect("lsn"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let confirmed = pg
            .psql("app", "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'polylog_app'")
            .expect("slot");
        if lsn(&confirmed) >= target {
            break;
        }
        assert!(Instant::now() < deadline, "the slot stays at {confirmed} behind {target:X}");
        std::thread::sleep(Duration::from_millis(100));
    }
    src.stop().expect("clean stop");
}

#[test]
fn a_dropped_slot_is_a_loud_error_asking_for_a_new_snapshot() {
    let pg = cluster();
    pg.psql("app", "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .expect("schema");
    let dir = TempDir::new("dropped");
    let log = open_log(dir.path());
    let src = Running::start("app", config(&pg, ""), log.clone(), dir.path());
    wait_for(&*log, "app.public.t", "the snapshot", |e| e.len() == 1);
    src.wait_streaming();
    // Kick the source off its slot and drop the slot before it reconnects.
    pg.psql(
        "app",
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'polylog_app';
         SELECT pg_sleep(0.1);
         SELECT pg_drop_replication_slot('polylog_app');",
    )
    .expect("drop the slot");
    let err = src.wait_failure(Duration::from_secs(30)).to_string();
    assert!(err.contains("\"polylog_app\" was dropped") && err.contains("new snapshot"), "{err}");
}

#[test]
fn a_slot_that_lost_its_wal_is_a_loud_error_asking_for_a_new_snapshot() {
    let pg = polylog_testkit::PgCluster::start_with_settings("max_slot_wal_keep_size = '1MB'")
        .expect("start Postgres");
    pg.create_database("app").expect("create database");
    pg.psql("app", "CREATE TABLE t (id int PRIMARY KEY, pad text)").expect("schema");
    let dir = TempDir::new("lost");
    let log = open_log(dir.path());
    let src = Running::start("app", config(&pg, ""), log.clone(), dir.path());
    src.wait_streaming();
    src.stop().expect("clean stop");
    // While the source is away, Postgres moves past more WAL than the slot may hold back.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        pg.psql(
            "app",
            "INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(1, 5000) g
               ON CONFLICT (id) DO UPDATE SET pad = excluded.pad || '.';
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .expect("churn");
        let status = pg
            .psql(
                "app",
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'polylog_app'",
            )
            .expect("slot status");
        if status.trim() == "lost" {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never lost its WAL ({status:?})");
    }
    let src = Running::start("app", config(&pg, ""), log.clone(), dir.path());
    let err = src.wait_failure(Duration::from_secs(30)).to_string();
    assert!(err.contains("wal_status = lost") && err.contains("new snapshot"), "{err}");
}

#[test]
fn the_source_rides_out_postgres_restarts() {
    let mut pg = cluster();
    pg.psql("app", "CREATE TABLE t (id int PRIMARY KEY)").expect("schema");
    let dir = TempDir::new("restarts");
    let log = open_log(dir.path());
    let src = Running::start("app", config(&pg, ""), log.clone(), dir.path());
    src.wait_streaming();
    pg.psql("app", "INSERT INTO t VALUES (1)").expect("insert");
    wait_for(&*log, "app.public.t", "the first row", |e| e.len() == 1);
    pg.stop().expect("a clean shutdown");
    pg.restart().expect("restart");
    pg.psql("app", "INSERT INTO t VALUES (2)").expect("insert");
    wait_for(&*log, "app.public.t", "a row after a clean restart", |e| e.len() == 2);
    pg.crash().expect("an immediate shutdown");
    pg.restart().expect("restart");
    pg.psql("app", "INSERT INTO t VALUES (3)").expect("insert");
    let events = wait_for(&*log, "app.public.t", "a row after a crash", |e| e.len() == 3);
    assert_eq!(events.iter().filter(|e| e.value["op"] == "c").count(), 3, "each row once");
    src.stop().expect("clean stop");
}

#[test]
fn replica_identity_using_index_keys_events_by_that_index() {
    let pg = cluster();
    pg.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, code text NOT NULL UNIQUE, v int);
         ALTER TABLE t REPLICA IDENTITY USING INDEX t_code_key;
         INSERT INTO t VALUES (1, 'a', 1), (2, 'b', 2);",
    )
    .expect("schema");
    let dir = TempDir::new("identity-index");
    let log = open_log(dir.path());
    let src = Running::start("app", config(&pg, ""), log.clone(), dir.path());
    wait_for(&*log, "app.public.t", "the snapshot", |e| e.len() == 2);
    src.wait_streaming();
    pg.psql("app", "DELETE FROM t WHERE id = 1; UPDATE t SET v = 20 WHERE id = 2")
        .expect("changes");
    let events = wait_for(&*log, "app.public.t", "the delete and update", |e| e.len() == 5);
    let del = events.iter().find(|e| e.value["op"] == "d").expect("delete");
    assert_eq!(del.key, serde_json::json!({"code": "a"}));
    assert!(
        events.iter().any(|e| e.value.is_null() && e.key == serde_json::json!({"code": "a"})),
        "tombstone"
    );
    assert!(events.iter().all(|e| e.key.get("code").is_some()), "every key is the identity index");
    assert_eq!(crate::support::fold(&events).len(), 1);
    src.stop().expect("clean stop");
}
