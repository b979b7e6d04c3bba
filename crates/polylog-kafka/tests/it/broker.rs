//! Against a real Kafka-protocol broker (`tansu`, in-memory, one per test): topics created with
//! their partitions and cleanup policy, appends and readers, group offsets, and what a standard
//! client (the `confluent-kafka` Python package) reads of what Polylog wrote.

use std::time::Duration;

use polylog_kafka::{KafkaLog, KafkaOptions};
use polylog_log::{Log, LogError, Record, StartAt, TopicConfig};
use polylog_testkit::KafkaBroker;

fn connect(broker: &KafkaBroker) -> KafkaLog {
    let mut o = KafkaOptions::new(&broker.brokers());
    o.replication_factor = 1;
    o.timeout = Duration::from_secs(20);
    o.session_timeout = Duration::from_secs(6);
    KafkaLog::connect(o).unwrap()
}

fn read_all(log: &dyn Log, topic: &str, partition: u32) -> Vec<polylog_log::StoredRecord> {
    let end = log.durable_offset(topic, partition).unwrap();
    let mut r = log.reader(topic, partition, StartAt::Beginning).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while r.position() < end {
        assert!(std::time::Instant::now() < deadline, "reading {topic}/{partition} stalled");
        out.extend(r.poll(1000, Duration::from_millis(200)).unwrap());
    }
    out
}

#[test]
fn topics_are_created_with_partitions_and_cleanup_policy() {
    let broker = KafkaBroker::start().unwrap();
    let log = connect(&broker);
    log.create_topic("views.videos", &TopicConfig::new(3).compacted()).unwrap();
    log.create_topic("app.public.videos", &TopicConfig::new(2)).unwrap();
    let topics = log.topics().unwrap();
    assert!(topics.contains(&"views.videos".to_string()), "{topics:?}");
    let d = log.describe_topic("views.videos").unwrap();
    assert_eq!(d.partitions.len(), 3);
    assert!(d.config.compacted, "cleanup.policy=compact as the broker reports it");
    let d = log.describe_topic("app.public.videos").unwrap();
    assert_eq!(d.partitions.len(), 2);
    assert!(!d.config.compacted);
    assert_eq!(
        d.config.retention_ms, None,
        "kept forever unless configured, as on the embedded log"
    );
    let mut c = TopicConfig::new(1);
    c.retention_ms = Some(3_600_000);
    log.create_topic("events", &c).unwrap();
    assert_eq!(log.describe_topic("events").unwrap().config.retention_ms, Some(3_600_000));
    assert!(matches!(
        log.create_topic("views.videos", &TopicConfig::new(3)),
        Err(LogError::TopicExists(_))
    ));
    assert!(matches!(log.describe_topic("nope"), Err(LogError::UnknownTopic(_))));
}

#[test]
fn appends_are_read_back_in_order_with_their_offsets() {
    let broker = KafkaBroker::start().unwrap();
    let log = connect(&broker);
    log.create_topic("t", &TopicConfig::new(2)).unwrap();
    let mut next = 0;
    for round in 0..20u64 {
        let records: Vec<Record> = (0..50)
            .map(|i| {
                let mut r = Record::new(format!("k{i}"), format!("{round}-{i}"));
                r.headers = vec![("round".into(), round.to_string().into_bytes())];
                r
            })
            .collect();
        let a = log.append("t", 1, &records).unwrap();
        assert_eq!((a.base_offset, a.last_offset), (next, next + 49));
        next += 50;
    }
    log.append("t", 1, &[Record::tombstone("k1")]).unwrap();
    assert_eq!(log.durable_offset("t", 1).unwrap(), 1001);
    let got = read_all(&log, "t", 1);
    assert_eq!(got.len(), 1001);
    for (i, r) in got.iter().enumerate().take(1000) {
        assert_eq!(r.offset, i as u64);
        let (round, n) = (i / 50, i % 50);
        assert_eq!(r.value.as_deref(), Some(format!("{round}-{n}").as_bytes()));
        assert_eq!(r.headers, vec![("round".to_string(), round.to_string().into_bytes())]);
    }
    assert_eq!(got[1000].value, None, "a tombstone stays a tombstone");
    let mut from = log.reader("t", 1, StartAt::Offset(990)).unwrap();
    let got = from.poll(5, Duration::from_secs(10)).unwrap();
    assert_eq!(got.first().map(|r| r.offset), Some(990));

    // From inside the last batch, with nothing after it: the rest of the batch.
    log.append("t", 0, &(0..10).map(|i| Record::new("k", format!("{i}"))).collect::<Vec<_>>())
        .unwrap();
    let mut tail = log.reader("t", 0, StartAt::Offset(6)).unwrap();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while got.len() < 4 && std::time::Instant::now() < deadline {
        got.extend(
            tail.poll(10, Duration::from_millis(200)).unwrap().into_iter().map(|r| r.offset),
        );
    }
    assert_eq!(got, [6, 7, 8, 9]);
    log.append("t", 0, &[Record::new("k", "10")]).unwrap();
    let next = tail.poll(10, Duration::from_secs(10)).unwrap();
    assert_eq!(next.iter().map(|r| r.offset).collect::<Vec<_>>(), [10]);

    log.commit_offsets("g", &[("t".into(), 1, 990)]).unwrap();
    assert_eq!(log.committed_offsets("g", "t").unwrap().get(&1), Some(&990));
    assert!(matches!(
        log.append("t", 5, &[Record::new("k", "v")]),
        Err(LogError::UnknownPartition { partitions: 2, .. })
    ));
}

/// Appends from several threads to one partition: each one's end is durable when its append
/// returns (it was acknowledged with `acks=all`), whatever high watermark the broker reports
/// (tansu 0.6 can report an older batch's), and a reader gets every record once.
#[test]
fn concurrent_appends_to_one_partition_are_durable_when_acknowledged() {
    let broker = KafkaBroker::start().unwrap();
    let log = std::sync::Arc::new(connect(&broker));
    log.create_topic("c", &TopicConfig::new(1)).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = std::sync::Arc::clone(&log);
            std::thread::spawn(move || {
                for round in 0..25 {
                    let batch: Vec<Record> =
                        (0..20).map(|i| Record::new("k", format!("{t}-{round}-{i}"))).collect();
                    let a = log.append("c", 0, &batch).unwrap();
                    log.wait_durable("c", 0, a.last_offset + 1, Duration::from_secs(5))
                        .expect("an acknowledged append is durable");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(log.durable_offset("c", 0).unwrap(), 2000);
    let got = read_all(&*log, "c", 0);
    assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), (0..2000).collect::<Vec<_>>());
}

/// What `confluent-kafka` (a standard client over a recent librdkafka) reads of a topic
/// Polylog wrote: keys, values and headers as written, in order.
#[test]
fn a_standard_client_reads_what_polylog_wrote() {
    let broker = KafkaBroker::start().unwrap();
    let log = connect(&broker);
    log.create_topic("app.public.t", &TopicConfig::new(1)).unwrap();
    let records: Vec<Record> = (0..100)
        .map(|i| {
            let mut r = Record::new(format!("{{\"id\":{i}}}"), format!("{{\"n\":{i}}}"));
            r.headers = vec![("h".into(), b"x".to_vec())];
            r
        })
        .collect();
    log.append("app.public.t", 0, &records).unwrap();
    let out: Vec<serde_json::Value> =
        polylog_testkit::confluent_read(&broker.brokers(), "app.public.t", 100)
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(out.len(), 100);
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line["key"], format!("{{\"id\":{i}}}"));
        assert_eq!(line["value"], format!("{{\"n\":{i}}}"));
        assert_eq!(line["offset"], i as u64);
        assert_eq!(line["headers"], serde_json::json!([["h", "x"]]));
    }
}

/// Members of one group split the partitions and the survivor gets all of them when another
/// leaves; while the group rebalances a member owns nothing.
#[test]
fn group_members_split_partitions_and_take_over() {
    let broker = KafkaBroker::start().unwrap();
    let (a, b) = (connect(&broker), connect(&broker));
    a.create_topic("out", &TopicConfig::new(4)).unwrap();
    let topics = ["out".to_string()];
    let mut ma = a.join_group("g.members", &topics).unwrap();
    let mut mb = b.join_group("g.members", &topics).unwrap();
    let all: std::collections::BTreeSet<(String, u32)> =
        (0..4).map(|p| ("out".to_string(), p)).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (oa, ob) = (ma.owned(&a).unwrap(), mb.owned(&b).unwrap());
        if let (Some(oa), Some(ob)) = (&oa, &ob) {
            if oa.len() == 2 && ob.len() == 2 {
                assert!(oa.is_disjoint(ob), "{oa:?} / {ob:?}");
                assert_eq!(oa.union(ob).cloned().collect::<std::collections::BTreeSet<_>>(), all);
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "never split: {oa:?} / {ob:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(ma);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ob = mb.owned(&b).unwrap();
        if ob.as_ref() == Some(&all) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the survivor never took over: {ob:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
