//! The oracle: a randomized workload on a real Postgres, captured by the real source; at
//! quiescence every document equals what the same LEFT JOINs compute in Postgres.

use std::collections::BTreeMap;
use std::sync::Arc;

use polylog_testkit::PgCluster;
use serde_json::Value;

pub use polylog_testkit::videos::VIEW;
use polylog_testkit::videos::{transaction, ORACLE, SCHEMA};

use crate::support::{documents, open_log, view_config, Rng, RunningSource, RunningView, TempDir};

/// Documents Postgres computes, by key.
pub fn oracle(pg: &PgCluster, db: &str) -> BTreeMap<String, Value> {
    let out = pg.psql(db, ORACLE).expect("the oracle query");
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, d) = l.split_once('\t').expect("key and document");
            let key: Value = serde_json::from_str(k).expect("key");
            (serde_json::to_string(&key).expect("json"), serde_json::from_str(d).expect("document"))
        })
        .collect()
}

/// The view's documents without their versions.
pub fn view_documents(log: &dyn polylog_log::Log) -> BTreeMap<String, Value> {
    let (mut docs, _) = documents(log, "views.videos");
    for d in docs.values_mut() {
        if let Some(o) = d.as_object_mut() {
            assert!(
                o.remove("_version").and_then(|v| v.as_u64()).is_some(),
                "every document has a _version"
            );
        }
    }
    docs
}

pub fn assert_same(ours: &BTreeMap<String, Value>, theirs: &BTreeMap<String, Value>) {
    let mut diffs = Vec::new();
    for k in ours.keys().chain(theirs.keys()) {
        if ours.get(k) != theirs.get(k) && !diffs.iter().any(|(d, _, _)| d == k) {
            diffs.push((k.clone(), ours.get(k).cloned(), theirs.get(k).cloned()));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} documents differ from Postgres's, e.g. {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(3)]
    );
}

#[test]
fn documents_equal_the_same_left_joins_in_postgres() {
    let dir = TempDir::new("views-oracle");
    same_left_joins(open_log(dir.path()), dir.path());
}

/// The same with every topic on Kafka (a tansu broker).
#[test]
fn documents_equal_the_same_left_joins_in_postgres_on_kafka() {
    let broker = polylog_testkit::KafkaBroker::start().expect("Kafka broker");
    let mut o = polylog_kafka::KafkaOptions::new(&broker.brokers());
    o.replication_factor = 1;
    let log = Arc::new(polylog_kafka::KafkaLog::connect(o).expect("connect to Kafka"));
    let dir = TempDir::new("views-oracle-kafka");
    same_left_joins(log, dir.path());
}

fn same_left_joins(log: Arc<dyn polylog_log::Log>, dir: &std::path::Path) {
    let pg = PgCluster::start().expect("start Postgres");
    pg.create_database("app").expect("database");
    pg.psql("app", SCHEMA).expect("schema");
    let mut rng = Rng::from_env("views oracle");
    // Rows before the source starts arrive through the snapshot, the rest through the stream.
    for _ in 0..60 {
        pg.psql("app", &transaction(&mut rng)).expect("workload");
    }
    let src = RunningSource::start(&pg, "app", log.clone(), dir);
    src.wait_flushed(&pg, "app");
    let mut view = RunningView::start("videos", &view_config(VIEW), log.clone(), dir);
    for i in 0..300 {
        pg.psql("app", &transaction(&mut rng)).expect("workload");
        if i == 150 {
            // Stopped in the middle of the stream, the view picks up where it left off.
            view.stop().expect("clean stop");
            view = RunningView::start("videos", &view_config(VIEW), log.clone(), dir);
        }
    }
    src.wait_flushed(&pg, "app");
    view.wait_caught_up();
    let theirs = oracle(&pg, "app");
    assert!(theirs.len() > 5, "the workload leaves videos behind ({})", theirs.len());
    assert_same(&view_documents(&*log), &theirs);
    view.stop().expect("clean stop");
}
