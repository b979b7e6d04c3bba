//! Rollups against a real Postgres: reports equal the same aggregation computed from the raw
//! stored events, with the stored and the open buckets combined; late events are counted and
//! kept out; nothing identifying reaches Postgres or a report.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use polylog_events::gen::{GenOptions, Generator};
use polylog_events::{
    Collector, CollectorOptions, Event, EventKind, ReportQuery, Rollup, RollupOptions,
};
use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions, StartAt};
use polylog_testkit::{PgCluster, TempDir};

/// The exact figures of a group, from raw events.
#[derive(Debug, Default, Clone, PartialEq)]
struct Exact {
    impressions: u64,
    measurable: u64,
    viewable: u64,
    clicks: u64,
    in_view_ms: u64,
    invalid: u64,
    users: HashSet<String>,
}

fn exact(events: &[Event], key: impl Fn(&Event) -> Option<String>) -> BTreeMap<String, Exact> {
    let mut out: BTreeMap<String, Exact> = BTreeMap::new();
    for e in events {
        let Some(k) = key(e) else { continue };
        let x = out.entry(k).or_default();
        if e.invalid {
            x.invalid += 1;
            continue;
        }
        match e.kind {
            EventKind::Impression => x.impressions += 1,
            EventKind::Viewability => {
                x.measurable += 1;
                x.viewable += e.viewable.unwrap_or(false) as u64;
                x.in_view_ms += e.in_view_ms.unwrap_or(0);
            }
            EventKind::Click => x.clicks += 1,
        }
        if let Some(u) = &e.user_hash {
            x.users.insert(u.clone());
        }
    }
    out
}

fn stored_events(log: &dyn Log, topic: &str) -> Vec<Event> {
    let mut out = Vec::new();
    for p in 0..log.describe_topic(topic).expect("topic").partitions.len() as u32 {
        let mut r = log.reader(topic, p, StartAt::Beginning).expect("reader");
        loop {
            let batch = r.poll(10_000, Duration::ZERO).expect("poll");
            if batch.is_empty() {
                break;
            }
            for rec in batch {
                out.push(
                    serde_json::from_slice(rec.value.as_deref().expect("value")).expect("event"),
                );
            }
        }
    }
    out
}

/// Compares a report's rows (keyed by `key` of each row) with the exact figures.
fn check(
    report: &serde_json::Value,
    key: impl Fn(&serde_json::Value) -> String,
    want: &BTreeMap<String, Exact>,
) {
    let rows = report["rows"].as_array().expect("rows");
    let got: BTreeMap<String, &serde_json::Value> = rows.iter().map(|r| (key(r), r)).collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "the report's groups"
    );
    let bound = 3.0 * polylog_events::hll::STANDARD_ERROR;
    for (k, x) in want {
        let r = got[k];
        for (field, v) in [
            ("impressions", x.impressions),
            ("measurable", x.measurable),
            ("viewable", x.viewable),
            ("clicks", x.clicks),
            ("in_view_ms", x.in_view_ms),
            ("invalid", x.invalid),
        ] {
            assert_eq!(r[field].as_u64(), Some(v), "{field} of {k}: {r}");
        }
        let (est, n) = (r["users"].as_u64().expect("users") as f64, x.users.len() as f64);
        assert!((est - n).abs() <= bound * n + 1.0, "users of {k}: {est} for {n} distinct");
    }
}

struct Setup {
    _dir: TempDir,
    pg: PgCluster,
    log: Arc<dyn Log>,
    collector: Collector,
}

fn setup() -> Setup {
    let dir = TempDir::new("rollup");
    let pg = PgCluster::start().expect("postgres");
    pg.create_database("analytics").expect("db");
    let o = LogOptions {
        fsync: FsyncPolicy::Never,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.path().join("log"), o).expect("log"));
    let mut opts = CollectorOptions::new("events");
    opts.site_categories = polylog_events::gen::site_categories().into_iter().collect();
    let collector =
        Collector::new(opts, Arc::clone(&log), &dir.path().join("keys")).expect("collector");
    Setup { _dir: dir, pg, log, collector }
}

fn ingest(c: &Collector, body: &[u8], now: i64) {
    for chunk in body.split_inclusive(|&b| b == b'\n').collect::<Vec<_>>().chunks(5_000) {
        let a = c.ingest(&chunk.concat(), false, now);
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["rejected"].as_array().map(Vec::len), Some(0), "{}", a.body);
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn report(r: &Rollup, query: &str) -> serde_json::Value {
    let q = ReportQuery::parse(r, query, polylog_log::now_ms()).expect("query");
    r.report(&q).unwrap_or_else(|e| panic!("report {query}: {e:?}")).to_json()
}

#[test]
fn reports_equal_the_raw_aggregation_stored_and_open_buckets_together() {
    let s = setup();
    let now = polylog_log::now_ms();
    let minute = 60_000;
    // Three days of history, then the last two minutes (still open when reported).
    let mut g = Generator::new(GenOptions { campaigns: 40, sites: 30, users: 3_000, seed: 7 });
    let (old, _) = g.batch(30_000, now - 3 * 86_400_000, now - 10 * minute);
    ingest(&s.collector, &old, now);
    let (recent, _) = g.batch(3_000, now - 2 * minute, now);
    ingest(&s.collector, &recent, now);
    let events = stored_events(&*s.log, "events");

    let mut opts = RollupOptions::new(
        "views_rollup",
        "events",
        &s.pg.url("analytics"),
        &["campaign_id", "device", "site_category"],
    );
    opts.lateness = Duration::from_secs(30);
    opts.flush_interval = Duration::from_millis(50);
    opts.rows_per_statement = 300;
    let rollup = Arc::new(Rollup::new(opts, Arc::clone(&s.log)).expect("rollup"));
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let (r, stop) = (Arc::clone(&rollup), Arc::clone(&stop));
        std::thread::spawn(move || r.run(&stop))
    };
    wait_for("the rollup to read everything", Duration::from_secs(60), || {
        let st = rollup.status.lock().expect("ok").clone();
        assert!(st.error.is_none(), "{st:?}");
        st.events == events.len() as u64 && st.lag_records == 0 && st.flushes > 0
    });
    // The old minutes are stored; the last ones are only in memory.
    wait_for("the history to be flushed", Duration::from_secs(30), || {
        s.pg.psql("analytics", "SELECT count(*) FROM polylog_rollups WHERE flushed_through >= 0")
            .map(|o| o.trim() == "1")
            .unwrap_or(false)
            && rollup.status.lock().expect("ok").flushed_through.as_deref().is_some_and(|f| {
                polylog_events::time::parse_time(f, 0).expect("ok") >= now - 12 * minute
            })
    });
    let stored: u64 =
        s.pg.psql(
            "analytics",
            "SELECT sum(impressions + measurable + clicks + invalid) FROM views_rollup_minute",
        )
        .expect("sum")
        .trim()
        .parse()
        .expect("number");
    assert!(stored > 0 && stored < events.len() as u64, "{stored} of {} stored", events.len());

    let range = format!("from={}&to={}", now - 4 * 86_400_000, now);
    // Totals by campaign and device over the whole range.
    let r = report(&rollup, &format!("{range}&group_by=campaign_id,device"));
    check(
        &r,
        |row| format!("{}/{}", row["campaign_id"], row["device"]).replace('"', ""),
        &exact(&events, |e| Some(format!("{}/{}", e.campaign_id, e.device))),
    );
    // Per hour, from an odd minute, filtered to two devices.
    let from = now - 50 * 3_600_000 - 17 * minute;
    let r = report(
        &rollup,
        &format!(
            "from={from}&to={now}&interval=hour&filter=device:mobile,device:tablet&group_by=device"
        ),
    );
    let lo = from.div_euclid(minute) * minute;
    check(
        &r,
        |row| {
            format!("{} {}", row["time"].as_str().expect("ok"), row["device"].as_str().expect("ok"))
        },
        &exact(&events, |e| {
            (e.ts_ms >= lo && (e.device == "mobile" || e.device == "tablet")).then(|| {
                let hour = e.ts_ms.div_euclid(3_600_000) * 3_600_000;
                format!("{} {}", polylog_events::time::format_ms(hour), e.device)
            })
        }),
    );
    // Per day by site category, and the grand total as CSV.
    let r = report(&rollup, &format!("{range}&interval=day&group_by=site_category"));
    check(
        &r,
        |row| {
            format!(
                "{} {}",
                row["time"].as_str().expect("ok"),
                row["site_category"].as_str().expect("ok")
            )
        },
        &exact(&events, |e| {
            let day = e.ts_ms.div_euclid(86_400_000) * 86_400_000;
            Some(format!(
                "{} {}",
                polylog_events::time::format_ms(day),
                e.site_category.clone().unwrap_or_default()
            ))
        }),
    );
    let q = ReportQuery::parse(&rollup, &format!("{range}&format=csv"), polylog_log::now_ms())
        .expect("ok");
    let csv = rollup.report(&q).expect("csv").to_csv();
    let all = exact(&events, |_| Some(String::new()));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[0].starts_with("impressions,measurable,viewable,viewability,clicks"), "{csv}");
    assert!(
        lines[1].starts_with(&format!(
            "{},{},{},",
            all[""].impressions, all[""].measurable, all[""].viewable
        )),
        "{csv}"
    );

    // Hours and days hold exactly the minutes they cover.
    let sums = |t: &str| {
        s.pg.psql(
            "analytics",
            &format!("SELECT sum(impressions), sum(measurable), sum(viewable), sum(clicks), sum(in_view_ms), sum(invalid), count(DISTINCT campaign_id) FROM views_rollup_{t}"),
        )
        .expect("sums")
    };
    assert_eq!(sums("minute"), sums("hour"));
    assert_eq!(sums("minute"), sums("day"));
    let parts =
        s.pg.psql(
            "analytics",
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'views_rollup_minute'::regclass",
        )
        .expect("ok");
    assert!(parts.trim().parse::<u32>().expect("ok") >= 1, "monthly partitions: {parts}");

    // An event for a minute already stored is late: counted, not added.
    let before = report(&rollup, &range);
    let (late, n_late) = g.batch(5, now - 3_600_000, now - 3_600_000 + 1);
    ingest(&s.collector, &late, now);
    wait_for("the late events", Duration::from_secs(20), || {
        report(&rollup, &range)["late_events"].as_u64() == Some(n_late)
    });
    assert_eq!(report(&rollup, &range)["rows"], before["rows"]);

    // The privacy canary: no user id, IP or query string in Postgres or in a report.
    let dump = s
        .pg
        .psql(
            "analytics",
            "SELECT string_agg(t::text, E'\\n') FROM (SELECT v::text AS t FROM views_rollup_minute v \
             UNION ALL SELECT h::text FROM views_rollup_hour h UNION ALL SELECT d::text FROM views_rollup_day d) x",
        )
        .expect("dump");
    let reports = format!(
        "{before}{}",
        report(&rollup, &format!("{range}&group_by=campaign_id,device,site_category"))
    );
    let mut secrets: HashSet<String> =
        ["user-", "utm_source", "uid=", "2001:db8"].map(String::from).into();
    for line in old.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).expect("ok");
        secrets.insert(v["ip"].as_str().expect("ok").to_string());
    }
    for text in [&dump, &reports] {
        for needle in &secrets {
            assert!(!text.contains(needle.as_str()), "{needle:?} found");
        }
    }
    stop.store(true, Ordering::SeqCst);
    runner.join().expect("ok").expect("rollup run");
}

#[test]
fn a_rollup_restarted_anywhere_counts_every_event_once() {
    let s = setup();
    let now = polylog_log::now_ms();
    let mut g = Generator::new(GenOptions { campaigns: 20, sites: 10, users: 500, seed: 11 });
    let (body, _) = g.batch(20_000, now - 6 * 3_600_000, now - 60_000);
    ingest(&s.collector, &body, now);
    let events = stored_events(&*s.log, "events");
    let want = exact(&events, |e| Some(e.campaign_id.clone()));
    let make = || {
        let mut opts = RollupOptions::new("r", "events", &s.pg.url("analytics"), &["campaign_id"]);
        opts.lateness = Duration::from_secs(5);
        opts.flush_interval = Duration::from_millis(5);
        opts.rows_per_statement = 50;
        Arc::new(Rollup::new(opts, Arc::clone(&s.log)).expect("rollup"))
    };
    // Stopped (not killed: the crash test does that with a process) at many points of its
    // reading and flushing, then once more to the end.
    let mut rng = polylog_testkit::Rng::from_env("rollup_restart");
    for _ in 0..8 {
        let r = make();
        let stop = Arc::new(AtomicBool::new(false));
        let h = {
            let (r, stop) = (Arc::clone(&r), Arc::clone(&stop));
            std::thread::spawn(move || r.run(&stop))
        };
        std::thread::sleep(Duration::from_millis(20 + rng.below(200)));
        stop.store(true, Ordering::SeqCst);
        h.join().expect("ok").expect("run");
    }
    let r = make();
    let stop = Arc::new(AtomicBool::new(false));
    let h = {
        let (r, stop) = (Arc::clone(&r), Arc::clone(&stop));
        std::thread::spawn(move || r.run(&stop))
    };
    let range = format!("from={}&to={now}", now - 86_400_000);
    let total: u64 = want.values().map(|x| x.impressions).sum();
    wait_for("the rollup to catch up", Duration::from_secs(60), || {
        r.status.lock().expect("ok").state == "running"
            && report(&r, &range)["rows"][0]["impressions"].as_u64() == Some(total)
    });
    let rep = report(&r, &format!("{range}&group_by=campaign_id"));
    check(&rep, |row| row["campaign_id"].as_str().expect("ok").to_string(), &want);
    assert_eq!(rep["late_events"], 0);
    // A second process on the same rollup waits instead of writing too.
    let other = make();
    let stop2 = Arc::new(AtomicBool::new(false));
    let h2 = {
        let (o, stop2) = (Arc::clone(&other), Arc::clone(&stop2));
        std::thread::spawn(move || o.run(&stop2))
    };
    wait_for("the second rollup to wait", Duration::from_secs(10), || {
        other
            .status
            .lock()
            .expect("ok")
            .error
            .as_deref()
            .is_some_and(|e| e.contains("another process"))
    });
    stop2.store(true, Ordering::SeqCst);
    h2.join().expect("ok").expect("second");
    stop.store(true, Ordering::SeqCst);
    h.join().expect("ok").expect("run");
}

#[test]
fn a_changed_rollup_definition_is_refused_with_the_way_out() {
    let s = setup();
    let url = s.pg.url("analytics");
    let run = |dims: &[&str]| {
        let r = Rollup::new(RollupOptions::new("x", "events", &url, dims), Arc::clone(&s.log))
            .expect("ok");
        let stop = AtomicBool::new(false);
        std::thread::scope(|sc| {
            let h = sc.spawn(|| r.run(&stop));
            wait_for("the rollup to start or fail", Duration::from_secs(20), || {
                let st = r.status.lock().expect("ok").state.clone();
                st == "running" || st == "failed" || st == "waiting"
            });
            stop.store(true, Ordering::SeqCst);
            h.join().expect("ok")
        })
    };
    run(&["campaign_id"]).expect("first definition");
    let e = run(&["campaign_id", "device"]).expect_err("changed dimensions");
    assert!(e.to_string().contains("give the changed rollup a new name"), "{e}");
    let bad =
        Rollup::new(RollupOptions::new("x", "events", &url, &["user_id"]), Arc::clone(&s.log));
    assert!(bad.err().expect("ok").to_string().contains("unknown dimension \"user_id\""));
}
