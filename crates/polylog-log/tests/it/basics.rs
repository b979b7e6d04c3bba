//! The log's everyday contract: append, read, follow, reopen, indexes, retention, groups, and
//! the refusals (bad names, locked or foreign directories, failed fsyncs, a full disk).

use std::sync::Arc;
use std::time::{Duration, Instant};

use polylog_log::{
    partition_for_key, EmbeddedLog, Faults, FsyncPolicy, Log, LogError, LogOptions, Record,
    StartAt, TopicConfig,
};

use crate::support::{open, opts, read_all, rec, Rng, TempDir};

#[test]
fn records_round_trip_across_partitions_and_reopen() {
    let dir = TempDir::new("roundtrip");
    let mut written = Vec::new();
    {
        let log = open(dir.path());
        log.create_topic("app.public.videos", &TopicConfig::new(3)).expect("create");
        for i in 0..300u32 {
            let key = format!("{{\"id\":{i}}}");
            let p = partition_for_key(key.as_bytes(), 3);
            let mut r = rec(&key, &format!("{{\"title\":\"video {i}\"}}"));
            r.headers = vec![("source".into(), b"test".to_vec()), ("source".into(), vec![0, 255])];
            if i % 7 == 0 {
                r.value = None; // tombstone
            }
            let a = log.append("app.public.videos", p, std::slice::from_ref(&r)).expect("append");
            assert_eq!(a.base_offset, a.last_offset);
            written.push((p, a.base_offset, r));
        }
        log.flush().expect("flush");
    }
    let log = open(dir.path());
    assert_eq!(log.topics().expect("topics"), vec!["app.public.videos".to_string()]);
    for p in 0..3 {
        let got = read_all(&log, "app.public.videos", p, StartAt::Beginning);
        let want: Vec<_> = written.iter().filter(|w| w.0 == p).collect();
        assert_eq!(got.len(), want.len(), "partition {p}");
        for (g, (_, off, r)) in got.iter().zip(want) {
            assert_eq!((g.partition, g.offset), (p, *off));
            assert_eq!((&g.key, &g.value, &g.headers), (&r.key, &r.value, &r.headers));
        }
        // Offsets continue after a reopen.
        let a = log.append("app.public.videos", p, &[rec("k", "v")]).expect("append after reopen");
        assert_eq!(a.base_offset, got.len() as u64);
    }
}

#[test]
fn segments_roll_and_every_offset_and_time_can_be_sought() {
    let dir = TempDir::new("seek");
    let log = open(dir.path());
    let cfg = TopicConfig { segment_bytes: 8192, ..TopicConfig::new(1) };
    log.create_topic("t", &cfg).expect("create");
    let mut rng = Rng::new(7);
    let mut n = 0u64;
    for b in 0..200 {
        let batch: Vec<Record> = (0..1 + rng.below(8))
            .map(|_| {
                n += 1;
                let mut r = Record::new(format!("k{n}"), rng.bytes_below(200));
                r.timestamp_ms = Some(1_000_000 + b * 10);
                r
            })
            .collect();
        log.append("t", 0, &batch).expect("append");
    }
    let d = log.describe_topic("t").expect("describe");
    assert!(d.partitions[0].segments > 5, "segments rolled by size: {:?}", d.partitions[0]);
    assert_eq!(d.partitions[0].end_offset, n);
    drop(log);
    let log = open(dir.path()); // sealed segments now come from their index files
    let all = read_all(&log, "t", 0, StartAt::Beginning);
    assert_eq!(all.len() as u64, n);
    for o in (0..n).step_by(13) {
        let got = read_all(&log, "t", 0, StartAt::Offset(o));
        assert_eq!(got.first().map(|r| r.offset), Some(o));
        assert_eq!(got.len() as u64, n - o);
    }
    for b in [0i64, 1, 57, 123, 199] {
        let ts = 1_000_000 + b * 10;
        let got = read_all(&log, "t", 0, StartAt::Timestamp(ts - 5));
        let first = all.iter().find(|r| r.timestamp_ms >= ts - 5).expect("exists");
        assert_eq!(got.first().map(|r| r.offset), Some(first.offset), "time {ts}");
    }
    assert!(read_all(&log, "t", 0, StartAt::Timestamp(9_000_000)).is_empty());
    assert!(read_all(&log, "t", 0, StartAt::End).is_empty());
}

#[test]
fn a_follower_is_woken_by_an_append() {
    let dir = TempDir::new("follow");
    let log = Arc::new(
        EmbeddedLog::open(dir.path(), LogOptions { fsync: FsyncPolicy::Always, ..opts() })
            .expect("open"),
    );
    log.create_topic("t", &TopicConfig::new(1)).expect("create");
    let mut reader = log.reader("t", 0, StartAt::End).expect("reader");
    let writer = Arc::clone(&log);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let a = writer.append("t", 0, &[rec("a", "1")]).expect("append");
        writer.wait_durable("t", 0, a.last_offset + 1, Duration::from_secs(10)).expect("durable");
    });
    let started = Instant::now();
    let got = reader.poll(10, Duration::from_secs(20)).expect("poll");
    assert_eq!(got.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(10), "woken, not timed out");
    t.join().expect("writer");
    // Nothing more: poll returns empty after its timeout.
    assert!(reader.poll(10, Duration::from_millis(50)).expect("poll").is_empty());
}

#[test]
fn interval_fsync_makes_records_durable_in_the_background() {
    let dir = TempDir::new("interval");
    let o = LogOptions { fsync: FsyncPolicy::Interval, fsync_interval_ms: 20, ..opts() };
    let log = EmbeddedLog::open(dir.path(), o).expect("open");
    log.create_topic("t", &TopicConfig::new(1)).expect("create");
    let a = log.append("t", 0, &[rec("a", "1"), rec("b", "2")]).expect("append");
    log.wait_durable("t", 0, a.last_offset + 1, Duration::from_secs(10)).expect("durable");
    assert_eq!(log.durable_offset("t", 0).expect("durable"), 2);
}

#[test]
fn retention_deletes_old_segments_by_size_and_time() {
    let dir = TempDir::new("retention");
    let log = open(dir.path());
    let by_size =
        TopicConfig { segment_bytes: 4096, retention_bytes: Some(20_000), ..TopicConfig::new(1) };
    let by_time =
        TopicConfig { segment_bytes: 4096, retention_ms: Some(60_000), ..TopicConfig::new(1) };
    log.create_topic("size", &by_size).expect("create");
    log.create_topic("time", &by_time).expect("create");
    let forever =
        TopicConfig { segment_bytes: 4096, retention_ms: Some(u64::MAX), ..TopicConfig::new(1) };
    log.create_topic("forever", &forever).expect("create");
    let old = polylog_log::now_ms() - 3_600_000;
    for i in 0..400u64 {
        log.append("size", 0, &[rec(&format!("k{i}"), &"x".repeat(200))]).expect("append");
        let mut r = rec(&format!("k{i}"), &"y".repeat(200));
        r.timestamp_ms = Some(if i < 300 { old } else { polylog_log::now_ms() });
        log.append("time", 0, std::slice::from_ref(&r)).expect("append");
        log.append("forever", 0, &[r]).expect("append");
    }
    let report = log.maintain_now().expect("maintain");
    assert!(report.segments_deleted > 0);
    let size = log.describe_topic("size").expect("describe").partitions[0].clone();
    assert!(size.size_bytes >= 20_000 && size.size_bytes < 20_000 + 2 * 4096, "{size:?}");
    assert_eq!(size.end_offset, 400);
    let kept = read_all(&log, "size", 0, StartAt::Beginning);
    assert_eq!(kept.first().map(|r| r.offset), Some(size.start_offset));
    assert_eq!(kept.len() as u64, 400 - size.start_offset);
    let kept = log.describe_topic("forever").expect("describe").partitions[0].clone();
    assert_eq!(kept.start_offset, 0, "a retention of u64::MAX ms keeps everything");
    let time = log.describe_topic("time").expect("describe").partitions[0].clone();
    assert!(time.start_offset > 250 && time.start_offset <= 300, "{time:?}");
    // Asking for a removed offset of a non-compacted topic is an error that says so.
    match log.reader("size", 0, StartAt::Offset(0)) {
        Err(LogError::OffsetOutOfRange { start, .. }) => assert_eq!(start, size.start_offset),
        other => panic!("expected OffsetOutOfRange, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn consumer_group_offsets_are_committed_durably() {
    let dir = TempDir::new("groups");
    {
        let log = open(dir.path());
        log.create_topic("t", &TopicConfig::new(2)).expect("create");
        log.commit_offsets("sink-a", &[("t".into(), 0, 5), ("t".into(), 1, 7)]).expect("commit");
        log.commit_offsets("sink-a", &[("t".into(), 1, 9)]).expect("commit");
        assert!(matches!(
            log.commit_offsets("sink-a", &[("t".into(), 2, 1)]),
            Err(LogError::UnknownPartition { .. })
        ));
        assert!(matches!(
            log.commit_offsets("bad/name", &[]),
            Err(LogError::InvalidGroupName { .. })
        ));
    }
    let log = open(dir.path());
    let c = log.committed_offsets("sink-a", "t").expect("committed");
    assert_eq!(c.into_iter().collect::<Vec<_>>(), vec![(0, 5), (1, 9)]);
    assert!(log.committed_offsets("other", "t").expect("committed").is_empty());
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let dir = TempDir::new("bad");
    let log = open(dir.path());
    for name in ["", "a/b", "..", "spaces are bad", &"x".repeat(250)] {
        let err = log.create_topic(name, &TopicConfig::new(1)).expect_err("bad name accepted");
        assert!(matches!(err, LogError::InvalidTopicName { .. }), "{name:?}: {err}");
    }
    let err = log.create_topic("t", &TopicConfig::new(0)).expect_err("0 partitions");
    assert!(err.to_string().contains("partitions"), "{err}");
    log.create_topic("t", &TopicConfig::new(1)).expect("create");
    assert!(matches!(log.create_topic("t", &TopicConfig::new(1)), Err(LogError::TopicExists(_))));
    assert!(matches!(log.append("nope", 0, &[rec("a", "b")]), Err(LogError::UnknownTopic(_))));
    assert!(matches!(log.append("t", 1, &[rec("a", "b")]), Err(LogError::UnknownPartition { .. })));
    assert!(matches!(log.append("t", 0, &[]), Err(LogError::InvalidAppend(_))));
    let huge = Record::new("k", vec![0u8; 17 << 20]);
    let err = log.append("t", 0, &[huge]).expect_err("oversized batch");
    assert!(err.to_string().contains("batch_bytes_max"), "{err}");
    log.create_topic("c", &TopicConfig::new(1).compacted()).expect("create");
    let keyless = Record { value: Some(b"v".to_vec()), ..Record::default() };
    let err = log.append("c", 0, &[keyless]).expect_err("keyless record in compacted topic");
    assert!(err.to_string().contains("needs a key"), "{err}");
    // Nothing was written by the refused appends.
    assert_eq!(log.describe_topic("t").expect("describe").partitions[0].end_offset, 0);
}

#[test]
fn one_writer_per_data_directory_and_readers_follow_it() {
    let dir = TempDir::new("lock");
    let log = open(dir.path());
    log.create_topic("t", &TopicConfig::new(1)).expect("create");
    log.append("t", 0, &[rec("a", "1")]).expect("append");
    let err = EmbeddedLog::open(dir.path(), opts()).expect_err("second writer");
    let msg = err.to_string();
    assert!(matches!(err, LogError::Locked { .. }), "{msg}");
    assert!(msg.contains(&format!("pid {}", std::process::id())), "names the holder: {msg}");
    // A read-only view works beside the writer and sees what it appends.
    let ro = EmbeddedLog::open_read_only(dir.path(), opts()).expect("read-only");
    assert!(matches!(ro.append("t", 0, &[rec("a", "1")]), Err(LogError::ReadOnly)));
    let mut r = ro.reader("t", 0, StartAt::Beginning).expect("reader");
    assert_eq!(r.poll(10, Duration::from_secs(5)).expect("poll").len(), 1);
    log.append("t", 0, &[rec("b", "2"), rec("c", "3")]).expect("append");
    let mut more = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while more.len() < 2 && Instant::now() < deadline {
        more.extend(r.poll(10, Duration::from_millis(500)).expect("poll"));
    }
    assert_eq!(more.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![1, 2]);
    drop(log);
    EmbeddedLog::open(dir.path(), opts()).expect("lock released when the writer closes");
}

#[test]
fn a_directory_that_is_not_polylogs_is_refused() {
    let dir = TempDir::new("foreign");
    std::fs::write(dir.path().join("important.txt"), "keep me").expect("write");
    let err = EmbeddedLog::open(dir.path(), opts()).expect_err("foreign dir");
    assert!(matches!(err, LogError::NotADataDir { .. }), "{err}");
    assert!(err.to_string().contains("important.txt"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.path().join("important.txt")).expect("read"), "keep me");
    let missing = dir.path().join("missing");
    let err = EmbeddedLog::open_read_only(&missing, opts()).expect_err("missing dir");
    assert!(matches!(err, LogError::NoDataDir { .. }), "{err}");
    std::fs::write(dir.path().join("polylog.json"), "{\"format\":\"polylog-data\",\"version\":9}")
        .expect("write");
    let err = EmbeddedLog::open(dir.path(), opts()).expect_err("future version");
    assert!(err.to_string().contains("version"), "{err}");
}

#[test]
fn a_failed_fsync_poisons_the_partition_and_loses_nothing_acknowledged() {
    let dir = TempDir::new("fsyncfail");
    let faults = Arc::new(Faults::default());
    let o = LogOptions { fsync: FsyncPolicy::Always, faults: Some(Arc::clone(&faults)), ..opts() };
    {
        let log = EmbeddedLog::open(dir.path(), o).expect("open");
        log.create_topic("t", &TopicConfig::new(1)).expect("create");
        let a = log.append("t", 0, &[rec("a", "1")]).expect("append");
        log.wait_durable("t", 0, a.last_offset + 1, Duration::from_secs(10)).expect("durable");
        faults.fail_fsync(true);
        let b = log.append("t", 0, &[rec("b", "2")]).expect("append before the failure is seen");
        let err = log
            .wait_durable("t", 0, b.last_offset + 1, Duration::from_secs(10))
            .expect_err("fsync failed");
        assert!(matches!(err, LogError::Poisoned { .. }), "{err}");
        assert!(err.to_string().contains("injected fsync failure"), "{err}");
        faults.fail_fsync(false);
        // Poisoned stays poisoned: no retry into a hole.
        let err = log.append("t", 0, &[rec("c", "3")]).expect_err("poisoned");
        assert!(matches!(err, LogError::Poisoned { .. }), "{err}");
        assert_eq!(log.durable_offset("t", 0).expect("durable"), 1);
    }
    let log = open(dir.path());
    let got = read_all(&log, "t", 0, StartAt::Beginning);
    assert_eq!(got[0].value.as_deref(), Some(&b"1"[..]), "the acknowledged record survived");
}

#[test]
fn a_full_disk_stops_writes_with_a_clear_error_and_loses_nothing_acknowledged() {
    let mnt = TempDir::new("fulldisk");
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=600k", "tmpfs"])
        .arg(mnt.path())
        .status()
        .expect("run mount");
    assert!(status.success(), "this test mounts a small tmpfs to fill up and needs root");
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(mnt.path());
    let data = mnt.path().join("data");
    let o = LogOptions { fsync: FsyncPolicy::Always, ..opts() };
    let mut acked = 0u64;
    let err = {
        let log = EmbeddedLog::open(&data, o.clone()).expect("open");
        log.create_topic("t", &TopicConfig { segment_bytes: 64 * 1024, ..TopicConfig::new(1) })
            .expect("create");
        loop {
            let batch: Vec<Record> =
                (0..10).map(|i| rec(&format!("k{acked}-{i}"), &"v".repeat(1000))).collect();
            let r = log.append("t", 0, &batch).and_then(|a| {
                log.wait_durable("t", 0, a.last_offset + 1, Duration::from_secs(10)).map(|()| a)
            });
            match r {
                Ok(a) => acked = a.last_offset + 1,
                Err(e) => break e,
            }
            assert!(acked < 10_000, "the disk never filled");
        }
    };
    let msg = err.to_string();
    assert!(msg.contains("No space left on device") && msg.contains("free disk space"), "{msg}");
    assert!(acked > 100, "some records were acknowledged before the disk filled: {acked}");
    // Reopening recovers the torn tail; every acknowledged record is there.
    let log = EmbeddedLog::open(&data, o).expect("reopen on the full disk");
    let got = read_all(&log, "t", 0, StartAt::Beginning);
    assert!(got.len() as u64 >= acked, "{} records back, {acked} acknowledged", got.len());
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
    }
}
