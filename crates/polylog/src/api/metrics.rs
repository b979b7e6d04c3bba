//! `GET /metrics`: Prometheus text format (version 0.0.4).
//!
//! From the status every component reports: `polylog_source_events_total`,
//! `_transactions_total`, `_snapshot_rows_total`, `_lag_seconds`, `_slot_lag_bytes`,
//! `_errors_total`; `polylog_view_changes_total`, `_documents_total`, `_lag_records`,
//! `_lag_seconds`, `_errors_total`; `polylog_sink_records_total`, `_batches_total`,
//! `_dead_letters_total`, `_lag_records`, `_lag_seconds`, `_errors_total`; `polylog_rollup_events_total`, `_late_events_total`, `_lag_records`,
//! `_errors_total`; `polylog_collector_requests_total`, `_events_accepted_total`,
//! `_events_rejected_total`; `polylog_component_up` (0 for a failed or stopped one).
//! From the log: `polylog_topic_end_offset` and `polylog_topic_start_offset` per partition,
//! `polylog_log_fsync_seconds` (histogram). From the API: `polylog_http_requests_total` by
//! route and code.

use std::fmt::Write;
use std::net::TcpStream;

use serde_json::Value;

use super::{Api, Reply, Request};

/// One metric family: its samples (labels, value).
struct Family {
    name: String,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families.iter().filter(|f| !f.samples.is_empty()) {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, v) in &f.samples {
            let _ = write!(out, "{}", f.name);
            if !labels.is_empty() {
                let l: Vec<String> =
                    labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
                let _ = write!(out, "{{{}}}", l.join(","));
            }
            let _ = writeln!(out, " {v}");
        }
    }
    out
}

/// Counters and gauges read from each component's status: (the value's JSON pointer in it,
/// metric suffix, kind, help).
type Fields = &'static [(&'static str, &'static str, &'static str, &'static str)];

const SOURCE: Fields = &[
    ("/events", "events_total", "counter", "Change events captured."),
    ("/transactions", "transactions_total", "counter", "Transactions captured."),
    ("/snapshot_rows", "snapshot_rows_total", "counter", "Rows read by snapshots."),
    (
        "/lag_seconds",
        "lag_seconds",
        "gauge",
        "How long after its commit the last transaction was captured.",
    ),
    (
        "/slot/lag_bytes",
        "slot_lag_bytes",
        "gauge",
        "WAL the source's replication slot holds back (checked every 5 s).",
    ),
    ("/errors", "errors_total", "counter", "Errors met (each retry's cause)."),
];
const VIEW: Fields = &[
    ("/changes", "changes_total", "counter", "Input changes applied."),
    ("/documents", "documents_total", "counter", "Documents written."),
    ("/lag", "lag_records", "gauge", "Input records not yet applied."),
    (
        "/lag_seconds",
        "lag_seconds",
        "gauge",
        "With lag: seconds since the newest applied record was written.",
    ),
    ("/errors", "errors_total", "counter", "Errors met."),
];
const SINK: Fields = &[
    ("/records", "records_total", "counter", "Records written to the target."),
    ("/batches", "batches_total", "counter", "Batches written to the target."),
    ("/dead_letters", "dead_letters_total", "counter", "Records the target rejected."),
    ("/lag", "lag_records", "gauge", "Records of its topics not yet written."),
    (
        "/lag_seconds",
        "lag_seconds",
        "gauge",
        "With lag: seconds since the newest written record was appended.",
    ),
    ("/errors", "errors_total", "counter", "Errors met (each retry's cause)."),
];
const ROLLUP: Fields = &[
    ("/events", "events_total", "counter", "Events counted."),
    ("/late_events", "late_events_total", "counter", "Events for minutes already stored."),
    ("/lag_records", "lag_records", "gauge", "Records of its topic not read yet."),
    ("/errors", "errors_total", "counter", "Errors met."),
];

fn component_families(status: &Value, kind: &'static str, fields: Fields) -> Vec<Family> {
    let Some(m) = status[format!("{kind}s")].as_object() else { return Vec::new() };
    fields
        .iter()
        .map(|(pointer, suffix, k, help)| Family {
            name: format!("polylog_{kind}_{suffix}"),
            kind: k,
            help,
            samples: m
                .iter()
                .filter_map(|(n, s)| {
                    s.pointer(pointer).and_then(Value::as_f64).map(|v| (vec![(kind, n.clone())], v))
                })
                .collect(),
        })
        .collect()
}

pub fn handle(api: &Api, _: &Request, _: &[String], _: &TcpStream) -> Reply {
    Reply::Bytes(200, "text/plain; version=0.0.4; charset=utf-8", text(api).into_bytes())
}

/// The whole exposition.
pub fn text(api: &Api) -> String {
    let status = api.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut families = Vec::new();
    families.extend(component_families(&status, "source", SOURCE));
    families.extend(component_families(&status, "view", VIEW));
    families.extend(component_families(&status, "sink", SINK));
    families.extend(component_families(&status, "rollup", ROLLUP));
    let mut up = Vec::new();
    for kind in ["source", "view", "sink", "rollup"] {
        for (n, s) in status[format!("{kind}s")].as_object().into_iter().flatten() {
            let state = s["state"].as_str().unwrap_or("");
            let v = if state == "failed" || state == "stopped" { 0.0 } else { 1.0 };
            up.push((vec![("kind", kind.to_string()), ("name", n.clone())], v));
        }
    }
    families.push(Family {
        name: "polylog_component_up".into(),
        kind: "gauge",
        help: "1 while a component runs (or retries), 0 once it failed or stopped.",
        samples: up,
    });
    for (field, name, help) in [
        ("requests", "polylog_collector_requests_total", "Requests the collector answered."),
        ("accepted", "polylog_collector_events_accepted_total", "Events the collector stored."),
        ("rejected", "polylog_collector_events_rejected_total", "Events the collector refused."),
    ] {
        let samples =
            status["collector"][field].as_f64().map(|v| (vec![], v)).into_iter().collect();
        families.push(Family { name: name.into(), kind: "counter", help, samples });
    }
    let (mut ends, mut starts) = (Vec::new(), Vec::new());
    for t in api.log.topics().unwrap_or_default() {
        let Ok(d) = api.log.describe_topic(&t) else { continue };
        for p in &d.partitions {
            let labels = vec![("topic", t.clone()), ("partition", p.partition.to_string())];
            ends.push((labels.clone(), p.end_offset as f64));
            starts.push((labels, p.start_offset as f64));
        }
    }
    families.push(Family {
        name: "polylog_topic_end_offset".into(),
        kind: "gauge",
        help: "Offset the next record of a partition gets.",
        samples: ends,
    });
    families.push(Family {
        name: "polylog_topic_start_offset".into(),
        kind: "gauge",
        help: "Offset of a partition's oldest record kept.",
        samples: starts,
    });
    let requests = api.requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
    families.push(Family {
        name: "polylog_http_requests_total".into(),
        kind: "counter",
        help: "API requests answered, by route and status code.",
        samples: requests
            .into_iter()
            .map(|((route, code), n)| {
                (vec![("route", route.to_string()), ("code", code.to_string())], n as f64)
            })
            .collect(),
    });
    let mut out = render(&families);
    let h = polylog_log::metrics::FSYNC.snapshot();
    let name = "polylog_log_fsync_seconds";
    let _ = writeln!(out, "# HELP {name} Time an fsync of the embedded log's data took.");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (le, n) in &h.buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count {}", h.count);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_empty_families_left_out() {
        let f = vec![
            Family {
                name: "a_total".into(),
                kind: "counter",
                help: "A.",
                samples: vec![(vec![("name", "x\"y\\z\nw".into())], 3.0)],
            },
            Family { name: "b".into(), kind: "gauge", help: "B.", samples: vec![] },
        ];
        assert_eq!(
            render(&f),
            "# HELP a_total A.\n# TYPE a_total counter\na_total{name=\"x\\\"y\\\\z\\nw\"} 3\n"
        );
    }
}
