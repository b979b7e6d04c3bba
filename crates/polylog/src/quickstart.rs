//! `polylog quickstart`: a guided tour on this machine, with nothing to set up.
//!
//! Today it shows the embedded log: it writes a stream of change events for a `videos` table
//! (synthetic, in the Debezium envelope that the Postgres source will produce) into a compacted
//! topic with group-committed fsyncs, compacts it, and reads it back.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use polylog_log::{
    now_ms, partition_for_key, EmbeddedLog, Log, LogError, LogOptions, Record, StartAt, TopicConfig,
};

use crate::topics::{human_bytes, record_json};

#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Change events to write.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
}

const TOPIC: &str = "quickstart.public.videos";
const PARTITIONS: u32 = 3;
const BATCH_RECORDS: usize = 2000;

/// A small deterministic generator (xorshift64*), so each run writes a realistic mix.
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const WORDS: [&str; 16] = [
    "cats",
    "rust",
    "cooking",
    "travel",
    "chess",
    "guitar",
    "robots",
    "space",
    "coffee",
    "garden",
    "running",
    "jazz",
    "origami",
    "sailing",
    "pottery",
    "volcanoes",
];

fn video_row(g: &mut Gen, id: u64, version: u64) -> serde_json::Value {
    let a = WORDS[g.below(16) as usize];
    let b = WORDS[g.below(16) as usize];
    serde_json::json!({
        "id": id,
        "title": format!("{a} and {b}, part {}", version + 1),
        "publisher_id": 1 + g.below(500),
        "duration_s": 30 + g.below(3600),
        "views": g.below(1_000_000),
        "published_at": "2026-11-26T08:00:00.000000Z",
    })
}

pub fn run(args: &QuickstartArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = data_dir.unwrap_or_else(|| PathBuf::from("polylog-quickstart"));
    println!("Polylog quickstart: the embedded log\n");
    let log = EmbeddedLog::open(&dir, LogOptions::default())
        .with_context(|| format!("cannot open the log in {}", dir.display()))?;
    println!("1. Opened the data directory {} (fsync = \"always\": a record is acknowledged only once on disk).", dir.display());
    // Small segments, so that compaction (which cleans sealed segments) has work to show.
    let config = TopicConfig { segment_bytes: 4 << 20, ..TopicConfig::new(PARTITIONS).compacted() };
    match log.create_topic(TOPIC, &config) {
        Ok(()) => println!("2. Created the compacted topic {TOPIC} with {PARTITIONS} partitions."),
        Err(LogError::TopicExists(_)) => {
            println!("2. The topic {TOPIC} exists from an earlier run; adding to it.")
        }
        Err(e) => return Err(e.into()),
    }

    println!(
        "3. Writing {} change events for a `videos` table: creates, updates and deletes in Debezium's\n   \
         envelope (synthetic; capture from Postgres arrives with the CDC source), keyed by primary key.",
        args.events
    );
    let mut g = Gen(now_ms() as u64 | 1);
    let mut versions: HashMap<u64, u64> = HashMap::new();
    let mut live: Vec<u64> = Vec::new();
    let mut next_id = 1u64;
    let (mut written, mut bytes, mut deletes) = (0u64, 0u64, 0u64);
    let mut lsn = 0x1600_0000u64;
    let started = Instant::now();
    let mut last_progress = Instant::now();
    while written < args.events {
        let mut batches: Vec<Vec<Record>> = vec![Vec::new(); PARTITIONS as usize];
        let round = (args.events - written).min(BATCH_RECORDS as u64 * u64::from(PARTITIONS));
        for _ in 0..round {
            lsn += 64 + g.below(512);
            let roll = g.below(100);
            let (slot, id, op) = if live.is_empty() || roll < 35 {
                next_id += 1;
                live.push(next_id - 1);
                (live.len() - 1, next_id - 1, "c")
            } else {
                let slot = g.below(live.len() as u64) as usize;
                (slot, live[slot], if roll < 92 { "u" } else { "d" })
            };
            let version = versions.get(&id).copied().unwrap_or(0);
            let before = (op != "c").then(|| video_row(&mut g, id, version.saturating_sub(1)));
            let after = (op != "d").then(|| video_row(&mut g, id, version));
            let ts = now_ms();
            let value = serde_json::json!({
                "before": before, "after": after, "op": op, "ts_ms": ts,
                "source": {
                    "connector": "postgresql", "name": "quickstart", "db": "quickstart",
                    "schema": "public", "table": "videos", "lsn": lsn, "txId": 1000 + lsn / 4096,
                    "ts_ms": ts, "snapshot": "false"
                }
            });
            let key = serde_json::to_vec(&serde_json::json!({ "id": id }))?;
            let p = partition_for_key(&key, PARTITIONS) as usize;
            let value = serde_json::to_vec(&value)?;
            bytes += (key.len() + value.len()) as u64;
            batches[p].push(Record::new(key.clone(), value));
            if op == "d" {
                batches[p].push(Record::tombstone(key));
                versions.remove(&id);
                live.swap_remove(slot);
                deletes += 1;
            } else {
                versions.insert(id, version + 1);
            }
            written += 1;
        }
        let mut ends = Vec::new();
        for (p, batch) in batches.iter().enumerate() {
            if !batch.is_empty() {
                ends.push((p as u32, log.append(TOPIC, p as u32, batch)?.last_offset + 1));
            }
        }
        for (p, end) in ends {
            log.wait_durable(TOPIC, p, end, Duration::from_secs(60))?;
        }
        let tty = std::io::stderr().is_terminal();
        if tty && (last_progress.elapsed() > Duration::from_millis(250) || written == args.events) {
            last_progress = Instant::now();
            let rate = written as f64 / started.elapsed().as_secs_f64().max(1e-9);
            eprint!("\r   {written}/{} events durable ({rate:.0} events/s)   ", args.events);
            let _ = std::io::stderr().flush();
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    println!(
        "   Done: {written} events ({deletes} deletes, each followed by a tombstone), {} in {secs:.2} s: \
         {:.0} events/s, {:.1} MB/s, every batch fsynced before it was acknowledged.",
        human_bytes(bytes),
        written as f64 / secs,
        bytes as f64 / secs / 1e6
    );

    log.flush()?;
    let before: u64 = size(&log)?;
    let report = log.maintain_now()?;
    println!(
        "4. Compacted the sealed segments: {} superseded records removed ({} → {} on disk; the active\n   \
         segment is compacted once it fills and rolls).",
        report.compaction.records_removed,
        human_bytes(before),
        human_bytes(size(&log)?)
    );

    println!("5. The newest records of partition 0, as `polylog topics tail` prints them:");
    let d = log.describe_topic(TOPIC)?;
    let end = d.partitions[0].durable_offset;
    let mut reader = log.reader(
        TOPIC,
        0,
        StartAt::Offset(end.saturating_sub(2).max(d.partitions[0].start_offset)),
    )?;
    for r in reader.poll(2, Duration::ZERO)? {
        println!("   {}", record_json(TOPIC, &r));
    }
    drop(reader);
    drop(log);

    let me = invocation();
    let dd = dir.display();
    println!("\nNext, try:");
    println!("  {me} --data-dir {dd} topics list");
    println!("  {me} --data-dir {dd} topics describe {TOPIC}");
    println!("  {me} --data-dir {dd} topics tail {TOPIC} -n 3");
    println!("  {me} --data-dir {dd} topics tail notes --follow     # in one terminal");
    println!("  printf 'k1\\thello\\n' | {me} --data-dir {dd} topics produce notes --create     # in another");
    Ok(())
}

/// How to run this binary again from here: `polylog` if that is what is on the PATH, else its
/// path (e.g. `./target/release/polylog` after `cargo run`).
fn invocation() -> String {
    let Ok(exe) = std::env::current_exe() else { return "polylog".into() };
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("polylog") == exe));
    if on_path {
        return "polylog".into();
    }
    match std::env::current_dir().ok().and_then(|cwd| exe.strip_prefix(cwd).ok().map(PathBuf::from))
    {
        Some(rel) => format!("./{}", rel.display()),
        None => exe.display().to_string(),
    }
}

fn size(log: &EmbeddedLog) -> anyhow::Result<u64> {
    Ok(log.describe_topic(TOPIC)?.partitions.iter().map(|p| p.size_bytes).sum())
}
