//! The HTTP API (`[api] listen`). Every route is in [`ROUTES`]; all but `/health` and `/login`
//! need the bearer token when one is configured (`api.token` or `POLYLOG_API_TOKEN`), given as
//! `Authorization: Bearer <token>` (compared in constant time) or, for the dashboard's reads,
//! the session cookie `/login` sets (see [`ui`]).
//!
//! - `GET /health`: `{"status": "ok"}`, or 503 with the components that failed.
//! - `GET /v1/status`: every source, view, sink, rollup and the collector (what
//!   `polylog status` prints), refreshed every second.
//! - `GET /metrics`: Prometheus text format (see [`metrics`]).
//! - `GET /v1/changes?topic=&table=&key=&op=&from=`: the live change feed, Server-Sent Events.
//! - `GET /v1/topics`, `GET /v1/topics/<topic>`: topics, their settings and offsets.
//! - `PUT /v1/topics/<topic>` with `{"partitions": n, "compacted": bool, "retention_ms": ms}`
//!   (all optional): creates a topic; 409 if it exists.
//! - `GET /v1/topics/<topic>/records?partition=&offset=&limit=`: a range of records.
//! - `POST /v1/topics/<topic>/records`: appends records, answers once they are durable.
//! - `GET /v1/search/<index>?q=&limit=`, `GET /v1/search/<index>/<id>`: the search sinks.
//! - `GET /v1/reports/<rollup>?from=&to=&group_by=&interval=&filter=&format=`: reports.
//!
//! Request heads are limited to 16 KiB and bodies to 8 MiB; at most 64 connections are served
//! at once, of which at most 16 follow the change feed.

mod feed;
pub mod metrics;
mod ui;

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polylog_events::server::{
    respond, respond_bytes, respond_with, timed_out, url_decode, DeadlineReader,
};
use polylog_log::{Log, LogError, Record, StartAt};
use polylog_sinks::search::SearchIndexes;
use serde_json::{json, Value};

const HEAD_MAX: usize = 16 * 1024;
const BODY_MAX: usize = 8 * 1024 * 1024;
const CONNECTIONS_MAX: usize = 64;
/// Records one produce request may carry, and one read may return.
const RECORDS_MAX: usize = 10_000;
const READ_MAX: usize = 1_000;
/// How long a produce request waits for its records to become durable.
const DURABLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client has to send its whole request.
const REQUEST_TIME: Duration = Duration::from_secs(10);
/// Statuses kept for the charts: 15 minutes at one a second.
const HISTORY_MAX: usize = 900;

pub struct Api {
    pub indexes: SearchIndexes,
    pub rollups: BTreeMap<String, Arc<polylog_events::Rollup>>,
    pub token: Option<String>,
    pub log: Arc<dyn Log>,
    /// What `/v1/status` answers, replaced by the running process every second.
    pub status: Mutex<Value>,
    /// Topic patterns the change feed follows when the request names none, and topics it
    /// leaves out then.
    pub feed_topics: Vec<String>,
    pub feed_skip: Vec<String>,
    /// Set when the process stops: ends change feeds.
    pub stop: Arc<AtomicBool>,
    /// Served on a loopback address: requests must name a loopback host (a page that rebinds
    /// its own name to 127.0.0.1 cannot read or write through the browser).
    pub loopback: bool,
    /// The last [`HISTORY_MAX`] statuses, reduced to counters and lags, for the dashboard's
    /// charts.
    history: Mutex<VecDeque<Value>>,
    /// Requests answered, by route and status code.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    feeds: AtomicUsize,
}

impl Api {
    pub fn new(log: Arc<dyn Log>, token: Option<String>, stop: Arc<AtomicBool>) -> Api {
        Api {
            indexes: Arc::default(),
            rollups: BTreeMap::new(),
            token,
            log,
            status: Mutex::new(json!({})),
            feed_topics: vec!["*".into()],
            feed_skip: Vec::new(),
            stop,
            loopback: false,
            history: Mutex::new(VecDeque::new()),
            requests: Mutex::new(BTreeMap::new()),
            feeds: AtomicUsize::new(0),
        }
    }

    /// Replaces the status `/v1/status` answers and adds it to the history.
    pub fn set_status(&self, status: Value) {
        // Each component's values at these JSON pointers, named by their last segment.
        let pick = |kind: &str, pointers: &[&str]| -> Value {
            let m: serde_json::Map<String, Value> = status[kind]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(n, s)| {
                    let f: serde_json::Map<String, Value> = pointers
                        .iter()
                        .map(|p| {
                            let name = p.rsplit('/').next().unwrap_or(p);
                            (name.to_string(), s.pointer(p).cloned().unwrap_or(Value::Null))
                        })
                        .collect();
                    (n.clone(), Value::Object(f))
                })
                .collect();
            Value::Object(m)
        };
        let point = json!({
            "t": status["updated_ms"],
            "sources": pick("sources", &["/events", "/slot/lag_bytes"]),
            "views": pick("views", &["/changes", "/lag"]),
            "sinks": pick("sinks", &["/records", "/lag"]),
            "rollups": pick("rollups", &["/events", "/lag_records"]),
            "collector": {"accepted": status["collector"]["accepted"]},
        });
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() >= HISTORY_MAX {
            h.pop_front();
        }
        h.push_back(point);
        drop(h);
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    fn authorized(&self, req: &Request) -> bool {
        let Some(token) = &self.token else { return true };
        let bearer = req.header("authorization").and_then(|v| {
            let (scheme, t) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| t.trim())
        });
        if bearer.is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes())) {
            return true;
        }
        // The dashboard's session cookie reads only: a page elsewhere cannot make a browser
        // write, and the cookie (HttpOnly) is not the token.
        let session = req.header("cookie").filter(|_| req.method == "GET").and_then(|c| {
            c.split(';').find_map(|kv| {
                kv.trim().strip_prefix(SESSION_COOKIE).and_then(|v| v.strip_prefix('='))
            })
        });
        session.is_some_and(|given| constant_time_eq(given.as_bytes(), read_key(token).as_bytes()))
    }

    /// Refuses a request that names another host than a loopback one, when serving loopback.
    fn refuse_host(&self, req: &Request) -> Option<Reply> {
        if !self.loopback {
            return None;
        }
        let host = req.header("host").unwrap_or("");
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.split(':').next().unwrap_or(""),
        };
        if ["localhost", "127.0.0.1", "::1"].contains(&name.to_ascii_lowercase().as_str()) {
            return None;
        }
        Some(error(
            403,
            format!("Host {host:?} is not this server's loopback address; to serve other hosts, listen on another address and set a token"),
        ))
    }

    fn count(&self, route: &'static str, code: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route, code))
            .or_default() += 1;
    }
}

/// The dashboard's session cookie.
pub(crate) const SESSION_COOKIE: &str = "polylog_session";

/// The session cookie's value for a token: a digest that grants reads only.
pub(crate) fn read_key(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("polylog dashboard, read only\0{token}").as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal contents, in time that depends only on the lengths.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..n {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// Serves until `stop` is set.
pub fn serve(listener: TcpListener, api: Arc<Api>, stop: &AtomicBool) -> std::io::Result<()> {
    let handler = Arc::new(move |stream: &TcpStream| {
        let _ = handle(stream, &api);
    });
    polylog_events::server::serve(listener, stop, CONNECTIONS_MAX, "API", handler)
}

/// A parsed request.
#[derive(Debug, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn params(&self) -> Vec<(String, String)> {
        self.query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (url_decode(k), url_decode(v))
            })
            .collect()
    }

    fn param(&self, name: &str) -> Option<String> {
        self.params().into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// What a handler answers; `Streamed` when it wrote the answer itself (the change feed).
pub enum Reply {
    Json(u16, Value),
    Bytes(u16, &'static str, Vec<u8>),
    /// With headers of its own.
    Headed(u16, Vec<(&'static str, String)>, &'static str, Vec<u8>),
    Streamed,
}

fn error(code: u16, msg: impl Into<String>) -> Reply {
    Reply::Json(code, json!({ "error": msg.into() }))
}

type Handler = fn(&Api, &Request, &[String], &TcpStream) -> Reply;

/// One route: a method and a path whose `{name}` segments match any one segment.
pub struct Route {
    pub method: &'static str,
    pub pattern: &'static str,
    /// Served without the token.
    pub public: bool,
    handler: Handler,
}

impl Route {
    const fn new(method: &'static str, pattern: &'static str, handler: Handler) -> Route {
        Route { method, pattern, public: false, handler }
    }

    /// The `{name}` segments' values when `path` matches.
    pub fn matches(&self, path: &str) -> Option<Vec<String>> {
        let want: Vec<&str> = self.pattern.split('/').filter(|s| !s.is_empty()).collect();
        let got: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if want.len() != got.len() {
            return None;
        }
        let mut args = Vec::new();
        for (w, g) in want.iter().zip(&got) {
            if w.starts_with('{') {
                args.push(url_decode(g));
            } else if w != g {
                return None;
            }
        }
        Some(args)
    }
}

/// Every route the API serves, in the order they are tried.
pub const ROUTES: &[Route] = &[
    Route { method: "GET", pattern: "/health", public: true, handler: health },
    Route { method: "POST", pattern: "/login", public: true, handler: ui::login },
    Route::new("GET", "/", ui::page),
    Route::new("GET", "/changes", ui::page),
    Route::new("GET", "/search", ui::page),
    Route::new("GET", "/reports", ui::page),
    Route::new("GET", "/v1/status", status),
    Route::new("GET", "/v1/status/history", history),
    Route::new("GET", "/metrics", metrics::handle),
    Route::new("GET", "/v1/changes", feed::handle),
    Route::new("GET", "/v1/topics", topics),
    Route::new("GET", "/v1/topics/{topic}", topic),
    Route::new("PUT", "/v1/topics/{topic}", create_topic),
    Route::new("GET", "/v1/topics/{topic}/records", read_records),
    Route::new("POST", "/v1/topics/{topic}/records", produce),
    Route::new("GET", "/v1/search", indexes),
    Route::new("GET", "/v1/search/{index}", search),
    Route::new("GET", "/v1/search/{index}/{id}", search_get),
    Route::new("GET", "/v1/reports", rollups),
    Route::new("GET", "/v1/reports/{rollup}", report),
];

fn handle(stream: &TcpStream, api: &Api) -> std::io::Result<()> {
    let (route, reply) = match read_head(stream) {
        Err(reply) => ("(unreadable)", reply),
        Ok((mut req, incoming)) => dispatch(stream, api, &mut req, incoming),
    };
    let code = match &reply {
        Reply::Json(c, _) | Reply::Bytes(c, _, _) | Reply::Headed(c, _, _, _) => *c,
        Reply::Streamed => 200,
    };
    api.count(route, code);
    match reply {
        Reply::Json(c, v) => respond(stream, c, &v),
        Reply::Bytes(c, t, b) => respond_bytes(stream, c, t, &b),
        Reply::Headed(c, headers, t, b) => respond_with(stream, c, &headers, t, &b),
        Reply::Streamed => Ok(()),
    }
}

fn is_json(req: &Request) -> bool {
    req.header("content-type").is_some_and(|t| {
        t.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    })
}

/// The route a request names and its `{name}` values, or every route its path matches.
fn route_of(req: &Request) -> (Option<(&'static Route, Vec<String>)>, Vec<&'static Route>) {
    let matched: Vec<(&Route, Vec<String>)> =
        ROUTES.iter().filter_map(|r| r.matches(&req.path).map(|a| (r, a))).collect();
    let others = matched.iter().map(|(r, _)| *r).collect();
    (matched.into_iter().find(|(r, _)| r.method == req.method), others)
}

/// The refusal of a request without the token: for a browser, the sign-in page.
fn unauthorized(req: &Request) -> Reply {
    if req.header("accept").is_some_and(|a| a.contains("text/html")) {
        let page = ui::login_page(&req.path, None);
        return Reply::Headed(401, vec![], "text/html; charset=utf-8", page.into_bytes());
    }
    let body = json!({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"});
    Reply::Headed(
        401,
        vec![("WWW-Authenticate", "Bearer".into())],
        "application/json",
        body.to_string().into_bytes(),
    )
}

/// Admits a request (its host, its token), only then reads its body, and routes it.
fn dispatch(
    stream: &TcpStream,
    api: &Api,
    req: &mut Request,
    incoming: Incoming<'_>,
) -> (&'static str, Reply) {
    let (exact, matched) = route_of(req);
    let name = exact
        .as_ref()
        .map(|(r, _)| *r)
        .or(matched.first().copied())
        .map_or("(no route)", |r| r.pattern);
    if let Some(refusal) = api.refuse_host(req) {
        return (name, refusal);
    }
    if !exact.as_ref().is_some_and(|(r, _)| r.public) && !api.authorized(req) {
        return (name, unauthorized(req));
    }
    match incoming.body() {
        Ok(body) => req.body = body,
        Err(reply) => return (name, reply),
    }
    let reply = match exact {
        // Writes are JSON: a form or a `no-cors` request from another page cannot send it.
        Some((r, _)) if r.method != "GET" && r.pattern != "/login" && !is_json(req) => {
            error(415, format!("{} {} takes Content-Type: application/json", r.method, r.pattern))
        }
        Some((r, args)) => (r.handler)(api, req, &args, stream),
        None if !matched.is_empty() => {
            let allowed: Vec<&str> = matched.iter().map(|r| r.method).collect();
            let body = json!({"error": format!("{} is not supported here; use {}", req.method, allowed.join(" or "))});
            Reply::Headed(
                405,
                vec![("Allow", allowed.join(", "))],
                "application/json",
                body.to_string().into_bytes(),
            )
        }
        None => error(
            404,
            format!(
                "no route {}; the routes are {}",
                req.path,
                ROUTES.iter().map(|r| r.pattern).collect::<Vec<_>>().join(", ")
            ),
        ),
    };
    (name, reply)
}

/// A request whose head is read: the rest of the connection, the request's deadline (it has
/// [`REQUEST_TIME`] in all: a client sending a byte now and then does not hold a connection
/// longer) and the length of its body, read once the request is admitted.
struct Incoming<'a> {
    reader: BufReader<DeadlineReader<'a>>,
    length: usize,
}

fn read_error(e: std::io::Error) -> Reply {
    if timed_out(&e) {
        return error(408, format!("the request took over {} s", REQUEST_TIME.as_secs()));
    }
    error(400, format!("reading the request: {e}"))
}

impl Incoming<'_> {
    /// Fails once the deadline has passed (every read waits at most what is left of it).
    fn timed(&self) -> Result<(), Reply> {
        if Instant::now() >= self.reader.get_ref().deadline {
            return Err(error(408, format!("the request took over {} s", REQUEST_TIME.as_secs())));
        }
        Ok(())
    }

    fn body(mut self) -> Result<Vec<u8>, Reply> {
        let mut body = vec![0; self.length];
        let mut got = 0;
        while got < self.length {
            self.timed()?;
            match self.reader.read(&mut body[got..]).map_err(read_error)? {
                0 => return Err(error(400, "the body ended early")),
                n => got += n,
            }
        }
        Ok(body)
    }
}

/// Reads a request's head (within its deadline and [`HEAD_MAX`]) and checks its body's length.
fn read_head(stream: &TcpStream) -> Result<(Request, Incoming<'_>), Reply> {
    let mut incoming =
        Incoming { reader: BufReader::new(DeadlineReader::new(stream, REQUEST_TIME)), length: 0 };
    let mut head = 0usize;
    let mut line = String::new();
    let mut next_line = |incoming: &mut Incoming<'_>, line: &mut String| -> Result<usize, Reply> {
        line.clear();
        incoming.timed()?;
        let limit = (HEAD_MAX + 1 - head.min(HEAD_MAX)) as u64;
        let n = (&mut incoming.reader).take(limit).read_line(line).map_err(read_error)?;
        head += n;
        if head > HEAD_MAX {
            return Err(error(431, "request head over 16 KiB"));
        }
        Ok(n)
    };
    next_line(&mut incoming, &mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or(""));
    if method.is_empty() || !target.starts_with('/') {
        return Err(error(400, "not an HTTP request"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut req =
        Request { method, path: path.to_string(), query: query.to_string(), ..Request::default() };
    loop {
        if next_line(&mut incoming, &mut line)? == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            req.headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    if req.header("transfer-encoding").is_some() {
        return Err(error(411, "send the body with a Content-Length, not chunked"));
    }
    incoming.length = match req.header("content-length").map(|v| v.parse::<usize>()) {
        None => 0,
        Some(Ok(n)) if n > BODY_MAX => {
            return Err(error(413, format!("the body is {n} bytes; at most {BODY_MAX}")))
        }
        Some(Ok(n)) => n,
        Some(Err(_)) => return Err(error(400, "Content-Length is not a number")),
    };
    Ok((req, incoming))
}

fn health(api: &Api, _: &Request, _: &[String], _: &TcpStream) -> Reply {
    let status = api.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut failed = Vec::new();
    for kind in ["sources", "views", "sinks", "rollups"] {
        if let Some(m) = status[kind].as_object() {
            for (name, s) in m {
                if s["state"] == "failed" {
                    failed.push(format!("{} {name}", kind.trim_end_matches('s')));
                }
            }
        }
    }
    if failed.is_empty() {
        Reply::Json(200, json!({"status": "ok"}))
    } else {
        Reply::Json(503, json!({"status": "failing", "failed": failed}))
    }
}

fn status(api: &Api, _: &Request, _: &[String], _: &TcpStream) -> Reply {
    Reply::Json(200, api.status.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

fn history(api: &Api, _: &Request, _: &[String], _: &TcpStream) -> Reply {
    let points: Vec<Value> =
        api.history.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
    Reply::Json(200, json!({ "points": points }))
}

fn indexes(api: &Api, _: &Request, _: &[String], _: &TcpStream) -> Reply {
    let ixs = api.indexes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut list: Vec<Value> =
        ixs.values().map(|ix| json!({"name": ix.name, "documents": ix.len()})).collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Reply::Json(200, json!({ "indexes": list }))
}

fn rollups(api: &Api, _: &Request, _: &[String], _: &TcpStream) -> Reply {
    let list: Vec<Value> = api
        .rollups
        .iter()
        .map(|(n, r)| json!({"name": n, "dimensions": r.dimension_names()}))
        .collect();
    Reply::Json(200, json!({ "rollups": list }))
}

fn log_error(e: LogError) -> Reply {
    match e {
        LogError::UnknownTopic(t) => error(404, format!("no topic {t:?}")),
        LogError::UnknownPartition { .. }
        | LogError::OffsetOutOfRange { .. }
        | LogError::InvalidAppend(_)
        | LogError::InvalidTopicConfig(_)
        | LogError::InvalidTopicName { .. } => error(400, e.to_string()),
        LogError::Timeout(_) => error(503, e.to_string()),
        e => error(500, e.to_string()),
    }
}

fn partitions_json(d: &polylog_log::TopicDescription) -> Vec<Value> {
    d.partitions
        .iter()
        .map(|p| {
            json!({
                "partition": p.partition,
                "start_offset": p.start_offset,
                "end_offset": p.end_offset,
                "durable_offset": p.durable_offset,
                "size_bytes": p.size_bytes,
            })
        })
        .collect()
}

fn topics(api: &Api, _: &Request, _: &[String], _: &TcpStream) -> Reply {
    let names = match api.log.topics() {
        Ok(n) => n,
        Err(e) => return log_error(e),
    };
    let list: Vec<Value> = names
        .iter()
        .filter_map(|n| api.log.describe_topic(n).ok())
        .map(|d| {
            json!({
                "name": d.name,
                "partitions": d.partitions.len(),
                "compacted": d.config.compacted,
                "records": d.partitions.iter().map(|p| p.end_offset - p.start_offset.min(p.end_offset)).sum::<u64>(),
                "size_bytes": d.partitions.iter().map(|p| p.size_bytes).sum::<u64>(),
            })
        })
        .collect();
    Reply::Json(200, json!({ "topics": list }))
}

fn topic(api: &Api, _: &Request, args: &[String], _: &TcpStream) -> Reply {
    match api.log.describe_topic(&args[0]) {
        Ok(d) => Reply::Json(
            200,
            json!({"name": d.name, "config": d.config, "partitions": partitions_json(&d)}),
        ),
        Err(e) => log_error(e),
    }
}

fn create_topic(api: &Api, req: &Request, args: &[String], _: &TcpStream) -> Reply {
    let body: Value = if req.body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(e) => return error(400, format!("the body is not JSON: {e}")),
        }
    };
    let Some(obj) = body.as_object() else {
        return error(400, "the body must be an object: {\"partitions\": n, \"compacted\": bool}");
    };
    if let Some(k) =
        obj.keys().find(|k| !["partitions", "compacted", "retention_ms"].contains(&k.as_str()))
    {
        return error(400, format!("unknown field {k:?} (partitions, compacted, retention_ms)"));
    }
    let partitions =
        match obj.get("partitions").map(|p| p.as_u64().and_then(|p| u32::try_from(p).ok())) {
            None => 1,
            Some(Some(p)) => p,
            Some(None) => return error(400, "partitions must be a positive number"),
        };
    let mut config = polylog_log::TopicConfig::new(partitions);
    match obj.get("compacted") {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => config = config.compacted(),
        Some(_) => return error(400, "compacted must be true or false"),
    }
    match obj.get("retention_ms").map(Value::as_u64) {
        None => {}
        Some(Some(ms)) if ms > 0 => config.retention_ms = Some(ms),
        Some(_) => return error(400, "retention_ms must be a positive number of milliseconds"),
    }
    match api.log.create_topic(&args[0], &config) {
        Ok(()) => Reply::Json(201, json!({"created": args[0], "config": config})),
        Err(LogError::TopicExists(t)) => error(409, format!("topic {t:?} exists")),
        Err(e) => log_error(e),
    }
}

/// A key or value as JSON when it is JSON, else as text (lossy when not UTF-8).
pub(crate) fn bytes_json(b: Option<&[u8]>) -> Value {
    match b {
        None => Value::Null,
        Some(b) => serde_json::from_slice(b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into_owned())),
    }
}

pub(crate) fn headers_json(h: &[(String, Vec<u8>)]) -> Value {
    let m: serde_json::Map<String, Value> = h
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(String::from_utf8_lossy(v).into_owned())))
        .collect();
    Value::Object(m)
}

fn read_records(api: &Api, req: &Request, args: &[String], _: &TcpStream) -> Reply {
    let topic = &args[0];
    let num = |k: &str, default: u64| -> Result<u64, Reply> {
        match req.param(k) {
            None => Ok(default),
            Some(v) => {
                v.parse().map_err(|_| error(400, format!("{k} must be a number, not {v:?}")))
            }
        }
    };
    let (partition, limit) = match (num("partition", 0), num("limit", 100)) {
        (Ok(p), Ok(l)) if (1..=READ_MAX as u64).contains(&l) => (p as u32, l as usize),
        (Ok(_), Ok(_)) => return error(400, format!("limit must be 1 to {READ_MAX}")),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let d = match api.log.describe_topic(topic) {
        Ok(d) => d,
        Err(e) => return log_error(e),
    };
    let Some(p) = d.partitions.iter().find(|p| p.partition == partition) else {
        return error(
            400,
            format!("{topic} has partitions 0 to {}", d.partitions.len().saturating_sub(1)),
        );
    };
    // `offset` is where to start; without it, the last `limit` durable records.
    let start = match req.param("offset") {
        None => p.durable_offset.saturating_sub(limit as u64).max(p.start_offset),
        Some(_) => match num("offset", 0) {
            Ok(o) => o.max(p.start_offset),
            Err(r) => return r,
        },
    };
    let mut reader = match api.log.reader(topic, partition, StartAt::Offset(start)) {
        Ok(r) => r,
        Err(e) => return log_error(e),
    };
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while records.len() < limit && reader.position() < p.durable_offset && Instant::now() < deadline
    {
        match reader.poll(limit - records.len(), Duration::from_millis(200)) {
            Ok(got) => records.extend(got),
            Err(e) => return log_error(e),
        }
    }
    let next = records.last().map_or(start, |r| r.offset + 1);
    let records: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "partition": r.partition,
                "offset": r.offset,
                "timestamp_ms": r.timestamp_ms,
                "key": bytes_json(r.key.as_deref()),
                "value": bytes_json(r.value.as_deref()),
                "headers": headers_json(&r.headers),
            })
        })
        .collect();
    Reply::Json(
        200,
        json!({"topic": topic, "partition": partition, "records": records, "next_offset": next, "durable_offset": p.durable_offset}),
    )
}

/// `{"records": [{"key": <JSON>, "value": <JSON or null>, "partition": n, "headers": {..}}]}`:
/// keys and values are stored as their JSON text; without a partition, the key's hash picks
/// one (as Kafka's default partitioner). Answers once every record is durable.
fn produce(api: &Api, req: &Request, args: &[String], _: &TcpStream) -> Reply {
    let topic = &args[0];
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return error(400, format!("the body is not JSON: {e}")),
    };
    let Some(items) = body["records"].as_array() else {
        return error(400, "the body must be {\"records\": [{\"key\": ..., \"value\": ...}, ...]}");
    };
    if items.is_empty() || items.len() > RECORDS_MAX {
        return error(400, format!("send 1 to {RECORDS_MAX} records, not {}", items.len()));
    }
    let d = match api.log.describe_topic(topic) {
        Ok(d) => d,
        Err(LogError::UnknownTopic(_)) => {
            return error(
                404,
                format!("no topic {topic:?}; create it with `polylog topics create {topic}`"),
            )
        }
        Err(e) => return log_error(e),
    };
    let partitions = d.partitions.len() as u32;
    let mut by_partition: BTreeMap<u32, Vec<(usize, Record)>> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        let Some(obj) = item.as_object() else {
            return error(400, format!("records[{i}] is not an object"));
        };
        if let Some(k) =
            obj.keys().find(|k| !["key", "value", "partition", "headers"].contains(&k.as_str()))
        {
            return error(
                400,
                format!("records[{i}]: unknown field {k:?} (key, value, partition, headers)"),
            );
        }
        let key = obj.get("key").filter(|k| !k.is_null()).map(|k| k.to_string().into_bytes());
        if d.config.compacted && key.is_none() {
            return error(
                400,
                format!("records[{i}] has no key; {topic} is compacted, so every record needs one"),
            );
        }
        let value = obj.get("value").filter(|v| !v.is_null()).map(|v| v.to_string().into_bytes());
        let partition = match obj.get("partition") {
            None | Some(Value::Null) => {
                key.as_deref().map_or(0, |k| polylog_log::partition_for_key(k, partitions))
            }
            Some(p) => match p.as_u64() {
                Some(p) if p < u64::from(partitions) => p as u32,
                _ => {
                    return error(
                        400,
                        format!("records[{i}].partition must be 0 to {}", partitions - 1),
                    )
                }
            },
        };
        let mut headers = Vec::new();
        match obj.get("headers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(h)) => {
                for (k, v) in h {
                    let Some(v) = v.as_str() else {
                        return error(400, format!("records[{i}].headers.{k} must be a string"));
                    };
                    headers.push((k.clone(), v.as_bytes().to_vec()));
                }
            }
            Some(_) => {
                return error(400, format!("records[{i}].headers must be an object of strings"))
            }
        }
        let record = Record { key, value, headers, timestamp_ms: None };
        by_partition.entry(partition).or_default().push((i, record));
    }
    let mut offsets = vec![Value::Null; items.len()];
    let mut ends = Vec::new();
    // A failure after some partitions were appended says which records were written (they
    // become durable all the same): a client retrying knows what it repeats.
    let partial = |e: LogError, offsets: &[Value]| -> Reply {
        match log_error(e) {
            Reply::Json(code, mut body) if offsets.iter().any(|o| !o.is_null()) => {
                body["offsets"] = json!(offsets);
                Reply::Json(code, body)
            }
            other => other,
        }
    };
    for (p, batch) in &by_partition {
        let records: Vec<Record> = batch.iter().map(|(_, r)| r.clone()).collect();
        let a = match api.log.append(topic, *p, &records) {
            Ok(a) => a,
            Err(e) => return partial(e, &offsets),
        };
        for (n, (i, _)) in batch.iter().enumerate() {
            offsets[*i] = json!({"partition": p, "offset": a.base_offset + n as u64});
        }
        ends.push((*p, a.last_offset + 1));
    }
    for (p, end) in ends {
        if let Err(e) = api.log.wait_durable(topic, p, end, DURABLE_TIMEOUT) {
            return partial(e, &offsets);
        }
    }
    Reply::Json(200, json!({ "offsets": offsets }))
}

/// Queries nested deeper than this are refused (the parser's work grows fast with nesting).
const QUERY_NESTING_MAX: usize = 8;

fn index(api: &Api, name: &str) -> Result<Arc<polylog_sinks::search::SearchIndex>, Reply> {
    api.indexes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .cloned()
        .ok_or_else(|| error(404, format!("no search index {name:?}")))
}

fn search(api: &Api, req: &Request, args: &[String], _: &TcpStream) -> Reply {
    let ix = match index(api, &args[0]) {
        Ok(ix) => ix,
        Err(r) => return r,
    };
    let q = req.param("q").unwrap_or_else(|| "*".into());
    let mut depth = 0usize;
    let deepest = q.chars().fold(0usize, |max, c| {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        max.max(depth)
    });
    if deepest > QUERY_NESTING_MAX {
        return error(400, format!("the query nests parentheses deeper than {QUERY_NESTING_MAX}"));
    }
    let limit = match req.param("limit").map(|l| l.parse::<usize>()) {
        None => 10,
        Some(Ok(l)) if (1..=1000).contains(&l) => l,
        Some(_) => return error(400, "limit must be 1 to 1000"),
    };
    match ix.search(&q, limit) {
        Ok(v) => Reply::Json(200, v),
        Err(e) => error(400, e.to_string()),
    }
}

fn search_get(api: &Api, _: &Request, args: &[String], _: &TcpStream) -> Reply {
    let ix = match index(api, &args[0]) {
        Ok(ix) => ix,
        Err(r) => return r,
    };
    // Keys are JSON; `7` is accepted for `{"id":7}`-style keys only as given.
    let id = &args[1];
    let key =
        serde_json::from_str::<Value>(id).map(|v| v.to_string()).unwrap_or_else(|_| id.clone());
    match ix.get(&key) {
        Ok(Some(v)) => Reply::Json(200, v),
        Ok(None) => error(404, format!("no document {key} in {}", args[0])),
        Err(e) => error(400, e.to_string()),
    }
}

fn report(api: &Api, req: &Request, args: &[String], _: &TcpStream) -> Reply {
    let name = &args[0];
    let Some(rollup) = api.rollups.get(name) else {
        let names: Vec<&str> = api.rollups.keys().map(String::as_str).collect();
        return error(404, format!("no rollup {name:?}; the rollups are {names:?}"));
    };
    let q = match polylog_events::ReportQuery::parse(rollup, &req.query, polylog_log::now_ms()) {
        Ok(q) => q,
        Err(e) => return error(400, e),
    };
    match rollup.report(&q) {
        Ok(r) if q.csv => Reply::Bytes(200, "text/csv; charset=utf-8", r.to_csv().into_bytes()),
        Ok(r) => Reply::Json(200, r.to_json()),
        Err(polylog_events::ReportError::Bad(e)) => error(400, e),
        Err(polylog_events::ReportError::Unavailable(e)) => error(503, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn start(token: Option<&str>) -> (String, Arc<AtomicBool>, polylog_testkit::TempDir) {
        let dir = polylog_testkit::TempDir::new("api");
        let log = polylog_log::EmbeddedLog::open(dir.path(), polylog_log::LogOptions::default())
            .expect("log");
        let stop = Arc::new(AtomicBool::new(false));
        let api = Arc::new(Api::new(Arc::new(log), token.map(str::to_string), Arc::clone(&stop)));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let s = Arc::clone(&stop);
        std::thread::spawn(move || serve(listener, api, &s));
        (addr, stop, dir)
    }

    /// The status code of the answer (the rest is not read: the change feed does not end).
    fn status_code(addr: &str, method: &str, path: &str, headers: &str) -> u16 {
        let mut s = TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Content-Length: 0\r\n\r\n"
        )
        .expect("request");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("status line");
        line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    /// Every route of the router, with each `{name}` filled in: without the token, with wrong
    /// ones, with the session cookie's value as a bearer token or the token as the cookie, only
    /// the public routes answer; with the token every route is past the check, and the
    /// dashboard's session cookie passes for reads only.
    #[test]
    fn every_route_but_health_refuses_a_request_without_the_token() {
        let (addr, stop, _dir) = start(Some("s3cret-token"));
        assert!(ROUTES.len() >= 10);
        let key = read_key("s3cret-token");
        let session = format!("Cookie: a=b; {SESSION_COOKIE}={key}\r\n");
        let json = "Content-Type: application/json\r\n";
        for r in ROUTES {
            let path: Vec<&str> =
                r.pattern.split('/').map(|s| if s.starts_with('{') { "x" } else { s }).collect();
            let path = path.join("/");
            let what = format!("{} {}", r.method, r.pattern);
            for wrong in [
                String::new(),
                "Authorization: Bearer s3cret-tokeN\r\n".into(),
                "Authorization: Bearer s3cret\r\n".into(),
                format!("Authorization: Bearer {key}\r\n"),
                format!("Cookie: {SESSION_COOKIE}=s3cret-token\r\n"),
                format!("Cookie: {SESSION_COOKIE}=nope\r\n"),
            ] {
                let code = status_code(&addr, r.method, &path, &format!("{json}{wrong}"));
                if r.public {
                    assert_ne!(code, 401, "{what} is public");
                } else {
                    assert_eq!(code, 401, "{what} without the right token ({wrong:?})");
                }
            }
            let bearer = format!("{json}Authorization: Bearer s3cret-token\r\n");
            let code = status_code(&addr, r.method, &path, &bearer);
            assert!(code != 401 && code != 0, "{what} with the token answered {code}");
            let code = status_code(&addr, r.method, &path, &format!("{json}{session}"));
            if r.method == "GET" || r.public {
                assert!(code != 401 && code != 0, "{what} with the session answered {code}");
            } else {
                assert_eq!(code, 401, "{what}: the session only reads");
            }
        }
        assert_eq!(status_code(&addr, "GET", "/nothing/here", ""), 401, "unknown paths too");
        assert_eq!(
            status_code(&addr, "GET", "/nothing/here", "Authorization: Bearer s3cret-token\r\n"),
            404
        );
        // A write that is not JSON is refused before anything happens.
        let form = "Authorization: Bearer s3cret-token\r\nContent-Type: text/plain\r\n";
        assert_eq!(status_code(&addr, "PUT", "/v1/topics/t", form), 415);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// On a loopback address, a request naming another host (a page that rebound its name to
    /// 127.0.0.1) is refused, token or not.
    #[test]
    fn on_loopback_other_hosts_are_refused() {
        let dir = polylog_testkit::TempDir::new("api-host");
        let log = polylog_log::EmbeddedLog::open(dir.path(), polylog_log::LogOptions::default())
            .expect("log");
        let stop = Arc::new(AtomicBool::new(false));
        let mut api = Api::new(Arc::new(log), None, Arc::clone(&stop));
        api.loopback = true;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let s = Arc::clone(&stop);
        let api = Arc::new(api);
        std::thread::spawn(move || serve(listener, api, &s));
        let with_host = |host: &str| {
            let mut s = TcpStream::connect(&addr).expect("connect");
            write!(s, "GET /v1/status HTTP/1.1\r\nHost: {host}\r\n\r\n").expect("request");
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).expect("status line");
            line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()).unwrap_or(0)
        };
        assert_eq!(with_host("evil.example:7700"), 403);
        assert_eq!(with_host("127.0.0.1.evil.example"), 403);
        assert_eq!(with_host("localhost:7700"), 200);
        assert_eq!(with_host("127.0.0.1"), 200);
        assert_eq!(with_host("[::1]:7700"), 200);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    #[test]
    fn tokens_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
