//! The HTTP API (`[api] listen`), as far as it is built: search over the `search` sinks'
//! indexes, and reports over the rollups.
//!
//! - `GET /v1/search/<index>?q=<query>&limit=<n>`: matching documents, best first
//!   (`{"total": n, "hits": [{"id", "version", "score", "doc"}]}`); the query uses the
//!   index's syntax over the documents' fields (`title:rust AND publisher.name:acme`).
//! - `GET /v1/search/<index>/<id>`: one document by its key (the key as JSON, URL-encoded).
//! - `GET /v1/reports/<rollup>?from=&to=&group_by=&interval=&filter=&format=json|csv`: see
//!   `polylog_events::report`.
//!
//! With `api.token` (or `POLYLOG_API_TOKEN`) set, requests need `Authorization: Bearer <token>`.
//! Requests are small GETs: a request head over 16 KiB is refused; at most 64 connections are
//! served at once.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use polylog_events::server::respond;
use polylog_sinks::search::SearchIndexes;
use serde_json::{json, Value};

const HEAD_MAX: usize = 16 * 1024;
const CONNECTIONS_MAX: usize = 64;

pub struct Api {
    pub indexes: SearchIndexes,
    pub rollups: std::collections::BTreeMap<String, Arc<polylog_events::Rollup>>,
    pub token: Option<String>,
}

/// Serves until `stop` is set.
pub fn serve(listener: TcpListener, api: Arc<Api>, stop: &AtomicBool) -> std::io::Result<()> {
    let handler = Arc::new(move |stream: &TcpStream| {
        let _ = handle(stream, &api);
    });
    polylog_events::server::serve(listener, stop, CONNECTIONS_MAX, "API", handler)
}

/// Queries nested deeper than this are refused (the parser's work grows fast with nesting).
const QUERY_NESTING_MAX: usize = 8;

fn handle(stream: &TcpStream, api: &Api) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut reader = BufReader::new(stream.take(HEAD_MAX as u64 + 1));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut auth = None;
    let mut head = request_line.len();
    loop {
        if std::time::Instant::now() > deadline {
            return respond(stream, 408, &json!({"error": "the request head took over 10 s"}));
        }
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        head += line.len();
        if head > HEAD_MAX {
            return respond(stream, 431, &json!({"error": "request head over 16 KiB"}));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_string());
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if let Some(token) = &api.token {
        if auth.as_deref() != Some(&format!("Bearer {token}")) {
            return respond(stream, 401, &json!({"error": "missing or wrong bearer token"}));
        }
    }
    if method != "GET" {
        return respond(
            stream,
            405,
            &json!({"error": format!("{method} is not supported; use GET")}),
        );
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (polylog_events::server::url_decode(k), polylog_events::server::url_decode(v))
        })
        .collect();
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let segments: Vec<String> =
        path.trim_matches('/').split('/').map(polylog_events::server::url_decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let index =
        |name: &str| api.indexes.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned();
    match segments.as_slice() {
        ["v1", "search", name] => {
            let Some(ix) = index(name) else {
                return respond(
                    stream,
                    404,
                    &json!({"error": format!("no search index {name:?}")}),
                );
            };
            let q = param("q").unwrap_or_else(|| "*".into());
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
                return respond(
                    stream,
                    400,
                    &json!({"error": format!("the query nests parentheses deeper than {QUERY_NESTING_MAX}")}),
                );
            }
            let limit = match param("limit").map(|l| l.parse::<usize>()) {
                None => 10,
                Some(Ok(l)) if (1..=1000).contains(&l) => l,
                Some(_) => {
                    return respond(stream, 400, &json!({"error": "limit must be 1 to 1000"}))
                }
            };
            match ix.search(&q, limit) {
                Ok(v) => respond(stream, 200, &v),
                Err(e) => respond(stream, 400, &json!({"error": e.to_string()})),
            }
        }
        ["v1", "search", name, id] => {
            let Some(ix) = index(name) else {
                return respond(
                    stream,
                    404,
                    &json!({"error": format!("no search index {name:?}")}),
                );
            };
            // Keys are JSON; `7` is accepted for `{"id":7}`-style keys only as given.
            let key = serde_json::from_str::<Value>(id)
                .map(|v| v.to_string())
                .unwrap_or_else(|_| id.to_string());
            match ix.get(&key) {
                Ok(Some(v)) => respond(stream, 200, &v),
                Ok(None) => {
                    respond(stream, 404, &json!({"error": format!("no document {key} in {name}")}))
                }
                Err(e) => respond(stream, 400, &json!({"error": e.to_string()})),
            }
        }
        ["v1", "reports", name] => {
            let Some(rollup) = api.rollups.get(*name) else {
                let names: Vec<&str> = api.rollups.keys().map(String::as_str).collect();
                return respond(
                    stream,
                    404,
                    &json!({"error": format!("no rollup {name:?}; the rollups are {names:?}")}),
                );
            };
            let q = match polylog_events::ReportQuery::parse(rollup, query, polylog_log::now_ms()) {
                Ok(q) => q,
                Err(e) => return respond(stream, 400, &json!({ "error": e })),
            };
            match rollup.report(&q) {
                Ok(r) if q.csv => polylog_events::server::respond_bytes(
                    stream,
                    200,
                    "text/csv; charset=utf-8",
                    r.to_csv().as_bytes(),
                ),
                Ok(r) => respond(stream, 200, &r.to_json()),
                Err(polylog_events::ReportError::Bad(e)) => {
                    respond(stream, 400, &json!({ "error": e }))
                }
                Err(polylog_events::ReportError::Unavailable(e)) => {
                    respond(stream, 503, &json!({ "error": e }))
                }
            }
        }
        _ => respond(
            stream,
            404,
            &json!({"error": format!("no route {path}; try /v1/search/<index>?q=... or /v1/reports/<rollup>")}),
        ),
    }
}
