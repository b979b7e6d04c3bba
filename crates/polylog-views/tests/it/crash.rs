//! Crash equivalence: a view killed with `kill -9` again and again ends with the same
//! documents as a view that ran without interruption over the same topics.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use polylog_log::{EmbeddedLog, FsyncPolicy, Log, LogOptions};
use polylog_views::{View, ViewOptions};
use serde_json::{json, Value};

use crate::oracle::VIEW;
use crate::support::{
    documents, open_log, view_config, FakeSource, Rng, RowChange, RunningView, TempDir,
};

const CHILD_ENV: &str = "POLYLOG_VIEWS_CRASH_CHILD_DIR";
const KILLS: usize = 20;

/// A random transaction over the oracle's five tables.
pub fn random_transaction(rng: &mut Rng) -> Vec<RowChange> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(5) {
        let gone = rng.chance(20);
        let fk =
            |rng: &mut Rng, n: u64| if rng.chance(10) { Value::Null } else { json!(rng.below(n)) };
        let (table, key, row): (&'static str, Value, Value) = match rng.below(5) {
            0 | 1 => {
                let id = rng.below(300);
                (
                    "public.videos",
                    json!({"id": id}),
                    json!({"id": id, "title": format!("t{}", rng.below(9)), "publisher_id": fk(rng, 30), "secret": "s"}),
                )
            }
            2 => {
                let id = rng.below(30);
                let code = ["fr", "de", "us"][rng.below(3) as usize];
                (
                    "public.publishers",
                    json!({"id": id}),
                    json!({"id": id, "name": format!("p{}", rng.below(9)), "country": code}),
                )
            }
            3 => {
                let (v, t) = (rng.below(300), rng.below(20));
                (
                    "public.video_tags",
                    json!({"video_id": v, "tag_id": t}),
                    json!({"video_id": v, "tag_id": t, "pos": rng.below(4)}),
                )
            }
            _ => {
                if rng.chance(50) {
                    let code = ["fr", "de", "us"][rng.below(3) as usize];
                    (
                        "public.countries",
                        json!({"code": code}),
                        json!({"code": code, "name": format!("c{}", rng.below(9))}),
                    )
                } else {
                    let id = rng.below(20);
                    (
                        "public.tags",
                        json!({"id": id}),
                        json!({"id": id, "label": format!("l{}", rng.below(9))}),
                    )
                }
            }
        };
        out.push((table, key, (!gone).then_some(row)));
    }
    out
}

/// The child's side: runs the view over the log in `CHILD_ENV` until killed, printing its
/// progress.
#[test]
fn child_process_for_views_crash_test() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let dir = std::path::PathBuf::from(dir);
    let o = LogOptions {
        fsync: FsyncPolicy::Always,
        maintenance_interval_ms: 0,
        ..LogOptions::default()
    };
    let log: Arc<dyn Log> =
        Arc::new(EmbeddedLog::open(dir.join("log"), o).expect("child: open log"));
    let mut opts = ViewOptions::new(dir.join("views").join("videos"));
    opts.checkpoint_interval = Duration::from_millis(20);
    let view = Arc::new(View::new("videos", &view_config(VIEW), log, opts).expect("child: view"));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| loop {
            let st = view.status.lock().expect("status").clone();
            println!("progress {}", st.changes);
            std::thread::sleep(Duration::from_millis(1));
        });
        view.run(&stop).expect("child: the view runs");
    });
}

#[test]
fn a_view_killed_twenty_times_ends_like_one_never_killed() {
    let root = TempDir::new("views-crash");
    let crashed = root.path().join("crashed");
    let reference = root.path().join("reference");
    const TABLES: [&str; 5] = [
        "public.videos",
        "public.publishers",
        "public.countries",
        "public.video_tags",
        "public.tags",
    ];
    // The same transactions go to both logs, a batch before each run of the child, so that
    // every run has work to do however fast the machine is.
    let mut workload = Rng::new(42);
    let mut feed = |transactions: usize| -> u64 {
        let txs: Vec<_> = (0..transactions).map(|_| random_transaction(&mut workload)).collect();
        for dir in [&crashed, &reference] {
            let mut src = FakeSource::new(open_log(dir), "app", &TABLES, 2);
            for tx in &txs {
                src.commit(tx);
            }
        }
        txs.iter().map(|tx| tx.len() as u64).sum()
    };

    let mut rng = Rng::from_env("views crash");
    let exe = std::env::current_exe().expect("test binary path");
    let mut interrupted = 0;
    for _ in 0..KILLS {
        // A run re-applies what its predecessor did not checkpoint, then at least this batch.
        let batch = feed(300);
        let mut child = Command::new(&exe)
            .args([
                "crash::child_process_for_views_crash_test",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &crashed)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let changes = Arc::new(AtomicU64::new(0));
        let stdout = child.stdout.take().expect("child stdout");
        let reader = {
            let changes = Arc::clone(&changes);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let mut parts = line.split(' ').skip(1).map(|n| n.parse::<u64>().unwrap_or(0));
                    if let Some(c) = parts.next() {
                        changes.store(c, Ordering::SeqCst);
                    }
                }
            })
        };
        // Kill it once it has applied a random share of the batch.
        let target = 1 + rng.below(batch - 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while changes.load(Ordering::SeqCst) < target && std::time::Instant::now() < deadline {
            if child.try_wait().expect("child status").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if changes.load(Ordering::SeqCst) < batch {
            interrupted += 1;
        }
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        reader.join().expect("reader");
    }
    eprintln!("views crash: {interrupted} of {KILLS} kills landed before the batch was applied");
    assert!(interrupted >= KILLS / 2, "most kills should land mid-work ({interrupted})");

    let finish = |dir: &std::path::Path| {
        let log = open_log(dir);
        let view = RunningView::start("videos", &view_config(VIEW), log.clone(), dir);
        view.wait_caught_up();
        view.stop().expect("clean stop");
        documents(&*log, "views.videos").0
    };
    let after_crashes = finish(&crashed);
    let uninterrupted = finish(&reference);
    assert!(uninterrupted.len() > 100, "the workload leaves documents ({})", uninterrupted.len());
    assert_eq!(after_crashes.len(), uninterrupted.len());
    for (k, v) in &uninterrupted {
        assert_eq!(after_crashes.get(k), Some(v), "document {k}");
    }
}
