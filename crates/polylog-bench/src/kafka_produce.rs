//! `kafka_produce`: 200-byte records appended in batches through Polylog's Kafka backend
//! (`Log::append`: idempotent producer, `acks=all`, returns once the cluster acknowledged the
//! batch with its offsets), against a bare producer loop of the same client library (rdkafka,
//! same settings) writing the same batches to the same broker and waiting for each batch's
//! acknowledgements the same way. The scenario starts its own broker (tansu, in memory).
//! For scale it also prints the bare loop sending everything before one final flush, which
//! no caller that must know what is durable can do.

use std::time::{Duration, Instant};

use polylog_kafka::{KafkaLog, KafkaOptions};
use polylog_log::{Log, Record, TopicConfig};
use polylog_testkit::KafkaBroker;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::Opts;

const RECORD_BYTES: usize = 200;
const KEY_BYTES: usize = 16;
/// Each side runs this many times, alternating which goes first; the best run counts.
const RUNS: usize = 3;

fn batches(n: usize, batch: usize) -> Vec<Vec<Record>> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut byte = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b'a' + (x % 26) as u8
    };
    (0..n)
        .map(|_| {
            (0..batch)
                .map(|_| {
                    let key: Vec<u8> = (0..KEY_BYTES).map(|_| byte()).collect();
                    let value: Vec<u8> = (0..RECORD_BYTES - KEY_BYTES).map(|_| byte()).collect();
                    Record::new(key, value)
                })
                .collect()
        })
        .collect()
}

fn polylog(
    log: &KafkaLog,
    topic: &str,
    partitions: u32,
    data: &[Vec<Record>],
) -> Result<f64, String> {
    let started = Instant::now();
    let mut n = 0usize;
    for (i, b) in data.iter().enumerate() {
        log.append(topic, i as u32 % partitions, b).map_err(|e| e.to_string())?;
        n += b.len();
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn bare_producer(brokers: &str) -> Result<ThreadedProducer<DefaultProducerContext>, String> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .map_err(|e| format!("bare producer: {e}"))
}

fn send(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    partition: i32,
    r: &Record,
) -> Result<(), String> {
    let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).partition(partition);
    if let Some(k) = &r.key {
        rec = rec.key(k.as_slice());
    }
    if let Some(v) = &r.value {
        rec = rec.payload(v.as_slice());
    }
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                back,
            )) => {
                rec = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(format!("bare producer: {e}")),
        }
    }
}

/// The bare loop: each batch sent, then flushed (every record acknowledged) before the next.
fn baseline(
    brokers: &str,
    topic: &str,
    partitions: u32,
    data: &[Vec<Record>],
) -> Result<f64, String> {
    let p = bare_producer(brokers)?;
    let started = Instant::now();
    let mut n = 0usize;
    for (i, b) in data.iter().enumerate() {
        let partition = (i as u32 % partitions) as i32;
        for r in b {
            send(&p, topic, partition, r)?;
        }
        p.flush(Duration::from_secs(60)).map_err(|e| format!("bare producer flush: {e}"))?;
        n += b.len();
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Everything sent, one flush at the end (no per-batch acknowledgement).
fn pipelined(
    brokers: &str,
    topic: &str,
    partitions: u32,
    data: &[Vec<Record>],
) -> Result<f64, String> {
    let p = bare_producer(brokers)?;
    let started = Instant::now();
    let mut n = 0usize;
    for (i, b) in data.iter().enumerate() {
        let partition = (i as u32 % partitions) as i32;
        for r in b {
            send(&p, topic, partition, r)?;
        }
        n += b.len();
    }
    p.flush(Duration::from_secs(120)).map_err(|e| format!("bare producer flush: {e}"))?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub fn run(opts: &Opts) -> Result<(), String> {
    let records: usize = opts.get("records", if opts.quick { 100_000 } else { 1_000_000 })?;
    let batch: usize = opts.get("batch", 1000)?;
    let partitions: u32 = opts.get("partitions", 3)?;
    if batch == 0 || records < batch || partitions == 0 {
        return Err("--batch must be between 1 and --records, --partitions at least 1".into());
    }
    let data = batches(records / batch, batch);
    let broker = KafkaBroker::start().map_err(|e| e.to_string())?;
    let brokers = broker.brokers();
    let mut o = KafkaOptions::new(&brokers);
    o.replication_factor = 1;
    let log = KafkaLog::connect(o).map_err(|e| e.to_string())?;
    println!(
        "kafka_produce: {} records of {RECORD_BYTES} bytes in batches of {batch} over {partitions} partitions of a tansu broker (in memory), each batch acknowledged (acks=all, idempotent) before the next; best of {RUNS} runs each",
        data.len() * batch
    );
    let (mut best_p, mut best_b) = (0f64, 0f64);
    for run in 0..RUNS {
        let (pt, bt) = (format!("polylog-{run}"), format!("baseline-{run}"));
        log.create_topic(&pt, &TopicConfig::new(partitions)).map_err(|e| e.to_string())?;
        log.create_topic(&bt, &TopicConfig::new(partitions)).map_err(|e| e.to_string())?;
        let (p, b) = if run % 2 == 0 {
            let b = baseline(&brokers, &bt, partitions, &data)?;
            (polylog(&log, &pt, partitions, &data)?, b)
        } else {
            let p = polylog(&log, &pt, partitions, &data)?;
            (p, baseline(&brokers, &bt, partitions, &data)?)
        };
        println!("  run {}: polylog {p:.0} rec/s, bare producer loop {b:.0} rec/s", run + 1);
        best_p = best_p.max(p);
        best_b = best_b.max(b);
    }
    log.create_topic("pipelined", &TopicConfig::new(partitions)).map_err(|e| e.to_string())?;
    let all = pipelined(&brokers, "pipelined", partitions, &data)?;
    println!("  for scale: the bare loop sending everything, one flush at the end: {all:.0} rec/s");
    println!(
        "RESULT kafka_produce polylog={best_p:.0}records/s baseline={best_b:.0}records/s ratio={:.2}",
        best_p / best_b
    );
    Ok(())
}
