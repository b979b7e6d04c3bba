//! Scale-out on Kafka: two processes run the same view and split its output partitions; one is
//! killed with `kill -9` mid-run; the survivor takes its partitions over and the output ends
//! equal to that of one view that ran alone over the same topics.
//!
//! The cluster is librdkafka's mock cluster (in this process, listening on a local port the
//! children connect to): tansu 0.6 never rebalances a group whose member stopped
//! heartbeating (it drops the member but the survivors are not told), so a killed member's
//! partitions would never move there. Orderly leaves are tested against tansu in
//! `polylog-kafka`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polylog_kafka::{KafkaLog, KafkaOptions};
use polylog_log::Log;
use polylog_views::{View, ViewOptions};
use rdkafka::mocking::MockCluster;

use crate::crash::random_transaction;
use crate::oracle::VIEW;
use crate::support::{documents, view_config, FakeSource, Rng, RunningView, TempDir};

const CHILD_ENV: &str = "POLYLOG_VIEWS_SHARE_CHILD";
const TABLES: [&str; 5] =
    ["public.videos", "public.publishers", "public.countries", "public.video_tags", "public.tags"];

fn kafka(brokers: &str) -> Arc<dyn Log> {
    let mut o = KafkaOptions::new(brokers);
    o.replication_factor = 1;
    o.session_timeout = Duration::from_secs(6);
    Arc::new(KafkaLog::connect(o).expect("connect to Kafka"))
}

/// The child's side: runs the view with `share` on until killed, printing its status.
#[test]
fn child_process_for_views_share_test() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let (brokers, dir) = spec.split_once(' ').expect("brokers and dir");
    let mut opts = ViewOptions::new(std::path::Path::new(dir).join("state"));
    opts.checkpoint_interval = Duration::from_millis(50);
    opts.share = true;
    let view = Arc::new(
        View::new("videos", &view_config(VIEW), kafka(brokers), opts).expect("child: view"),
    );
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| loop {
            let st = view.status.lock().expect("status").clone();
            let parts = st.partitions.unwrap_or_default();
            println!("status {} {} {} {parts:?}", st.state, st.changes, st.lag);
            std::thread::sleep(Duration::from_millis(20));
        });
        view.run(&stop).expect("child: the view runs");
    });
}

/// A child process and the last status line it printed.
struct Member {
    child: Child,
    last: Arc<Mutex<String>>,
}

impl Member {
    fn start(brokers: &str, dir: &std::path::Path) -> Member {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["scale_out::child_process_for_views_share_test", "--exact", "--nocapture"])
            .env(CHILD_ENV, format!("{brokers} {}", dir.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let last = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("stdout");
        let l = Arc::clone(&last);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with("status ") {
                    *l.lock().expect("status") = line;
                }
            }
        });
        Member { child, last }
    }

    fn status(&self) -> String {
        self.last.lock().expect("status").clone()
    }

    /// Waits until the status line ends with `partitions` (e.g. `[0, 1]`).
    fn wait_owning(&self, partitions: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.status().ends_with(partitions) {
            assert!(Instant::now() < deadline, "never owned {partitions}: {}", self.status());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_processes_share_a_view_and_the_survivor_takes_over() {
    let t0 = Instant::now();
    let cluster = MockCluster::new(1).expect("mock cluster");
    // The mock cluster does not create topics on request: they are made on its side.
    for t in TABLES {
        cluster.create_topic(&format!("app.{t}"), 2, 1).expect("topic");
    }
    for (t, n) in [("app.transaction", 1), ("views.videos", 2), ("views.reference", 2)] {
        cluster.create_topic(t, n, 1).expect("topic");
    }
    let brokers = cluster.bootstrap_servers();
    let log = kafka(&brokers);
    let mut src = FakeSource::existing(Arc::clone(&log), "app", 2);
    let mut rng = Rng::new(7);
    let mut feed = |n: usize| {
        for _ in 0..n {
            src.commit(&random_transaction(&mut rng));
        }
    };
    feed(300);
    eprintln!("scale-out: fed {:?}", t0.elapsed());
    let root = TempDir::new("views-share");
    let a = Member::start(&brokers, &root.path().join("a"));
    let b = Member::start(&brokers, &root.path().join("b"));
    // Two output partitions (as many as the root topic has): one each.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !(a.status().ends_with("[0]") && b.status().ends_with("[1]")
        || a.status().ends_with("[1]") && b.status().ends_with("[0]"))
    {
        assert!(
            Instant::now() < deadline,
            "the two processes never split the partitions: {:?} / {:?}",
            a.status(),
            b.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("scale-out: split {:?}", t0.elapsed());
    feed(300);
    // Killed mid-run, with changes still coming.
    let mut a = a;
    a.child.kill().expect("kill -9");
    a.child.wait().expect("reap");
    feed(300);
    b.wait_owning("[0, 1]", Duration::from_secs(90));
    eprintln!("scale-out: taken over {:?}", t0.elapsed());
    feed(100);

    // The survivor catches up; a view that runs alone over the same topics is the reference.
    let reference =
        RunningView::start("reference", &view_config(VIEW), Arc::clone(&log), root.path());
    reference.wait_caught_up();
    let want = documents(&*log, "views.reference").0;
    eprintln!("scale-out: reference {:?}", t0.elapsed());
    assert!(want.len() > 100, "the workload leaves documents ({})", want.len());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = documents(&*log, "views.videos").0;
        if got == want {
            eprintln!("scale-out: equal {:?}", t0.elapsed());
            break;
        }
        if Instant::now() > deadline {
            let diff: Vec<_> =
                want.keys().filter(|k| got.get(*k) != want.get(*k)).take(3).collect();
            panic!(
                "the shared view's output never equalled the reference: {} vs {} documents, e.g. {diff:?}; survivor: {}",
                got.len(),
                want.len(),
                b.status()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    reference.stop().expect("clean stop");
}
