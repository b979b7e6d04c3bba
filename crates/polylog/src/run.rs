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

/// Runs every configured source until Ctrl-C / SIGTERM or a fatal error.
pub fn run(config: &Config) -> anyhow::Result<()> {
    if config.sources.is_empty() {
        bail!("nothing to run: the config has no [sources.*] table");
    }
    for (what, n) in [
        ("views", config.views.len()),
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
    let failed = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for (name, src) in &srcs {
            let (stop, failed) = (&stop, &failed);
            scope.spawn(move || {
                eprintln!("polylog: source {name}: starting (slot {})", src.slot_name());
                if let Err(e) = src.run(stop) {
                    eprintln!("polylog: source {name} stopped: {e}");
                    failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("source {name}: {e}"));
                    stop.store(true, Ordering::SeqCst);
                }
            });
        }
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                write_status(config, &statuses);
                std::thread::sleep(STATUS_INTERVAL);
            }
            write_status(config, &statuses);
        });
    });
    let failed = failed.into_inner().unwrap_or_else(|e| e.into_inner());
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    eprintln!("polylog: stopped");
    Ok(())
}

fn write_status(config: &Config, statuses: &[(String, Arc<Mutex<SourceStatus>>)]) {
    let map: BTreeMap<&str, SourceStatus> = statuses
        .iter()
        .map(|(n, s)| (n.as_str(), s.lock().unwrap_or_else(|e| e.into_inner()).clone()))
        .collect();
    let path = status_path(config);
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::json!({ "updated_ms": polylog_log::now_ms(), "sources": map });
    let _ = std::fs::create_dir_all(path.parent().unwrap_or(&config.data_dir))
        .and_then(|()| std::fs::write(&tmp, serde_json::to_vec_pretty(&body).unwrap_or_default()))
        .and_then(|()| std::fs::rename(&tmp, &path));
}

/// Prints each source's state (as the running process last reported it) and its slot's lag,
/// read from Postgres.
pub fn status(config: &Config) -> anyhow::Result<()> {
    if config.sources.is_empty() {
        println!("no sources configured");
        return Ok(());
    }
    let reported: serde_json::Value = std::fs::read(status_path(config))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let age_ms = reported["updated_ms"].as_i64().map(|t| polylog_log::now_ms() - t);
    let running = age_ms.is_some_and(|a| a < 5_000);
    let mut rows =
        vec![["SOURCE", "STATE", "FLUSHED LSN", "SLOT", "SLOT LAG", "EVENTS", "LAST ERROR"]
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
