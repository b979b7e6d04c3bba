//! Input records as the view sees them: a row set, deleted or truncated, with the transaction
//! it belongs to.

use crate::json::Fields;
use polylog_log::StoredRecord;
use polylog_postgres::event::Position;

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// The row's new image, a JSON object (`c`, `u`, `r`, or a plain JSON object value).
    Set(Vec<u8>),
    Delete,
    Truncate,
    /// Nothing to do (a record without a key, a value that is not a JSON object).
    Skip(String),
}

#[derive(Debug, Clone)]
pub struct Change {
    pub offset: u64,
    pub key: Vec<u8>,
    pub op: Op,
    /// Commit LSN of the source transaction the change belongs to; `None` for changes outside
    /// transactions (snapshot reads, records without a position).
    pub commit: Option<u64>,
    /// Where it sits in its partition's change stream (0 when unknown).
    pub order: u64,
    /// The source LSN the change reflects (commit LSN, or the snapshot's LSN).
    pub lsn: u64,
    /// Whether the source counts it in its transaction's END event (tombstones are not).
    pub counted: bool,
    /// When the record was written to the log (ms since the epoch).
    pub timestamp_ms: i64,
}

impl Change {
    pub fn parse(r: StoredRecord) -> Change {
        let pos = Position::from_headers(&r.headers);
        let key = r.key.unwrap_or_default();
        let mut change = Change {
            timestamp_ms: r.timestamp_ms,
            offset: r.offset,
            key,
            op: Op::Delete,
            commit: pos.map(|p| p.commit_lsn),
            order: pos.map_or(0, |p| p.commit_lsn),
            lsn: pos.map_or(0, |p| p.commit_lsn),
            counted: r.value.is_some(),
        };
        let Some(value) = r.value else {
            if change.key.is_empty() {
                change.op = Op::Skip("a tombstone without a key".into());
            }
            return change;
        };
        let valid = serde_json::from_slice::<serde::de::IgnoredAny>(&value).is_ok();
        let Some(fields) = Fields::parse(&value).filter(|_| valid) else {
            change.op = Op::Skip("the value is not a JSON object".into());
            return change;
        };
        let op = fields.get("op").filter(|o| o.first() == Some(&b'"'));
        let envelope =
            op.is_some() && (fields.get("after").is_some() || fields.get("before").is_some());
        if !envelope {
            change.op = if change.key.is_empty() {
                Op::Skip("a row without a key".into())
            } else {
                Op::Set(value.clone())
            };
            return change;
        }
        let op = op
            .map(|o| String::from_utf8_lossy(&o[1..o.len().saturating_sub(1)]).into_owned())
            .unwrap_or_default();
        let source_lsn = fields
            .get("source")
            .and_then(Fields::parse)
            .and_then(|s| s.get("lsn"))
            .and_then(|l| std::str::from_utf8(l).ok()?.parse::<u64>().ok());
        if let Some(lsn) = source_lsn {
            change.lsn = change.lsn.max(lsn);
        }
        if op == "r" {
            change.commit = None; // a snapshot read belongs to no transaction
        }
        let after = fields.get("after").filter(|a| a.first() == Some(&b'{'));
        change.op = match (op.as_str(), after) {
            ("t", _) => Op::Truncate,
            (_, _) if change.key.is_empty() => Op::Skip("a change without a key".into()),
            ("d", _) => Op::Delete,
            ("c" | "u" | "r", Some(after)) => Op::Set(after.to_vec()),
            (other, _) => Op::Skip(format!("a change with op {other:?} and no row image")),
        };
        change
    }
}
