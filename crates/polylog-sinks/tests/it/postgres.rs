//! The Postgres sink: tables replicated row for row through the real source, replays that
//! rebuild a dropped table, and documents of a view in a JSONB table.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions};
use polylog_postgres::{PostgresSource, PostgresSourceConfig, SourceOptions};
use polylog_sinks::{Sink, SinkConfig, SinkError, StartFrom};
use polylog_testkit::{PgCluster, Rng, TempDir};

fn open_log(dir: &std::path::Path) -> Arc<dyn Log> {
    let o = LogOptions {
        fsync: FsyncPolicy::Never,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    Arc::new(EmbeddedLog::open(dir.join("log"), o).expect("open log"))
}

struct Running<T: Send + 'static> {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Running<T> {
    fn start(f: impl FnOnce(&AtomicBool) -> T + Send + 'static) -> Running<T> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        Running { stop, handle: Some(std::thread::spawn(move || f(&s))) }
    }
    /// Waits for the thread to finish on its own.
    fn stop_when_done(mut self) -> T {
        self.handle.take().expect("running").join().expect("thread")
    }

    fn stop(mut self) -> T {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().expect("running").join().expect("thread")
    }
}

impl<T: Send + 'static> Drop for Running<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn source(
    pg: &PgCluster,
    log: &Arc<dyn Log>,
    dir: &std::path::Path,
) -> (Arc<PostgresSource>, Running<()>) {
    let text = format!("url = \"{}\"\nstatus_interval_ms = 50\nheartbeat_interval_ms = 200\ntopic_prefix = \"app\"", pg.url("app"));
    let cfg: PostgresSourceConfig = toml::from_str(&text).expect("source config");
    let opts = SourceOptions { state_dir: dir.join("source"), partitions: 2, progress: false };
    let src = Arc::new(PostgresSource::new("app", cfg, Arc::clone(log), opts).expect("source"));
    let s = Arc::clone(&src);
    (src, Running::start(move |stop| s.run(stop).expect("the source runs")))
}

fn wait_flushed(pg: &PgCluster, src: &PostgresSource) {
    let now = pg.psql("app", "SELECT pg_current_wal_lsn()").expect("lsn");
    let target = polylog_postgres::pgoutput::parse_lsn(&now);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = src.status.lock().expect("status").clone();
        let flushed = st.flushed_lsn.as_deref().and_then(polylog_postgres::pgoutput::parse_lsn);
        if st.state == "streaming" && flushed >= target {
            return;
        }
        assert!(Instant::now() < deadline, "the source did not catch up: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sink(name: &str, text: &str, log: &Arc<dyn Log>) -> Arc<Sink> {
    let cfg: SinkConfig = toml::from_str(text).expect("sink config");
    Arc::new(Sink::new(name, cfg, Arc::clone(log)).expect("sink"))
}

/// Runs the sink until everything its topics hold now is written.
fn catch_up(s: &Arc<Sink>) {
    s.run(&AtomicBool::new(false), true).expect("the sink catches up");
}

const SCHEMA: &str = "
    CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), at timestamptz,
                        data bytea, doc jsonb, tags int[]);
    CREATE TABLE links (a int, b text, weight float8, PRIMARY KEY (a, b));
";

/// Rows as JSON, in key order, without the sink's own columns.
fn rows(pg: &PgCluster, db: &str, table: &str, order: &str) -> String {
    pg.psql(
        db,
        &format!(
            "SELECT COALESCE(jsonb_agg(to_jsonb(t) - '_polylog_partition' - '_polylog_position' ORDER BY {order}), '[]') FROM {table} t"
        ),
    )
    .expect("rows")
}

fn workload(pg: &PgCluster, rng: &mut Rng, rounds: usize) {
    for _ in 0..rounds {
        let mut stmts = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let (id, v) = (rng.below(60), rng.below(1000));
            stmts.push(match rng.below(10) {
                0..=3 => format!(
                    "INSERT INTO items VALUES ({id}, 'n{v}', {v}.25, '2026-01-01 00:00:00+00'::timestamptz + interval '{v} minutes', '\\x{v:04x}', '{{\"v\": {v}}}', ARRAY[{v}, {id}]) \
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, price = excluded.price, tags = excluded.tags"
                ),
                4 => format!("DELETE FROM items WHERE id = {id}"),
                5 => format!("UPDATE items SET id = {v} + 100 WHERE id = {id} AND NOT EXISTS (SELECT 1 FROM items WHERE id = {v} + 100)"),
                6 | 7 => format!("INSERT INTO links VALUES ({id}, 'b{}', {v}.5) ON CONFLICT (a, b) DO UPDATE SET weight = excluded.weight", v % 5),
                8 => format!("DELETE FROM links WHERE a = {id}"),
                _ => if rng.chance(15) { "TRUNCATE links".to_string() } else { format!("UPDATE items SET name = NULL WHERE id < {id}") },
            });
        }
        pg.psql("app", &format!("BEGIN; {}; COMMIT;", stmts.join("; "))).expect("workload");
    }
}

#[test]
fn tables_are_replicated_row_for_row_and_rebuilt_by_a_replay() {
    let pg = PgCluster::start().expect("postgres");
    pg.create_database("app").expect("db");
    pg.create_database("replica").expect("db");
    pg.psql("app", SCHEMA).expect("schema");
    let mut rng = Rng::from_env("postgres sink");
    workload(&pg, &mut rng, 40); // snapshot
    let dir = TempDir::new("sink-tables");
    let log = open_log(dir.path());
    let (src, running) = source(&pg, &log, dir.path());
    let text = format!(
        "kind = \"postgres\"\nurl = \"{}\"\ntopics = [\"app.public.*\"]\nbatch_rows = 7",
        pg.url("replica")
    );
    let s = sink("replica", &text, &log);
    // The sink runs (and is stopped and started again) while the workload goes on.
    for _ in 0..3 {
        let r = {
            let s = Arc::clone(&s);
            Running::start(move |stop| s.run(stop, false))
        };
        workload(&pg, &mut rng, 60);
        r.stop().expect("the sink runs");
    }
    wait_flushed(&pg, &src);
    catch_up(&s);
    let check = || {
        assert_eq!(rows(&pg, "replica", "items", "id"), rows(&pg, "app", "items", "id"), "items");
        assert_eq!(
            rows(&pg, "replica", "links", "a, b"),
            rows(&pg, "app", "links", "a, b"),
            "links"
        );
    };
    check();
    assert_ne!(rows(&pg, "app", "items", "id"), "[]", "the workload leaves rows");
    assert_eq!(s.lag().expect("lag").0, 0);

    // Replaying everything over the replica changes nothing: no row goes back in time.
    s.reset(StartFrom::Beginning).expect("reset");
    catch_up(&s);
    check();
    // A lost table is rebuilt by a replay.
    pg.psql("replica", "DROP TABLE items").expect("drop");
    let fresh = sink("replica", &text, &log); // a new process: the table is created again
    fresh.reset(StartFrom::Beginning).expect("reset");
    catch_up(&fresh);
    check();
    drop(running);
}

#[test]
fn an_unreachable_target_is_retried_shown_in_status_and_nothing_is_skipped() {
    let mut pg = PgCluster::start().expect("postgres");
    pg.create_database("app").expect("db");
    pg.create_database("replica").expect("db");
    pg.psql("app", SCHEMA).expect("schema");
    pg.psql("app", "INSERT INTO links SELECT g, 'b', g FROM generate_series(1, 300) g")
        .expect("rows");
    let dir = TempDir::new("sink-unreachable");
    let log = open_log(dir.path());
    {
        let (src, running) = source(&pg, &log, dir.path());
        wait_flushed(&pg, &src);
        drop(running);
    }
    pg.stop().expect("stop Postgres");
    let text = format!(
        "kind = \"postgres\"\nurl = \"{}\"\ntopics = [\"app.public.links\"]\nbatch_rows = 50",
        pg.url("replica")
    );
    let s = sink("replica", &text, &log);
    let s2 = Arc::clone(&s);
    let running = Running::start(move |stop| s2.run(stop, true));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = s.status.lock().expect("status").clone();
        if st.state == "retrying" {
            assert!(
                st.last_error.as_deref().is_some_and(|e| e.contains("cannot connect")),
                "{st:?}"
            );
            assert_eq!(st.records, 0);
            break;
        }
        assert!(Instant::now() < deadline, "not retrying: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    pg.restart().expect("restart Postgres");
    running.stop_when_done().expect("the sink catches up once Postgres is back");
    assert_eq!(pg.psql("replica", "SELECT count(*) FROM links").expect("count"), "300");
    assert_eq!(s.lag().expect("lag").0, 0);
}

#[test]
fn a_replica_table_that_is_not_the_sinks_is_refused() {
    let pg = PgCluster::start().expect("postgres");
    pg.create_database("app").expect("db");
    pg.create_database("replica").expect("db");
    pg.psql("app", SCHEMA).expect("schema");
    pg.psql("app", "INSERT INTO links VALUES (1, 'x', 1)").expect("row");
    pg.psql("replica", "CREATE TABLE links (a int, b text, note text)").expect("other table");
    let dir = TempDir::new("sink-refused");
    let log = open_log(dir.path());
    let (src, running) = source(&pg, &log, dir.path());
    wait_flushed(&pg, &src);
    let text = format!(
        "kind = \"postgres\"\nurl = \"{}\"\ntopics = [\"app.public.links\"]",
        pg.url("replica")
    );
    let err = sink("replica", &text, &log).run(&AtomicBool::new(false), true).expect_err("refused");
    assert!(matches!(err, SinkError::Config(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("public.links") && msg.contains("_polylog_") && msg.contains("note"),
        "{msg}"
    );
    drop(running);
}

#[test]
fn documents_of_a_view_land_in_a_jsonb_table() {
    let pg = PgCluster::start().expect("postgres");
    pg.create_database("app").expect("db");
    pg.create_database("docs").expect("db");
    pg.psql(
        "app",
        "CREATE TABLE publishers (id int PRIMARY KEY, name text);
         CREATE TABLE videos (id int PRIMARY KEY, title text, publisher_id int);
         INSERT INTO publishers VALUES (1, 'one'), (2, 'two');
         INSERT INTO videos SELECT g, 't' || g, g % 3 FROM generate_series(1, 30) g;",
    )
    .expect("schema");
    let dir = TempDir::new("sink-docs");
    let log = open_log(dir.path());
    let (src, running) = source(&pg, &log, dir.path());
    let view_cfg: polylog_views::ViewConfig = toml::from_str(
        "root = \"app.public.videos\"\njoins = [{ name = \"publisher\", topic = \"app.public.publishers\", on = { publisher_id = \"id\" }, kind = \"one\" }]",
    )
    .expect("view");
    wait_flushed(&pg, &src);
    let view = Arc::new(
        polylog_views::View::new(
            "videos",
            &view_cfg,
            Arc::clone(&log),
            polylog_views::ViewOptions::new(dir.path().join("view")),
        )
        .expect("view"),
    );
    let v = Arc::clone(&view);
    let view_running = Running::start(move |stop| v.run(stop).expect("the view runs"));
    let text = format!(
        "kind = \"postgres\"\nmode = \"document\"\nurl = \"{}\"\ntopics = [\"views.videos\"]",
        pg.url("docs")
    );
    let s = sink("docs", &text, &log);
    let s2 = Arc::clone(&s);
    let sink_running = Running::start(move |stop| s2.run(stop, false));
    // The same documents into the embedded search index.
    let search_cfg = toml::from_str("kind = \"search\"\ntopic = \"views.videos\"").expect("config");
    let search =
        Arc::new(Sink::new("search", search_cfg, Arc::clone(&log)).expect("sink").with_search(
            dir.path().join("search"),
            polylog_sinks::search::SearchIndexes::default(),
        ));
    let s3 = Arc::clone(&search);
    let search_running = Running::start(move |stop| s3.run(stop, false));
    // A random workload: renames, new videos, moves between publishers (some missing), deletes.
    let mut rng = Rng::from_env("document and search sinks");
    for _ in 0..150 {
        let (v, p) = (1 + rng.below(40), rng.below(4));
        let sql = match rng.below(6) {
            0 => format!("UPDATE publishers SET name = 'p{}' WHERE id = {}", rng.below(99), 1 + rng.below(2)),
            1 => format!(
                "INSERT INTO videos VALUES ({v}, 't{}', {p}) ON CONFLICT (id) DO UPDATE SET title = excluded.title, publisher_id = excluded.publisher_id",
                rng.below(99)
            ),
            2 => format!("DELETE FROM videos WHERE id = {v}"),
            3 => format!("INSERT INTO publishers VALUES ({p}, 'new {p}') ON CONFLICT (id) DO UPDATE SET name = excluded.name"),
            4 => format!("DELETE FROM publishers WHERE id = {p}"),
            _ => format!(
                "BEGIN; UPDATE videos SET publisher_id = {p} WHERE id % 5 = {}; UPDATE publishers SET name = name || '.' WHERE id = {p}; COMMIT",
                v % 5
            ),
        };
        pg.psql("app", &sql).expect("workload");
    }
    wait_flushed(&pg, &src);
    let expected = pg
        .psql(
            "app",
            "SELECT jsonb_object_agg(v.id::text, jsonb_build_object('id', v.id, 'title', v.title, 'publisher_id', v.publisher_id,
                'publisher', CASE WHEN p.id IS NULL THEN NULL ELSE jsonb_build_object('id', p.id, 'name', p.name) END))
             FROM videos v LEFT JOIN publishers p ON p.id = v.publisher_id",
        )
        .expect("expected");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = pg
            .psql("docs", "SELECT jsonb_object_agg(id->>'id', doc - '_version') FROM views_videos")
            .unwrap_or_default();
        if got == expected {
            break;
        }
        assert!(Instant::now() < deadline, "documents differ:\n{got}\n{expected}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let versions = pg
        .psql(
            "docs",
            "SELECT count(*) = (SELECT count(*) FROM views_videos) FROM views_videos \
             WHERE version = (doc->>'_version')::bigint AND version > 0",
        )
        .expect("versions");
    assert_eq!(versions, "t", "every row's version is its document's _version");
    // The search index holds exactly the same documents.
    let expected: serde_json::Value = serde_json::from_str(&expected).expect("json");
    let ix = search.search_index().expect("index");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hits = ix.search("*", 1000).expect("search");
        let got: serde_json::Map<String, serde_json::Value> = hits["hits"]
            .as_array()
            .expect("hits")
            .iter()
            .map(|h| {
                let mut d = h["doc"].clone();
                d.as_object_mut().map(|o| o.remove("_version"));
                (h["id"]["id"].to_string(), d)
            })
            .collect();
        if serde_json::Value::Object(got.clone()) == expected {
            break;
        }
        assert!(Instant::now() < deadline, "the index differs:\n{got:?}\n{expected}");
        std::thread::sleep(Duration::from_millis(100));
    }
    search_running.stop().expect("the search sink runs");
    sink_running.stop().expect("the sink runs");
    drop(view_running);
    drop(running);
}
