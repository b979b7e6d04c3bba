//! `kafka_produce`: 200-byte records appended in batches through Polylog's Kafka backend
//! (`Log::append`: idempotent producer, `acks=all`, returns once the cluster acknowledged the
//! batch, with its offsets), against a bare producer loop of the same client library (rdkafka,
//! same settings) sending the same records to the same broker, one flush at the end (it never
//! waits for an acknowledgement before sending more, which Polylog does after every batch).
//! The scenario starts its own broker (tansu, in memory).

use std::time::{Duration, Instant};

use polylog_kafka::{KafkaLog, KafkaOptions};
use polylog_log::{Log, Record, TopicConfig};
use polylog_testkit::KafkaBroker;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::Opts;

const RECORD_BYTES: usize = crate::log_append::RECORD_BYTES;
/// Each side runs this many times, alternating which goes first; the best run counts.
const RUNS: usize = 3;

/// Appends every batch, partition `i % partitions` for batch `i`, from `appenders` threads
/// (each its own share of the partitions, appending one batch at a time).
fn polylog(
    log: &KafkaLog,
    topic: &str,
    partitions: u32,
    data: &[&[Record]],
    appenders: u32,
) -> Result<f64, String> {
    let started = Instant::now();
    let results: Vec<Result<usize, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..appenders)
            .map(|a| {
                s.spawn(move || {
                    let mut n = 0usize;
                    for (i, b) in data.iter().enumerate() {
                        let p = i as u32 % partitions;
                        if p % appenders == a {
                            log.append(topic, p, b).map_err(|e| e.to_string())?;
                            n += b.len();
                        }
                    }
                    Ok(n)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(Err("appender panicked".into()))).collect()
    });
    let mut n = 0;
    for r in results {
        n += r?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn bare_producer(brokers: &str) -> Result<ThreadedProducer<DefaultProducerContext>, String> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
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

/// The bare loop: everything sent, one flush at the end.
fn bare_loop(
    brokers: &str,
    topic: &str,
    partitions: u32,
    data: &[&[Record]],
) -> Result<f64, String> {
    let p = bare_producer(brokers)?;
    let started = Instant::now();
    let mut n = 0usize;
    for (i, b) in data.iter().enumerate() {
        let partition = (i as u32 % partitions) as i32;
        for r in b.iter() {
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
    let appenders: u32 = opts.get("appenders", 1)?;
    if batch == 0 || records < batch || partitions == 0 || appenders == 0 {
        return Err(
            "--batch must be between 1 and --records, --partitions and --appenders at least 1"
                .into(),
        );
    }
    // The same few distinct batches over and over (as in log_append), so memory stays small.
    let pool = crate::log_append::pool(batch);
    let data: Vec<&[Record]> =
        (0..records / batch).map(|i| pool[i % pool.len()].as_slice()).collect();
    let broker = KafkaBroker::start().map_err(|e| e.to_string())?;
    let brokers = broker.brokers();
    let mut o = KafkaOptions::new(&brokers);
    o.replication_factor = 1;
    let log = KafkaLog::connect(o).map_err(|e| e.to_string())?;
    println!(
        "kafka_produce: {} records of {RECORD_BYTES} bytes in batches of {batch} over {partitions} partitions of a tansu broker (in memory), Polylog's appends ({appenders} appender thread(s)) each acknowledged (acks=all, idempotent) before the next, the bare loop flushing once at the end; best of {RUNS} runs each",
        data.len() * batch
    );
    let (mut best_p, mut best_b) = (0f64, 0f64);
    for run in 0..RUNS {
        let (pt, bt) = (format!("polylog-{run}"), format!("baseline-{run}"));
        log.create_topic(&pt, &TopicConfig::new(partitions)).map_err(|e| e.to_string())?;
        log.create_topic(&bt, &TopicConfig::new(partitions)).map_err(|e| e.to_string())?;
        let (p, b) = if run % 2 == 0 {
            let b = bare_loop(&brokers, &bt, partitions, &data)?;
            (polylog(&log, &pt, partitions, &data, appenders)?, b)
        } else {
            let p = polylog(&log, &pt, partitions, &data, appenders)?;
            (p, bare_loop(&brokers, &bt, partitions, &data)?)
        };
        println!("  run {}: polylog {p:.0} rec/s, bare producer loop {b:.0} rec/s", run + 1);
        best_p = best_p.max(p);
        best_b = best_b.max(b);
    }
    println!(
        "RESULT kafka_produce polylog={best_p:.0}records/s baseline={best_b:.0}records/s ratio={:.2}",
        best_p / best_b
    );
    Ok(())
}
