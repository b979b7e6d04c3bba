//! Fuzzes the pgoutput decoder, `polylog_postgres::pgoutput::decode`.
//!
//! Input: byte 0 picks `in_stream` (its low bit), the rest is one XLogData payload.
//!
//! Properties:
//! - decoding never panics, and allocates no more than the input's length allows (libFuzzer's
//!   `-rss_limit_mb` / `-malloc_limit_mb` catch an allocation sized by a count read from it);
//! - a message that decodes is exactly its bytes: encoding it again with the encoder below
//!   (written from the protocol docs, independent of the decoder) gives the input back, except
//!   for the two flag bytes the decoder reads as a boolean (Message's `transactional` and
//!   StreamStart's `first_segment`), which are compared as booleans; and decoding the
//!   re-encoded bytes gives the same message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use polylog_postgres::pgoutput::{decode, Message, TupleValue};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, buf)) = data.split_first() else { return };
    let in_stream = mode & 1 == 1;
    let Ok(msg) = decode(buf, in_stream) else { return };

    // The streamed transaction's xid is read and dropped by the decoder; take it from the input.
    let tag = buf[0];
    let carries_xid = matches!(tag, b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M');
    let xid = (in_stream && carries_xid).then(|| {
        u32::from_be_bytes(buf[1..5].try_into().expect("a decoded message holds its xid"))
    });
    let encoded = encode(&msg, xid);
    assert_eq!(
        decode(&encoded, in_stream).as_ref(),
        Ok(&msg),
        "re-encoded message decodes differently"
    );

    // The input with the boolean flag bytes written the way the encoder writes them.
    let mut canonical = buf.to_vec();
    let xid_len = if xid.is_some() { 4 } else { 0 };
    match msg {
        Message::LogicalMessage { transactional, .. } => {
            canonical[1 + xid_len] = u8::from(transactional);
        }
        Message::StreamStart { first_segment, .. } => {
            // 'S', Int32 xid, Int8 flag: the flag is non-zero for the first segment.
            assert_eq!(first_segment, canonical[5] != 0);
            canonical[5] = u8::from(first_segment);
        }
        _ => {}
    }
    assert_eq!(encoded, canonical, "decode({buf:02X?}) = {msg:?} does not re-encode to its input");
});

/// Encodes a message the way Postgres's pgoutput does ("Logical Replication Message Formats"):
/// big-endian integers, NUL-terminated strings, Int32-length-prefixed byte strings. `xid` is the
/// streamed transaction's id, written after the type byte of the messages that carry it inside a
/// stream.
fn encode(msg: &Message, xid: Option<u32>) -> Vec<u8> {
    let mut w = W(Vec::new());
    let head = |w: &mut W, tag: u8| {
        w.u8(tag);
        if let Some(x) = xid {
            w.u32(x);
        }
    };
    match msg {
        Message::Begin { final_lsn, commit_time_us, xid } => {
            w.u8(b'B');
            w.u64(*final_lsn);
            w.i64(*commit_time_us);
            w.u32(*xid);
        }
        Message::Commit { flags, commit_lsn, end_lsn, commit_time_us } => {
            w.u8(b'C');
            w.u8(*flags);
            w.u64(*commit_lsn);
            w.u64(*end_lsn);
            w.i64(*commit_time_us);
        }
        Message::Origin { lsn, name } => {
            w.u8(b'O');
            w.u64(*lsn);
            w.str(name);
        }
        Message::Relation(rel) => {
            head(&mut w, b'R');
            w.u32(rel.oid);
            w.str(&rel.namespace);
            w.str(&rel.name);
            w.u8(rel.replica_identity);
            w.u16(u16::try_from(rel.columns.len()).expect("a relation has at most 65535 columns"));
            for c in &rel.columns {
                w.u8(c.flags);
                w.str(&c.name);
                w.u32(c.type_oid);
                w.i32(c.type_modifier);
            }
        }
        Message::Type { oid, namespace, name } => {
            head(&mut w, b'Y');
            w.u32(*oid);
            w.str(namespace);
            w.str(name);
        }
        Message::Insert { relation, new } => {
            head(&mut w, b'I');
            w.u32(*relation);
            w.u8(b'N');
            w.tuple(new);
        }
        Message::Update { relation, key, old, new } => {
            head(&mut w, b'U');
            w.u32(*relation);
            assert!(key.is_none() || old.is_none(), "an update has an old key or an old row");
            if let Some(k) = key {
                w.u8(b'K');
                w.tuple(k);
            }
            if let Some(o) = old {
                w.u8(b'O');
                w.tuple(o);
            }
            w.u8(b'N');
            w.tuple(new);
        }
        Message::Delete { relation, key, old } => {
            head(&mut w, b'D');
            w.u32(*relation);
            match (key, old) {
                (Some(k), None) => {
                    w.u8(b'K');
                    w.tuple(k);
                }
                (None, Some(o)) => {
                    w.u8(b'O');
                    w.tuple(o);
                }
                _ => panic!("a delete has exactly one of an old key and an old row: {msg:?}"),
            }
        }
        Message::Truncate { options, relations } => {
            head(&mut w, b'T');
            w.i32(i32::try_from(relations.len()).expect("an Int32 count"));
            w.u8(*options);
            for r in relations {
                w.u32(*r);
            }
        }
        Message::LogicalMessage { transactional, lsn, prefix, content } => {
            head(&mut w, b'M');
            w.u8(u8::from(*transactional));
            w.u64(*lsn);
            w.str(prefix);
            w.sized(content);
        }
        Message::StreamStart { xid, first_segment } => {
            w.u8(b'S');
            w.u32(*xid);
            w.u8(u8::from(*first_segment));
        }
        Message::StreamStop => w.u8(b'E'),
        Message::StreamCommit { xid, flags, commit_lsn, end_lsn, commit_time_us } => {
            w.u8(b'c');
            w.u32(*xid);
            w.u8(*flags);
            w.u64(*commit_lsn);
            w.u64(*end_lsn);
            w.i64(*commit_time_us);
        }
        Message::StreamAbort { xid, subxid } => {
            w.u8(b'A');
            w.u32(*xid);
            w.u32(*subxid);
        }
    }
    w.0
}

/// Wire bytes, written piece by piece.
struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn str(&mut self, s: &str) {
        assert!(!s.as_bytes().contains(&0), "a decoded string holds no NUL: {s:?}");
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
    }
    fn sized(&mut self, b: &[u8]) {
        self.i32(i32::try_from(b.len()).expect("an Int32 length"));
        self.0.extend_from_slice(b);
    }
    fn tuple(&mut self, values: &[TupleValue]) {
        self.u16(u16::try_from(values.len()).expect("at most 65535 columns"));
        for v in values {
            match v {
                TupleValue::Null => self.u8(b'n'),
                TupleValue::UnchangedToast => self.u8(b'u'),
                TupleValue::Text(t) => {
                    self.u8(b't');
                    self.sized(t);
                }
                TupleValue::Binary(b) => {
                    self.u8(b'b');
                    self.sized(b);
                }
            }
        }
    }
}
