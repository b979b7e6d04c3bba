//! `polylog load` killed with SIGKILL again and again, then run to its end: every row is in
//! Postgres and in the Parquet files exactly once.

#![allow(clippy::unwrap_used)] // a test stops at its first failure

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use polylog_testkit::{PgCluster, Rng, TempDir};

fn count(pg: &PgCluster, sql: &str) -> u64 {
    pg.psql("postgres", sql).unwrap().parse().unwrap()
}

#[test]
fn a_load_killed_9_times_resumes_with_no_duplicate_and_no_gap() {
    let mut rng = Rng::from_env("load_kill");
    let pg = PgCluster::start().unwrap();
    let dir = TempDir::new("load-kill");
    let (csv, schema, parquet) =
        (dir.path().join("w.csv"), dir.path().join("w.toml"), dir.path().join("pq"));
    let rows = 40_000u64;
    let gen = Command::new(env!("CARGO_BIN_EXE_polylog"))
        .args(["gen", "wide-rows", "--columns", "60", "--rows", &rows.to_string(), "--partitioned"])
        .arg("--out")
        .arg(&csv)
        .arg("--schema-out")
        .arg(&schema)
        .status()
        .unwrap();
    assert!(gen.success());
    // Postgres' own CSV load of the same file is the reference.
    let cols: Vec<String> =
        polylog_load::gen::wide_columns(60).iter().map(|(n, t)| format!("{n} {t}")).collect();
    pg.psql("postgres", &format!("CREATE TABLE reference ({})", cols.join(", "))).unwrap();
    pg.psql(
        "postgres",
        &format!("\\copy reference FROM '{}' WITH (FORMAT csv, HEADER)", csv.display()),
    )
    .unwrap();

    let url = pg.url("postgres");
    let load = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_polylog"));
        c.args(["load", "--to-postgres", &url, "--table", "wide", "--parallel", "2"])
            .args(["--chunk-rows", "1500", "--quiet", "--from"])
            .arg(&csv)
            .arg("--schema")
            .arg(&schema)
            .arg("--to-parquet")
            .arg(&parquet)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let chunks = |pg: &PgCluster| {
        pg.psql("postgres", "SELECT count(*) FROM polylog_load_chunks")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut kills = 0;
    let mut last = 0;
    while kills < 9 {
        let mut child = load().spawn().unwrap();
        // Kill after a few more chunks committed, or at a random moment of the first ones.
        let wait_for = last + 1 + rng.below(3);
        let deadline = Instant::now() + Duration::from_secs(60);
        let random_pause = Duration::from_millis(rng.below(400));
        let started = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if chunks(&pg) >= wait_for || (kills % 3 == 2 && started.elapsed() >= random_pause) {
                break;
            }
            assert!(Instant::now() < deadline, "the load made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the load failed: {status}");
            break; // finished before we could kill it again
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        last = chunks(&pg);
    }
    assert!(kills >= 5, "the load finished before being killed 5 times ({kills})");
    let out = load().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("already in from an earlier run")
            || stderr.contains("had already finished"),
        "{stderr}"
    );

    assert_eq!(count(&pg, "SELECT count(*) FROM wide"), rows);
    let diff = count(
        &pg,
        "SELECT count(*) FROM ((SELECT x::text FROM wide x EXCEPT ALL SELECT y::text FROM reference y) \
         UNION ALL (SELECT y::text FROM reference y EXCEPT ALL SELECT x::text FROM wide x)) d",
    );
    assert_eq!(diff, 0, "rows differ from the reference: duplicates or gaps");

    // One Parquet file per committed chunk, holding every id exactly once.
    use polylog_load::parquet::file::reader::SerializedFileReader;
    use polylog_load::parquet::record::RowAccessor;
    let mut ids = Vec::new();
    let mut files = 0;
    for e in std::fs::read_dir(&parquet).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "parquet") {
            continue;
        }
        files += 1;
        let r = SerializedFileReader::new(std::fs::File::open(&p).unwrap()).unwrap();
        for row in r.into_iter() {
            ids.push(row.unwrap().get_long(0).unwrap());
        }
    }
    assert_eq!(files, count(&pg, "SELECT count(*) FROM polylog_load_chunks"));
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as u64, rows);
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&(rows as i64)));
}
