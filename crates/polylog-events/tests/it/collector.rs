use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use polylog_events::{Collector, CollectorOptions};
use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions, StartAt};
use polylog_testkit::TempDir;
use serde_json::{json, Value};

struct Running {
    addr: String,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    log: Arc<dyn Log>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn start(dir: &std::path::Path) -> Running {
    let o = LogOptions {
        fsync: FsyncPolicy::Always,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.join("log"), o).expect("log"));
    let mut opts = CollectorOptions::new("events.viewability");
    opts.body_max = 64 * 1024;
    opts.events_max = 100;
    opts.header_timeout = Duration::from_millis(500);
    opts.site_categories.insert("example.com".into(), "news".into());
    let c = Arc::new(Collector::new(opts, Arc::clone(&log), &dir.join("keys")).expect("collector"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    let handle = std::thread::spawn(move || c.serve(listener, &s).expect("serve"));
    Running { addr, stop, handle: Some(handle), log }
}

fn post(addr: &str, body: &[u8], extra_headers: &str) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n{extra_headers}\r\n",
        body.len()
    )
    .expect("head");
    s.write_all(body).expect("body");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("answer");
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let json = out
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

fn event(i: u64, ip: &str, user: &str) -> Value {
    json!({"type": "viewability", "ts": polylog_log::now_ms() - 1000, "impression_id": format!("imp-{i}"),
           "campaign_id": "camp-1", "site_domain": "www.Example.com", "page_url": format!("https://www.example.com/a?email={user}"),
           "ip": ip, "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Version/17.0 Mobile/15E148 Safari/604.1",
           "user_id": user, "ad_format": "display", "in_view_pct": 70, "in_view_ms": 1200 + i})
}

fn stored(log: &dyn Log) -> Vec<Value> {
    let d = log.describe_topic("events.viewability").expect("topic");
    let mut out = Vec::new();
    for p in 0..d.partitions.len() as u32 {
        let mut r = log.reader("events.viewability", p, StartAt::Beginning).expect("reader");
        for rec in r.poll(10_000, Duration::from_millis(50)).expect("poll") {
            out.push(
                serde_json::from_slice(rec.value.as_deref().unwrap_or_default()).expect("json"),
            );
        }
    }
    out
}

/// Every file under `dir`, as bytes.
fn all_bytes(dir: &std::path::Path, out: &mut Vec<u8>) {
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            all_bytes(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            out.extend_from_slice(&b);
        }
    }
}

#[test]
fn good_events_are_stored_anonymized_and_bad_ones_answered_with_reasons() {
    let dir = TempDir::new("collector");
    let c = start(dir.path());
    let mut ndjson = String::new();
    for i in 0..3 {
        ndjson.push_str(&event(i, "198.51.100.23", "user-secret-42").to_string());
        ndjson.push('\n');
    }
    ndjson.push_str("{\"type\": \"click\"}\n");
    ndjson.push_str("not json\n");
    let (status, answer) = post(&c.addr, ndjson.as_bytes(), "");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 3);
    let reasons: Vec<String> = answer["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .map(|r| r["reason"].to_string())
        .collect();
    assert_eq!(answer["rejected"][0]["index"], 3);
    assert!(
        reasons[0].contains("`ts` is missing") && reasons[1].contains("not JSON"),
        "{reasons:?}"
    );
    // A JSON array, gzip-compressed, IPv6.
    let array = json!([event(10, "2001:db8:abcd:12::99", "other-user-77")]).to_string();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(array.as_bytes()).expect("gzip");
    let (status, answer) = post(&c.addr, &gz.finish().expect("gzip"), "Content-Encoding: gzip\r\n");
    assert_eq!((status, answer["accepted"].clone()), (200, json!(1)), "{answer}");

    let events = stored(&*c.log);
    assert_eq!(events.len(), 4);
    let e = &events.iter().find(|e| e["impression_id"] == "imp-0").expect("imp-0");
    assert_eq!(e["ip_prefix"], "198.51.100.0/24");
    assert_eq!(e["page_url"], "https://www.example.com/a");
    assert_eq!((e["device"].as_str(), e["browser"].as_str()), (Some("mobile"), Some("Safari")));
    assert_eq!(
        (e["site_domain"].as_str(), e["site_category"].as_str()),
        (Some("www.example.com"), Some("news"))
    );
    assert_eq!(e["viewable"], true, "display at 70% for 1.2 s");
    assert!(e["user_hash"].as_str().is_some_and(|h| h.len() == 32));
    let v6 = events.iter().find(|e| e["impression_id"] == "imp-10").expect("imp-10");
    assert_eq!(v6["ip_prefix"], "2001:db8:abcd::/48");

    // The privacy canary: no raw IP, user id or query string anywhere on disk.
    drop(c);
    let mut bytes = Vec::new();
    all_bytes(dir.path(), &mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    for secret in
        ["198.51.100.23", "user-secret-42", "other-user-77", "2001:db8:abcd:12::99", "email="]
    {
        assert!(!text.contains(secret), "{secret} reached the disk");
    }
}

#[test]
fn bad_requests_get_a_4xx_and_the_server_stays_up() {
    let dir = TempDir::new("collector-bad");
    let c = start(dir.path());
    let (s, a) = post(&c.addr, b"[{\"type\": ", "");
    assert_eq!(s, 400, "{a}");
    assert!(a["error"].as_str().is_some_and(|e| e.contains("not a JSON array")), "{a}");
    let (s, a) = post(&c.addr, &vec![b' '; 70 * 1024], "");
    assert_eq!(s, 413, "{a}");
    // A gzip bomb: 10 MB of zeros compress to ~10 KB.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![b'0'; 10 * 1024 * 1024]).expect("gzip");
    let bomb = gz.finish().expect("gzip");
    let (s, a) = post(&c.addr, &bomb, "Content-Encoding: gzip\r\n");
    assert_eq!(s, 413, "{a}");
    assert!(a["error"].as_str().is_some_and(|e| e.contains("decompressed")), "{a}");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let (s, a) = post(&c.addr, deep.as_bytes(), "");
    assert_eq!(s, 400, "{a}");
    assert!(a["error"].as_str().is_some_and(|e| e.contains("nests deeper")), "{a}");
    let many: String = (0..101).map(|i| format!("{}\n", event(i, "10.0.0.1", "u"))).collect();
    let (s, _) = post(&c.addr, many.as_bytes(), "");
    assert_eq!(s, 413);
    let (s, a) = post(&c.addr, b"{\"x\":1}", "Content-Encoding: br\r\n");
    assert_eq!(s, 415, "{a}");
    let wrong = json!({"type": "click", "ts": "yesterday", "impression_id": "i", "campaign_id": "c", "site_domain": "d"});
    let (s, a) = post(&c.addr, wrong.to_string().as_bytes(), "");
    assert_eq!(s, 400, "{a}");
    assert!(a["rejected"][0]["reason"].as_str().is_some_and(|r| r.contains("`ts`")), "{a}");
    // A client that sends half a head and goes quiet is cut off; the server still answers.
    let mut slow = std::net::TcpStream::connect(&c.addr).expect("connect");
    slow.write_all(b"POST /v1/events HTTP/1.1\r\n").expect("half a head");
    std::thread::sleep(Duration::from_millis(800));
    let (s, a) = post(&c.addr, format!("{}\n", event(1, "10.0.0.1", "u")).as_bytes(), "");
    assert_eq!((s, a["accepted"].clone()), (200, json!(1)), "{a}");
}
