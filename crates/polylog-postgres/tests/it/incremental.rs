//! Incremental re-snapshot while streaming, triggered through the signal table (DBLog).

use std::time::{Duration, Instant};

use crate::support::{cluster, config, fold, open_log, read_topic, wait_for, Running, TempDir};

#[test]
fn a_signal_resnapshots_a_table_while_changes_keep_streaming() {
    let pg = cluster();
    pg.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, v int);
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 1000) g;
         CREATE TABLE polylog_signal (id text PRIMARY KEY, type text NOT NULL, data text);",
    )
    .expect("schema");
    let dir = TempDir::new("incremental");
    let log = open_log(dir.path());
    let cfg = config(
        &pg,
        "tables = [\"public.t\"]\nsignal_table = \"public.polylog_signal\"\nsnapshot_chunk_rows = 100",
    );
    let src = Running::start("app", cfg, log.clone(), dir.path());
    wait_for(&*log, "app.public.t", "the initial snapshot", |e| e.len() == 1000);
    src.wait_streaming();
    pg.psql(
        "app",
        "INSERT INTO polylog_signal VALUES ('resync-1', 'execute-snapshot', '{\"data-collections\": [\"public.t\"]}')",
    )
    .expect("signal");
    // Changes keep coming while the table is re-read chunk by chunk.
    for round in 1..=20 {
        pg.psql(
            "app",
            &format!(
                "UPDATE t SET v = {round} WHERE id % 20 = {}; DELETE FROM t WHERE id = {}; \
                 INSERT INTO t VALUES ({}, {round})",
                round % 20,
                round * 37,
                5000 + round
            ),
        )
        .expect("changes");
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = read_topic(&*log, "app.public.t");
        let incremental =
            events.iter().filter(|e| e.value["source"]["snapshot"] == "incremental").count();
        let table: std::collections::BTreeMap<String, serde_json::Value> = pg
            .psql("app", "SELECT row_to_json(t) FROM t")
            .expect("select")
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json");
                (serde_json::json!({"id": v["id"]}).to_string(), v)
            })
            .collect();
        let folded = fold(&events);
        if incremental >= 900 && folded == table {
            break;
        }
        if Instant::now() > deadline {
            let wrong: Vec<_> =
                table.iter().filter(|(k, v)| folded.get(*k) != Some(v)).take(3).collect();
            let extra: Vec<_> = folded.keys().filter(|k| !table.contains_key(*k)).take(3).collect();
            let first =
                wrong.first().map(|(k, _)| (*k).clone()).or(extra.first().map(|k| (*k).clone()));
            let detail: Vec<_> = events
                .iter()
                .filter(|e| Some(e.key.to_string()) == first)
                .map(|e| {
                    let pos = polylog_postgres::event::Position::from_headers(&e.headers);
                    (e.partition, e.offset, e.value["op"].clone(), e.value["after"].clone(), pos)
                })
                .collect();
            panic!(
                "{incremental} rows re-read; wrong {wrong:?}; extra {extra:?}; events: {detail:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The signal row itself is not an event, and the state says the snapshot finished.
    assert!(read_topic(&*log, "app.public.polylog_signal").is_empty());
    src.stop().expect("clean stop");
    let state = std::fs::read_to_string(dir.path().join("sources/app/state.json")).expect("state");
    assert!(state.contains("\"incremental\": null") && state.contains("resync-1"), "{state}");
}
