//! Memory bounds of `polylog run`, read from the kernel (`VmHWM`, the peak resident set):
//! - a transaction of 10 million rows (`POLYLOG_BIG_TX_ROWS`) is captured whole, in bounded
//!   memory: Postgres spills it to disk, the source writes it in batches (a view applying it is
//!   not bounded: `POLYLOG_BIG_TX_VIEW=1` shows it);
//! - a 1 GB request body to the collector and to the API is refused at its `Content-Length`,
//!   without being held;
//! - 500 slow connections to each are cut at their deadline, and the service answers again.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use polylog_testkit::{PgCluster, TempDir};
use serde_json::Value;

use crate::api::{call, free_port, Running, TOKEN};
use crate::polylog;

/// The most `polylog run` may hold resident, whatever it is sent.
const RSS_BOUND_MIB: u64 = 128;

/// The peak and current resident set of a process, in MiB.
fn rss_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .expect("a VmHWM/VmRSS line")
            / 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn start(dir: &std::path::Path, config: &str, api: &str) -> Running {
    std::fs::write(dir.join("polylog.toml"), config).expect("config");
    let run = Running(
        polylog(dir)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("run.log")).expect("log"))
            .spawn()
            .expect("polylog run"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(api).is_err() {
        assert!(Instant::now() < deadline, "the API never listened");
        std::thread::sleep(Duration::from_millis(100));
    }
    run
}

fn status(api: &str) -> Value {
    let (code, body) = call(api, "GET", "/v1/status", "");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status JSON")
}

#[test]
fn a_ten_million_row_transaction_is_captured_in_bounded_memory() {
    let rows: u64 = std::env::var("POLYLOG_BIG_TX_ROWS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000_000);
    let pg = PgCluster::start().expect("start Postgres");
    pg.create_database("app").expect("database");
    pg.psql("app", "CREATE TABLE big (id bigint PRIMARY KEY, v text)").expect("table");
    let dir = TempDir::new("big-tx");
    let api = format!("127.0.0.1:{}", free_port());
    // With POLYLOG_BIG_TX_VIEW=1, a view over the table applies the transaction too (its
    // memory grows with the transaction: see docs/reliability.md).
    let view = std::env::var("POLYLOG_BIG_TX_VIEW").is_ok_and(|v| v == "1");
    let config = format!(
        "data_dir = \"{}\"\n[log]\nfsync = \"always\"\n[api]\nlisten = \"{api}\"\ntoken = \"{TOKEN}\"\n\
         [sources.app]\nkind = \"postgres\"\nurl = \"{}\"\n{}",
        dir.path().join("data").display(),
        pg.url("app"),
        if view { "[views.big]\nroot = \"app.public.big\"\n" } else { "" }
    );
    let run = start(dir.path(), &config, &api);
    let pid = run.0.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&api)["sources"]["app"]["state"] != "streaming" {
        assert!(Instant::now() < deadline, "the source never streamed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (before, _) = rss_mib(pid);
    let started = Instant::now();
    pg.psql(
        "app",
        &format!("INSERT INTO big SELECT g, 'row number ' || g FROM generate_series(1, {rows}) g"),
    )
    .expect("the big transaction");
    let committed = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300 + rows / 20_000);
    let mut peak_seen = 0;
    loop {
        let s = status(&api);
        let (_, now) = rss_mib(pid);
        peak_seen = peak_seen.max(now);
        let events = s["sources"]["app"]["events"].as_u64().unwrap_or(0);
        let documents = s["views"]["big"]["documents"].as_u64().unwrap_or(0);
        if events >= rows && (!view || documents >= rows) {
            assert_eq!(events, rows, "more events than rows");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{events} of {rows} events after {:?}: {s}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let captured = started.elapsed();
    let peak = rss_mib(pid).0.max(peak_seen);
    let (code, body) = call(&api, "GET", "/v1/topics/app.public.big", "");
    assert_eq!(code, 200, "{body}");
    let topic: Value = serde_json::from_str(&body).expect("topic JSON");
    let stored: u64 = topic["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["end_offset"].as_u64().unwrap_or(0) - p["start_offset"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(stored, rows, "records in app.public.big");
    eprintln!(
        "big transaction: {rows} rows committed in {committed:?}, captured in {captured:?}; \
         peak RSS {peak} MiB ({before} MiB before it; bound {RSS_BOUND_MIB} MiB)"
    );
    assert!(peak < RSS_BOUND_MIB, "peak RSS {peak} MiB for a {rows}-row transaction");
}

/// Sends a head announcing `len` bytes, then zeros until the server stops reading; the
/// answer's status line, if one came.
fn send_huge(addr: &str, head: &str, len: u64) -> (Option<String>, u64) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "{head}Content-Length: {len}\r\n\r\n").expect("head");
    let chunk = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    while sent < len {
        match s.write(&chunk[..chunk.len().min((len - sent) as usize)]) {
            Ok(n) => sent += n as u64,
            Err(_) => break,
        }
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    (text.lines().next().map(str::to_string).filter(|l| !l.is_empty()), sent)
}

/// Opens `n` connections that send the start of a request and then a byte a second.
fn slow_connections(addr: &str, n: usize, start: &'static str) -> std::thread::JoinHandle<usize> {
    let conns: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            let _ = s.write_all(start.as_bytes());
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    // Dribble until the server has closed them all (or 30 s pass); count those it closed.
    std::thread::spawn(move || {
        let mut open: Vec<Option<TcpStream>> = conns.into_iter().map(Some).collect();
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until && open.iter().any(Option::is_some) {
            for slot in &mut open {
                if let Some(s) = slot {
                    let mut buf = [0u8; 4096];
                    let closed = match s.read(&mut buf) {
                        Ok(0) => true,
                        Ok(_) => false, // an answer (408, 503); the close follows
                        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    };
                    if closed || s.write(b"x").is_err() {
                        *slot = None;
                    }
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        open.iter().filter(|s| s.is_none()).count()
    })
}

#[test]
fn a_1_gb_body_and_500_slow_connections_leave_memory_bounded_and_the_service_up() {
    let dir = TempDir::new("bounds");
    let (api, collector) =
        (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let config = format!(
        "data_dir = \"{}\"\n[api]\nlisten = \"{api}\"\ntoken = \"{TOKEN}\"\n\
         [collector]\nlisten = \"{collector}\"\ntopic = \"events\"\n",
        dir.path().join("data").display()
    );
    let mut run = start(dir.path(), &config, &api);
    let pid = run.0.id();
    let event = serde_json::json!({"type": "impression", "ts": polylog_log::now_ms() - 1000,
        "impression_id": "imp-1", "campaign_id": "camp-1", "site_domain": "www.example.com",
        "ip": "10.1.2.3", "user_agent": "Mozilla/5.0"})
    .to_string();
    let post_event = || call(&collector, "POST", "/v1/events", &event);
    let (code, body) = post_event();
    assert_eq!(code, 200, "{body}");

    const GIB: u64 = 1 << 30;
    let (answer, sent) = send_huge(&collector, "POST /v1/events HTTP/1.1\r\nHost: x\r\n", GIB);
    eprintln!("collector, 1 GiB body: {answer:?} after {} MiB sent", sent >> 20);
    // The collector reads (and drops) a few MiB so that the client hears the answer.
    assert!(answer.as_deref().is_some_and(|a| a.contains("413")), "{answer:?}");
    assert!(sent < GIB, "the collector read the whole 1 GiB body");
    let sending = Instant::now();
    let (answer, sent) = send_huge(
        &api,
        &format!(
            "POST /v1/topics/big/records HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        ),
        GIB,
    );
    let refused_after = sending.elapsed();
    eprintln!("API, 1 GiB body: {answer:?} after {} MiB sent, {refused_after:?}", sent >> 20);
    // The API answers at the head and closes: the client may see the answer or a reset.
    assert!(answer.as_deref().is_none_or(|a| a.contains("413")), "{answer:?}");
    assert!(refused_after < Duration::from_secs(5), "the API took {refused_after:?} to refuse");
    assert!(sent < GIB, "the API read the whole 1 GiB body");

    // 500 slow connections to each, one server after the other (1,000 at once could meet a
    // low descriptor limit in this process, which other tests share).
    let mut during = 0;
    for (name, addr, start, deadline) in [
        ("collector", &collector, "POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Slow: ", 5),
        ("API", &api, "GET /v1/status HTTP/1.1\r\nHost: localhost\r\nX-Slow: ", 10),
    ] {
        let started = Instant::now();
        let slow = slow_connections(addr, 500, start);
        std::thread::sleep(Duration::from_secs(2));
        during = during.max(rss_mib(pid).1);
        let closed = slow.join().expect("slow connections");
        let cut_after = started.elapsed();
        eprintln!("{name}: 500 slow connections, all closed within {cut_after:?}");
        assert_eq!(closed, 500, "{name}: slow connections the server closed");
        // Each is answered at its deadline (or at once past the connection limit).
        assert!(
            cut_after < Duration::from_secs(deadline + 8),
            "{name}: closed after {cut_after:?}"
        );
        assert!(run.0.try_wait().expect("try_wait").is_none(), "polylog died");
    }
    let (code, body) = post_event();
    assert_eq!(code, 200, "after the slow connections: {body}");
    let (code, body) = call(&api, "GET", "/v1/status", "");
    assert_eq!(code, 200, "after the slow connections: {body}");
    // The kernel updates the high-water mark lazily: the largest reading counts.
    let peak = rss_mib(pid).0.max(during);
    eprintln!(
        "1 GiB bodies and 2 x 500 slow connections: RSS {during} MiB during, peak {peak} MiB \
         (bound {RSS_BOUND_MIB} MiB)"
    );
    assert!(peak < RSS_BOUND_MIB, "peak RSS {peak} MiB");
}
