//! Two processes' sinks sharing a topic's partitions on Kafka (tansu): each writes the
//! partitions it owns; when one stops, the other takes its partitions over from the group's
//! committed offsets and every record is written.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use polylog_kafka::{KafkaLog, KafkaOptions};
use polylog_log::{Log, Record, TopicConfig};
use polylog_sinks::{Sink, SinkConfig};
use polylog_testkit::{KafkaBroker, TempDir};

fn kafka(brokers: &str) -> Arc<dyn Log> {
    let mut o = KafkaOptions::new(brokers);
    o.replication_factor = 1;
    o.session_timeout = Duration::from_secs(6);
    Arc::new(KafkaLog::connect(o).expect("connect to Kafka"))
}

/// The record numbers a file sink wrote, and the partitions they came from.
fn written(dir: &std::path::Path) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let (mut ns, mut parts) = (BTreeSet::new(), BTreeSet::new());
    for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for line in std::fs::read_to_string(f.path()).unwrap_or_default().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if let (Some(n), Some(p)) = (v["value"]["n"].as_u64(), v["partition"].as_u64()) {
                ns.insert(n);
                parts.insert(p);
            }
        }
    }
    (ns, parts)
}

#[test]
fn two_sinks_split_partitions_and_one_takes_over_when_the_other_stops() {
    let broker = KafkaBroker::start().expect("Kafka broker");
    let log = kafka(&broker.brokers());
    log.create_topic("events", &TopicConfig::new(4)).expect("topic");
    let append = |from: u64, to: u64| {
        for i in from..to {
            let r = Record::new(format!("k{i}"), format!("{{\"n\":{i}}}"));
            log.append("events", (i % 4) as u32, &[r]).expect("append");
        }
    };
    let dir = TempDir::new("sink-shared");
    let start = |name: &str| {
        let out = dir.path().join(name);
        let text = format!("kind = \"file\"\ntopics = [\"events\"]\npath = \"{}\"", out.display());
        let cfg: SinkConfig = toml::from_str(&text).expect("config");
        // Two processes running sink "f": two clients of the cluster.
        let sink = Sink::new("f", cfg, kafka(&broker.brokers())).expect("sink").shared(true);
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let handle = std::thread::spawn(move || sink.run(&s, false));
        (out, stop, handle)
    };
    let (out_a, stop_a, a) = start("a");
    let (out_b, stop_b, b) = start("b");
    // Records keep coming until both have joined and written something.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut next = 0;
    while written(&out_a).0.is_empty() || written(&out_b).0.is_empty() {
        assert!(Instant::now() < deadline, "one of the sinks never wrote anything");
        append(next, next + 8);
        next += 8;
        std::thread::sleep(Duration::from_millis(200));
    }
    // Now split: each partition's new records are written by one of them.
    append(10_000, 10_400);
    let deadline = Instant::now() + Duration::from_secs(90);
    let later = |n: &u64| (10_000..10_400).contains(n);
    loop {
        let (na, nb) = (written(&out_a).0, written(&out_b).0);
        let (na, nb): (BTreeSet<u64>, BTreeSet<u64>) =
            (na.into_iter().filter(later).collect(), nb.into_iter().filter(later).collect());
        if na.union(&nb).count() == 400 {
            let parts = |ns: &BTreeSet<u64>| ns.iter().map(|n| n % 4).collect::<BTreeSet<_>>();
            let (pa, pb) = (parts(&na), parts(&nb));
            assert!(!pa.is_empty() && !pb.is_empty(), "both write: {pa:?} / {pb:?}");
            assert!(pa.is_disjoint(&pb), "each partition has one writer: {pa:?} / {pb:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the two sinks did not write everything between them: {} of 400",
            na.union(&nb).count()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // One stops (it leaves the group); the other takes its partitions over.
    stop_a.store(true, Ordering::SeqCst);
    a.join().expect("sink a").expect("sink a stops cleanly");
    append(20_000, 20_400);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (nb, pb) = written(&out_b);
        if (20_000..20_400).all(|n| nb.contains(&n)) {
            assert_eq!(pb.len(), 4, "the survivor wrote every partition");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the survivor did not take over: {} of 400 later records, partitions {pb:?}",
            (20_000..20_400).filter(|n| nb.contains(n)).count()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop_b.store(true, Ordering::SeqCst);
    b.join().expect("sink b").expect("sink b stops cleanly");
}
