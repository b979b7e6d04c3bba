//! `polylog topics ...`

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use polylog_log::{partition_for_key, LogReader, Record, StartAt, TopicConfig};

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// List topics with their partitions and sizes.
    List,
    /// Show a topic's configuration and each partition's offsets and size.
    Describe {
        topic: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create a topic.
    Create(CreateArgs),
    /// Print records as JSON lines: {"topic","partition","offset","timestamp","key","value"}.
    Tail(TailArgs),
    /// Append `key<TAB>value` lines from stdin (a line without a tab has no key).
    Produce(ProduceArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    topic: String,
    /// Number of partitions [default: `log.partitions` from the config].
    #[arg(long)]
    partitions: Option<u32>,
    /// Keep the latest record per key (Kafka's cleanup.policy=compact).
    #[arg(long)]
    compacted: bool,
    /// Delete segments whose newest record is older than this many milliseconds.
    #[arg(long, value_name = "MS")]
    retention_ms: Option<u64>,
    /// Delete the oldest segments while a partition is larger than this.
    #[arg(long, value_name = "BYTES")]
    retention_bytes: Option<u64>,
    /// Segment file size [default: `log.segment_bytes` from the config].
    #[arg(long, value_name = "BYTES")]
    segment_bytes: Option<u64>,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    topic: String,
    /// Start at the oldest record instead of the last `-n` of each partition.
    #[arg(long)]
    from_beginning: bool,
    /// Keep printing new records as they are written (Ctrl-C to stop).
    #[arg(short, long)]
    follow: bool,
    /// Records to show per partition when not reading from the beginning.
    #[arg(short = 'n', long, default_value_t = 10)]
    lines: u64,
    /// Only this partition.
    #[arg(short, long)]
    partition: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    topic: String,
    /// Write every record to this partition instead of choosing by key.
    #[arg(short, long)]
    partition: Option<u32>,
    /// Create the topic (with the config's partition count) if it does not exist.
    #[arg(long)]
    create: bool,
}

/// Lines gathered into one batch at most (a batch is also cut whenever stdin has no more
/// buffered input, so interactive lines are written at once).
const PRODUCE_BATCH_RECORDS_MAX: usize = 1000;
const PRODUCE_BATCH_BYTES_MAX: usize = 1 << 20;
const DURABLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `tail --follow` looks for new records when there were none.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

pub fn run(config: &Config, cmd: TopicsCommand) -> anyhow::Result<()> {
    match cmd {
        TopicsCommand::List => list(config),
        TopicsCommand::Describe { topic, json } => describe(config, &topic, json),
        TopicsCommand::Create(args) => create(config, &args),
        TopicsCommand::Tail(args) => tail(config, &args),
        TopicsCommand::Produce(args) => produce(config, &args),
    }
}

fn list(config: &Config) -> anyhow::Result<()> {
    let log = crate::open_log_read_only(config)?;
    let mut out = std::io::stdout().lock();
    let topics = log.topics()?;
    if topics.is_empty() {
        writeln!(out, "no topics in {}", config.data_dir.display())?;
        return Ok(());
    }
    let mut rows =
        vec![["TOPIC", "PARTITIONS", "CLEANUP", "OFFSETS", "SIZE"].map(String::from).to_vec()];
    for t in topics {
        let d = log.describe_topic(&t)?;
        let records: u64 = d.partitions.iter().map(|p| p.end_offset - p.start_offset).sum();
        let size: u64 = d.partitions.iter().map(|p| p.size_bytes).sum();
        rows.push(vec![
            t,
            d.config.partitions.to_string(),
            cleanup(&d.config),
            records.to_string(),
            human_bytes(size),
        ]);
    }
    print_table(&mut out, &rows)?;
    Ok(())
}

fn cleanup(c: &TopicConfig) -> String {
    if c.compacted {
        "compact".into()
    } else {
        "delete".into()
    }
}

fn describe(config: &Config, topic: &str, json: bool) -> anyhow::Result<()> {
    let log = crate::open_log_read_only(config)?;
    let d = log.describe_topic(topic)?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &d)?;
        writeln!(out)?;
        return Ok(());
    }
    let c = &d.config;
    writeln!(out, "topic {}", d.name)?;
    writeln!(out, "  partitions      {}", c.partitions)?;
    writeln!(out, "  cleanup         {}", cleanup(c))?;
    if c.compacted {
        writeln!(out, "  tombstones kept {}", human_ms(c.tombstone_retention_ms))?;
    }
    writeln!(
        out,
        "  retention       {}",
        match (c.retention_ms, c.retention_bytes) {
            (None, None) => "none (kept forever)".to_string(),
            (ms, bytes) => [ms.map(human_ms), bytes.map(human_bytes)]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", "),
        }
    )?;
    writeln!(out, "  segment size    {}", human_bytes(c.segment_bytes))?;
    writeln!(out)?;
    let mut rows = vec![["PARTITION", "START", "END", "DURABLE", "SEGMENTS", "SIZE"]
        .map(String::from)
        .to_vec()];
    for p in &d.partitions {
        rows.push(vec![
            p.partition.to_string(),
            p.start_offset.to_string(),
            p.end_offset.to_string(),
            p.durable_offset.to_string(),
            p.segments.to_string(),
            human_bytes(p.size_bytes),
        ]);
    }
    print_table(&mut out, &rows)?;
    Ok(())
}

fn create(config: &Config, a: &CreateArgs) -> anyhow::Result<()> {
    let log = crate::open_log(config)?;
    let mut c = TopicConfig::new(a.partitions.unwrap_or(config.log.partitions));
    c.compacted = a.compacted;
    c.retention_ms = a.retention_ms;
    c.retention_bytes = a.retention_bytes;
    c.segment_bytes = a.segment_bytes.unwrap_or(config.log.segment_bytes);
    log.create_topic(&a.topic, &c)?;
    eprintln!("created topic {} with {} partition(s)", a.topic, c.partitions);
    Ok(())
}

pub use polylog_sinks::file::record_json;

/// How long `tail` waits for records a partition is known to hold.
const TAIL_WAIT: Duration = Duration::from_secs(10);

fn tail(config: &Config, a: &TailArgs) -> anyhow::Result<()> {
    let log = crate::open_log_read_only(config)?;
    let d = log.describe_topic(&a.topic)?;
    let partitions: Vec<u32> = match a.partition {
        Some(p) if p >= d.config.partitions => {
            bail!(
                "topic {} has {} partition(s); there is no partition {p}",
                a.topic,
                d.config.partitions
            )
        }
        Some(p) => vec![p],
        None => (0..d.config.partitions).collect(),
    };
    let mut readers: Vec<Box<dyn LogReader>> = Vec::new();
    for &p in &partitions {
        let desc = &d.partitions[p as usize];
        let start = if a.from_beginning {
            StartAt::Beginning
        } else {
            StartAt::Offset(desc.durable_offset.saturating_sub(a.lines).max(desc.start_offset))
        };
        readers.push(log.reader(&a.topic, p, start)?);
    }
    let ends: Vec<u64> =
        partitions.iter().map(|&p| d.partitions[p as usize].durable_offset).collect();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // Without --follow, a partition is read to the end it had at the start; on Kafka also what
    // came with the last fetch (some brokers report an end inside the last batch).
    let exact = config.log.backend == crate::config::Backend::Embedded;
    let mut done = vec![false; readers.len()];
    loop {
        let mut any = false;
        for (i, r) in readers.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            let short = r.position() < ends[i];
            if !a.follow && !short && exact {
                done[i] = true;
                continue;
            }
            // A Kafka reader fetches over the network: wait for what is known to be there (the
            // embedded log's durable records are there at once).
            let wait = if !a.follow && short && !exact { TAIL_WAIT } else { Duration::ZERO };
            let got = r.poll(1000, wait)?;
            if !a.follow && got.is_empty() {
                // (The embedded log may end in offsets compaction removed: nothing to wait for.)
                if short && !exact {
                    bail!(
                        "{}/{}: nothing to read at offset {} within {TAIL_WAIT:?}, though the partition ends at {}",
                        a.topic,
                        partitions[i],
                        r.position(),
                        ends[i]
                    );
                }
                done[i] = true;
            }
            for rec in got {
                if !a.follow && exact && rec.offset >= ends[i] {
                    break;
                }
                any = true;
                serde_json::to_writer(&mut out, &record_json(&a.topic, &rec))?;
                out.write_all(b"\n")?;
            }
        }
        if !a.follow && done.iter().all(|d| *d) {
            break;
        }
        if !any {
            out.flush()?;
            std::thread::sleep(FOLLOW_POLL);
        }
    }
    out.flush()?;
    Ok(())
}

fn produce(config: &Config, a: &ProduceArgs) -> anyhow::Result<()> {
    let log = crate::open_log(config)?;
    let partitions = match log.describe_topic(&a.topic) {
        Ok(d) => d.config.partitions,
        Err(polylog_log::LogError::UnknownTopic(_)) if a.create => {
            let c = TopicConfig {
                segment_bytes: config.log.segment_bytes,
                ..TopicConfig::new(config.log.partitions)
            };
            log.create_topic(&a.topic, &c)?;
            eprintln!("created topic {} with {} partition(s)", a.topic, c.partitions);
            c.partitions
        }
        Err(polylog_log::LogError::UnknownTopic(t)) => {
            bail!("topic {t:?} does not exist; create it with `polylog topics create {t}` or pass --create")
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(p) = a.partition {
        if p >= partitions {
            bail!("topic {} has {partitions} partition(s); there is no partition {p}", a.topic);
        }
    }
    // Our own buffer (larger than stdin's, so reads bypass it) tells when no more input is
    // waiting, which is when a batch is cut.
    let mut input = std::io::BufReader::with_capacity(64 * 1024, std::io::stdin());
    let mut batches: Vec<Vec<Record>> = vec![Vec::new(); partitions as usize];
    let (mut pending, mut pending_bytes, mut total, mut round_robin) = (0usize, 0usize, 0u64, 0u32);
    let mut ends = vec![0u64; partitions as usize];
    let mut line = String::new();
    let mut line_no = 0u64;
    loop {
        line.clear();
        let n = input.read_line(&mut line).context("reading stdin")?;
        if n > 0 {
            line_no += 1;
            let text = line.strip_suffix('\n').unwrap_or(&line);
            let text = text.strip_suffix('\r').unwrap_or(text);
            if !text.is_empty() {
                let (key, value) = match text.split_once('\t') {
                    Some((k, v)) => (Some(k.as_bytes().to_vec()), v.as_bytes().to_vec()),
                    None => (None, text.as_bytes().to_vec()),
                };
                let p = match (a.partition, &key) {
                    (Some(p), _) => p,
                    (None, Some(k)) => partition_for_key(k, partitions),
                    (None, None) => {
                        round_robin = (round_robin + 1) % partitions;
                        round_robin
                    }
                };
                pending_bytes += value.len() + key.as_ref().map_or(0, Vec::len);
                batches[p as usize].push(Record { key, value: Some(value), ..Record::default() });
                pending += 1;
            }
        }
        let flush = n == 0
            || input.buffer().is_empty()
            || pending >= PRODUCE_BATCH_RECORDS_MAX
            || pending_bytes >= PRODUCE_BATCH_BYTES_MAX;
        if flush && pending > 0 {
            for (p, batch) in batches.iter_mut().enumerate() {
                if batch.is_empty() {
                    continue;
                }
                let a2 = log.append(&a.topic, p as u32, batch).with_context(|| {
                    format!("writing the batch that ends at input line {line_no}")
                })?;
                ends[p] = a2.last_offset + 1;
                total += batch.len() as u64;
                batch.clear();
            }
            pending = 0;
            pending_bytes = 0;
        }
        if n == 0 {
            break;
        }
    }
    for (p, &end) in ends.iter().enumerate() {
        if end > 0 {
            log.wait_durable(&a.topic, p as u32, end, DURABLE_TIMEOUT)?;
        }
    }
    eprintln!("produced {total} record(s) to {}; all durable", a.topic);
    Ok(())
}

pub fn print_table(out: &mut impl Write, rows: &[Vec<String>]) -> std::io::Result<()> {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_ms(ms: u64) -> String {
    match ms {
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}
