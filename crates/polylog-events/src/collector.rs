//! The HTTP collector: `POST /v1/events` with NDJSON (one event per line) or a JSON array,
//! optionally gzip-compressed. Each event is checked, anonymized and categorized; the good ones
//! are appended to the topic and durable before the answer, the bad ones are listed with their
//! reasons (the good events of the same request are kept):
//!
//! ```json
//! {"accepted": 2, "rejected": [{"index": 1, "reason": "`ts` is missing"}]}
//! ```
//!
//! Whole requests are refused with a 4xx and a reason: a body over `body_max` bytes (before or
//! after decompression: a gzip bomb stops at the limit), more than `events_max` events, nesting
//! deeper than `depth_max`, a JSON array that does not parse, a head that takes longer than
//! `header_timeout` (in all, however slowly it comes) or is over 16 KiB, a body that takes over
//! 30 s, an unsupported content encoding.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use polylog_log::{partition_for_key, Log, LogError, Record, TopicConfig};
use serde_json::{json, Value};

use crate::anonymize::{ip_prefix, strip_url, Anonymizer};
use crate::categorize::{site_category, user_agent};
use crate::model::{mrc_viewable, Event, EventKind, RawEvent};
use crate::server::{timed_out, DeadlineReader};

const HEAD_MAX: usize = 16 * 1024;
const CONNECTIONS_MAX: usize = 256;
/// Time a request's body has to arrive, once its head has.
const BODY_TIME: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct CollectorOptions {
    pub topic: String,
    pub partitions: u32,
    /// Largest body, compressed and after decompression.
    pub body_max: usize,
    pub events_max: usize,
    pub depth_max: usize,
    pub header_timeout: Duration,
    /// Days a user-id hashing key is kept.
    pub keep_days: u32,
    /// Site domain → category.
    pub site_categories: BTreeMap<String, String>,
    /// Country lookup by IP (before the IP is cut to its prefix).
    pub geo: Option<Arc<crate::geo::GeoDb>>,
}

impl CollectorOptions {
    pub fn new(topic: &str) -> CollectorOptions {
        CollectorOptions {
            topic: topic.to_string(),
            partitions: 4,
            body_max: 8 * 1024 * 1024,
            events_max: 10_000,
            depth_max: 16,
            header_timeout: Duration::from_secs(5),
            keep_days: 2,
            site_categories: BTreeMap::new(),
            geo: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error("the log: {0}")]
    Log(#[from] LogError),
    #[error("the anonymization keys in {0}")]
    Keys(String),
}

/// Counters for `polylog status`.
#[derive(Debug, Default)]
pub struct CollectorStats {
    pub requests: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
}

pub struct Collector {
    opts: CollectorOptions,
    log: Arc<dyn Log>,
    anonymizer: Anonymizer,
    /// User agents seen lately and what they say (traffic repeats a few thousand of them).
    agents: std::sync::Mutex<std::collections::HashMap<String, crate::categorize::Agent>>,
    pub stats: CollectorStats,
}

/// User agents remembered before the memory is emptied.
const AGENTS_MAX: usize = 10_000;

/// An HTTP answer: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

fn refuse(status: u16, reason: impl Into<String>) -> Answer {
    Answer { status, body: json!({"error": reason.into()}) }
}

/// Deepest nesting of arrays and objects in `bytes` (strings skipped).
fn depth(bytes: &[u8]) -> usize {
    let (mut d, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                d += 1;
                max = max.max(d);
            }
            b']' | b'}' => d = d.saturating_sub(1),
            _ => {}
        }
    }
    max
}

impl Collector {
    pub fn new(
        opts: CollectorOptions,
        log: Arc<dyn Log>,
        state_dir: &std::path::Path,
    ) -> Result<Collector, CollectorError> {
        match log.create_topic(&opts.topic, &TopicConfig::new(opts.partitions.max(1))) {
            Ok(()) | Err(LogError::TopicExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let anonymizer = Anonymizer::open(state_dir, opts.keep_days)
            .map_err(|e| CollectorError::Keys(format!("{}: {e}", state_dir.display())))?;
        Ok(Collector {
            opts,
            log,
            anonymizer,
            agents: Default::default(),
            stats: CollectorStats::default(),
        })
    }

    /// Turns a checked event into what is stored.
    fn event(&self, raw: RawEvent, now_ms: i64) -> std::io::Result<Event> {
        let agent = {
            let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
            match raw.user_agent.as_deref().and_then(|ua| agents.get(ua)) {
                Some(a) => a.clone(),
                None => {
                    let a = user_agent(raw.user_agent.as_deref());
                    if let Some(ua) = &raw.user_agent {
                        if agents.len() >= AGENTS_MAX {
                            agents.clear();
                        }
                        agents.insert(ua.clone(), a.clone());
                    }
                    a
                }
            }
        };
        let user_hash = match &raw.user_id {
            Some(u) => self.anonymizer.user_hash(raw.ts_ms, now_ms, u)?,
            None => None,
        };
        let viewable = match (raw.kind, raw.ad_format, raw.in_view_pct, raw.in_view_ms) {
            (EventKind::Viewability, Some(f), Some(p), Some(ms)) => Some(mrc_viewable(f, p, ms)),
            _ => None,
        };
        Ok(Event {
            kind: raw.kind,
            ts_ms: raw.ts_ms,
            impression_id: raw.impression_id,
            campaign_id: raw.campaign_id,
            creative_id: raw.creative_id,
            placement_id: raw.placement_id,
            site_category: site_category(&self.opts.site_categories, &raw.site_domain),
            site_domain: raw.site_domain,
            page_url: raw.page_url.as_deref().map(strip_url),
            ip_prefix: raw.ip.as_deref().and_then(ip_prefix),
            user_hash,
            device: agent.device.to_string(),
            browser: agent.browser.to_string(),
            invalid: agent.invalid,
            country: match (&self.opts.geo, &raw.ip) {
                (Some(db), Some(ip)) => ip.trim().parse().ok().and_then(|ip| db.country(ip)),
                _ => None,
            },
            ad_format: raw.ad_format,
            ad_size: raw.ad_size,
            in_view_pct: raw.in_view_pct,
            in_view_ms: raw.in_view_ms,
            viewable,
        })
    }

    /// Handles one request body (`gzip`: it is compressed).
    pub fn ingest(&self, body: &[u8], gzip: bool, now_ms: i64) -> Answer {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let max = self.opts.body_max;
        if body.len() > max {
            return refuse(413, format!("the body is over {max} bytes"));
        }
        let plain: std::borrow::Cow<'_, [u8]> = if gzip {
            let mut out = Vec::new();
            let mut d = flate2::read::GzDecoder::new(body).take(max as u64 + 1);
            if let Err(e) = d.read_to_end(&mut out) {
                return refuse(400, format!("the gzip body does not decompress: {e}"));
            }
            if out.len() > max {
                return refuse(413, format!("the body is over {max} bytes once decompressed"));
            }
            out.into()
        } else {
            body.into()
        };
        let trimmed = plain.trim_ascii_start();
        // A JSON array, or NDJSON: one value per line.
        let items: Vec<Result<Value, String>> = if trimmed.first() == Some(&b'[') {
            if depth(trimmed) > self.opts.depth_max + 1 {
                return refuse(400, format!("the body nests deeper than {}", self.opts.depth_max));
            }
            match serde_json::from_slice::<Vec<Value>>(trimmed) {
                Ok(values) => values.into_iter().map(Ok).collect(),
                Err(e) => {
                    return refuse(400, format!("the body is not a JSON array of events: {e}"))
                }
            }
        } else {
            trimmed
                .split(|&b| b == b'\n')
                .filter(|l| !l.trim_ascii().is_empty())
                .map(|line| {
                    if depth(line) > self.opts.depth_max {
                        return Err(format!("nests deeper than {}", self.opts.depth_max));
                    }
                    serde_json::from_slice::<Value>(line).map_err(|e| format!("not JSON: {e}"))
                })
                .collect()
        };
        if items.len() > self.opts.events_max {
            return refuse(
                413,
                format!("more than {} events in one request", self.opts.events_max),
            );
        }
        if items.is_empty() {
            return refuse(400, "no events in the body");
        }
        let mut rejected = Vec::new();
        let mut by_partition: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
        for (i, item) in items.into_iter().enumerate() {
            let raw = item.and_then(|v| RawEvent::parse(&v, now_ms));
            match raw {
                Err(reason) => rejected.push(json!({"index": i, "reason": reason})),
                Ok(raw) => {
                    let event = match self.event(raw, now_ms) {
                        Ok(e) => e,
                        Err(e) => return refuse(503, format!("the anonymization keys: {e}")),
                    };
                    let key = event.impression_id.clone().into_bytes();
                    let p = partition_for_key(&key, self.opts.partitions.max(1));
                    let mut r = Record::new(key, serde_json::to_vec(&event).unwrap_or_default());
                    r.timestamp_ms = Some(event.ts_ms);
                    by_partition.entry(p).or_default().push(r);
                }
            }
        }
        let mut accepted = 0u64;
        let mut ends = Vec::new();
        for (p, records) in &by_partition {
            match self.log.append(&self.opts.topic, *p, records) {
                Ok(a) => ends.push((*p, a.last_offset + 1)),
                Err(e) => return refuse(503, format!("the log refused the events: {e}")),
            }
            accepted += records.len() as u64;
        }
        for (p, end) in ends {
            if let Err(e) = self.log.wait_durable(&self.opts.topic, p, end, Duration::from_secs(30))
            {
                return refuse(503, format!("the events are not durable: {e}"));
            }
        }
        self.stats.accepted.fetch_add(accepted, Ordering::Relaxed);
        self.stats.rejected.fetch_add(rejected.len() as u64, Ordering::Relaxed);
        let status = if accepted == 0 { 400 } else { 200 };
        Answer { status, body: json!({"accepted": accepted, "rejected": rejected}) }
    }

    /// Serves `POST /v1/events` until `stop` is set.
    pub fn serve(
        self: &Arc<Self>,
        listener: TcpListener,
        stop: &AtomicBool,
    ) -> std::io::Result<()> {
        let me = Arc::clone(self);
        crate::server::serve(
            listener,
            stop,
            CONNECTIONS_MAX,
            "collector",
            Arc::new(move |stream: &TcpStream| {
                let _ = me.handle(stream);
            }),
        )
    }

    fn handle(&self, stream: &TcpStream) -> std::io::Result<()> {
        let mut reader = BufReader::new(DeadlineReader::new(stream, self.opts.header_timeout));
        match self.handle_request(stream, &mut reader) {
            Err(e) if timed_out(&e) => {
                let secs = self.opts.header_timeout.as_secs_f64();
                respond(
                    stream,
                    &refuse(408, format!("the request head did not arrive within {secs} s, or its body within {} s", BODY_TIME.as_secs())),
                )
            }
            r => r,
        }
    }

    fn handle_request(
        &self,
        stream: &TcpStream,
        reader: &mut BufReader<DeadlineReader<'_>>,
    ) -> std::io::Result<()> {
        let mut line = String::new();
        reader.take(HEAD_MAX as u64).read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (mut length, mut gzip, mut head) = (None, false, line.len());
        loop {
            let mut h = String::new();
            if reader.take(HEAD_MAX as u64).read_line(&mut h)? == 0 {
                break;
            }
            head += h.len();
            if head > HEAD_MAX {
                return respond(stream, &refuse(431, "the request head is over 16 KiB"));
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
                if k == "content-length" {
                    length = v.parse::<usize>().ok();
                } else if k == "content-encoding" {
                    match v.as_str() {
                        "gzip" => gzip = true,
                        "identity" => {}
                        other => {
                            return respond(
                                stream,
                                &refuse(
                                    415,
                                    format!("content-encoding {other} is not supported (gzip is)"),
                                ),
                            )
                        }
                    }
                } else if k == "transfer-encoding" && v.contains("chunked") {
                    return respond(
                        stream,
                        &refuse(411, "send a Content-Length (chunked bodies are not accepted)"),
                    );
                }
            }
        }
        if path.split('?').next() != Some("/v1/events") {
            return respond(
                stream,
                &refuse(404, format!("no route {path}; events go to POST /v1/events")),
            );
        }
        if method != "POST" {
            return respond(stream, &refuse(405, "events are POSTed"));
        }
        let Some(length) = length else {
            return respond(stream, &refuse(411, "a Content-Length is required"));
        };
        if length > self.opts.body_max {
            // Read (a bounded part of) what the client sends anyway, so it gets the answer
            // rather than a reset connection.
            reader.get_mut().deadline = Instant::now() + Duration::from_secs(2);
            let _ =
                std::io::copy(&mut reader.take(length.min(4 << 20) as u64), &mut std::io::sink());
            return respond(
                stream,
                &refuse(413, format!("the body is over {} bytes", self.opts.body_max)),
            );
        }
        reader.get_mut().deadline = Instant::now() + BODY_TIME;
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let answer = self.ingest(&body, gzip, polylog_log::now_ms());
        respond(stream, &answer)
    }
}

fn respond(stream: &TcpStream, a: &Answer) -> std::io::Result<()> {
    crate::server::respond(stream, a.status, &a.body)
}
