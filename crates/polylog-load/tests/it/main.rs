//! Bulk loads against a real Postgres: every value of a 120-column table round-trips into
//! Postgres and Parquet unchanged; partitions; bad input; S3 through a real S3-compatible server.

#![allow(clippy::unwrap_used)] // a test stops at its first failure

use std::path::Path;
use std::process::{Child, Command, Stdio};

use polylog_load::gen::{schema_toml, wide_columns, WideRows};
use polylog_load::load::parquet_name;
use polylog_load::source::Header;
use polylog_load::{load, LoadError, LoadOptions};
use polylog_testkit::{free_port, PgCluster, TempDir};

fn write_rows(path: &Path, columns: usize, rows: u64, seed: u64) {
    let g = WideRows { columns, rows, days: 60, null_percent: 5, seed };
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    g.write_csv(&mut f).unwrap();
}

fn create_twin(pg: &PgCluster, table: &str, columns: usize) {
    let cols: Vec<String> = wide_columns(columns).iter().map(|(n, t)| format!("{n} {t}")).collect();
    pg.psql("postgres", &format!("CREATE TABLE {table} ({})", cols.join(", "))).unwrap();
}

/// Rows of `a` missing from `b` plus rows of `b` missing from `a`, compared as whole rows.
fn difference(pg: &PgCluster, a: &str, b: &str) -> u64 {
    let sql = format!(
        "SELECT count(*) FROM ((SELECT x::text FROM {a} x EXCEPT ALL SELECT y::text FROM {b} y) \
         UNION ALL (SELECT y::text FROM {b} y EXCEPT ALL SELECT x::text FROM {a} x)) d"
    );
    pg.psql("postgres", &sql).unwrap().parse().unwrap()
}

fn count(pg: &PgCluster, sql: &str) -> u64 {
    pg.psql("postgres", sql).unwrap().parse().unwrap()
}

#[test]
fn every_value_of_120_columns_round_trips_into_postgres_and_parquet() {
    let pg = PgCluster::start().unwrap();
    let dir = TempDir::new("load-exact");
    let csv = dir.path().join("wide.csv");
    let rows = 3_000;
    write_rows(&csv, 120, rows, 7);
    let schema = dir.path().join("wide.toml");
    std::fs::write(&schema, schema_toml(120, false)).unwrap();

    // Postgres' own CSV parser is the reference.
    create_twin(&pg, "reference", 120);
    pg.psql(
        "postgres",
        &format!("\\copy reference FROM '{}' WITH (FORMAT csv, HEADER)", csv.display()),
    )
    .unwrap();

    let mut opts = LoadOptions::new(&csv, &pg.url("postgres"), "wide");
    opts.schema_file = Some(schema);
    opts.parquet = Some(dir.path().join("parquet").display().to_string());
    opts.chunk_rows = 700;
    opts.parallel = 2;
    let s = load(&opts).unwrap();
    assert_eq!(s.rows, rows);
    assert_eq!(s.chunks, 5);
    assert_eq!(s.parquet_files, 5);
    assert_eq!(count(&pg, "SELECT count(*) FROM wide"), rows);
    assert_eq!(difference(&pg, "wide", "reference"), 0, "a value differs from Postgres' own parse");
    // Every type is there, with NULLs and special values.
    assert!(count(&pg, "SELECT count(*) FROM wide WHERE revenue_1 = 'NaN'") > 0);
    assert!(count(&pg, "SELECT count(*) FROM wide WHERE campaign_1 = ''") > 0);
    assert!(count(&pg, "SELECT count(*) FROM wide WHERE campaign_1 IS NULL") > 0);
    assert!(count(&pg, "SELECT count(*) FROM wide WHERE campaign_1 LIKE E'%\\n%'") > 0);
    assert!(count(&pg, "SELECT count(*) FROM wide WHERE campaign_1 LIKE E'%\\t%'") > 0);
    assert!(count(&pg, "SELECT count(*) FROM wide WHERE campaign_1 LIKE '%\"%'") > 0);
    assert!(count(&pg, "SELECT count(*) FROM wide WHERE campaign_1 LIKE E'%\\\\\\\\%'") > 0);

    // The Parquet files, read back by loading them into a third table, hold the same values.
    create_twin(&pg, "from_parquet", 120);
    let mut files: Vec<_> = std::fs::read_dir(dir.path().join("parquet"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 5);
    for f in &files {
        let opts = LoadOptions::new(f, &pg.url("postgres"), "from_parquet");
        load(&opts).unwrap();
    }
    assert_eq!(difference(&pg, "from_parquet", "reference"), 0, "a Parquet value differs");

    // Loading the same file again is a no-op: it is the same load, finished.
    let again = load(&opts).unwrap();
    assert!(again.already_done);
    assert_eq!(count(&pg, "SELECT count(*) FROM wide"), rows);
}

#[test]
fn parquet_values_have_their_logical_types() {
    use parquet::file::reader::SerializedFileReader;
    let pg = PgCluster::start().unwrap();
    let dir = TempDir::new("load-types");
    pg.psql(
        "postgres",
        "CREATE TABLE t (id int, d date, ts timestamptz, n numeric(10,2), big numeric(30,4), u uuid, b bytea, s text)",
    )
    .unwrap();
    let csv = dir.path().join("t.csv");
    std::fs::write(
        &csv,
        "1,2024-02-29,2024-02-29 12:00:00.5+01,12.345,-1.5,a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,\\x00ff,\"a\"\"b\"\n2,,,,,,,\n",
    )
    .unwrap();
    let mut opts = LoadOptions::new(&csv, &pg.url("postgres"), "t");
    opts.parquet = Some(dir.path().join("pq").display().to_string());
    opts.header = Header::No;
    let s = load(&opts).unwrap();
    assert_eq!(
        pg.psql("postgres", "SET TimeZone = 'UTC'; SELECT * FROM t ORDER BY id").unwrap(),
        "1|2024-02-29|2024-02-29 11:00:00.5+00|12.35|-1.5000|a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11|\\x00ff|a\"b\n2|||||||"
    );
    let f = std::fs::File::open(dir.path().join("pq").join(parquet_name(&s.load_id, 0))).unwrap();
    let r = SerializedFileReader::new(f).unwrap();
    let rows: Vec<String> = r.into_iter().map(|row| row.unwrap().to_string()).collect();
    assert_eq!(rows.len(), 2);
    let first = &rows[0];
    for want in [
        "id: 1",
        "d: 2024-02-29",
        "ts: 2024-02-29 11:00:00.500000 +00:00",
        "n: 12.35",
        "big: -1.5000",
        "s: \"a\"b\"",
    ] {
        assert!(first.contains(want), "{want} not in {first}");
    }
    assert!(rows[1].contains("d: null") && rows[1].contains("n: null"), "{}", rows[1]);
}

#[test]
fn partitions_are_created_and_loaded_in_parallel() {
    let pg = PgCluster::start().unwrap();
    let dir = TempDir::new("load-parts");
    let csv = dir.path().join("p.csv");
    write_rows(&csv, 20, 4_000, 3); // 60 days from 2026-01-01: January, February, March
    let schema = dir.path().join("p.toml");
    std::fs::write(&schema, schema_toml(20, true)).unwrap();
    let mut opts = LoadOptions::new(&csv, &pg.url("postgres"), "daily");
    opts.schema_file = Some(schema);
    opts.parallel = 2;
    opts.chunk_rows = 500;
    let s = load(&opts).unwrap();
    assert_eq!(s.rows, 4_000);
    let parts = pg
        .psql("postgres", "SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'daily'::regclass")
        .unwrap();
    assert_eq!(parts, "daily_202601,daily_202602,daily_202603");
    assert_eq!(
        count(&pg, "SELECT count(*) FROM daily_202601"),
        count(&pg, "SELECT count(*) FROM daily WHERE day < '2026-02-01'")
    );
    assert!(count(&pg, "SELECT count(*) FROM ONLY daily_202602 WHERE day >= '2026-03-01' OR day < '2026-02-01'") == 0);
    assert_eq!(s.targets.len(), 3, "{s}");

    // An existing partitioned table: rows are routed to its partitions, a default one catches
    // the rest.
    pg.psql(
        "postgres",
        "CREATE TABLE ranged (id bigint, v int) PARTITION BY RANGE (id); \
        CREATE TABLE ranged_low PARTITION OF ranged FOR VALUES FROM (MINVALUE) TO (100); \
        CREATE TABLE ranged_mid PARTITION OF ranged FOR VALUES FROM (100) TO (200); \
        CREATE TABLE ranged_rest PARTITION OF ranged DEFAULT",
    )
    .unwrap();
    let csv = dir.path().join("r.csv");
    let body: String = (0..300).map(|i| format!("{i},{}\n", i * 2)).collect();
    std::fs::write(&csv, body).unwrap();
    let s = load(&LoadOptions::new(&csv, &pg.url("postgres"), "ranged")).unwrap();
    assert_eq!(s.targets.iter().map(|t| t.1).collect::<Vec<_>>(), vec![100, 100, 100], "{s}");
    assert_eq!(count(&pg, "SELECT count(*) FROM ranged_rest WHERE id >= 200"), 100);
}

#[test]
fn bad_rows_stop_the_load_at_a_chunk_boundary_or_go_to_rejects() {
    let pg = PgCluster::start().unwrap();
    let dir = TempDir::new("load-bad");
    pg.psql("postgres", "CREATE TABLE m (id int PRIMARY KEY, price numeric(8,2), note text)")
        .unwrap();
    let csv = dir.path().join("m.csv");
    let mut body = String::from("id,price,note\n");
    for i in 1..=250 {
        match i {
            123 => body.push_str("123,12x.5,oops\n"),
            177 => body.push_str("177,1.5\n"),
            _ => body.push_str(&format!("{i},{i}.25,\"row {i}\"\n")),
        }
    }
    std::fs::write(&csv, body).unwrap();
    let mut opts = LoadOptions::new(&csv, &pg.url("postgres"), "m");
    opts.chunk_rows = 50;
    let err = load(&opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Stopped(_)));
    assert!(
        msg.contains("row 123 (line 124), column \"price\": \"12x.5\" is not a number"),
        "{msg}"
    );
    assert!(msg.contains("100 rows are committed"), "{msg}");
    assert_eq!(count(&pg, "SELECT count(*) FROM m"), 100, "only whole chunks before the bad row");

    // With a rejects file the load goes on; the bad rows are set aside with their reasons.
    let rejects = dir.path().join("rejects.csv");
    opts.rejects = Some(rejects.clone());
    let s = load(&opts).unwrap();
    assert_eq!(s.rejected, 2);
    assert_eq!(s.resumed_rows, 100);
    assert_eq!(count(&pg, "SELECT count(*) FROM m"), 248);
    assert_eq!(
        std::fs::read_to_string(&rejects).unwrap(),
        "\"123\",\"12x.5\",\"oops\"\n\"177\",\"1.5\"\n"
    );
    let reasons = std::fs::read_to_string(dir.path().join("rejects.csv.reasons")).unwrap();
    assert!(
        reasons.contains("row 177 (line 178)")
            && reasons.contains("has 2 fields where 3 were expected"),
        "{reasons}"
    );

    // Postgres' own objections (a duplicate key) name the input row too, and commit nothing
    // of that chunk.
    pg.psql("postgres", "CREATE TABLE u (id int PRIMARY KEY)").unwrap();
    let csv = dir.path().join("u.tsv");
    std::fs::write(&csv, "1\n2\n3\n2\n").unwrap();
    let err = load(&LoadOptions::new(&csv, &pg.url("postgres"), "u")).unwrap_err().to_string();
    assert!(err.contains("row 4: copying into") && err.contains("23505"), "{err}");
    assert_eq!(count(&pg, "SELECT count(*) FROM u"), 0);

    // A missing table, an unsupported type, an unknown column: clear errors, nothing loaded.
    let err = load(&LoadOptions::new(&csv, &pg.url("postgres"), "nope")).unwrap_err().to_string();
    assert!(err.contains("table nope does not exist") && err.contains("--schema"), "{err}");
    pg.psql("postgres", "CREATE TABLE odd (id int, span interval)").unwrap();
    let err = load(&LoadOptions::new(&csv, &pg.url("postgres"), "odd")).unwrap_err().to_string();
    assert!(err.contains("span") && err.contains("interval"), "{err}");
}

struct Moto(Child, u16);
impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http(port: u16, method: &str, path: &str) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status = String::from_utf8_lossy(&out[9..12]).parse().unwrap();
    let head = String::from_utf8_lossy(&out[..head_end]).to_ascii_lowercase();
    let mut body = out[head_end + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut plain = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
                .unwrap();
            if n == 0 {
                break;
            }
            plain.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 4 + n..];
        }
        body = plain;
    }
    (status, body)
}

#[test]
fn parquet_goes_to_an_s3_compatible_bucket() {
    let port = free_port().unwrap();
    let child = Command::new("moto_server")
        .args(["-p", &port.to_string(), "-H", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server (an S3-compatible server) is needed: pip install 'moto[server]'");
    let moto = Moto(child, port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", moto.1)).is_err() {
        assert!(std::time::Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (status, body) = http(port, "PUT", "/loads");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"));
    std::env::set_var("AWS_ALLOW_HTTP", "true");

    let pg = PgCluster::start().unwrap();
    let dir = TempDir::new("load-s3");
    let csv = dir.path().join("s.csv");
    write_rows(&csv, 30, 1_000, 5);
    let schema = dir.path().join("s.toml");
    std::fs::write(&schema, schema_toml(30, false)).unwrap();
    let mut opts = LoadOptions::new(&csv, &pg.url("postgres"), "s3rows");
    opts.schema_file = Some(schema);
    opts.parquet = Some("s3://loads/daily/2026".into());
    opts.chunk_rows = 400;
    let s = load(&opts).unwrap();
    assert_eq!(s.parquet_files, 3);
    // Read the objects back through the S3 API and check their rows.
    use object_store::ObjectStore;
    let store =
        object_store::aws::AmazonS3Builder::from_env().with_bucket_name("loads").build().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut total = 0;
    for i in 0..3 {
        let path =
            object_store::path::Path::from(format!("daily/2026/{}", parquet_name(&s.load_id, i)));
        let body = rt.block_on(async { store.get(&path).await.unwrap().bytes().await.unwrap() });
        let local = dir.path().join(format!("{i}.parquet"));
        std::fs::write(&local, &body).unwrap();
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let r = SerializedFileReader::new(std::fs::File::open(&local).unwrap()).unwrap();
        total += r.metadata().file_metadata().num_rows();
    }
    assert_eq!(total, 1_000);
}

#[test]
fn a_topic_loads_what_it_got_since_the_last_load() {
    use polylog_log::{EmbeddedLog, Log, LogOptions, Record, TopicConfig};
    use std::sync::Arc;
    let pg = PgCluster::start().unwrap();
    let dir = TempDir::new("load-topic");
    let log = Arc::new(EmbeddedLog::open(dir.path().join("log"), LogOptions::default()).unwrap());
    log.create_topic("sums", &TopicConfig::new(2)).unwrap();
    let put = |p: u32, values: &[&str]| {
        let recs: Vec<Record> =
            values.iter().map(|v| Record::new("k", v.as_bytes().to_vec())).collect();
        let a = log.append("sums", p, &recs).unwrap();
        log.wait_durable("sums", p, a.last_offset + 1, std::time::Duration::from_secs(10)).unwrap();
    };
    put(
        0,
        &[
            r#"{"id": 1, "amount": 12345678901234567890.123456789, "note": "tab\there"}"#,
            r#"{"before": null, "after": {"id": 2, "amount": "7.5", "note": null}, "op": "c"}"#,
            r#"{"before": {"id": 2}, "after": null, "op": "d"}"#,
        ],
    );
    put(1, &[r#"{"id": 3, "amount": 1e2, "tags": {"a": [1, 2]}}"#]);
    pg.psql("postgres", "CREATE TABLE sums (id int, amount numeric, note text, tags jsonb)")
        .unwrap();
    let mut opts = LoadOptions::new("sums", &pg.url("postgres"), "sums");
    opts.topic = Some(polylog_load::load::TopicInput { log: log.clone(), topic: "sums".into() });
    let s = load(&opts).unwrap();
    assert_eq!(s.rows, 3, "{s}");
    assert_eq!(
        pg.psql("postgres", "SELECT id, amount, note, tags FROM sums ORDER BY id").unwrap(),
        "1|12345678901234567890.123456789|tab\there|\n2|7.5||\n3|100||{\"a\": [1, 2]}"
    );
    // Only what came since is loaded next time; then nothing.
    put(1, &[r#"{"id": 4}"#]);
    let s = load(&opts).unwrap();
    assert_eq!(s.rows, 1, "{s}");
    let s = load(&opts).unwrap();
    assert!(s.nothing_new, "{s}");
    assert_eq!(count(&pg, "SELECT count(*) FROM sums"), 4);
    // A record the table cannot hold is named by partition and offset.
    put(0, &[r#"{"id": 5, "colour": "red"}"#]);
    let err = load(&opts).unwrap_err().to_string();
    assert!(
        err.contains(
            "row 1 (partition 0, offset 3): the record has \"colour\", which is not a column"
        ),
        "{err}"
    );
}
