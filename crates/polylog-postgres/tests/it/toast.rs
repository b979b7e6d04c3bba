//! Unchanged TOASTed columns are filled from the last known image, never silently null.

use serde_json::json;

use crate::support::{cluster, config, open_log, wait_for, Running, TempDir};

/// About 22 kB of hex: too big to stay inline even compressed, so Postgres TOASTs it.
const BIG: &str = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 700))";

#[test]
fn unchanged_toasted_columns_are_filled_from_the_last_image() {
    let pg = cluster();
    pg.psql("app", &format!("CREATE TABLE docs (id int PRIMARY KEY, title text, body text); INSERT INTO docs VALUES (1, 'one', {BIG})"))
        .expect("schema");
    let body_of =
        |id: i32| pg.psql("app", &format!("SELECT body FROM docs WHERE id = {id}")).expect("body");
    let body1 = body_of(1);
    let dir = TempDir::new("toast");
    let log = open_log(dir.path());
    let src = Running::start("app", config(&pg, ""), log.clone(), dir.path());
    src.wait_streaming();
    pg.psql(
        "app",
        &format!(
            "INSERT INTO docs VALUES (2, 'two', {BIG}); UPDATE docs SET title = 'ONE' WHERE id = 1"
        ),
    )
    .expect("changes");
    pg.psql("app", "UPDATE docs SET title = 'TWO' WHERE id = 2").expect("update");
    let body2 = body_of(2);
    let events = wait_for(&*log, "app.public.docs", "both updates", |e| {
        e.iter().filter(|x| x.value["op"] == "u").count() == 2
    });
    let update = |id: i32| {
        events
            .iter()
            .find(|e| e.value["op"] == "u" && e.key == json!({"id": id}))
            .expect("update")
            .value["after"]
            .clone()
    };
    assert_eq!(update(1)["title"], "ONE");
    assert_eq!(update(1)["body"], body1.as_str(), "filled from the snapshot's image");
    assert_eq!(update(2)["body"], body2.as_str(), "filled from the streamed insert's image");
    // After a restart the images are still there.
    src.stop().expect("stop");
    let src = Running::start("app", config(&pg, ""), log.clone(), dir.path());
    src.wait_streaming();
    pg.psql("app", "UPDATE docs SET title = 'again' WHERE id = 1").expect("update");
    let events = wait_for(&*log, "app.public.docs", "the third update", |e| {
        e.iter().filter(|x| x.value["op"] == "u").count() == 3
    });
    let last =
        events.iter().rfind(|e| e.value["op"] == "u" && e.key == json!({"id": 1})).expect("update");
    assert_eq!(last.value["after"]["body"], body1.as_str());
    src.stop().expect("stop");
    // The restart did not record the unchanged shape again.
    let history = crate::support::read_topic(&*log, "app.schema-history");
    assert_eq!(history.len(), 1, "{history:?}");
}

#[test]
fn a_toasted_value_never_seen_gets_the_documented_placeholder() {
    let pg = cluster();
    pg.psql("app", &format!("CREATE TABLE docs (id int PRIMARY KEY, title text, body text); INSERT INTO docs VALUES (1, 'one', {BIG})"))
        .expect("schema");
    let dir = TempDir::new("toast-unknown");
    let log = open_log(dir.path());
    let src = Running::start("app", config(&pg, "snapshot = \"never\""), log.clone(), dir.path());
    src.wait_streaming();
    pg.psql("app", "UPDATE docs SET title = 'ONE' WHERE id = 1").expect("update");
    let events = wait_for(&*log, "app.public.docs", "the update", |e| e.len() == 1);
    assert_eq!(events[0].value["after"]["body"], polylog_postgres::event::UNAVAILABLE_VALUE);
    assert_eq!(events[0].value["after"]["title"], "ONE");
    src.stop().expect("stop");
}
