//! Every documented type round-trips, through the snapshot and through streaming.

use serde_json::{json, Value};

use crate::support::{cluster, config, open_log, wait_for, Running, TempDir};

const COLUMNS: &str = "
    c_int2 int2, c_int4 int4, c_int8 int8, c_num numeric, c_float float8, c_real real,
    c_text text, c_varchar varchar(10), c_char char(3), c_bool bool,
    c_ts timestamp, c_tstz timestamptz, c_date date, c_time time, c_timetz timetz,
    c_interval interval, c_uuid uuid, c_json json, c_jsonb jsonb, c_bytea bytea,
    c_int_arr int[], c_text_arr text[], c_num_arr numeric[], c_jsonb_arr jsonb[],
    c_enum mood, c_enum_arr mood[], c_inet inet, c_cidr cidr, c_money_domain posint";

const VALUES: &str = "
    32767, -2147483648, 9223372036854775807, 12345678901234567890.123456789, 1.5, 'NaN',
    E'tab\\there \"quoted\" back\\\\slash\\nnewline \u{fc}n\u{ef}code', 'short', 'ab', true,
    '2024-01-31 13:45:00.123456', '2024-01-31 13:45:00.5+02', '2024-02-29', '23:59:59.999999', '13:45:00+05:30',
    '1 year 2 months 3 days 04:05:06.5', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\":[1,2,{\"b\":null}]}',
    '{\"k\":\"v\",\"n\":1.5}', '\\x00ff10',
    '{1,2,NULL,4}', '{\"a b\",\"c,d\",\"with \\\"q\\\"\",NULL}', '{1.10,-0.000001}', ARRAY['{\"x\":1}'::jsonb],
    'happy', '{sad,happy}', '192.168.0.1/24', '10.0.0.0/8', 42";

fn expected() -> Value {
    json!({
        "c_int2": 32767, "c_int4": -2147483648i64, "c_int8": 9223372036854775807i64,
        "c_num": "12345678901234567890.123456789", "c_float": 1.5, "c_real": "NaN",
        "c_text": "tab\there \"quoted\" back\\slash\nnewline ünïcode", "c_varchar": "short", "c_char": "ab ",
        "c_bool": true,
        "c_ts": "2024-01-31T13:45:00.123456", "c_tstz": "2024-01-31T11:45:00.5Z", "c_date": "2024-02-29",
        "c_time": "23:59:59.999999", "c_timetz": "13:45:00+05:30",
        "c_interval": "P1Y2M3DT4H5M6.5S", "c_uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "c_json": {"a": [1, 2, {"b": null}]}, "c_jsonb": {"k": "v", "n": 1.5}, "c_bytea": "AP8Q",
        "c_int_arr": [1, 2, null, 4], "c_text_arr": ["a b", "c,d", "with \"q\"", null],
        "c_num_arr": ["1.10", "-0.000001"], "c_jsonb_arr": [{"x": 1}],
        "c_enum": "happy", "c_enum_arr": ["sad", "happy"], "c_inet": "192.168.0.1/24", "c_cidr": "10.0.0.0/8",
        "c_money_domain": 42,
    })
}

fn check(events: &[crate::support::Event], id: i64, how: &str) {
    let e = events.iter().find(|e| e.key == json!({"id": id})).expect("row event");
    let mut after = e.value["after"].clone();
    after.as_object_mut().expect("object").remove("id");
    let want = expected();
    for (k, v) in want.as_object().expect("object") {
        assert_eq!(&after[k], v, "{how}: column {k}");
    }
    // A row of NULLs stays NULLs.
    let nulls = events.iter().find(|e| e.key == json!({"id": id + 1})).expect("null row");
    for k in want.as_object().expect("object").keys() {
        assert!(nulls.value["after"][k].is_null(), "{how}: {k} should be null");
    }
}

#[test]
fn every_type_round_trips_through_snapshot_and_stream() {
    let pg = cluster();
    pg.psql(
        "app",
        &format!(
            "CREATE TYPE mood AS ENUM ('sad', 'happy'); CREATE DOMAIN posint AS int CHECK (VALUE > 0);
             CREATE TABLE all_types (id int PRIMARY KEY, {COLUMNS});
             INSERT INTO all_types VALUES (1, {VALUES}); INSERT INTO all_types (id) VALUES (2);"
        ),
    )
    .expect("schema and snapshot rows");
    let dir = TempDir::new("types");
    let log = open_log(dir.path());
    let src = Running::start("app", config(&pg, ""), log.clone(), dir.path());
    let snap = wait_for(&*log, "app.public.all_types", "the snapshot", |e| e.len() == 2);
    check(&snap, 1, "snapshot");
    src.wait_streaming();
    pg.psql(
        "app",
        &format!(
            "INSERT INTO all_types VALUES (3, {VALUES}); INSERT INTO all_types (id) VALUES (4);"
        ),
    )
    .expect("streamed rows");
    let all = wait_for(&*log, "app.public.all_types", "the streamed rows", |e| e.len() == 4);
    check(&all, 3, "stream");
    src.stop().expect("clean stop");
}
