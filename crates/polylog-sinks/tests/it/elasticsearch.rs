//! The Elasticsearch sink against an OpenSearch-compatible server (`osmem-server`, installed by
//! `scripts/test`), or a real cluster at `POLYLOG_TEST_ELASTICSEARCH_URL`; 429 backoff against
//! a server that refuses on purpose.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions, Record, StartAt, TopicConfig};
use polylog_sinks::{Sink, SinkConfig};
use polylog_testkit::TempDir;
use serde_json::Value;

/// A cluster to test against, stopped on drop when we started it.
struct Cluster {
    url: String,
    child: Option<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cluster() -> Cluster {
    if let Ok(url) = std::env::var("POLYLOG_TEST_ELASTICSEARCH_URL") {
        return Cluster { url, child: None };
    }
    let out = Command::new("python3")
        .args(["-c", "import osmem_server, os; print(os.path.dirname(osmem_server.__file__))"])
        .output()
        .expect("python3");
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !dir.is_empty(),
        "no OpenSearch-compatible server: `pip install osmem-server` (scripts/test does) or set POLYLOG_TEST_ELASTICSEARCH_URL"
    );
    let port = polylog_testkit::free_port().expect("a free port");
    let child = Command::new(format!("{dir}/bin/osmem-server"))
        .args(["-addr", &format!("127.0.0.1:{port}"), "-no-stdin-watch"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start osmem-server");
    // Stopped (and waited for) when dropped, whether it came up or not.
    let cluster = Cluster { url: format!("http://127.0.0.1:{port}"), child: Some(child) };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return cluster;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("osmem-server did not start");
}

fn get(url: &str, path: &str) -> (u16, Value) {
    let ep = polylog_sinks::http::Endpoint::parse(url).expect("url");
    let (status, body) =
        ep.request("GET", path, "application/json", b"", Duration::from_secs(5)).expect("GET");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn open_log(dir: &std::path::Path) -> Arc<dyn Log> {
    let o = LogOptions {
        fsync: FsyncPolicy::Never,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    Arc::new(EmbeddedLog::open(dir.join("log"), o).expect("log"))
}

fn doc(id: u64, n: &str, version: u64) -> Record {
    Record::new(
        format!("{{\"id\":{id}}}"),
        format!("{{\"id\":{id},\"n\":{n},\"_version\":{version}}}"),
    )
}

/// A view's tombstone: it carries the version of the change that removed the document.
fn versioned_tombstone(id: u64, version: u64) -> Record {
    let mut r = Record::tombstone(format!("{{\"id\":{id}}}"));
    r.headers.push(("polylog.version".into(), version.to_string().into_bytes()));
    r
}

#[test]
fn documents_are_indexed_by_version_and_rejects_go_to_the_dead_letter_topic() {
    let es = cluster();
    let dir = TempDir::new("sink-es");
    let log = open_log(dir.path());
    log.create_topic("views.items", &TopicConfig::new(1)).expect("topic");
    log.append(
        "views.items",
        0,
        &[
            doc(1, "1", 10),
            doc(2, "2", 10),
            doc(1, "11", 20),
            doc(2, "0", 5), // older than what is indexed: a 409, already applied
            doc(3, "\"not a number\"", 7), // refused by the mapping
            Record::tombstone("{\"id\":4}"), // nothing to delete: a 404
            doc(5, "5", 1),
            Record::tombstone("{\"id\":5}"),
            // Deleted at 150, then back at 200: a replay must not delete it again.
            doc(6, "6", 100),
            versioned_tombstone(6, 150),
            doc(6, "66", 200),
        ],
    )
    .expect("append");
    let text = format!(
        "kind = \"elasticsearch\"\nurl = \"{}\"\ntopics = [\"views.items\"]\nindex = \"items\"\nbatch_docs = 3\n\
         mappings = '{{\"properties\": {{\"n\": {{\"type\": \"integer\"}}}}}}'",
        es.url
    );
    let cfg: SinkConfig = toml::from_str(&text).expect("config");
    let sink = Sink::new("es", cfg, Arc::clone(&log)).expect("sink");
    sink.run(&AtomicBool::new(false), true).expect("the sink writes");
    let (status, one) = get(&es.url, "/items/_doc/1");
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["_source"]["n"], 11);
    assert_eq!(one["_version"], 20);
    assert_eq!(
        get(&es.url, "/items/_doc/2").1["_source"]["n"],
        2,
        "the older document was not indexed"
    );
    assert_eq!(get(&es.url, "/items/_doc/5").0, 404, "deleted");
    assert_eq!(get(&es.url, "/items/_doc/3").0, 404, "rejected");
    let st = sink.status.lock().expect("status").clone();
    assert_eq!(st.dead_letters, 1, "{st:?}");
    let mut r = log.reader("dlq.es", 0, StartAt::Beginning).expect("dead-letter topic");
    let dead = r.poll(10, Duration::from_secs(1)).expect("poll");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key.as_deref(), Some(&b"{\"id\":3}"[..]));
    let why = dead[0]
        .headers
        .iter()
        .find(|(k, _)| k == "polylog.error")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    assert!(
        why.as_deref()
            .is_some_and(|w| w.starts_with("400") && w.contains("mapper_parsing_exception")),
        "{why:?}"
    );
    // A replay from the beginning changes nothing (409s) and writes no new dead letters twice
    // for documents that were applied.
    sink.reset(polylog_sinks::StartFrom::Beginning).expect("reset");
    sink.run(&AtomicBool::new(false), true).expect("replay");
    assert_eq!(get(&es.url, "/items/_doc/1").1["_source"]["n"], 11);
    let six = get(&es.url, "/items/_doc/6");
    assert_eq!((six.0, six.1["_source"]["n"].clone()), (200, serde_json::json!(66)), "{}", six.1);
}

/// A server that answers `_bulk` with 429 the first `refusals` times, then accepts everything.
fn refusing_server(refusals: usize) -> (String, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let mut len = 0;
            loop {
                let mut h = String::new();
                let _ = reader.read_line(&mut h);
                if h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let (status, answer) = if line.contains("/_bulk") {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                if n < refusals {
                    (429, "{\"error\":{\"type\":\"es_rejected_execution_exception\",\"reason\":\"busy\"}}".to_string())
                } else {
                    let actions = String::from_utf8_lossy(&body)
                        .lines()
                        .filter(|l| l.starts_with("{\"index\"") || l.starts_with("{\"delete\""))
                        .count();
                    let items: Vec<String> =
                        (0..actions).map(|_| "{\"index\":{\"status\":201}}".to_string()).collect();
                    (200, format!("{{\"errors\":false,\"items\":[{}]}}", items.join(",")))
                }
            } else {
                (200, "{\"acknowledged\":true}".to_string())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    (url, seen)
}

#[test]
fn a_busy_cluster_is_retried_with_backoff_and_nothing_is_skipped() {
    let (url, seen) = refusing_server(3);
    let dir = TempDir::new("sink-es-busy");
    let log = open_log(dir.path());
    log.create_topic("views.items", &TopicConfig::new(1)).expect("topic");
    log.append("views.items", 0, &[doc(1, "1", 1), doc(2, "2", 1)]).expect("append");
    let cfg: SinkConfig = toml::from_str(&format!(
        "kind = \"opensearch\"\nurl = \"{url}\"\ntopics = [\"views.items\"]"
    ))
    .expect("config");
    let sink = Sink::new("busy", cfg, Arc::clone(&log)).expect("sink");
    sink.run(&AtomicBool::new(false), true).expect("written after the cluster stops refusing");
    assert_eq!(seen.load(Ordering::SeqCst), 4, "three refusals, then the batch");
    let st = sink.status.lock().expect("status").clone();
    assert_eq!((st.records, st.dead_letters), (2, 0), "{st:?}");
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("429")), "{st:?}");
    assert_eq!(sink.lag().expect("lag").0, 0);
}
