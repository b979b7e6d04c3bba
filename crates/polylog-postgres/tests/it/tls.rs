//! TLS: `sslmode` honoured; `verify-full` checks the certificate chain and the host name.

use polylog_postgres::wire::{ConnectParams, Connection, PgError};
use polylog_testkit::PgCluster;

use crate::support::{config, open_log, wait_for, Running, TempDir};

fn connect(pg: &PgCluster, host: &str, query: &str) -> Result<Connection, PgError> {
    let url = format!("postgres://postgres@{host}:{}/postgres?{query}", pg.port());
    Connection::connect(&ConnectParams::parse(&url).expect("url"), false)
}

fn encrypted(c: &mut Connection) -> bool {
    let rows = c.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").expect("query");
    rows[0][0].as_deref() == Some("t")
}

#[test]
fn sslmodes_are_honoured_and_verify_full_really_verifies() {
    let pg = PgCluster::start_tls().expect("a cluster with TLS");
    let ca = pg.tls_ca().display().to_string();
    let other = pg.tls_other_ca().display().to_string();
    let full = format!("sslmode=verify-full&sslrootcert={ca}");
    assert!(encrypted(
        &mut connect(&pg, "localhost", &full).expect("verify-full with the right CA and host")
    ));
    let e = connect(&pg, "127.0.0.1", &full)
        .expect_err("the certificate is for localhost, not 127.0.0.1");
    assert!(matches!(e, PgError::Tls(_)) && e.to_string().contains("not valid for name"), "{e}");
    assert!(!e.to_string().is_empty() && !matches!(e, PgError::Io(_)));
    let e = connect(&pg, "localhost", &format!("sslmode=verify-full&sslrootcert={other}"))
        .expect_err("wrong CA");
    assert!(matches!(e, PgError::Tls(_)) && e.to_string().contains("UnknownIssuer"), "{e}");
    let e = connect(&pg, "localhost", "sslmode=verify-full&sslrootcert=/nonexistent.crt")
        .expect_err("no CA file");
    assert!(e.to_string().contains("sslrootcert"), "{e}");
    // verify-ca checks the chain only; require and prefer encrypt without checking.
    assert!(encrypted(
        &mut connect(&pg, "127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"))
            .expect("verify-ca")
    ));
    connect(&pg, "127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={other}"))
        .expect_err("verify-ca, wrong CA");
    assert!(encrypted(&mut connect(&pg, "127.0.0.1", "sslmode=require").expect("require")));
    assert!(encrypted(&mut connect(&pg, "127.0.0.1", "").expect("prefer")));
    assert!(!encrypted(&mut connect(&pg, "127.0.0.1", "sslmode=disable").expect("disable")));
}

#[test]
fn require_fails_against_a_server_without_tls_and_the_source_streams_over_tls() {
    let plain = crate::support::cluster();
    let e = connect(&plain, "127.0.0.1", "sslmode=require").expect_err("no TLS on the server");
    assert!(e.to_string().contains("does not accept TLS"), "{e}");

    let pg = PgCluster::start_tls().expect("a cluster with TLS");
    pg.create_database("app").expect("db");
    pg.psql("app", "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)").expect("table");
    pg.prepend_hba(
        "hostnossl all all 0.0.0.0/0 reject\nhostnossl replication all 0.0.0.0/0 reject",
    )
    .expect("TLS only");
    let dir = TempDir::new("tls");
    let log = open_log(dir.path());
    let mut cfg = config(&pg, "");
    cfg.url = format!(
        "postgres://postgres@localhost:{}/app?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        pg.tls_ca().display()
    );
    let src = Running::start("app", cfg, log.clone(), dir.path());
    wait_for(&*log, "app.public.t", "the snapshot over TLS", |e| e.len() == 1);
    src.wait_streaming();
    pg.psql("app", "INSERT INTO t VALUES (2)").expect("insert");
    wait_for(&*log, "app.public.t", "a change streamed over TLS", |e| e.len() == 2);
    src.stop().expect("clean stop");
}
