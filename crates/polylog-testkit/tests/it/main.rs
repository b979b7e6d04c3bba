//! The testkit gives a test a real Postgres, ready for logical replication.

use polylog_testkit::{find_pg_bin, PgCluster};

#[test]
fn a_cluster_supports_logical_replication_slots() {
    let pg = PgCluster::start().expect("start a throwaway cluster");
    assert_eq!(pg.psql("postgres", "SHOW wal_level").expect("psql"), "logical");
    pg.create_database("app").expect("create database");
    pg.psql("app", "CREATE TABLE videos (id bigint PRIMARY KEY, title text)")
        .expect("create table");
    pg.psql("app", "CREATE PUBLICATION polylog_app FOR ALL TABLES").expect("publication");
    let created = pg
        .psql(
            "app",
            "SELECT slot_name FROM pg_create_logical_replication_slot('polylog_app', 'pgoutput')",
        )
        .expect("create slot");
    assert_eq!(created, "polylog_app");
    let slots = pg
        .psql("app", "SELECT slot_name, plugin, slot_type, database FROM pg_replication_slots")
        .expect("list slots");
    assert_eq!(slots, "polylog_app|pgoutput|logical|app");
    // The slot sees a committed change.
    pg.psql("app", "INSERT INTO videos VALUES (1, 'hello')").expect("insert");
    let changes = pg
        .psql(
            "app",
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('polylog_app', NULL, NULL, \
             'proto_version', '1', 'publication_names', 'polylog_app')",
        )
        .expect("peek");
    assert!(changes.parse::<u64>().expect("a count") >= 3, "BEGIN, INSERT, COMMIT: {changes}");
    assert!(pg.url("app").starts_with("postgres://postgres@127.0.0.1:"));
}

#[test]
fn a_cluster_is_stopped_and_removed_on_drop_and_survives_a_crash() {
    let mut pg = PgCluster::start().expect("start");
    pg.psql("postgres", "CREATE TABLE t (x int); INSERT INTO t VALUES (1)").expect("write");
    pg.crash().expect("immediate shutdown");
    assert!(pg.psql("postgres", "SELECT 1").is_err(), "the server is down");
    pg.restart().expect("restart");
    assert_eq!(pg.psql("postgres", "SELECT x FROM t").expect("read after restart"), "1");
    let dir = pg.data_dir();
    let port = pg.port();
    drop(pg);
    assert!(!dir.exists(), "data directory removed");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "server stopped");
}

#[test]
fn missing_binaries_fail_with_the_install_command() {
    let e = find_pg_bin(Some(std::path::Path::new("/nonexistent/pg/bin")))
        .expect_err("no binaries there");
    assert!(e.0.contains("apt-get install -y postgresql"), "{e}");
    assert!(e.0.contains("initdb"), "{e}");
}
