//! `report_latency`: a report over six months grouped by campaign (~10K campaigns), from a
//! rollup's stored minutes/hours/days plus its open buckets, against the same aggregation
//! (counts and `count(DISTINCT user)`) over the raw events in Postgres, in the same run on the
//! same events. The figure is the median latency (lower is better); p99 is printed too.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use polylog_events::gen::{GenOptions, Generator};
use polylog_events::{
    Collector, CollectorOptions, Event, EventKind, ReportQuery, Rollup, RollupOptions,
};
use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions, StartAt};
use polylog_postgres::wire::{ConnectParams, Connection};
use polylog_testkit::PgCluster;

use crate::{Opts, ScratchDir};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(opts: &Opts) -> Result<(), String> {
    let events: u64 = opts.get("events", if opts.quick { 200_000 } else { 3_000_000 })?;
    let campaigns: u64 = opts.get("campaigns", if opts.quick { 2_000 } else { 10_000 })?;
    let runs: usize = opts.get("runs", 9)?;
    let days = 182;
    println!("report_latency: {events} events over {days} days, {campaigns} campaigns; {runs} reports each");
    let scratch = ScratchDir::new(opts, "report-latency")?;
    let pg = PgCluster::start().map_err(err)?;
    pg.create_database("analytics").map_err(err)?;
    let o = LogOptions {
        fsync: FsyncPolicy::Never,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(scratch.0.join("log"), o).map_err(err)?);
    let mut co = CollectorOptions::new("events");
    co.site_categories = polylog_events::gen::site_categories().into_iter().collect();
    let collector = Collector::new(co, Arc::clone(&log), &scratch.0.join("keys")).map_err(err)?;

    // Six months of traffic, posted as if live: each request at its own time.
    let started = Instant::now();
    let now = polylog_log::now_ms();
    let from = now - days * 86_400_000;
    let mut g = Generator::new(GenOptions { campaigns, sites: 2_000, users: 200_000, seed: 5 });
    let chunk = 5_000u64;
    let (mut total, mut at) = (0u64, from);
    let step = (now - from) / (events / chunk).max(1) as i64;
    while total < events {
        let end = (at + step).min(now);
        let (body, n) = g.batch(chunk, at, end);
        let a = collector.ingest(&body, false, end + 1_000);
        if a.status != 200 {
            return Err(format!("the collector refused generated events: {}", a.body));
        }
        total += n;
        at = end;
    }
    println!("  {total} events collected in {:.1} s", started.elapsed().as_secs_f64());

    // The raw events into Postgres for the baseline.
    let started = Instant::now();
    let csv = scratch.0.join("raw.csv");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&csv).map_err(err)?);
    let mut stored = 0u64;
    for p in 0..log.describe_topic("events").map_err(err)?.partitions.len() as u32 {
        let mut r = log.reader("events", p, StartAt::Beginning).map_err(err)?;
        loop {
            let batch = r.poll(10_000, Duration::ZERO).map_err(err)?;
            if batch.is_empty() {
                break;
            }
            for rec in batch {
                let e: Event = serde_json::from_slice(rec.value.as_deref().unwrap_or_default())
                    .map_err(err)?;
                let kind = match e.kind {
                    EventKind::Impression => "impression",
                    EventKind::Viewability => "viewability",
                    EventKind::Click => "click",
                };
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{}",
                    e.ts_ms,
                    e.campaign_id,
                    e.device,
                    kind,
                    e.invalid,
                    e.viewable.unwrap_or(false),
                    e.in_view_ms.unwrap_or(0),
                    e.user_hash.as_deref().unwrap_or("")
                )
                .map_err(err)?;
                stored += 1;
            }
        }
    }
    out.flush().map_err(err)?;
    drop(out);
    pg.psql(
        "analytics",
        "CREATE TABLE raw_events (ts_ms bigint, campaign_id text, device text, kind text, invalid bool, \
         viewable bool, in_view_ms bigint, user_hash text)",
    )
    .map_err(err)?;
    let status = std::process::Command::new(pg.bin_dir().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &pg.url("analytics"), "-c"])
        .arg(format!("\\copy raw_events FROM '{}' WITH (FORMAT csv, NULL '')", csv.display()))
        .status()
        .map_err(err)?;
    if !status.success() {
        return Err("psql \\copy of the raw events failed".into());
    }
    pg.psql(
        "analytics",
        "ALTER TABLE raw_events ADD COLUMN ts timestamptz; UPDATE raw_events SET ts = to_timestamp(ts_ms / 1000.0); \
         CREATE INDEX ON raw_events (ts)",
    )
    .map_err(err)?;
    pg.psql("analytics", "VACUUM ANALYZE raw_events").map_err(err)?;
    let _ = std::fs::remove_file(&csv);
    println!(
        "  {stored} raw events loaded into Postgres in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The rollup reads the topic into Postgres.
    let started = Instant::now();
    let mut ro = RollupOptions::new(
        "viewability",
        "events",
        &pg.url("analytics"),
        &["campaign_id", "site_domain", "device", "country"],
    );
    ro.flush_interval = Duration::from_millis(200);
    let rollup = Arc::new(Rollup::new(ro, Arc::clone(&log)).map_err(err)?);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<(), String> {
        let r = Arc::clone(&rollup);
        let stop = &stop;
        let h = scope.spawn(move || r.run(stop));
        let result = (|| {
            loop {
                let st = rollup.status.lock().map_err(err)?.clone();
                if st.state == "failed" {
                    return Err(format!("the rollup failed: {:?}", st.error));
                }
                let through =
                    st.flushed_through.as_deref().map(|t| polylog_events::time::parse_time(t, 0));
                if st.events == stored
                    && through.is_some_and(|t| t.is_ok_and(|t| t >= now - 5 * 60_000))
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let rows = table_rows(&pg)?;
            println!(
                "  rollup built in {:.1} s ({rows}); {} buckets still open",
                started.elapsed().as_secs_f64(),
                rollup.status.lock().map_err(err)?.open_buckets
            );
            let query = format!("from={from}&to={now}&group_by=campaign_id");
            let q = ReportQuery::parse(&rollup, &query, polylog_log::now_ms())?;
            let params = ConnectParams::parse(&pg.url("analytics")).map_err(err)?;
            let mut c = Connection::connect(&params, false).map_err(err)?;
            let sql = format!(
                "SELECT campaign_id, count(*) FILTER (WHERE NOT invalid AND kind = 'impression'), \
                 count(*) FILTER (WHERE NOT invalid AND kind = 'viewability'), \
                 count(*) FILTER (WHERE NOT invalid AND viewable), \
                 count(*) FILTER (WHERE NOT invalid AND kind = 'click'), \
                 coalesce(sum(in_view_ms) FILTER (WHERE NOT invalid), 0), count(*) FILTER (WHERE invalid), \
                 count(DISTINCT user_hash) FILTER (WHERE NOT invalid AND user_hash <> '') \
                 FROM raw_events WHERE ts >= to_timestamp({}) AND ts < to_timestamp({}) GROUP BY campaign_id",
                q.from_ms / 1000,
                q.to_ms / 1000
            );
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let (mut report, mut raw) = (None, None);
            for _ in 0..runs {
                let t = Instant::now();
                report = Some(rollup.report(&q).map_err(|e| format!("{e:?}"))?);
                ours.push(t.elapsed().as_secs_f64() * 1000.0);
                let t = Instant::now();
                raw = Some(c.query(&sql).map_err(err)?);
                theirs.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            // Both say the same.
            let (report, raw) = (report.unwrap_or_else(|| unreachable!()), raw.unwrap_or_default());
            if report.rows.len() != raw.len() {
                return Err(format!(
                    "{} campaigns in the report, {} in the raw aggregation",
                    report.rows.len(),
                    raw.len()
                ));
            }
            let by: std::collections::HashMap<&str, &Vec<Option<String>>> =
                raw.iter().map(|r| (r[0].as_deref().unwrap_or(""), r)).collect();
            let mut worst = 0f64;
            for row in &report.rows {
                let r = by
                    .get(row.dims[0].as_str())
                    .ok_or_else(|| format!("campaign {} missing", row.dims[0]))?;
                let n = |i: usize| r[i].as_deref().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                let a = &row.agg;
                if [a.impressions, a.measurable, a.viewable, a.clicks, a.in_view_ms, a.invalid]
                    != [n(1), n(2), n(3), n(4), n(5), n(6)]
                {
                    return Err(format!(
                        "campaign {}: the report and the raw aggregation differ",
                        row.dims[0]
                    ));
                }
                let exact = n(7) as f64;
                if exact >= 100.0 {
                    worst = worst.max((a.users.count() as f64 - exact).abs() / exact);
                }
            }
            let (p50, p99) = (percentile(&mut ours, 0.5), percentile(&mut ours, 0.99));
            let (b50, b99) = (percentile(&mut theirs, 0.5), percentile(&mut theirs, 0.99));
            println!(
                "  {} campaigns; counts equal to the raw aggregation, distinct users within {:.1}% \
                 (campaigns with ≥100 users; a user counts once per day, the hash key rotating daily)",
                report.rows.len(),
                worst * 100.0
            );
            println!("  polylog: p50 {p50:.1} ms, p99 {p99:.1} ms; raw events in Postgres: p50 {b50:.1} ms, p99 {b99:.1} ms ({runs} runs each, p99 = the slowest)");
            println!(
                "RESULT report_latency polylog={p50:.1}ms baseline={b50:.1}ms ratio={:.3}",
                p50 / b50
            );
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        h.join().map_err(|_| "the rollup panicked".to_string())?.map_err(err)?;
        result
    })
}

fn table_rows(pg: &PgCluster) -> Result<String, String> {
    let out = pg
        .psql(
            "analytics",
            "SELECT (SELECT count(*) FROM viewability_minute) || ' minute, ' || \
             (SELECT count(*) FROM viewability_hour) || ' hour, ' || (SELECT count(*) FROM viewability_day) || ' day rows'",
        )
        .map_err(err)?;
    Ok(out.trim().to_string())
}
