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
use polylog_views::{View, ViewError, ViewOptions, ViewStatus};

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

fn views(config: &Config, log: Arc<dyn Log>) -> anyhow::Result<Vec<(String, View)>> {
    let mut out = Vec::new();
    for (name, v) in &config.views {
        let opts = ViewOptions::new(config.data_dir.join("views").join(name));
        out.push((name.clone(), View::new(name, v, Arc::clone(&log), opts)?));
    }
    Ok(out)
}

/// Runs every configured source, then every view, until Ctrl-C / SIGTERM or a fatal error.
pub fn run(config: &Config) -> anyhow::Result<()> {
    if config.sources.is_empty() && config.views.is_empty() {
        bail!("nothing to run: the config has no [sources.*] or [views.*] table");
    }
    for (what, n) in [
        ("sinks", config.sinks.len()),
        ("rollups", config.rollups.len()),
        ("collector", usize::from(config.collector.is_some())),
    ] {
        if n > 0 {
            eprintln!("polylog: warning: {what} are not built in this version yet; ignoring them");
        }
    }
    let log: Arc<dyn Log> = Arc::new(crate::open_log(config)?);
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing a signal handler")?;
    }
    let progress = std::io::stderr().is_terminal();
    let srcs = sources(config, Arc::clone(&log), progress)?;
    let statuses: Vec<(String, Arc<Mutex<SourceStatus>>)> =
        srcs.iter().map(|(n, s)| (n.clone(), Arc::clone(&s.status))).collect();
    let views = views(config, Arc::clone(&log))?;
    let failed = Mutex::new(Vec::new());
    let fail = |what: String| {
        eprintln!("polylog: {what}");
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
    std::thread::scope(|scope| {
        for (name, src) in &srcs {
            let (stop, fail) = (&stop, &fail);
            scope.spawn(move || {
                eprintln!("polylog: source {name}: starting (slot {})", src.slot_name());
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
                eprintln!("polylog: view {name}: writing {}", view.spec.output_topic());
                if let Err(e) = view.run(stop) {
                    fail(format!("view {name} stopped: {e}"));
                }
            });
        }
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                write_status(config, &statuses, &views);
                std::thread::sleep(STATUS_INTERVAL);
            }
            write_status(config, &statuses, &views);
        });
    });
    let failed = failed.into_inner().unwrap_or_else(|e| e.into_inner());
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    eprintln!("polylog: stopped");
    Ok(())
}

fn write_status(
    config: &Config,
    statuses: &[(String, Arc<Mutex<SourceStatus>>)],
    views: &[(String, View)],
) {
    let map: BTreeMap<&str, SourceStatus> = statuses
        .iter()
        .map(|(n, s)| (n.as_str(), s.lock().unwrap_or_else(|e| e.into_inner()).clone()))
        .collect();
    let view_map: BTreeMap<&str, ViewStatus> = views
        .iter()
        .map(|(n, v)| (n.as_str(), v.status.lock().unwrap_or_else(|e| e.into_inner()).clone()))
        .collect();
    let path = status_path(config);
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::json!({
        "updated_ms": polylog_log::now_ms(),
        "sources": map,
        "views": view_map,
    });
    let _ = std::fs::create_dir_all(path.parent().unwrap_or(&config.data_dir))
        .and_then(|()| std::fs::write(&tmp, serde_json::to_vec_pretty(&body).unwrap_or_default()))
        .and_then(|()| std::fs::rename(&tmp, &path));
}

/// Prints each source's state (as the running process last reported it) and its slot's lag,
/// read from Postgres, then each view's state and lag.
pub fn status(config: &Config) -> anyhow::Result<()> {
    if config.sources.is_empty() && config.views.is_empty() {
        println!("no sources or views configured");
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
    if config.views.is_empty() {
        return Ok(());
    }
    if !config.sources.is_empty() {
        println!();
    }
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
