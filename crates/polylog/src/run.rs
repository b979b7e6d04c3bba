//! `polylog run` and `polylog status`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use polylog_log::Log;
use polylog_postgres::wire::{ConnectParams, Connection};
use polylog_postgres::{PostgresSource, SourceOptions, SourceStatus};
use polylog_sinks::search::SearchIndexes;
use polylog_sinks::{Sink, StartFrom};
use polylog_views::{View, ViewError, ViewOptions};

use crate::config::{Config, SourceConfig};
use crate::topics::print_table;

/// How often `run` writes the status file that `polylog status` reads.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

fn status_path(config: &Config) -> PathBuf {
    config.data_dir.join("status").join("sources.json")
}

fn sources(
    config: &Config,
    log: Arc<dyn Log>,
    progress: bool,
) -> anyhow::Result<Vec<(String, PostgresSource)>> {
    let mut out = Vec::new();
    for (name, s) in &config.sources {
        let SourceConfig::Postgres(pg) = s;
        let opts = SourceOptions {
            state_dir: config.data_dir.join("sources").join(name),
            partitions: config.log.partitions,
            progress,
        };
        let src = PostgresSource::new(name, pg.clone(), Arc::clone(&log), opts)?;
        out.push((name.clone(), src));
    }
    Ok(out)
}

fn sinks(
    config: &Config,
    log: Arc<dyn Log>,
    indexes: &SearchIndexes,
) -> anyhow::Result<Vec<(String, Sink)>> {
    let mut out = Vec::new();
    for (name, s) in &config.sinks {
        let sink = Sink::new(name, s.clone(), Arc::clone(&log))?
            .with_search(config.data_dir.join("search"), Arc::clone(indexes))
            .shared(config.log.scale_out);
        out.push((name.clone(), sink));
    }
    Ok(out)
}

/// The API's bearer token: `api.token`, else `POLYLOG_API_TOKEN`.
pub fn api_token(config: &Config) -> Option<String> {
    config
        .api
        .token
        .clone()
        .or_else(|| std::env::var("POLYLOG_API_TOKEN").ok())
        .filter(|t| !t.is_empty())
}

fn views(config: &Config, log: Arc<dyn Log>) -> anyhow::Result<Vec<(String, View)>> {
    let mut out = Vec::new();
    for (name, v) in &config.views {
        let mut opts = ViewOptions::new(config.data_dir.join("views").join(name));
        opts.share = config.log.scale_out;
        out.push((name.clone(), View::new(name, v, Arc::clone(&log), opts)?));
    }
    Ok(out)
}

/// Runs every configured source, then every view and sink, until Ctrl-C / SIGTERM or a fatal
/// error.
pub fn run(config: &Config) -> anyhow::Result<()> {
    if config.sources.is_empty()
        && config.views.is_empty()
        && config.sinks.is_empty()
        && config.collector.is_none()
        && config.rollups.is_empty()
    {
        bail!("nothing to run: the config has no [sources.*], [views.*], [sinks.*], [collector] or [rollups.*] table");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing a signal handler")?;
    }
    run_with(config, stop)
}

/// Runs every configured source, view and sink until `stop` is set or a fatal error.
pub fn run_with(config: &Config, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let log: Arc<dyn Log> = crate::open_log(config)?;
    let progress = std::io::stderr().is_terminal();
    let srcs = sources(config, Arc::clone(&log), progress)?;
    let statuses: Vec<(String, Arc<Mutex<SourceStatus>>)> =
        srcs.iter().map(|(n, s)| (n.clone(), Arc::clone(&s.status))).collect();
    let views = views(config, Arc::clone(&log))?;
    let indexes: SearchIndexes = Arc::default();
    let sinks = sinks(config, Arc::clone(&log), &indexes)?;
    let mut rollups = BTreeMap::new();
    for (name, r) in &config.rollups {
        let rollup = polylog_events::Rollup::new(r.options(name), Arc::clone(&log))
            .map_err(|e| anyhow::anyhow!("rollup {name}: {e}"))?;
        rollups.insert(name.clone(), Arc::new(rollup));
    }
    // The HTTP API: with an `[api]` table, or when there are indexes or reports to serve.
    let serves = |s: &Sink| matches!(s.cfg, polylog_sinks::SinkConfig::Search(_));
    let listener = if config.api.configured
        || !rollups.is_empty()
        || sinks.iter().any(|(_, s)| serves(s))
    {
        for (_, s) in &sinks {
            if serves(s) {
                s.search_index()?;
            }
        }
        let l = std::net::TcpListener::bind(&config.api.listen)
            .with_context(|| format!("`api.listen`: cannot listen on {}", config.api.listen))?;
        tracing::info!("API on http://{}/ (status, metrics, changes, topics)", config.api.listen);
        Some(l)
    } else {
        None
    };
    let mut api = crate::api::Api::new(Arc::clone(&log), api_token(config), Arc::clone(&stop));
    api.indexes = Arc::clone(&indexes);
    api.rollups = rollups.clone();
    (api.feed_topics, api.feed_skip) = feed_topics(config);
    api.loopback = config
        .api
        .listen
        .parse::<std::net::SocketAddr>()
        .map_or(config.api.listen.starts_with("localhost:"), |a| a.ip().is_loopback());
    let api = Arc::new(api);
    let collector = match &config.collector {
        None => None,
        Some(c) => {
            let mut opts = polylog_events::CollectorOptions::new(&c.topic);
            opts.partitions = config.log.partitions.max(1);
            opts.body_max = c.body_max_bytes;
            opts.events_max = c.events_max;
            opts.keep_days = c.keep_key_days;
            opts.site_categories = c.site_categories.clone();
            if let Some(path) = &c.geoip_db {
                let db = polylog_events::geo::GeoDb::open(path)
                    .map_err(|e| anyhow::anyhow!("`collector.geoip_db`: {e}"))?;
                opts.geo = Some(Arc::new(db));
            }
            let collector = polylog_events::Collector::new(
                opts,
                Arc::clone(&log),
                &config.data_dir.join("collector"),
            )?;
            let l = std::net::TcpListener::bind(&c.listen)
                .with_context(|| format!("`collector.listen`: cannot listen on {}", c.listen))?;
            tracing::info!("collector on http://{}/v1/events, writing {}", c.listen, c.topic);
            Some((Arc::new(collector), l))
        }
    };
    let collector_stats = collector.as_ref().map(|(c, _)| Arc::clone(c));
    let failed = Mutex::new(Vec::new());
    let fail = |what: String| {
        tracing::error!("{what}");
        failed.lock().unwrap_or_else(|e| e.into_inner()).push(what);
        stop.store(true, Ordering::SeqCst);
    };
    // Sources create their topics as they start; a view waits for its topics while a
    // source is still starting (or retrying a connection).
    let sources_starting = || {
        statuses.iter().any(|(_, s)| {
            let st = s.lock().unwrap_or_else(|e| e.into_inner());
            st.state == "starting" || st.state == "retrying"
        })
    };
    let slots = watch_slots(config, &statuses, Arc::clone(&stop));
    std::thread::scope(|scope| {
        for (name, src) in &srcs {
            let (stop, fail) = (&stop, &fail);
            scope.spawn(move || {
                tracing::info!("source {name}: starting (slot {})", src.slot_name());
                if let Err(e) = src.run(stop) {
                    fail(format!("source {name} stopped: {e}"));
                }
            });
        }
        for (name, view) in &views {
            let (stop, fail, sources_starting) = (&stop, &fail, &sources_starting);
            scope.spawn(move || {
                loop {
                    match view.check() {
                        Ok(()) => break,
                        Err(ViewError::MissingTopic(_)) if sources_starting() => {}
                        Err(e) => return fail(format!("view {name}: {e}")),
                    }
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                tracing::info!("view {name}: writing {}", view.spec.output_topic());
                if let Err(e) = view.run(stop) {
                    fail(format!("view {name} stopped: {e}"));
                }
            });
        }
        if let Some((collector, listener)) = collector {
            let (stop, fail) = (&stop, &fail);
            scope.spawn(move || {
                if let Err(e) = collector.serve(listener, stop) {
                    fail(format!("the collector stopped: {e}"));
                }
            });
        }
        if let Some(listener) = listener {
            let (stop, fail, api) = (&stop, &fail, Arc::clone(&api));
            scope.spawn(move || {
                if let Err(e) = crate::api::serve(listener, api, stop) {
                    fail(format!("the API stopped: {e}"));
                }
            });
        }
        for (name, rollup) in &rollups {
            let (stop, fail) = (&stop, &fail);
            scope.spawn(move || {
                tracing::info!(
                    "rollup {name}: {} into {}_minute/_hour/_day",
                    rollup.opts.topic,
                    rollup.opts.table
                );
                if let Err(e) = rollup.run(stop) {
                    fail(format!("rollup {name} stopped: {e}"));
                }
            });
        }
        for (name, sink) in &sinks {
            let (stop, fail) = (&stop, &fail);
            scope.spawn(move || {
                tracing::info!("sink {name}: writing {}", sink.cfg.topics().join(", "));
                if let Err(e) = sink.run(stop, false) {
                    fail(format!("sink {name} stopped: {e}"));
                }
            });
        }
        scope.spawn(|| loop {
            let stopping = stop.load(Ordering::SeqCst);
            let slots = slots.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let body = status_json(
                &statuses,
                &views,
                &sinks,
                collector_stats.as_deref(),
                &rollups,
                &slots,
            );
            write_status(config, &body);
            api.set_status(body);
            if stopping {
                break;
            }
            std::thread::sleep(STATUS_INTERVAL);
        });
    });
    let failed = failed.into_inner().unwrap_or_else(|e| e.into_inner());
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    tracing::info!("stopped");
    Ok(())
}

/// The change feed's default topics: every source's topics but its transaction and schema
/// topics, and every view's output.
fn feed_topics(config: &Config) -> (Vec<String>, Vec<String>) {
    let (mut follow, mut skip) = (Vec::new(), Vec::new());
    for (name, s) in &config.sources {
        let SourceConfig::Postgres(pg) = s;
        let prefix = pg.topic_prefix.clone().unwrap_or_else(|| name.clone());
        follow.push(format!("{prefix}.*"));
        skip.push(format!("{prefix}.transaction"));
        skip.push(format!("{prefix}.schema-history"));
    }
    for name in config.views.keys() {
        follow.push(format!("views.{name}"));
    }
    (follow, skip)
}

/// Each source's slot: its `wal_status` and the WAL it holds back, by source name.
type Slots = Arc<Mutex<BTreeMap<String, serde_json::Value>>>;

/// Reads each source's slot from Postgres every 5 s (not every second: it is a connection
/// each time) and whenever a source's state changes (a slot appears as a source starts), on a
/// thread of its own: a Postgres that does not answer holds neither the status nor a stop.
fn watch_slots(
    config: &Config,
    sources: &[(String, Arc<Mutex<SourceStatus>>)],
    stop: Arc<AtomicBool>,
) -> Slots {
    let slots = Slots::default();
    let targets: Vec<(String, String, String, Arc<Mutex<SourceStatus>>)> = sources
        .iter()
        .filter_map(|(name, status)| {
            let SourceConfig::Postgres(pg) = config.sources.get(name)?;
            let slot =
                pg.slot.clone().unwrap_or_else(|| polylog_postgres::default_object_name(name));
            Some((name.clone(), pg.url.clone(), slot, Arc::clone(status)))
        })
        .collect();
    if targets.is_empty() {
        return slots;
    }
    let shared = Arc::clone(&slots);
    std::thread::spawn(move || {
        let mut states = Vec::new();
        let mut checked: Option<std::time::Instant> = None;
        while !stop.load(Ordering::SeqCst) {
            let now: Vec<String> = targets
                .iter()
                .map(|t| t.3.lock().unwrap_or_else(|e| e.into_inner()).state.clone())
                .collect();
            if checked.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) || now != states {
                states = now;
                checked = Some(std::time::Instant::now());
                for (name, url, slot, _) in &targets {
                    let v = match slot_lag(url, slot) {
                        Ok(Some((wal_status, lag))) => {
                            serde_json::json!({"name": slot, "state": wal_status, "lag_bytes": lag})
                        }
                        Ok(None) => serde_json::json!({"name": slot, "state": "missing"}),
                        Err(e) => {
                            serde_json::json!({"name": slot, "state": "unreachable", "error": e.to_string()})
                        }
                    };
                    shared.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), v);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    slots
}

/// What `/v1/status` answers and the status file holds.
fn status_json(
    statuses: &[(String, Arc<Mutex<SourceStatus>>)],
    views: &[(String, View)],
    sinks: &[(String, Sink)],
    collector: Option<&polylog_events::Collector>,
    rollups: &BTreeMap<String, Arc<polylog_events::Rollup>>,
    slots: &BTreeMap<String, serde_json::Value>,
) -> serde_json::Value {
    fn json_of<T: serde::Serialize>(v: &Mutex<T>) -> serde_json::Value {
        serde_json::to_value(&*v.lock().unwrap_or_else(|e| e.into_inner())).unwrap_or_default()
    }
    let sources: serde_json::Map<String, serde_json::Value> = statuses
        .iter()
        .map(|(n, s)| {
            let mut v = json_of(s);
            v["slot"] = slots.get(n).cloned().unwrap_or_default();
            v["lag_seconds"] = serde_json::json!(v["behind_ms"].as_f64().unwrap_or(0.0) / 1000.0);
            (n.clone(), v)
        })
        .collect();
    // Seconds behind: for a view or sink with lag, since the newest record it applied was
    // written (the next one is at most that old); 0 without lag.
    let now = polylog_log::now_ms();
    let behind = |mut v: serde_json::Value, at: &str| {
        let lag = v["lag"].as_u64().unwrap_or(0);
        v["lag_seconds"] = match v[at].as_i64() {
            _ if lag == 0 => serde_json::json!(0.0),
            Some(t) if t > 0 => serde_json::json!((now - t).max(0) as f64 / 1000.0),
            _ => serde_json::Value::Null,
        };
        v
    };
    let views: serde_json::Map<String, serde_json::Value> =
        views.iter().map(|(n, v)| (n.clone(), behind(json_of(&v.status), "applied_ms"))).collect();
    let sinks: serde_json::Map<String, serde_json::Value> =
        sinks.iter().map(|(n, s)| (n.clone(), behind(json_of(&s.status), "written_ms"))).collect();
    let rollups: serde_json::Map<String, serde_json::Value> =
        rollups.iter().map(|(n, r)| (n.clone(), json_of(&r.status))).collect();
    serde_json::json!({
        "updated_ms": polylog_log::now_ms(),
        "sources": sources,
        "views": views,
        "sinks": sinks,
        "rollups": rollups,
        "collector": collector.map(|c| serde_json::json!({
            "requests": c.stats.requests.load(Ordering::Relaxed),
            "accepted": c.stats.accepted.load(Ordering::Relaxed),
            "rejected": c.stats.rejected.load(Ordering::Relaxed),
        })),
    })
}

fn write_status(config: &Config, body: &serde_json::Value) {
    let path = status_path(config);
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::create_dir_all(path.parent().unwrap_or(&config.data_dir))
        .and_then(|()| std::fs::write(&tmp, serde_json::to_vec_pretty(body).unwrap_or_default()))
        .and_then(|()| std::fs::rename(&tmp, &path));
}

/// Prints each source's state (as the running process last reported it) and its slot's lag,
/// read from Postgres, then each view's state and lag.
/// `polylog status` options.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Wait until this sink has written every change the sources had captured up to now
    /// (every source's current Postgres LSN), then exit 0: the signal for a cutover.
    #[arg(long, value_name = "SINK")]
    wait_caught_up: Option<String>,
    /// Give up waiting after this many seconds (exit 1).
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    timeout: u64,
}

pub fn status(config: &Config, args: &StatusArgs) -> anyhow::Result<()> {
    if let Some(sink) = &args.wait_caught_up {
        return wait_caught_up(config, sink, Duration::from_secs(args.timeout));
    }
    if config.sources.is_empty()
        && config.views.is_empty()
        && config.sinks.is_empty()
        && config.collector.is_none()
        && config.rollups.is_empty()
    {
        println!("no sources, views, sinks, collector or rollups configured");
        return Ok(());
    }
    let reported: serde_json::Value = std::fs::read(status_path(config))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let age_ms = reported["updated_ms"].as_i64().map(|t| polylog_log::now_ms() - t);
    let running = age_ms.is_some_and(|a| a < 5_000);
    let mut rows = vec![[
        "SOURCE",
        "STATE",
        "SNAPSHOT",
        "FLUSHED LSN",
        "SLOT",
        "SLOT LAG",
        "EVENTS",
        "LAST ERROR",
    ]
    .map(String::from)
    .to_vec()];
    for (name, s) in &config.sources {
        let SourceConfig::Postgres(pg) = s;
        let r = &reported["sources"][name];
        let state = if running {
            r["state"].as_str().unwrap_or("?").to_string()
        } else {
            "not running".into()
        };
        let slot = pg.slot.clone().unwrap_or_else(|| polylog_postgres::default_object_name(name));
        let (slot_state, lag) = match slot_lag(&pg.url, &slot) {
            Ok(Some((wal_status, lag))) => (wal_status, crate::topics::human_bytes(lag)),
            Ok(None) => ("missing".into(), "-".into()),
            Err(e) => ("unreachable".into(), format!("({e})")),
        };
        let snapshot = match (r["snapshot_rows"].as_u64(), r["snapshot_rows_estimate"].as_u64()) {
            (Some(done), Some(total)) if total > 0 => {
                format!("{done}/~{total} rows ({:.0}%)", 100.0 * done as f64 / total as f64)
            }
            (Some(done), _) if done > 0 => format!("{done} rows"),
            _ => "-".into(),
        };
        rows.push(vec![
            name.clone(),
            state,
            snapshot,
            r["flushed_lsn"].as_str().unwrap_or("-").to_string(),
            slot_state,
            lag,
            r["events"].as_u64().map_or("-".into(), |e| e.to_string()),
            r["last_error"].as_str().unwrap_or("").to_string(),
        ]);
    }
    if !config.sources.is_empty() {
        print_table(&mut std::io::stdout().lock(), &rows)?;
    }
    if !config.views.is_empty() {
        if !config.sources.is_empty() {
            println!();
        }
        print_views(config, &reported, running)?;
    }
    if !config.sinks.is_empty() {
        if !config.sources.is_empty() || !config.views.is_empty() {
            println!();
        }
        print_sinks(config, &reported, running)?;
    }
    if let Some(c) = &config.collector {
        let r = &reported["collector"];
        let n = |k: &str| r[k].as_u64().map_or("-".to_string(), |v| v.to_string());
        println!();
        let rows = vec![
            ["COLLECTOR", "STATE", "REQUESTS", "EVENTS ACCEPTED", "EVENTS REJECTED"]
                .map(String::from)
                .to_vec(),
            vec![
                format!("{} → {}", c.listen, c.topic),
                if running { "running".into() } else { "not running".into() },
                n("requests"),
                n("accepted"),
                n("rejected"),
            ],
        ];
        print_table(&mut std::io::stdout().lock(), &rows)?;
    }
    if !config.rollups.is_empty() {
        println!();
        let mut rows = vec![[
            "ROLLUP",
            "STATE",
            "STORED THROUGH",
            "OPEN BUCKETS",
            "EVENTS",
            "LATE",
            "LAG",
            "LAST ERROR",
        ]
        .map(String::from)
        .to_vec()];
        for name in config.rollups.keys() {
            let r = &reported["rollups"][name];
            let n = |k: &str| r[k].as_u64().map_or("-".to_string(), |v| v.to_string());
            rows.push(vec![
                name.clone(),
                if running {
                    r["state"].as_str().unwrap_or("?").into()
                } else {
                    "not running".into()
                },
                r["flushed_through"].as_str().unwrap_or("-").to_string(),
                n("open_buckets"),
                n("events"),
                n("late_events"),
                r["lag_records"].as_u64().map_or("-".into(), |l| format!("{l} records")),
                r["error"].as_str().unwrap_or("").to_string(),
            ]);
        }
        print_table(&mut std::io::stdout().lock(), &rows)?;
    }
    Ok(())
}

fn print_sinks(config: &Config, reported: &serde_json::Value, running: bool) -> anyhow::Result<()> {
    // Without a running process, the lag comes from the log: the sink's committed offsets.
    let log: Option<Arc<dyn Log>> =
        if running { None } else { crate::open_log_read_only(config).ok() };
    let mut rows = vec![["SINK", "KIND", "STATE", "LAG", "RECORDS", "REJECTED", "LAST ERROR"]
        .map(String::from)
        .to_vec()];
    for (name, cfg) in &config.sinks {
        let r = &reported["sinks"][name];
        let kind = match cfg {
            polylog_sinks::SinkConfig::Postgres(p) => {
                format!("postgres ({:?})", p.mode).to_lowercase()
            }
            polylog_sinks::SinkConfig::Search(_) => "search".into(),
            polylog_sinks::SinkConfig::File(_) => "file".into(),
            polylog_sinks::SinkConfig::Elasticsearch(_) => "elasticsearch".into(),
        };
        let (state, lag) = if running {
            (
                r["state"].as_str().unwrap_or("?").to_string(),
                r["lag"].as_u64().map_or("-".into(), |l| format!("{l} records")),
            )
        } else {
            let lag = log
                .as_ref()
                .and_then(|log| Sink::new(name, cfg.clone(), Arc::clone(log)).ok())
                .and_then(|s| s.lag().ok())
                .map_or("-".into(), |(l, _)| format!("{l} records"));
            ("not running".into(), lag)
        };
        rows.push(vec![
            name.clone(),
            kind,
            state,
            lag,
            r["records"].as_u64().map_or("-".into(), |n| n.to_string()),
            r["dead_letters"].as_u64().map_or("-".into(), |n| n.to_string()),
            r["last_error"].as_str().unwrap_or("").to_string(),
        ]);
    }
    print_table(&mut std::io::stdout().lock(), &rows)?;
    Ok(())
}

fn print_views(config: &Config, reported: &serde_json::Value, running: bool) -> anyhow::Result<()> {
    let mut rows = vec![["VIEW", "STATE", "LAG", "CHANGES", "DOCUMENTS", "VERSION", "LAST ERROR"]
        .map(String::from)
        .to_vec()];
    for name in config.views.keys() {
        let r = &reported["views"][name];
        let num = |k: &str| r[k].as_u64().map_or("-".to_string(), |n| n.to_string());
        let state = if running {
            r["state"].as_str().unwrap_or("waiting for its topics").to_string()
        } else {
            "not running".into()
        };
        rows.push(vec![
            name.clone(),
            state,
            if running { format!("{} records", num("lag")) } else { "-".into() },
            num("changes"),
            num("documents"),
            r["version"].as_u64().map_or("-".into(), polylog_postgres::pgoutput::format_lsn),
            r["last_error"].as_str().unwrap_or("").to_string(),
        ]);
    }
    print_table(&mut std::io::stdout().lock(), &rows)?;
    Ok(())
}

/// The slot's `wal_status` and how many bytes of WAL it holds back.
fn slot_lag(url: &str, slot: &str) -> anyhow::Result<Option<(String, u64)>> {
    let params = ConnectParams::parse(url)?;
    let mut conn = Connection::connect(&params, false)?;
    let rows = conn.query(&format!(
        "SELECT COALESCE(wal_status, '?'), GREATEST(pg_current_wal_lsn() - confirmed_flush_lsn, 0)::bigint \
         FROM pg_replication_slots WHERE slot_name = {}",
        polylog_postgres::schema::quote_literal(slot)
    ))?;
    Ok(rows.first().map(|r| {
        let f = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        (f(0), f(1).parse().unwrap_or(0))
    }))
}

/// `polylog replay` options.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The sink to rebuild.
    #[arg(long)]
    sink: String,
    /// From the beginning of its topics (the default).
    #[arg(long, conflicts_with = "from_time")]
    from_beginning: bool,
    /// From the first record at or after this time: milliseconds since the epoch, or
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    #[arg(long, value_name = "TIME")]
    from_time: Option<String>,
}

/// Parses milliseconds since the epoch or a UTC time `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let bad = || {
        anyhow::anyhow!("--from-time {s:?}: give milliseconds since the epoch or a UTC time like 2026-11-26T10:00:00Z")
    };
    let t = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = t.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> =
        date.split('-').map(|p| p.parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> =
        hms.split(':').map(|p| p.parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
    if d.len() != 3 || h.len() != 3 {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m, day) = (if d[1] <= 2 { d[0] - 1 } else { d[0] }, d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms: i64 = format!("{frac:0<3}")[..3].parse().map_err(|_| bad())?;
    Ok(((days * 24 + h[0]) * 60 + h[1]) * 60_000 + h[2] * 1000 + ms)
}

/// Rebuilds a sink's store: its offsets go back to `--from-*`, then it writes until it has
/// written everything the log holds, with a progress line.
pub fn replay(config: &Config, args: &ReplayArgs) -> anyhow::Result<()> {
    let Some(cfg) = config.sinks.get(&args.sink) else {
        let names: Vec<&String> = config.sinks.keys().collect();
        bail!("no sink {:?} in the config (sinks: {names:?})", args.sink);
    };
    let from = match &args.from_time {
        Some(t) => StartFrom::Time(parse_time(t)?),
        None => StartFrom::Beginning,
    };
    let log: Arc<dyn Log> = crate::open_log(config)?;
    let sink = Sink::new(&args.sink, cfg.clone(), Arc::clone(&log))?
        .with_search(config.data_dir.join("search"), SearchIndexes::default());
    sink.reset(from)?;
    let (total, _) = sink.lag()?;
    eprintln!("polylog: replaying {total} records into sink {}", args.sink);
    let stop = AtomicBool::new(false);
    let progress = std::io::stderr().is_terminal();
    let result = std::thread::scope(|scope| {
        let runner = scope.spawn(|| sink.run(&stop, true));
        while !runner.is_finished() {
            std::thread::sleep(Duration::from_millis(250));
            if progress {
                let done = sink.status.lock().unwrap_or_else(|e| e.into_inner()).records;
                let pct = if total > 0 { 100.0 * done as f64 / total as f64 } else { 100.0 };
                eprint!("\r  {done}/{total} records ({pct:.0}%)   ");
            }
        }
        runner
            .join()
            .unwrap_or_else(|_| Err(polylog_sinks::SinkError::Target("the sink panicked".into())))
    });
    if progress {
        eprintln!();
    }
    result?;
    let written = sink.status.lock().unwrap_or_else(|e| e.into_inner()).records;
    println!(
        "replayed {written} records into sink {}; its lag is {} records",
        args.sink,
        sink.lag()?.0
    );
    Ok(())
}

/// Waits until `sink` has written every change captured up to each source's current LSN.
fn wait_caught_up(config: &Config, sink: &str, timeout: Duration) -> anyhow::Result<()> {
    if !config.sinks.contains_key(sink) {
        bail!("no sink {sink:?} in the config");
    }
    let deadline = std::time::Instant::now() + timeout;
    // Where each source's database is now: the sink must get past it.
    let mut targets = BTreeMap::new();
    for (name, s) in &config.sources {
        let SourceConfig::Postgres(pg) = s;
        let mut conn = Connection::connect(&ConnectParams::parse(&pg.url)?, false)?;
        let rows = conn.query("SELECT pg_current_wal_lsn()::text")?;
        let lsn = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|l| polylog_postgres::pgoutput::parse_lsn(&l))
            .unwrap_or(0);
        targets.insert(name.clone(), lsn);
    }
    let mut sources_there_at: Option<i64> = None;
    loop {
        let reported: serde_json::Value = std::fs::read(status_path(config))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let updated = reported["updated_ms"].as_i64().unwrap_or(0);
        let running = polylog_log::now_ms() - updated < 5_000;
        if !running {
            bail!("polylog run is not running (its status is older than 5 s)");
        }
        let sources_there = targets.iter().all(|(name, &target)| {
            reported["sources"][name]["flushed_lsn"]
                .as_str()
                .and_then(polylog_postgres::pgoutput::parse_lsn)
                .is_some_and(|l| l >= target)
        });
        if sources_there && sources_there_at.is_none() {
            sources_there_at = Some(updated);
        }
        let s = &reported["sinks"][sink];
        if let Some(at) = sources_there_at {
            // A lag measured after the sources got there covers everything up to the targets.
            let measured_after = s["lag_ms"].as_i64().is_some_and(|m| m > at);
            if measured_after && s["state"] == "running" && s["lag"].as_u64() == Some(0) {
                println!("sink {sink} is caught up");
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "sink {sink} did not catch up within {timeout:?} (state {}, lag {} records)",
                s["state"].as_str().unwrap_or("?"),
                s["lag"].as_u64().map_or("?".into(), |l| l.to_string())
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
