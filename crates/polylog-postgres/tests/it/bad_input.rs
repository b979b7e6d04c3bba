//! Bad input and unfriendly servers: each gets a clear answer, never a crash.

use std::time::{Duration, Instant};

use polylog_postgres::wire::{ConnectParams, Connection, PgError};
use polylog_testkit::PgCluster;

use crate::support::{cluster, config, open_log, wait_for, Running, TempDir};

fn connect(url: &str) -> Result<Connection, PgError> {
    Connection::connect(&ConnectParams::parse(url).expect("url"), false)
}

#[test]
fn passwords_are_checked_with_scram_and_md5_and_a_wrong_one_is_named() {
    let pg = cluster();
    pg.psql(
        "app",
        "CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'sécret pw';
         SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD 'md5pw';
         GRANT ALL ON SCHEMA public TO scram_user; GRANT CREATE ON DATABASE app TO scram_user;",
    )
    .expect("roles");
    pg.prepend_hba(
        "host all scram_user 127.0.0.1/32 scram-sha-256\nhost replication scram_user 127.0.0.1/32 scram-sha-256\n\
         host all md5_user 127.0.0.1/32 md5",
    )
    .expect("hba");
    let port = pg.port();
    let mut c = connect(&format!("postgres://scram_user:s%C3%A9cret%20pw@127.0.0.1:{port}/app"))
        .expect("SCRAM login");
    assert_eq!(c.query("SELECT current_user").expect("query")[0][0].as_deref(), Some("scram_user"));
    connect(&format!("postgres://md5_user:md5pw@127.0.0.1:{port}/app")).expect("MD5 login");
    let e = connect(&format!("postgres://scram_user:wrong@127.0.0.1:{port}/app"))
        .expect_err("wrong password");
    assert!(matches!(e, PgError::Auth(_)), "{e}");
    assert!(e.to_string().contains("password authentication failed"), "{e}");
    let e =
        connect(&format!("postgres://scram_user@127.0.0.1:{port}/app")).expect_err("no password");
    assert!(e.to_string().contains("asks user \"scram_user\" for a password"), "{e}");

    // A source with a wrong password stops with that error instead of retrying forever.
    let dir = TempDir::new("badpw");
    let mut cfg = config(&pg, "");
    cfg.url = format!("postgres://scram_user:wrong@127.0.0.1:{port}/app");
    let src = Running::start("app", cfg, open_log(dir.path()), dir.path());
    let err = src.wait_failure(Duration::from_secs(30)).to_string();
    assert!(err.contains("password authentication failed"), "{err}");

    // With the right password, the whole source works over SCRAM, replication included.
    pg.psql("app", "CREATE TABLE t (id int PRIMARY KEY); ALTER TABLE t OWNER TO scram_user; INSERT INTO t VALUES (1)")
        .expect("table");
    let dir = TempDir::new("scram");
    let log = open_log(dir.path());
    let mut cfg = config(&pg, "");
    cfg.url = format!("postgres://scram_user:s%C3%A9cret%20pw@127.0.0.1:{port}/app");
    let src = Running::start("app", cfg, log.clone(), dir.path());
    wait_for(&*log, "app.public.t", "the snapshot", |e| e.len() == 1);
    src.stop().expect("clean stop");
}

#[test]
fn an_unreachable_server_is_retried_with_backoff_and_shown_in_status() {
    let port = polylog_testkit::free_port().expect("a free port");
    let dir = TempDir::new("unreachable");
    let cfg: polylog_postgres::PostgresSourceConfig =
        toml::from_str(&format!("url = \"postgres://postgres@127.0.0.1:{port}/app\""))
            .expect("config");
    let src = Running::start("app", cfg, open_log(dir.path()), dir.path());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = src.source.status.lock().expect("status").clone();
        if st.state == "retrying" {
            assert!(
                st.last_error.as_deref().is_some_and(|e| e.contains("cannot connect")),
                "{st:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "not retrying: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    src.stop().expect("a retrying source stops cleanly");
}

#[test]
fn a_missing_replication_privilege_is_named() {
    let pg = cluster();
    pg.psql(
        "app",
        "CREATE ROLE plain LOGIN; GRANT CREATE ON DATABASE app TO plain; GRANT ALL ON SCHEMA public TO plain;
         CREATE TABLE t (id int PRIMARY KEY); ALTER TABLE t OWNER TO plain;",
    )
    .expect("role");
    let dir = TempDir::new("noreplication");
    let mut cfg = config(&pg, "");
    cfg.url = format!("postgres://plain@127.0.0.1:{}/app", pg.port());
    let src = Running::start("app", cfg, open_log(dir.path()), dir.path());
    let err = src.wait_failure(Duration::from_secs(30)).to_string();
    assert!(
        err.contains("REPLICATION privilege") && err.contains("ALTER ROLE \"plain\" REPLICATION"),
        "{err}"
    );
}

#[test]
fn wal_level_not_logical_says_how_to_fix_it() {
    let pg = PgCluster::start_with_settings("wal_level = replica").expect("start");
    pg.create_database("app").expect("db");
    pg.psql("app", "CREATE TABLE t (id int PRIMARY KEY)").expect("table");
    let dir = TempDir::new("wallevel");
    let src = Running::start("app", config(&pg, ""), open_log(dir.path()), dir.path());
    let err = src.wait_failure(Duration::from_secs(30)).to_string();
    assert!(
        err.contains("wal_level is \"replica\"")
            && err.contains("ALTER SYSTEM SET wal_level = logical"),
        "{err}"
    );
}

#[test]
fn a_type_polylog_does_not_know_is_passed_as_text() {
    let pg = cluster();
    pg.psql(
        "app",
        "CREATE TABLE docs (id int PRIMARY KEY, body tsvector, at point);
         INSERT INTO docs VALUES (1, to_tsvector('english', 'the quick brown fox'), '(1,2)');",
    )
    .expect("schema");
    let dir = TempDir::new("unknowntype");
    let log = open_log(dir.path());
    let src = Running::start("app", config(&pg, ""), log.clone(), dir.path());
    src.wait_streaming();
    pg.psql("app", "INSERT INTO docs VALUES (2, 'a b', '(3,4)')").expect("insert");
    let events = wait_for(&*log, "app.public.docs", "both rows", |e| e.len() == 2);
    for e in &events {
        assert!(
            e.value["after"]["body"].is_string() && e.value["after"]["at"].is_string(),
            "{e:?}"
        );
    }
    assert!(events.iter().any(|e| e.value["after"]["at"] == "(3,4)"));
    src.stop().expect("clean stop");
}
