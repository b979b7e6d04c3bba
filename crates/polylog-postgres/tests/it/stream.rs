//! Snapshot, then streaming: the events, their envelope, transaction markers, schema history.

use serde_json::json;

use crate::support::{cluster, config, fold, open_log, read_topic, wait_for, Running, TempDir};

#[test]
fn snapshot_then_stream_produces_debezium_events() {
    let pg = cluster();
    pg.psql(
        "app",
        "CREATE TABLE videos (id bigint PRIMARY KEY, title text NOT NULL, views int);
         CREATE TABLE audit_log (id bigint PRIMARY KEY, what text);
         INSERT INTO videos VALUES (1, 'first', 10), (2, 'second', 20);",
    )
    .expect("schema");
    let dir = TempDir::new("stream");
    let log = open_log(dir.path());
    let cfg = config(&pg, "exclude_tables = [\"public.audit_log\"]");
    let src = Running::start("app", cfg, log.clone(), dir.path());

    // The snapshot: one "r" event per row, keyed by primary key.
    let snap = wait_for(&*log, "app.public.videos", "the snapshot", |e| e.len() == 2);
    let one = snap.iter().find(|e| e.key == json!({"id": 1})).expect("row 1");
    assert_eq!(one.value["op"], "r");
    assert_eq!(one.value["after"], json!({"id": 1, "title": "first", "views": 10}));
    assert_eq!(one.value["source"]["snapshot"], "true");
    assert_eq!(one.value["source"]["table"], "videos");
    assert_eq!(one.value["source"]["connector"], "postgresql");

    // Streaming: an insert, an update, a delete in one transaction; a transaction on an
    // excluded table only; a multi-row statement.
    pg.psql(
        "app",
        "BEGIN; INSERT INTO videos VALUES (3, 'third', 0); UPDATE videos SET views = 11 WHERE id = 1;
         DELETE FROM videos WHERE id = 2; COMMIT;
         INSERT INTO audit_log VALUES (1, 'ignored');
         INSERT INTO videos SELECT g, 'bulk ' || g, g FROM generate_series(10, 14) g;",
    )
    .expect("changes");
    let events =
        wait_for(&*log, "app.public.videos", "the streamed changes", |e| e.len() >= 2 + 3 + 1 + 5);
    let streamed: Vec<_> =
        events.iter().filter(|e| e.value["source"]["snapshot"] == "false").collect();
    let ops: Vec<(&str, String)> = streamed
        .iter()
        .map(|e| (e.value["op"].as_str().unwrap_or("tombstone"), e.key.to_string()))
        .collect();
    assert!(ops.contains(&("c", json!({"id": 3}).to_string())), "{ops:?}");
    assert!(ops.contains(&("u", json!({"id": 1}).to_string())), "{ops:?}");
    assert!(ops.contains(&("d", json!({"id": 2}).to_string())), "{ops:?}");
    // The delete is followed by a tombstone for its key.
    let del = events.iter().find(|e| e.value["op"] == "d").expect("delete");
    let next = events
        .iter()
        .find(|e| e.partition == del.partition && e.offset == del.offset + 1)
        .expect("tombstone");
    assert!(next.value.is_null() && next.key == del.key);
    assert_eq!(del.value["before"], json!({"id": 2}), "default replica identity: the key");
    let upd = events.iter().find(|e| e.value["op"] == "u").expect("update");
    assert_eq!(upd.value["after"]["views"], 11);
    assert!(
        upd.value["source"]["lsn"].as_u64().is_some()
            && upd.value["source"]["txId"].as_u64().is_some()
    );

    let state = fold(&events);
    let ids: Vec<String> = state.keys().cloned().collect();
    assert_eq!(ids.len(), 1 + 1 + 5, "{ids:?}");
    assert_eq!(state[&json!({"id": 1}).to_string()]["views"], 11);

    // The excluded table got no topic records; transactions have BEGIN/END with counts.
    assert!(read_topic(&*log, "app.public.audit_log").is_empty());
    let tx = wait_for(&*log, "app.transaction", "transaction markers", |e| {
        e.iter().filter(|m| m.value["status"] == "END").count() >= 2
    });
    let ends: Vec<u64> = tx
        .iter()
        .filter(|m| m.value["status"] == "END")
        .map(|m| m.value["event_count"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(
        ends,
        vec![3, 5],
        "only transactions with captured changes, with their event counts"
    );
    let first_end = tx.iter().find(|m| m.value["status"] == "END").expect("END");
    assert_eq!(
        first_end.value["data_collections"],
        json!([{"data_collection": "public.videos", "event_count": 3}])
    );
    // The schema history has the table's columns and key.
    let history = read_topic(&*log, "app.schema-history");
    let cols = &history.first().expect("a schema record").value["columns"];
    assert_eq!(cols[0]["name"], "id");
    assert_eq!(cols[0]["key"], true);
    src.stop().expect("clean stop");
}

#[test]
fn schema_changes_show_in_later_events() {
    let pg = cluster();
    pg.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, a text, b text); INSERT INTO t VALUES (1, 'a', 'b');",
    )
    .expect("schema");
    let dir = TempDir::new("ddl");
    let log = open_log(dir.path());
    let src = Running::start("app", config(&pg, ""), log.clone(), dir.path());
    wait_for(&*log, "app.public.t", "the snapshot", |e| e.len() == 1);
    pg.psql("app", "INSERT INTO t VALUES (2, 'x', 'y')").expect("insert");
    pg.psql("app", "ALTER TABLE t ADD COLUMN c int; INSERT INTO t VALUES (3, 'x', 'y', 3)")
        .expect("add");
    pg.psql("app", "ALTER TABLE t DROP COLUMN b; INSERT INTO t VALUES (4, 'x', 4)").expect("drop");
    pg.psql("app", "ALTER TABLE t RENAME COLUMN a TO alpha; INSERT INTO t VALUES (5, 'x', 5)")
        .expect("rename");
    let events = wait_for(&*log, "app.public.t", "four inserts", |e| e.len() == 5);
    let after = |id: i64| {
        events.iter().find(|e| e.key == json!({"id": id})).expect("event").value["after"].clone()
    };
    assert_eq!(after(2), json!({"id": 2, "a": "x", "b": "y"}));
    assert_eq!(after(3), json!({"id": 3, "a": "x", "b": "y", "c": 3}));
    assert_eq!(after(4), json!({"id": 4, "a": "x", "c": 4}));
    assert_eq!(after(5), json!({"id": 5, "alpha": "x", "c": 5}));
    let history = read_topic(&*log, "app.schema-history");
    let names: Vec<Vec<String>> = history
        .iter()
        .map(|h| {
            h.value["columns"]
                .as_array()
                .expect("columns")
                .iter()
                .map(|c| c["name"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .collect();
    assert!(names.contains(&vec!["id".into(), "alpha".into(), "c".into()]), "{names:?}");
    src.stop().expect("clean stop");
}

#[test]
fn a_table_without_a_primary_key_is_refused_with_the_fix() {
    let pg = cluster();
    pg.psql("app", "CREATE TABLE events (at timestamptz, what text)").expect("schema");
    let dir = TempDir::new("nopk");
    let log = open_log(dir.path());
    let src = Running::start("app", config(&pg, ""), log, dir.path());
    let err = src.wait_failure(std::time::Duration::from_secs(30)).to_string();
    assert!(
        err.contains("public.events has no primary key") && err.contains("REPLICA IDENTITY FULL"),
        "{err}"
    );
}

#[test]
fn positions_are_unique_and_increasing_in_every_partition() {
    let pg = cluster();
    pg.psql("app", "CREATE TABLE t (id int PRIMARY KEY, v int)").expect("schema");
    let dir = TempDir::new("positions");
    let log = open_log(dir.path());
    let src = Running::start("app", config(&pg, "snapshot = \"never\""), log.clone(), dir.path());
    assert_eq!(src.source.table_topic("public", "t"), "app.public.t");
    src.wait_streaming();
    pg.psql(
        "app",
        "INSERT INTO t SELECT g, g FROM generate_series(1, 200) g; UPDATE t SET v = v + 1; \
         COPY t FROM PROGRAM 'seq 201 300 | sed \"s/$/\\t0/\"'; DELETE FROM t WHERE id % 3 = 0;",
    )
    .expect("changes");
    let events = wait_for(&*log, "app.public.t", "every change", |e| {
        e.iter().filter(|x| !x.value.is_null()).count() == 200 + 200 + 100 + 100
    });
    let mut last: std::collections::HashMap<u32, polylog_postgres::event::Position> =
        Default::default();
    for e in &events {
        let pos =
            polylog_postgres::event::Position::from_headers(&e.headers).expect("position header");
        if e.value.is_null() {
            assert_eq!(
                last.get(&e.partition),
                Some(&pos),
                "a tombstone shares its delete's position"
            );
            continue;
        }
        assert!(last.get(&e.partition).is_none_or(|l| *l < pos), "positions increase: {e:?}");
        last.insert(e.partition, pos);
    }
    src.stop().expect("clean stop");
}

#[test]
fn excluded_columns_are_left_out_and_masked_columns_hashed() {
    let pg = cluster();
    pg.psql(
        "app",
        "CREATE TABLE users (id int PRIMARY KEY, email text, password_hash text, name text);
         INSERT INTO users VALUES (1, 'a@example.com', 'secret-hash', 'Ann');",
    )
    .expect("schema");
    // The masking key comes from the environment; each test uses its own variable.
    std::env::set_var("POLYLOG_TEST_MASK_KEY", "k1");
    let dir = TempDir::new("pii");
    let log = open_log(dir.path());
    let cfg = config(
        &pg,
        "exclude_columns = [\"public.users.password_hash\"]\nmask_columns = [\"public.*.email\"]\n\
         mask_key_env = \"POLYLOG_TEST_MASK_KEY\"",
    );
    let src = Running::start("app", cfg, log.clone(), dir.path());
    src.wait_streaming();
    pg.psql("app", "INSERT INTO users VALUES (2, 'a@example.com', 'other-hash', 'Bob')")
        .expect("insert");
    let events = wait_for(&*log, "app.public.users", "both rows", |e| e.len() == 2);
    for e in &events {
        let after = &e.value["after"];
        assert!(after.get("password_hash").is_none(), "excluded: {after}");
        let email = after["email"].as_str().expect("masked email");
        assert_eq!(email.len(), 64, "an HMAC-SHA-256 in hex: {email}");
        assert!(!email.contains("example.com"));
    }
    assert_eq!(
        events[0].value["after"]["email"], events[1].value["after"]["email"],
        "same value, same hash"
    );
    let history = crate::support::read_topic(&*log, "app.schema-history");
    assert!(history.iter().all(|h| !h.value.to_string().contains("secret-hash")));
    src.stop().expect("clean stop");
}

#[test]
fn truncate_is_an_event_and_snapshot_always_resnapshots_on_start() {
    let pg = cluster();
    pg.psql("app", "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
        .expect("schema");
    let dir = TempDir::new("truncate");
    let log = open_log(dir.path());
    let src = Running::start("app", config(&pg, "snapshot = \"always\""), log.clone(), dir.path());
    wait_for(&*log, "app.public.t", "the first snapshot", |e| e.len() == 2);
    src.wait_streaming();
    pg.psql("app", "TRUNCATE t; INSERT INTO t VALUES (3)").expect("truncate");
    let events = wait_for(&*log, "app.public.t", "the truncate and the insert", |e| e.len() == 5);
    // One truncate event in each of the topic's two partitions.
    let truncates: Vec<_> = events.iter().filter(|e| e.value["op"] == "t").collect();
    assert_eq!(truncates.iter().map(|e| e.partition).collect::<Vec<_>>(), vec![0, 1]);
    let t = truncates[0];
    assert!(t.key.is_null() && t.value["before"].is_null() && t.value["after"].is_null());
    assert_eq!(t.value["source"]["table"], "t");
    src.stop().expect("stop");
    // `always`: a new slot and a new snapshot on every start.
    let src = Running::start("app", config(&pg, "snapshot = \"always\""), log.clone(), dir.path());
    let events = wait_for(&*log, "app.public.t", "the second snapshot", |e| {
        e.iter().filter(|x| x.value["op"] == "r").count() == 3
    });
    assert_eq!(events.iter().rfind(|x| x.value["op"] == "r").expect("r").key, json!({"id": 3}));
    src.stop().expect("stop");
}

#[test]
fn parallel_key_ranges_read_every_row_once() {
    let pg = cluster();
    pg.psql(
        "app",
        "CREATE TABLE small (id smallint PRIMARY KEY, v int);
         INSERT INTO small SELECT g, g FROM generate_series(-32768, -32700) g;
         INSERT INTO small VALUES (0, 0), (32766, 1), (32767, 2);
         CREATE TABLE single (id smallint PRIMARY KEY); INSERT INTO single VALUES (32767);
         CREATE TABLE empty (id bigint PRIMARY KEY);
         CREATE TABLE nokey (n int); ALTER TABLE nokey REPLICA IDENTITY FULL;
         INSERT INTO nokey SELECT g FROM generate_series(1, 50) g;",
    )
    .expect("schema");
    let dir = TempDir::new("ranges");
    let log = open_log(dir.path());
    let cfg = config(&pg, "snapshot_parallelism = 4\nsnapshot_chunk_rows = 7");
    let src = Running::start("app", cfg, log.clone(), dir.path());
    src.wait_streaming();
    for (table, rows) in [("small", 72), ("single", 1), ("empty", 0), ("nokey", 50)] {
        let events = crate::support::read_topic(&*log, &format!("app.public.{table}"));
        assert_eq!(events.len(), rows, "{table}: every row exactly once");
        assert_eq!(fold(&events).len(), rows, "{table}");
    }
    src.stop().expect("clean stop");
}
