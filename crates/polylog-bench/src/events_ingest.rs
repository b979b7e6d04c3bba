//! `events_ingest`: events/s through the HTTP collector (parse, validate, anonymize,
//! categorize, durable append with `fsync = "always"`), posted by client threads on the same
//! machine in NDJSON requests, against writing the same request bytes to a file with an fsync
//! per request, in the same run. Rollups are not built yet, so they are not in the figure.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use polylog_events::{Collector, CollectorOptions};
use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions};

use crate::{Opts, ScratchDir};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

const UAS: [&str; 4] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Version/17.0 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; SM-X700) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
];

/// One request body of `n` events.
fn request(batch: u64, n: u64, now: i64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let k = batch * n + i;
        let kind = ["impression", "viewability", "viewability", "click"][(k % 4) as usize];
        let _ = writeln!(
            out,
            r#"{{"type":"{kind}","ts":{},"impression_id":"imp-{}","campaign_id":"camp-{}","creative_id":"cr-{}","site_domain":"site{}.example.com","page_url":"https://site{}.example.com/a/{}?utm=x","ip":"10.{}.{}.{}","user_agent":"{}","user_id":"user-{}","ad_format":"display","ad_size":"300x250","in_view_pct":{},"in_view_ms":{}}}"#,
            now - (k % 1000) as i64,
            k / 4,
            k % 997,
            k % 31,
            k % 211,
            k % 211,
            k % 50,
            k % 256,
            (k / 256) % 256,
            k % 7,
            UAS[(k % 4) as usize],
            k % 100_003,
            k % 101,
            k % 3000
        );
    }
    out
}

fn post(addr: &str, body: &[u8]) -> Result<(), String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(err)?;
    write!(s, "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len())
        .map_err(err)?;
    s.write_all(body).map_err(err)?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(err)?;
    if !out.starts_with("HTTP/1.1 200") || out.contains("\"rejected\":[{") {
        return Err(format!(
            "the collector answered: {}",
            out.chars().take(300).collect::<String>()
        ));
    }
    Ok(())
}

pub fn run(opts: &Opts) -> Result<(), String> {
    let requests: u64 = opts.get("requests", if opts.quick { 100 } else { 1000 })?;
    let per: u64 = opts.get("events-per-request", 1000)?;
    let clients: u64 = opts.get("clients", 4)?;
    let total = requests * per;
    println!(
        "events_ingest: {total} events in {requests} NDJSON requests of {per}, {clients} clients"
    );
    let scratch = ScratchDir::new(opts, "events-ingest")?;
    let now = polylog_log::now_ms();
    let bodies: Vec<Vec<u8>> = (0..requests).map(|b| request(b, per, now)).collect();
    let bytes: usize = bodies.iter().map(Vec::len).sum();

    let o = LogOptions {
        fsync: FsyncPolicy::Always,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(scratch.0.join("log"), o).map_err(err)?);
    let mut co = CollectorOptions::new("events.viewability");
    co.events_max = per as usize;
    let collector =
        Arc::new(Collector::new(co, Arc::clone(&log), &scratch.0.join("keys")).map_err(err)?);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(err)?;
    let addr = listener.local_addr().map_err(err)?.to_string();
    let stop = AtomicBool::new(false);
    let polylog_secs = std::thread::scope(|scope| -> Result<f64, String> {
        let c = Arc::clone(&collector);
        let stop = &stop;
        scope.spawn(move || c.serve(listener, stop));
        let started = Instant::now();
        let workers: Vec<_> = (0..clients)
            .map(|w| {
                let (bodies, addr) = (&bodies, &addr);
                scope.spawn(move || -> Result<(), String> {
                    for b in bodies.iter().skip(w as usize).step_by(clients as usize) {
                        post(addr, b)?;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut result = Ok(());
        for w in workers {
            if let Err(e) = w.join().map_err(|_| "client panicked".to_string()).and_then(|r| r) {
                result = Err(e);
            }
        }
        let secs = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::SeqCst);
        result.map(|()| secs)
    })?;
    let accepted = collector.stats.accepted.load(Ordering::SeqCst);
    if accepted != total {
        return Err(format!("{accepted} events accepted, expected {total}"));
    }

    // The baseline: the same request bytes to a file, an fsync per request.
    let path = scratch.0.join("baseline.ndjson");
    let mut f = std::fs::File::create(&path).map_err(err)?;
    let started = Instant::now();
    for b in &bodies {
        f.write_all(b).map_err(err)?;
        f.sync_data().map_err(err)?;
    }
    let baseline_secs = started.elapsed().as_secs_f64();
    let (p, b) = (total as f64 / polylog_secs, total as f64 / baseline_secs);
    println!(
        "  polylog: {polylog_secs:.2} s over HTTP, {:.0} MB of requests, every event anonymized and durable; write+fsync of the same bytes: {baseline_secs:.2} s",
        bytes as f64 / 1e6
    );
    println!(
        "RESULT events_ingest polylog={p:.0}events/s baseline={b:.0}events/s ratio={:.2}",
        p / b
    );
    Ok(())
}
