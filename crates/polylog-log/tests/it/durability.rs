//! Durability under `kill -9`: a child process appends with `fsync = "always"` and reports each
//! durable offset; it is killed at random moments, again and again, and every record it was told
//! is durable must be there afterwards, in order and intact.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use polylog_log::{
    EmbeddedLog, FsyncPolicy, Log, LogError, LogOptions, Record, StartAt, TopicConfig,
};

use crate::support::{opts, read_all, Rng, TempDir};

const CHILD_ENV: &str = "POLYLOG_DURABILITY_CHILD_DIR";
const KILLS: usize = 25;

fn value_for(offset: u64) -> Vec<u8> {
    format!("record-{offset}-{}", "x".repeat((offset % 97) as usize)).into_bytes()
}

/// The child's side: runs only when the parent test starts this binary with `CHILD_ENV` set.
#[test]
fn child_process_for_kill_test() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let o = LogOptions { fsync: FsyncPolicy::Always, ..opts() };
    let log = EmbeddedLog::open(&dir, o).expect("child: open");
    match log.create_topic("d", &TopicConfig { segment_bytes: 256 * 1024, ..TopicConfig::new(1) }) {
        Ok(()) | Err(LogError::TopicExists(_)) => {}
        Err(e) => panic!("child: {e}"),
    }
    let mut next = log.describe_topic("d").expect("child: describe").partitions[0].end_offset;
    let mut rng = Rng::new(u64::from(std::process::id()));
    let mut out = std::io::stdout().lock();
    loop {
        let n = 1 + rng.below(64);
        let batch: Vec<Record> =
            (next..next + n).map(|o| Record::new(o.to_string(), value_for(o))).collect();
        let a = log.append("d", 0, &batch).expect("child: append");
        assert_eq!(a.base_offset, next, "child: offsets are dense");
        next += n;
        log.wait_durable("d", 0, next, Duration::from_secs(30)).expect("child: durable");
        writeln!(out, "durable {next}").and_then(|()| out.flush()).expect("child: report");
    }
}

#[test]
fn every_record_reported_durable_survives_kill_9() {
    let root = TempDir::new("durability");
    let mut rng = Rng::from_env("durability");
    let exe = std::env::current_exe().expect("test binary path");
    let mut acked_total = 0;
    for kill in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([
                "durability::child_process_for_kill_test",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, root.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let acked = Arc::new(AtomicU64::new(0));
        let stdout = child.stdout.take().expect("child stdout");
        let reader = {
            let acked = Arc::clone(&acked);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(n) = line.strip_prefix("durable ").and_then(|n| n.parse().ok()) {
                        acked.fetch_max(n, Ordering::SeqCst);
                    }
                }
            })
        };
        // Let it get going (opening includes recovery), then kill it at a random moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while acked.load(Ordering::SeqCst) <= acked_total && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.below(150)));
        child.kill().expect("kill -9");
        child.wait().expect("reap child");
        reader.join().expect("stdout reader");
        let acked = acked.load(Ordering::SeqCst);
        assert!(acked > acked_total, "kill {kill}: the child made no progress");

        let log = EmbeddedLog::open(root.path(), opts()).expect("reopen after kill");
        let got = read_all(&log, "d", 0, StartAt::Beginning);
        assert!(
            got.len() as u64 >= acked,
            "kill {kill}: {} records back, {acked} were acknowledged",
            got.len()
        );
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.offset, i as u64, "kill {kill}: offsets are dense and in order");
            assert_eq!(
                r.value.as_deref(),
                Some(&value_for(i as u64)[..]),
                "kill {kill}: record {i}"
            );
        }
        acked_total = got.len() as u64;
    }
    eprintln!("durability: {KILLS} kills, {acked_total} records");
}
