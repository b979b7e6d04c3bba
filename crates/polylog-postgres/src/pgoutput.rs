//! A sans-I/O decoder of the `pgoutput` logical replication protocol, versions 1 and 2, as
//! spoken by Postgres 15 (see "Logical Replication Message Formats" in the Postgres docs).
//!
//! [`decode`] turns the payload of one XLogData (`'w'`) message into a [`Message`]. Decoding is
//! total: any byte string yields either a message or a [`DecodeError`], never a panic, and
//! allocations are bounded by the length of the input rather than by counts read from it.

/// A position in the write-ahead log.
pub type Lsn = u64;

/// One column value of a row, as carried by pgoutput's TupleData.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// The value is SQL NULL (`'n'`).
    Null,
    /// The value is an unchanged TOASTed value that was not sent (`'u'`).
    UnchangedToast,
    /// The value in Postgres text format (`'t'`).
    Text(Vec<u8>),
    /// The value in Postgres binary format (`'b'`, only with the `binary` option).
    Binary(Vec<u8>),
}

/// A column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column flags: 1 when the column is part of the replica identity key, else 0.
    pub flags: u8,
    /// The column name.
    pub name: String,
    /// The oid of the column's data type.
    pub type_oid: u32,
    /// The type modifier (`atttypmod`), -1 when there is none.
    pub type_modifier: i32,
}

/// The description of a table, sent before the first change to it in a session and again
/// whenever its definition changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's oid, which change messages use to refer to it.
    pub oid: u32,
    /// The schema name; Postgres sends the empty string for `pg_catalog`.
    pub namespace: String,
    /// The table name.
    pub name: String,
    /// The replica identity (`relreplident`): `b'd'` default, `b'n'` nothing, `b'f'` full,
    /// `b'i'` index.
    pub replica_identity: u8,
    /// The published columns, in table order (generated columns are not sent).
    pub columns: Vec<Column>,
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Start of a transaction (`'B'`).
    Begin {
        /// The LSN of the transaction's commit record.
        final_lsn: Lsn,
        /// Commit time in microseconds since 2000-01-01 00:00:00 UTC.
        commit_time_us: i64,
        /// The transaction id.
        xid: u32,
    },
    /// End of a transaction (`'C'`).
    Commit {
        /// Flags; currently always 0.
        flags: u8,
        /// The LSN of the commit record.
        commit_lsn: Lsn,
        /// The LSN just past the commit record.
        end_lsn: Lsn,
        /// Commit time in microseconds since 2000-01-01 00:00:00 UTC.
        commit_time_us: i64,
    },
    /// The replication origin of the transaction (`'O'`).
    Origin {
        /// The commit LSN on the origin server.
        lsn: Lsn,
        /// The origin name.
        name: String,
    },
    /// A table description (`'R'`).
    Relation(Relation),
    /// A data type description (`'Y'`), sent for non-built-in types.
    Type {
        /// The type oid.
        oid: u32,
        /// The schema name (empty for `pg_catalog`).
        namespace: String,
        /// The type name.
        name: String,
    },
    /// A row insertion (`'I'`).
    Insert {
        /// The oid of the table.
        relation: u32,
        /// The new row.
        new: Vec<TupleValue>,
    },
    /// A row update (`'U'`).
    Update {
        /// The oid of the table.
        relation: u32,
        /// The old key (`'K'`), sent when the key changed and the replica identity is default or
        /// index.
        key: Option<Vec<TupleValue>>,
        /// The old row (`'O'`), sent when the replica identity is full.
        old: Option<Vec<TupleValue>>,
        /// The new row.
        new: Vec<TupleValue>,
    },
    /// A row deletion (`'D'`); exactly one of `key` and `old` is set.
    Delete {
        /// The oid of the table.
        relation: u32,
        /// The old key (`'K'`).
        key: Option<Vec<TupleValue>>,
        /// The old row (`'O'`), when the replica identity is full.
        old: Option<Vec<TupleValue>>,
    },
    /// A `TRUNCATE` of one or more tables (`'T'`).
    Truncate {
        /// Option bits: 1 `CASCADE`, 2 `RESTART IDENTITY`.
        options: u8,
        /// The oids of the truncated tables.
        relations: Vec<u32>,
    },
    /// A message written with `pg_logical_emit_message` (`'M'`).
    LogicalMessage {
        /// Whether the message is part of a transaction.
        transactional: bool,
        /// The LSN of the message.
        lsn: Lsn,
        /// The message prefix.
        prefix: String,
        /// The message content.
        content: Vec<u8>,
    },
    /// Start of a block of a streamed in-progress transaction (`'S'`, protocol 2).
    StreamStart {
        /// The streamed transaction's id.
        xid: u32,
        /// Whether this is the transaction's first block.
        first_segment: bool,
    },
    /// End of a block of a streamed transaction (`'E'`, protocol 2).
    StreamStop,
    /// Commit of a streamed transaction (`'c'`, protocol 2).
    StreamCommit {
        /// The streamed transaction's id.
        xid: u32,
        /// Flags; currently always 0.
        flags: u8,
        /// The LSN of the commit record.
        commit_lsn: Lsn,
        /// The LSN just past the commit record.
        end_lsn: Lsn,
        /// Commit time in microseconds since 2000-01-01 00:00:00 UTC.
        commit_time_us: i64,
    },
    /// Abort of a streamed transaction or of one of its subtransactions (`'A'`, protocol 2).
    StreamAbort {
        /// The top-level transaction's id.
        xid: u32,
        /// The aborted subtransaction's id (equal to `xid` when the whole transaction aborted).
        subxid: u32,
    },
}

/// The input is not a well-formed pgoutput message.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

/// Decodes one pgoutput message (the payload of an XLogData `'w'` message).
///
/// `in_stream` must be true between a StreamStart and the following StreamStop: there the
/// Relation, Type, Insert, Update, Delete, Truncate and Message messages carry the Int32 xid of
/// the streamed transaction right after the type byte. That xid is read and discarded (the
/// enclosing StreamStart names the transaction).
///
/// Rejects truncated input, trailing bytes, negative or out-of-range lengths and counts, unknown
/// message or tuple kinds, unknown replica identities and strings that are not UTF-8.
pub fn decode(buf: &[u8], in_stream: bool) -> Result<Message, DecodeError> {
    let mut r = Reader::new(buf);
    let tag = r.u8("message type")?;
    if in_stream && carries_stream_xid(tag) {
        r.u32("streamed transaction xid")?;
    }
    let message = match tag {
        b'B' => decode_begin(&mut r)?,
        b'C' => decode_commit(&mut r)?,
        b'O' => decode_origin(&mut r)?,
        b'R' => Message::Relation(decode_relation(&mut r)?),
        b'Y' => decode_type(&mut r)?,
        b'I' => decode_insert(&mut r)?,
        b'U' => decode_update(&mut r)?,
        b'D' => decode_delete(&mut r)?,
        b'T' => decode_truncate(&mut r)?,
        b'M' => decode_logical_message(&mut r)?,
        b'S' => decode_stream_start(&mut r)?,
        b'E' => Message::StreamStop,
        b'c' => decode_stream_commit(&mut r)?,
        b'A' => decode_stream_abort(&mut r)?,
        other => return Err(error(format!("unknown message type {}", show_byte(other)))),
    };
    r.finish()?;
    Ok(message)
}

/// Formats an LSN the way Postgres prints it: "16/B374D848" (upper 32 bits in hex, '/', lower
/// 32 bits in hex, uppercase, no padding).
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses an LSN written the way Postgres prints it ("16/B374D848"): two groups of 1 to 8 hex
/// digits (either case) separated by '/'. Returns `None` for anything else.
pub fn parse_lsn(s: &str) -> Option<Lsn> {
    let (high, low) = s.split_once('/')?;
    Some((parse_lsn_half(high)? << 32) | parse_lsn_half(low)?)
}

/// Parses one half of an LSN: 1 to 8 hex digits, nothing else (no sign, no spaces).
fn parse_lsn_half(s: &str) -> Option<u64> {
    let valid = (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Whether a message of this type carries the streamed transaction's xid when sent between
/// StreamStart and StreamStop.
fn carries_stream_xid(tag: u8) -> bool {
    matches!(tag, b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M')
}

/// Decodes the body of a Begin message.
fn decode_begin(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(Message::Begin {
        final_lsn: r.u64("begin final LSN")?,
        commit_time_us: r.i64("begin commit timestamp")?,
        xid: r.u32("begin xid")?,
    })
}

/// Decodes the body of a Commit message.
fn decode_commit(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(Message::Commit {
        flags: r.u8("commit flags")?,
        commit_lsn: r.u64("commit LSN")?,
        end_lsn: r.u64("commit end LSN")?,
        commit_time_us: r.i64("commit timestamp")?,
    })
}

/// Decodes the body of an Origin message.
fn decode_origin(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(Message::Origin { lsn: r.u64("origin LSN")?, name: r.string("origin name")? })
}

/// Decodes the body of a Relation message.
fn decode_relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let oid = r.u32("relation oid")?;
    let namespace = r.string("relation namespace")?;
    let name = r.string("relation name")?;
    let replica_identity = r.u8("replica identity")?;
    if !matches!(replica_identity, b'd' | b'n' | b'f' | b'i') {
        return Err(error(format!("unknown replica identity {}", show_byte(replica_identity))));
    }
    let count = usize::from(r.u16("relation column count")?);
    // Each column takes at least 10 bytes: flags, an empty name's NUL, type oid and modifier.
    let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
    for _ in 0..count {
        columns.push(decode_column(r)?);
    }
    Ok(Relation { oid, namespace, name, replica_identity, columns })
}

/// Decodes one column description of a Relation message.
fn decode_column(r: &mut Reader<'_>) -> Result<Column, DecodeError> {
    Ok(Column {
        flags: r.u8("column flags")?,
        name: r.string("column name")?,
        type_oid: r.u32("column type oid")?,
        type_modifier: r.i32("column type modifier")?,
    })
}

/// Decodes the body of a Type message.
fn decode_type(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(Message::Type {
        oid: r.u32("type oid")?,
        namespace: r.string("type namespace")?,
        name: r.string("type name")?,
    })
}

/// Decodes the body of an Insert message.
fn decode_insert(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let relation = r.u32("insert relation oid")?;
    expect_marker(r.u8("insert tuple marker")?, b'N', "insert")?;
    Ok(Message::Insert { relation, new: decode_tuple(r)? })
}

/// Decodes the body of an Update message: an optional old key or old row, then the new row.
fn decode_update(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let relation = r.u32("update relation oid")?;
    let (mut key, mut old) = (None, None);
    let mut marker = r.u8("update tuple marker")?;
    if matches!(marker, b'K' | b'O') {
        let tuple = Some(decode_tuple(r)?);
        if marker == b'K' {
            key = tuple;
        } else {
            old = tuple;
        }
        marker = r.u8("update new tuple marker")?;
    }
    expect_marker(marker, b'N', "update")?;
    Ok(Message::Update { relation, key, old, new: decode_tuple(r)? })
}

/// Decodes the body of a Delete message: the old key or the old row.
fn decode_delete(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let relation = r.u32("delete relation oid")?;
    match r.u8("delete tuple marker")? {
        b'K' => Ok(Message::Delete { relation, key: Some(decode_tuple(r)?), old: None }),
        b'O' => Ok(Message::Delete { relation, key: None, old: Some(decode_tuple(r)?) }),
        other => Err(error(format!(
            "delete: expected tuple marker 'K' or 'O', got {}",
            show_byte(other)
        ))),
    }
}

/// Decodes the body of a Truncate message.
fn decode_truncate(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let count = r.count("truncate relation count")?;
    let options = r.u8("truncate options")?;
    let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
    for _ in 0..count {
        relations.push(r.u32("truncated relation oid")?);
    }
    Ok(Message::Truncate { options, relations })
}

/// Decodes the body of a logical decoding Message message.
fn decode_logical_message(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let flags = r.u8("message flags")?;
    Ok(Message::LogicalMessage {
        transactional: flags & 1 != 0,
        lsn: r.u64("message LSN")?,
        prefix: r.string("message prefix")?,
        content: r.sized_bytes("message content")?.to_vec(),
    })
}

/// Decodes the body of a Stream Start message.
fn decode_stream_start(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(Message::StreamStart {
        xid: r.u32("stream start xid")?,
        first_segment: r.u8("stream start first-segment flag")? != 0,
    })
}

/// Decodes the body of a Stream Commit message.
fn decode_stream_commit(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(Message::StreamCommit {
        xid: r.u32("stream commit xid")?,
        flags: r.u8("stream commit flags")?,
        commit_lsn: r.u64("stream commit LSN")?,
        end_lsn: r.u64("stream commit end LSN")?,
        commit_time_us: r.i64("stream commit timestamp")?,
    })
}

/// Decodes the body of a Stream Abort message (the protocol 2 form, without the abort LSN and
/// timestamp that protocol 4 adds).
fn decode_stream_abort(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(Message::StreamAbort {
        xid: r.u32("stream abort xid")?,
        subxid: r.u32("stream abort subtransaction xid")?,
    })
}

/// Checks a tuple marker byte ('N', 'K', 'O').
fn expect_marker(got: u8, expected: u8, context: &str) -> Result<(), DecodeError> {
    if got == expected {
        return Ok(());
    }
    Err(error(format!(
        "{context}: expected tuple marker {}, got {}",
        show_byte(expected),
        show_byte(got)
    )))
}

/// Decodes a TupleData: an Int16 column count, then one value per column.
fn decode_tuple(r: &mut Reader<'_>) -> Result<Vec<TupleValue>, DecodeError> {
    let count = usize::from(r.u16("tuple column count")?);
    // Each value takes at least its kind byte.
    let mut values = Vec::with_capacity(count.min(r.remaining()));
    for _ in 0..count {
        values.push(decode_tuple_value(r)?);
    }
    Ok(values)
}

/// Decodes one column value of a TupleData.
fn decode_tuple_value(r: &mut Reader<'_>) -> Result<TupleValue, DecodeError> {
    match r.u8("tuple value kind")? {
        b'n' => Ok(TupleValue::Null),
        b'u' => Ok(TupleValue::UnchangedToast),
        b't' => Ok(TupleValue::Text(r.sized_bytes("text tuple value")?.to_vec())),
        b'b' => Ok(TupleValue::Binary(r.sized_bytes("binary tuple value")?.to_vec())),
        other => Err(error(format!("unknown tuple value kind {}", show_byte(other)))),
    }
}

/// Builds a [`DecodeError`].
fn error(message: String) -> DecodeError {
    DecodeError(message)
}

/// Shows a byte for an error message: `'X'` when printable ASCII, else hex.
fn show_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", char::from(b))
    } else {
        format!("0x{b:02X}")
    }
}

/// A cursor over the bytes of one message; every read checks the bounds.
struct Reader<'a> {
    /// The whole message.
    buf: &'a [u8],
    /// The offset of the next unread byte; never beyond `buf.len()`.
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// The number of unread bytes.
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The unread bytes.
    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    /// Reads the next `n` bytes.
    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let taken = self.rest().get(..n).ok_or_else(|| {
            error(format!(
                "truncated at offset {} reading {what}: need {n} bytes, {} left",
                self.pos,
                self.remaining()
            ))
        })?;
        self.pos += n;
        Ok(taken)
    }

    /// Reads the next `N` bytes as an array.
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let bytes = self.bytes(N, what)?;
        <[u8; N]>::try_from(bytes).map_err(|_| error(format!("internal: short read of {what}")))
    }

    /// Reads a Byte1 / Int8.
    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array(what)?))
    }

    /// Reads an unsigned big-endian Int16.
    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    /// Reads an unsigned big-endian Int32 (oids, xids).
    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// Reads a signed big-endian Int32.
    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    /// Reads an unsigned big-endian Int64 (LSNs).
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// Reads a signed big-endian Int64 (timestamps).
    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// Reads a non-negative Int32 count.
    fn count(&mut self, what: &str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.i32(what)?;
        usize::try_from(n).map_err(|_| error(format!("negative {what} {n} at offset {at}")))
    }

    /// Reads an Int32 length followed by that many bytes.
    fn sized_bytes(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let len = self.count(what)?;
        self.bytes(len, what)
    }

    /// Reads a NUL-terminated UTF-8 string.
    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let at = self.pos;
        let len = self.rest().iter().position(|&b| b == 0).ok_or_else(|| {
            error(format!("unterminated {what} at offset {at}: no NUL before the end"))
        })?;
        let bytes = self.bytes(len, what)?;
        self.bytes(1, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| error(format!("{what} at offset {at} is not valid UTF-8: {e}")))
    }

    /// Checks that the whole message was consumed.
    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(error(format!("{n} trailing bytes at offset {}", self.pos))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM_XID: u32 = 0xDEAD_BEEF;

    /// Builds wire bytes piece by piece.
    #[derive(Default)]
    struct Bytes(Vec<u8>);

    impl Bytes {
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.extend_from_slice(v);
            self
        }
        fn str(self, v: &str) -> Self {
            self.raw(v.as_bytes()).u8(0)
        }
        fn sized(self, v: &[u8]) -> Self {
            let len = i32::try_from(v.len()).expect("test data fits an Int32 length");
            self.i32(len).raw(v)
        }
        fn xid_if(self, in_stream: bool) -> Self {
            if in_stream {
                self.u32(STREAM_XID)
            } else {
                self
            }
        }
        fn tuple(self, values: &[TupleValue]) -> Self {
            let count = u16::try_from(values.len()).expect("test tuple fits an Int16 count");
            values.iter().fold(self.u16(count), |b, v| match v {
                TupleValue::Null => b.u8(b'n'),
                TupleValue::UnchangedToast => b.u8(b'u'),
                TupleValue::Text(t) => b.u8(b't').sized(t),
                TupleValue::Binary(t) => b.u8(b'b').sized(t),
            })
        }
        fn opt_tuple(self, marker: u8, values: &Option<Vec<TupleValue>>) -> Self {
            match values {
                Some(v) => self.u8(marker).tuple(v),
                None => self,
            }
        }
    }

    /// Encodes a message the way pgoutput does, independently of the decoder.
    fn encode(msg: &Message, in_stream: bool) -> Vec<u8> {
        let b = Bytes::default();
        let b = match msg {
            Message::Begin { final_lsn, commit_time_us, xid } => {
                b.u8(b'B').u64(*final_lsn).i64(*commit_time_us).u32(*xid)
            }
            Message::Commit { flags, commit_lsn, end_lsn, commit_time_us } => {
                b.u8(b'C').u8(*flags).u64(*commit_lsn).u64(*end_lsn).i64(*commit_time_us)
            }
            Message::Origin { lsn, name } => b.u8(b'O').u64(*lsn).str(name),
            Message::Relation(rel) => {
                let count = u16::try_from(rel.columns.len()).expect("test relation fits");
                let b = b.u8(b'R').xid_if(in_stream).u32(rel.oid);
                let b = b.str(&rel.namespace).str(&rel.name).u8(rel.replica_identity).u16(count);
                rel.columns
                    .iter()
                    .fold(b, |b, c| b.u8(c.flags).str(&c.name).u32(c.type_oid).i32(c.type_modifier))
            }
            Message::Type { oid, namespace, name } => {
                b.u8(b'Y').xid_if(in_stream).u32(*oid).str(namespace).str(name)
            }
            Message::Insert { relation, new } => {
                b.u8(b'I').xid_if(in_stream).u32(*relation).u8(b'N').tuple(new)
            }
            Message::Update { relation, key, old, new } => b
                .u8(b'U')
                .xid_if(in_stream)
                .u32(*relation)
                .opt_tuple(b'K', key)
                .opt_tuple(b'O', old)
                .u8(b'N')
                .tuple(new),
            Message::Delete { relation, key, old } => b
                .u8(b'D')
                .xid_if(in_stream)
                .u32(*relation)
                .opt_tuple(b'K', key)
                .opt_tuple(b'O', old),
            Message::Truncate { options, relations } => {
                let count = i32::try_from(relations.len()).expect("test truncate fits");
                let b = b.u8(b'T').xid_if(in_stream).i32(count).u8(*options);
                relations.iter().fold(b, |b, r| b.u32(*r))
            }
            Message::LogicalMessage { transactional, lsn, prefix, content } => b
                .u8(b'M')
                .xid_if(in_stream)
                .u8(u8::from(*transactional))
                .u64(*lsn)
                .str(prefix)
                .sized(content),
            Message::StreamStart { xid, first_segment } => {
                b.u8(b'S').u32(*xid).u8(u8::from(*first_segment))
            }
            Message::StreamStop => b.u8(b'E'),
            Message::StreamCommit { xid, flags, commit_lsn, end_lsn, commit_time_us } => {
                b.u8(b'c').u32(*xid).u8(*flags).u64(*commit_lsn).u64(*end_lsn).i64(*commit_time_us)
            }
            Message::StreamAbort { xid, subxid } => b.u8(b'A').u32(*xid).u32(*subxid),
        };
        b.0
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(s.as_bytes().to_vec())
    }

    fn row() -> Vec<TupleValue> {
        vec![
            text("42"),
            TupleValue::Null,
            TupleValue::UnchangedToast,
            text(""),
            TupleValue::Binary(vec![0, 1, 0xFF]),
            text("héllo\0world"),
        ]
    }

    /// One message of every kind, with awkward values.
    fn samples() -> Vec<Message> {
        vec![
            Message::Begin {
                final_lsn: 0x16_B374_D848,
                commit_time_us: 760_000_000_123_456,
                xid: 7,
            },
            Message::Begin { final_lsn: u64::MAX, commit_time_us: i64::MIN, xid: u32::MAX },
            Message::Commit {
                flags: 0,
                commit_lsn: 0x16_B374_D848,
                end_lsn: 0x16_B374_D878,
                commit_time_us: -1,
            },
            Message::Origin { lsn: 1, name: "pg_16385".into() },
            Message::Origin { lsn: 0, name: String::new() },
            Message::Relation(Relation {
                oid: 16385,
                namespace: "public".into(),
                name: "orders ünïcode".into(),
                replica_identity: b'd',
                columns: vec![
                    Column { flags: 1, name: "id".into(), type_oid: 23, type_modifier: -1 },
                    Column { flags: 0, name: "note".into(), type_oid: 1043, type_modifier: 104 },
                    Column {
                        flags: 0,
                        name: String::new(),
                        type_oid: u32::MAX,
                        type_modifier: i32::MIN,
                    },
                ],
            }),
            Message::Relation(Relation {
                oid: 1,
                namespace: String::new(),
                name: "t".into(),
                replica_identity: b'f',
                columns: vec![],
            }),
            Message::Type { oid: 16390, namespace: "public".into(), name: "mood".into() },
            Message::Insert { relation: 16385, new: row() },
            Message::Insert { relation: 16385, new: vec![] },
            Message::Update { relation: 16385, key: None, old: None, new: row() },
            Message::Update { relation: 16385, key: Some(vec![text("1")]), old: None, new: row() },
            Message::Update { relation: 16385, key: None, old: Some(row()), new: row() },
            Message::Delete {
                relation: 16385,
                key: Some(vec![text("1"), TupleValue::Null]),
                old: None,
            },
            Message::Delete { relation: 16385, key: None, old: Some(row()) },
            Message::Truncate { options: 3, relations: vec![16385, 16390, u32::MAX] },
            Message::Truncate { options: 0, relations: vec![] },
            Message::LogicalMessage {
                transactional: true,
                lsn: 99,
                prefix: "polylog".into(),
                content: b"\0binary\xFF".to_vec(),
            },
            Message::LogicalMessage {
                transactional: false,
                lsn: 0,
                prefix: String::new(),
                content: vec![],
            },
            Message::StreamStart { xid: 1234, first_segment: true },
            Message::StreamStart { xid: 1234, first_segment: false },
            Message::StreamStop,
            Message::StreamCommit {
                xid: 1234,
                flags: 0,
                commit_lsn: 10,
                end_lsn: 20,
                commit_time_us: 30,
            },
            Message::StreamAbort { xid: 1234, subxid: 1235 },
        ]
    }

    /// Asserts that `input` decodes to `expected`.
    fn check(input: &[u8], in_stream: bool, expected: &Message) {
        assert_eq!(decode(input, in_stream).as_ref(), Ok(expected), "input {input:02X?}");
    }

    /// Asserts that `input` is rejected with an error mentioning `needle`.
    fn check_err(input: &[u8], in_stream: bool, needle: &str) {
        match decode(input, in_stream) {
            Ok(m) => panic!("input {input:02X?} decoded to {m:?}, expected an error"),
            Err(e) => assert!(e.0.contains(needle), "error {e:?} does not mention {needle:?}"),
        }
    }

    #[test]
    fn round_trips_every_message_kind() {
        for in_stream in [false, true] {
            for msg in samples() {
                check(&encode(&msg, in_stream), in_stream, &msg);
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for in_stream in [false, true] {
            for msg in samples() {
                let bytes = encode(&msg, in_stream);
                for len in 0..bytes.len() {
                    let prefix = bytes.get(..len).expect("prefix within bounds");
                    assert!(
                        decode(prefix, in_stream).is_err(),
                        "prefix of length {len} of {msg:?} decoded"
                    );
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for in_stream in [false, true] {
            for msg in samples() {
                let mut bytes = encode(&msg, in_stream);
                bytes.push(0);
                check_err(&bytes, in_stream, "trailing");
            }
        }
    }

    #[test]
    fn corrupting_any_byte_never_panics() {
        for in_stream in [false, true] {
            for msg in samples() {
                let bytes = encode(&msg, in_stream);
                for i in 0..bytes.len() {
                    for v in 0..=u8::MAX {
                        let mut corrupt = bytes.clone();
                        if let Some(b) = corrupt.get_mut(i) {
                            *b = v;
                        }
                        let _ = decode(&corrupt, in_stream);
                    }
                }
            }
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = usize::try_from(state % 64).expect("small");
            let bytes: Vec<u8> = (0..len)
                .map(|i| state.rotate_left(u32::try_from(i).expect("small")).to_le_bytes()[0])
                .collect();
            for tag in [b'R', b'I', b'U', b'D', b'T', b'M', b'Y'] {
                let mut input = vec![tag];
                input.extend_from_slice(&bytes);
                let _ = decode(&input, false);
                let _ = decode(&input, true);
            }
        }
    }

    #[test]
    fn decodes_hand_written_insert() {
        // A captured-style insert into relation 16385 of (1, NULL, 'ab').
        let input = [
            b'I', 0, 0, 0x40, 0x01, b'N', 0, 3, b't', 0, 0, 0, 1, b'1', b'n', b't', 0, 0, 0, 2,
            b'a', b'b',
        ];
        let expected =
            Message::Insert { relation: 16385, new: vec![text("1"), TupleValue::Null, text("ab")] };
        check(&input, false, &expected);
        // The same bytes inside a stream: the relid is read as the xid and the rest is garbage.
        assert!(decode(&input, true).is_err());
    }

    #[test]
    fn rejects_malformed_messages() {
        let cases: Vec<(Vec<u8>, bool, &str)> = vec![
            (vec![], false, "message type"),
            (vec![b'Z'], false, "unknown message type 'Z'"),
            (vec![0x00], false, "unknown message type 0x00"),
            (vec![b'b'], false, "unknown message type 'b'"),
            // Negative text length.
            (
                Bytes::default().u8(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(-1).0,
                false,
                "negative",
            ),
            // Length beyond the buffer.
            (
                Bytes::default().u8(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(5).raw(b"ab").0,
                false,
                "need 5 bytes, 2 left",
            ),
            (
                Bytes::default().u8(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(i32::MAX).0,
                false,
                "truncated",
            ),
            // Unknown tuple value kind.
            (
                Bytes::default().u8(b'I').u32(1).u8(b'N').u16(1).u8(b'x').0,
                false,
                "tuple value kind 'x'",
            ),
            // Insert without 'N'.
            (
                Bytes::default().u8(b'I').u32(1).u8(b'K').u16(0).0,
                false,
                "expected tuple marker 'N'",
            ),
            // Update with a bad first and second marker.
            (
                Bytes::default().u8(b'U').u32(1).u8(b'X').u16(0).0,
                false,
                "expected tuple marker 'N', got 'X'",
            ),
            (Bytes::default().u8(b'U').u32(1).u8(b'K').u16(0).u8(b'O').u16(0).0, false, "got 'O'"),
            // Delete needs 'K' or 'O'.
            (Bytes::default().u8(b'D').u32(1).u8(b'N').u16(0).0, false, "'K' or 'O'"),
            // Huge counts with no data behind them: an error, not a huge allocation.
            (Bytes::default().u8(b'I').u32(1).u8(b'N').u16(u16::MAX).0, false, "truncated"),
            (Bytes::default().u8(b'T').i32(i32::MAX).u8(0).0, false, "truncated"),
            (
                Bytes::default().u8(b'T').i32(-5).u8(0).0,
                false,
                "negative truncate relation count -5",
            ),
            (
                Bytes::default().u8(b'R').u32(1).str("s").str("t").u8(b'd').u16(u16::MAX).0,
                false,
                "truncated",
            ),
            // Unknown replica identity.
            (
                Bytes::default().u8(b'R').u32(1).str("s").str("t").u8(b'x').u16(0).0,
                false,
                "replica identity 'x'",
            ),
            // Invalid UTF-8 and unterminated strings.
            (Bytes::default().u8(b'O').u64(1).raw(b"\xFF\xFE").u8(0).0, false, "not valid UTF-8"),
            (Bytes::default().u8(b'O').u64(1).raw(b"abc").0, false, "unterminated origin name"),
            (
                Bytes::default().u8(b'M').u8(1).u64(1).str("p").i32(-1).0,
                false,
                "negative message content",
            ),
            // Messages that do not take an xid in a stream keep their layout.
            (Bytes::default().u8(b'E').u32(STREAM_XID).0, true, "trailing"),
        ];
        for (input, in_stream, needle) in cases {
            check_err(&input, in_stream, needle);
        }
    }

    #[test]
    fn error_display() {
        let err = decode(b"?", false).expect_err("unknown type");
        assert_eq!(err.to_string(), "malformed pgoutput message: unknown message type '?'");
    }

    #[test]
    fn formats_lsns() {
        let cases: &[(Lsn, &str)] = &[
            (0, "0/0"),
            (0x16_B374_D848, "16/B374D848"),
            (0x1_0000_0000, "1/0"),
            (0xFFFF_FFFF, "0/FFFFFFFF"),
            (u64::MAX, "FFFFFFFF/FFFFFFFF"),
            (0x0A_0000_00AB, "A/AB"),
        ];
        for &(lsn, text) in cases {
            assert_eq!(format_lsn(lsn), text);
            assert_eq!(parse_lsn(text), Some(lsn), "parsing {text}");
        }
    }

    #[test]
    fn parses_lsns() {
        let cases: &[(&str, Option<Lsn>)] = &[
            ("16/b374d848", Some(0x16_B374_D848)),
            ("00000016/0000B374", Some(0x16_0000_B374)),
            ("", None),
            ("16", None),
            ("/1", None),
            ("1/", None),
            ("1/2/3", None),
            ("+1/2", None),
            ("1/-2", None),
            (" 1/2", None),
            ("1/2 ", None),
            ("123456789/0", None),
            ("0/123456789", None),
            ("G/0", None),
            ("１/0", None),
        ];
        for &(text, expected) in cases {
            assert_eq!(parse_lsn(text), expected, "parsing {text:?}");
        }
    }
}
