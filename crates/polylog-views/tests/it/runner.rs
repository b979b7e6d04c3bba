//! A view over topics written the way the Postgres source writes them.

use std::time::Duration;

use serde_json::json;

use crate::support::{
    documents, eventually, open_log, view_config, FakeSource, RunningView, TempDir,
};

const VIDEOS: &str = r#"
    root = "app.public.videos"
    [[joins]]
    name = "publisher"
    topic = "app.public.publishers"
    on = { publisher_id = "id" }
    kind = "one"
    [[joins]]
    name = "tags"
    topic = "app.public.video_tags"
    on = { id = "video_id" }
    kind = "many"
    fields = ["tag_id"]
"#;

const TABLES: &[&str] = &["public.videos", "public.publishers", "public.video_tags"];

#[test]
fn a_transaction_is_applied_whole_and_each_document_emitted_once() {
    let dir = TempDir::new("views-tx");
    let log = open_log(dir.path());
    let mut src = FakeSource::new(log.clone(), "app", TABLES, 2);
    let view = RunningView::start("videos", &view_config(VIDEOS), log.clone(), dir.path());
    // The video, its publisher and two tags in one transaction, whose publisher change has
    // not reached its topic yet.
    let (records, end) = src.transaction(&[
        (
            "public.videos",
            json!({"id": 1}),
            Some(json!({"id": 1, "title": "a", "publisher_id": 7})),
        ),
        ("public.publishers", json!({"id": 7}), Some(json!({"id": 7, "name": "P"}))),
        (
            "public.video_tags",
            json!({"video_id": 1, "tag_id": 2}),
            Some(json!({"video_id": 1, "tag_id": 2})),
        ),
        (
            "public.video_tags",
            json!({"video_id": 1, "tag_id": 3}),
            Some(json!({"video_id": 1, "tag_id": 3})),
        ),
    ]);
    for ((topic, p), batch) in &records {
        if topic != "app.public.publishers" {
            log.append(topic, *p, batch).expect("append");
        }
    }
    log.append("app.transaction", 0, &[end]).expect("END");
    std::thread::sleep(Duration::from_millis(500));
    let out = view.view.spec.output_topic();
    assert_eq!(documents(&*log, &out).1, 0, "nothing is emitted from half a transaction");
    for ((topic, p), batch) in &records {
        if topic == "app.public.publishers" {
            log.append(topic, *p, batch).expect("append");
        }
    }
    let (docs, n) = eventually(30, "the document", || {
        let (docs, n) = documents(&*log, &out);
        (n > 0).then_some((docs, n))
    });
    assert_eq!(n, 1, "one document for the transaction");
    let doc = &docs["{\"id\":1}"];
    assert_eq!(doc["publisher"], json!({"id": 7, "name": "P"}));
    assert_eq!(doc["tags"], json!([{"tag_id": 2}, {"tag_id": 3}]));
    assert!(doc["_version"].as_u64().is_some_and(|v| v > 0), "{doc}");

    // A publisher rename re-emits exactly its videos.
    let lsn = src.commit(&[
        (
            "public.videos",
            json!({"id": 2}),
            Some(json!({"id": 2, "title": "b", "publisher_id": 8})),
        ),
        ("public.publishers", json!({"id": 8}), Some(json!({"id": 8, "name": "Q"}))),
    ]);
    eventually(30, "video 2", || (documents(&*log, &out).1 == 2).then_some(()));
    let rename = src.commit(&[(
        "public.publishers",
        json!({"id": 7}),
        Some(json!({"id": 7, "name": "P2"})),
    )]);
    let (docs, n) = eventually(30, "the rename", || {
        let (docs, n) = documents(&*log, &out);
        (n == 3).then_some((docs, n))
    });
    assert_eq!(n, 3);
    assert_eq!(docs["{\"id\":1}"]["publisher"]["name"], "P2");
    assert_eq!(docs["{\"id\":1}"]["_version"], json!(rename));
    assert_eq!(docs["{\"id\":2}"]["_version"], json!(lsn), "video 2 was not re-emitted");

    // Deleting the root leaves a tombstone; deleting a tag empties the array.
    src.commit(&[
        ("public.videos", json!({"id": 2}), None),
        ("public.video_tags", json!({"video_id": 1, "tag_id": 2}), None),
    ]);
    let docs = eventually(30, "the deletes", || {
        let (docs, _) = documents(&*log, &out);
        (docs.len() == 1 && docs["{\"id\":1}"]["tags"] == json!([{"tag_id": 3}])).then_some(docs)
    });
    assert_eq!(docs.len(), 1);
    view.stop().expect("clean stop");
}

#[test]
fn a_restarted_view_continues_where_it_stopped_and_a_changed_one_rebuilds() {
    let dir = TempDir::new("views-restart");
    let log = open_log(dir.path());
    let mut src = FakeSource::new(log.clone(), "app", TABLES, 2);
    for i in 0..50 {
        src.commit(&[(
            "public.videos",
            json!({"id": i}),
            Some(json!({"id": i, "title": "t", "publisher_id": i % 3})),
        )]);
    }
    let cfg = view_config(VIDEOS);
    let view = RunningView::start("videos", &cfg, log.clone(), dir.path());
    view.wait_caught_up();
    view.stop().expect("clean stop");
    let out = "views.videos";
    assert_eq!(documents(&*log, out).1, 50);
    src.commit(&[("public.publishers", json!({"id": 1}), Some(json!({"id": 1, "name": "one"})))]);
    let view = RunningView::start("videos", &cfg, log.clone(), dir.path());
    view.wait_caught_up();
    view.stop().expect("clean stop");
    let (docs, n) = documents(&*log, out);
    assert_eq!(n, 50 + 17, "only the publisher's 17 videos are emitted after the restart");
    assert_eq!(docs["{\"id\":4}"]["publisher"]["name"], "one");

    // A changed definition starts over from the beginning of the topics.
    let changed = view_config(&VIDEOS.replace(
        "root = \"app.public.videos\"",
        "root = \"app.public.videos\"\nfields = [\"id\"]",
    ));
    let view = RunningView::start("videos", &changed, log.clone(), dir.path());
    view.wait_caught_up();
    view.stop().expect("clean stop");
    let (docs, n) = documents(&*log, out);
    assert_eq!(n, 2 * (50 + 17), "the rebuild replays every transaction");
    assert_eq!(docs["{\"id\":4}"].as_object().map(|o| o.contains_key("title")), Some(false));
}

#[test]
fn bad_views_are_rejected_naming_the_view_and_the_field() {
    let dir = TempDir::new("views-bad");
    let log = open_log(dir.path());
    let _src = FakeSource::new(log.clone(), "app", TABLES, 1);
    let cfg = view_config(&VIDEOS.replace("app.public.publishers", "app.public.nope"));
    let err =
        RunningView::start("videos", &cfg, log.clone(), dir.path()).wait_failure().to_string();
    assert!(
        err.contains("`views.videos.joins[0].topic`") && err.contains("does not exist"),
        "{err}"
    );

    // With the tables' schemas recorded (as the source records them), columns are checked.
    let history = |table: &str, cols: &[(&str, &str)]| {
        let columns: Vec<serde_json::Value> =
            cols.iter().map(|(n, t)| json!({"name": n, "type": t, "excluded": false})).collect();
        let v = json!({"table": table, "columns": columns});
        polylog_log::Record::new(
            serde_json::to_vec(&json!({"table": table})).expect("json"),
            serde_json::to_vec(&v).expect("json"),
        )
    };
    log.create_topic("app.schema-history", &polylog_log::TopicConfig::new(1)).expect("topic");
    log.append(
        "app.schema-history",
        0,
        &[
            history("public.videos", &[("id", "integer"), ("publisher_id", "text")]),
            history("public.publishers", &[("id", "integer"), ("name", "text")]),
            history("public.video_tags", &[("video_id", "integer"), ("tag_id", "integer")]),
        ],
    )
    .expect("append");
    let err = RunningView::start("videos", &view_config(VIDEOS), log.clone(), dir.path())
        .wait_failure()
        .to_string();
    assert!(
        err.contains("`views.videos.joins[0].on`")
            && err.contains("publisher_id (text) and id (integer)"),
        "{err}"
    );
    log.append(
        "app.schema-history",
        0,
        &[history("public.videos", &[("id", "integer"), ("publisher_id", "bigint")])],
    )
    .expect("append");
    let cfg = view_config(&VIDEOS.replace("fields = [\"tag_id\"]", "fields = [\"tag\"]"));
    let err =
        RunningView::start("videos", &cfg, log.clone(), dir.path()).wait_failure().to_string();
    assert!(
        err.contains("`views.videos.joins[1].fields`") && err.contains("\"tag\" is not a column"),
        "{err}"
    );
}

#[test]
fn a_transaction_topic_found_late_does_not_replay_old_transactions() {
    let dir = TempDir::new("views-late-feed");
    let log = open_log(dir.path());
    // The transaction topic is not there when the view starts (say, a source still creating
    // its topics): the view applies changes as they come.
    let mut src = FakeSource::without_transaction_topic(log.clone(), "app", TABLES, 2);
    let row = |i: u64, title: &str| {
        vec![(
            "public.videos",
            json!({"id": i}),
            Some(json!({"id": i, "title": title, "publisher_id": 1})),
        )]
    };
    let mut ends = Vec::new();
    for i in 0..20 {
        let (records, end) = src.transaction(&row(i, &format!("t{i}")));
        for ((topic, p), batch) in records {
            log.append(&topic, p, &batch).expect("append");
        }
        ends.push(end);
    }
    let cfg = view_config(VIDEOS);
    let view = RunningView::start("videos", &cfg, log.clone(), dir.path());
    view.wait_caught_up();
    view.stop().expect("clean stop");
    assert_eq!(documents(&*log, "views.videos").1, 20);
    // Now the transaction topic appears, holding the old ENDs, and one new transaction.
    log.create_topic("app.transaction", &polylog_log::TopicConfig::new(1)).expect("topic");
    log.append("app.transaction", 0, &ends).expect("old ENDs");
    src.commit(&row(1, "new"));
    let started = std::time::Instant::now();
    let view = RunningView::start("videos", &cfg, log.clone(), dir.path());
    eventually(20, "the new transaction", || {
        let (docs, _) = documents(&*log, "views.videos");
        (docs["{\"id\":1}"]["title"] == "new").then_some(())
    });
    assert!(started.elapsed() < Duration::from_secs(15), "old transactions were waited for");
    view.stop().expect("clean stop");
    assert_eq!(documents(&*log, "views.videos").1, 21, "nothing re-emitted");
}
