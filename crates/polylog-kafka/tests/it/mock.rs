//! librdkafka's mock cluster: appends with their offsets, readers, tombstones, headers, group
//! offsets, errors. (The mock does not implement CreateTopics; `broker` tests `create_topic`.)

use std::time::Duration;

use polylog_kafka::{KafkaLog, KafkaOptions};
use polylog_log::{Log, LogError, Record, StartAt};
use rdkafka::mocking::MockCluster;

fn log(cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>) -> KafkaLog {
    let mut o = KafkaOptions::new(&cluster.bootstrap_servers());
    o.timeout = Duration::from_secs(10);
    KafkaLog::connect(o).unwrap()
}

#[test]
fn topics_appends_readers_and_group_offsets() {
    let cluster = MockCluster::new(1).unwrap();
    let log = log(&cluster);
    // The mock cluster does not implement CreateTopics: the topic is made on its side.
    cluster.create_topic("app.public.videos", 3, 1).unwrap();
    assert!(log.topics().unwrap().contains(&"app.public.videos".to_string()));
    assert_eq!(log.describe_topic("app.public.videos").unwrap().partitions.len(), 3);

    let mut records: Vec<Record> =
        (0..100).map(|i| Record::new(format!("k{i}"), format!("v{i}"))).collect();
    records[7].headers = vec![("h".into(), b"x".to_vec())];
    records[9] = Record::tombstone("k9");
    let a = log.append("app.public.videos", 1, &records).unwrap();
    assert_eq!((a.partition, a.base_offset, a.last_offset), (1, 0, 99));
    let b = log.append("app.public.videos", 1, &records[..10]).unwrap();
    assert_eq!((b.base_offset, b.last_offset), (100, 109));
    log.wait_durable("app.public.videos", 1, 110, Duration::from_secs(10)).unwrap();
    assert_eq!(log.durable_offset("app.public.videos", 1).unwrap(), 110);
    assert_eq!(log.durable_offset("app.public.videos", 0).unwrap(), 0);

    let mut r = log.reader("app.public.videos", 1, StartAt::Beginning).unwrap();
    let mut got = Vec::new();
    while got.len() < 110 {
        let batch = r.poll(1000, Duration::from_secs(5)).unwrap();
        assert!(!batch.is_empty(), "the reader stopped at {}", got.len());
        got.extend(batch);
    }
    assert_eq!(r.position(), 110);
    for (i, s) in got.iter().enumerate() {
        let want = &records[i % 100];
        assert_eq!(s.offset, i as u64);
        assert_eq!(s.key, want.key);
        assert_eq!(s.value, want.value, "offset {i}");
        assert_eq!(s.headers, want.headers, "offset {i}");
    }
    // Nothing more: an empty poll, not an error.
    assert!(r.poll(10, Duration::from_millis(200)).unwrap().is_empty());

    let mut r = log.reader("app.public.videos", 1, StartAt::Offset(105)).unwrap();
    let batch = r.poll(1000, Duration::from_secs(5)).unwrap();
    assert_eq!(batch.first().map(|s| s.offset), Some(105));

    log.commit_offsets(
        "sink.replica",
        &[("app.public.videos".into(), 1, 110), ("app.public.videos".into(), 2, 0)],
    )
    .unwrap();
    let c = log.committed_offsets("sink.replica", "app.public.videos").unwrap();
    assert_eq!(c.get(&1), Some(&110));
    assert_eq!(c.get(&0), None);

    assert!(matches!(log.append("nope", 0, &records[..1]), Err(LogError::UnknownTopic(_))));
    assert!(matches!(
        log.append("app.public.videos", 3, &records[..1]),
        Err(LogError::UnknownPartition { partitions: 3, .. })
    ));
}

#[test]
fn an_unreachable_cluster_is_a_clear_error() {
    let mut o = KafkaOptions::new("127.0.0.1:1");
    o.timeout = Duration::from_secs(2);
    let err = KafkaLog::connect(o).unwrap_err().to_string();
    assert!(err.contains("cannot reach the Kafka cluster at 127.0.0.1:1"), "{err}");
}
