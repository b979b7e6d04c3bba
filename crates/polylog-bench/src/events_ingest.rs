//! `events_ingest`: events/s end to end: posted by client threads on the same machine in NDJSON
//! requests of generated traffic, through the HTTP collector (parse, validate, anonymize,
//! categorize, durable append with `fsync = "always"`) and counted by a rollup into its
//! per-minute buckets (flushed to a throwaway Postgres as minutes close), against writing the
//! same request bytes to a file with an fsync per request, in the same run. The time runs until
//! the rollup has counted the last event.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use polylog_events::{Collector, CollectorOptions};
use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions};

use crate::{Opts, ScratchDir};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn post(addr: &str, body: &[u8]) -> Result<(), String> {
    match polylog_events::gen::post(addr, body).map_err(err)? {
        (200, answer) if !answer.contains("\"rejected\":[{") => Ok(()),
        (status, answer) => Err(format!(
            "the collector answered {status}: {}",
            answer.chars().take(300).collect::<String>()
        )),
    }
}

pub fn run(opts: &Opts) -> Result<(), String> {
    let requests: u64 = opts.get("requests", if opts.quick { 100 } else { 1000 })?;
    let per: u64 = opts.get("events-per-request", 1000)?;
    let clients: u64 = opts.get("clients", 4)?;
    let scratch = ScratchDir::new(opts, "events-ingest")?;
    let now = polylog_log::now_ms();
    let mut g = polylog_events::gen::Generator::new(polylog_events::gen::GenOptions::default());
    let mut total = 0;
    let bodies: Vec<Vec<u8>> = (0..requests)
        .map(|_| {
            let (body, n) = g.batch(per, now - 1000, now);
            total += n;
            body
        })
        .collect();
    println!(
        "events_ingest: {total} generated events in {requests} NDJSON requests of ~{per}, {clients} clients"
    );
    let pg = polylog_testkit::PgCluster::start().map_err(err)?;
    pg.create_database("analytics").map_err(err)?;
    let bytes: usize = bodies.iter().map(Vec::len).sum();

    let o = LogOptions {
        fsync: FsyncPolicy::Always,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(scratch.0.join("log"), o).map_err(err)?);
    let mut co = CollectorOptions::new("events.viewability");
    co.events_max = per as usize + 10;
    let rollup = polylog_events::Rollup::new(
        polylog_events::RollupOptions::new(
            "viewability",
            "events.viewability",
            &pg.url("analytics"),
            &["campaign_id", "site_domain", "device", "country"],
        ),
        Arc::clone(&log),
    )
    .map_err(err)?;
    let collector =
        Arc::new(Collector::new(co, Arc::clone(&log), &scratch.0.join("keys")).map_err(err)?);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(err)?;
    let addr = listener.local_addr().map_err(err)?.to_string();
    let stop = AtomicBool::new(false);
    let polylog_secs = std::thread::scope(|scope| -> Result<f64, String> {
        let c = Arc::clone(&collector);
        let stop = &stop;
        scope.spawn(move || c.serve(listener, stop));
        let rollup = &rollup;
        scope.spawn(move || rollup.run(stop));
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
        let collected = started.elapsed().as_secs_f64();
        // Until the rollup has counted every event.
        while result.is_ok() && rollup.status.lock().map_err(err)?.events < total {
            if started.elapsed().as_secs() > 600 {
                result = Err("the rollup did not count every event within 600 s".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "  collected in {collected:.2} s, counted by the rollup {:.2} s later",
            secs - collected
        );
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
        "  polylog: {polylog_secs:.2} s over HTTP, {:.0} MB of requests, every event anonymized, durable and rolled up; write+fsync of the same bytes: {baseline_secs:.2} s",
        bytes as f64 / 1e6
    );
    println!(
        "RESULT events_ingest polylog={p:.0}events/s baseline={b:.0}events/s ratio={:.2}",
        p / b
    );
    Ok(())
}
