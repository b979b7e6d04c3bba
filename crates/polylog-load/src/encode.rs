//! A chunk of parsed rows, written as Postgres' binary COPY stream and as a Parquet file.

use std::sync::Arc;

use parquet::basic::{Compression, LogicalType, Repetition, TimeUnit, Type as Physical};
use parquet::data_type::{
    BoolType, ByteArray, ByteArrayType, DoubleType, FixedLenByteArray, FixedLenByteArrayType,
    FloatType, Int32Type, Int64Type,
};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;

use crate::types::{encode_numeric, numeric_unscaled, ColType, Column, ColumnData, Values};

/// Parsed rows on their way to one table or partition.
#[derive(Debug)]
pub struct Chunk {
    /// Numbered in input order; the unit of commit and of resume.
    pub no: u64,
    /// The input row number of each row (1-based), for messages.
    pub rows: Vec<u64>,
    pub cols: Vec<ColumnData>,
}

impl Chunk {
    /// Chunk `no`, with room for `rows` rows.
    pub fn with_capacity(no: u64, columns: &[Column], rows: usize) -> Chunk {
        let cols = columns.iter().map(|c| ColumnData::with_capacity(&c.ty, rows)).collect();
        Chunk { no, rows: Vec::with_capacity(rows), cols }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Input records on their way to a worker, which parses them: the reader only splits records,
/// routes them and checksums them, so that parsing runs in every stream at once.
#[derive(Debug)]
pub struct RawChunk {
    pub no: u64,
    pub target: usize,
    /// Input row number and line of each record.
    pub rows: Vec<(u64, u64)>,
    pub data: Vec<u8>,
    /// The fields of all records: `(start, end)` into `data`, or NULL.
    pub fields: Vec<Option<(u32, u32)>>,
    /// Where each record's fields end in `fields`.
    pub ends: Vec<u32>,
    /// Records the reader already found bad (wrong field count, no partition for the key):
    /// record index, column (empty: the whole record) and reason.
    pub bad: Vec<(usize, String, String)>,
    pub crc: u32,
}

/// One record of a raw chunk (or of the input).
#[derive(Debug, Clone, Copy)]
pub struct RowRef<'a> {
    pub data: &'a [u8],
    /// `data` as text, when it is all UTF-8.
    pub utf8: Option<&'a str>,
    pub fields: &'a [Option<(u32, u32)>],
    pub row: u64,
    pub line: u64,
}

impl RowRef<'_> {
    pub fn field(&self, i: usize) -> Option<&[u8]> {
        self.fields.get(i).copied().flatten().map(|(s, e)| &self.data[s as usize..e as usize])
    }

    /// The field as text, when the record's data is known to be UTF-8.
    pub fn field_str(&self, i: usize) -> Option<&str> {
        let (s, e) = self.fields.get(i).copied().flatten()?;
        self.utf8?.get(s as usize..e as usize)
    }
}

impl RawChunk {
    pub fn new(target: usize, fields_per_row: usize, hint: (usize, usize)) -> RawChunk {
        RawChunk {
            no: u64::MAX,
            target,
            rows: Vec::with_capacity(hint.0),
            data: Vec::with_capacity(hint.1),
            fields: Vec::with_capacity(hint.0 * fields_per_row),
            ends: Vec::with_capacity(hint.0),
            bad: Vec::new(),
            crc: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Appends a record (which has `fields_per_row` fields).
    pub fn push(&mut self, row: u64, line: u64, data: &[u8], fields: &[Option<(usize, usize)>]) {
        let base = self.data.len();
        self.data.extend_from_slice(data);
        self.rows.push((row, line));
        self.crc = crc32c::crc32c_append(self.crc, data);
        for f in fields {
            let tag = match f {
                Some((s, e)) => (e - s) as u32,
                None => u32::MAX,
            };
            self.crc = crc32c::crc32c_append(self.crc, &tag.to_le_bytes());
            self.fields.push(f.map(|(s, e)| ((base + s) as u32, (base + e) as u32)));
        }
        self.ends.push(self.fields.len() as u32);
    }

    /// Record `i`; `utf8` is the chunk's data as text when it is all UTF-8.
    pub fn row<'a>(&'a self, i: usize, utf8: Option<&'a str>) -> RowRef<'a> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let fields = &self.fields[start..self.ends[i] as usize];
        RowRef { data: &self.data, utf8, fields, row: self.rows[i].0, line: self.rows[i].1 }
    }
}

const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Calls `send` with the binary COPY stream of the chunk's rows, in pieces of about `piece`
/// bytes.
pub fn copy_binary<E>(
    chunk: &Chunk,
    columns: &[Column],
    piece: usize,
    mut send: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut out = Vec::with_capacity(piece + 64 * 1024);
    out.extend_from_slice(COPY_HEADER);
    let mut at = vec![0usize; columns.len()]; // next value of each column
    let ncols = columns.len() as i16;
    for row in 0..chunk.rows.len() {
        out.extend_from_slice(&ncols.to_be_bytes());
        for (c, col) in chunk.cols.iter().enumerate() {
            if !col.valid[row] {
                out.extend_from_slice(&(-1i32).to_be_bytes());
                continue;
            }
            let i = at[c];
            at[c] += 1;
            match &col.values {
                Values::Bool(v) => {
                    out.extend_from_slice(&1i32.to_be_bytes());
                    out.push(v[i] as u8);
                }
                Values::I16(v) => {
                    out.extend_from_slice(&2i32.to_be_bytes());
                    out.extend_from_slice(&v[i].to_be_bytes());
                }
                Values::I32(v) => {
                    out.extend_from_slice(&4i32.to_be_bytes());
                    out.extend_from_slice(&v[i].to_be_bytes());
                }
                Values::I64(v) => {
                    out.extend_from_slice(&8i32.to_be_bytes());
                    out.extend_from_slice(&v[i].to_be_bytes());
                }
                Values::F32(v) => {
                    out.extend_from_slice(&4i32.to_be_bytes());
                    out.extend_from_slice(&v[i].to_bits().to_be_bytes());
                }
                Values::F64(v) => {
                    out.extend_from_slice(&8i32.to_be_bytes());
                    out.extend_from_slice(&v[i].to_bits().to_be_bytes());
                }
                Values::Uuid(v) => {
                    out.extend_from_slice(&16i32.to_be_bytes());
                    out.extend_from_slice(&v[i]);
                }
                Values::Bytes { .. } => {
                    let b = col.values.bytes(i);
                    match columns[c].ty {
                        ColType::Numeric(_) => {
                            // Canonical numerics are ASCII.
                            encode_numeric(std::str::from_utf8(b).unwrap_or("NaN"), &mut out)
                        }
                        ColType::Jsonb => {
                            out.extend_from_slice(&(b.len() as i32 + 1).to_be_bytes());
                            out.push(1); // jsonb's binary format version
                            out.extend_from_slice(b);
                        }
                        _ => {
                            out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                            out.extend_from_slice(b);
                        }
                    }
                }
            }
        }
        if out.len() >= piece {
            send(&out)?;
            out.clear();
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    send(&out)
}

/// Days between 1970-01-01 (Parquet's epoch) and 2000-01-01 (Postgres').
const EPOCH_DAYS: i32 = 10_957;
const EPOCH_US: i64 = 946_684_800_000_000;

/// The Parquet schema of the columns. Types map exactly: numeric(p,s) to DECIMAL (INT64 up to
/// 18 digits, 16-byte FIXED_LEN_BYTE_ARRAY up to 38), unconstrained numeric to its decimal
/// text (no Parquet type holds every numeric), timestamps to INT64 microseconds (UTC-adjusted
/// for timestamptz), dates, times, UUIDs and JSON to their logical types.
pub fn parquet_schema(columns: &[Column]) -> Result<Arc<Type>, String> {
    let mut fields = Vec::with_capacity(columns.len());
    for c in columns {
        let (physical, logical, len, decimal) = match &c.ty {
            ColType::Bool => (Physical::BOOLEAN, None, None, None),
            ColType::Int2 => (
                Physical::INT32,
                Some(LogicalType::Integer { bit_width: 16, is_signed: true }),
                None,
                None,
            ),
            ColType::Int4 => (Physical::INT32, None, None, None),
            ColType::Int8 => (Physical::INT64, None, None, None),
            ColType::Float4 => (Physical::FLOAT, None, None, None),
            ColType::Float8 => (Physical::DOUBLE, None, None, None),
            ColType::Numeric(Some((p, s))) if *p <= 38 => {
                let logical = LogicalType::Decimal { scale: *s as i32, precision: *p as i32 };
                if *p <= 18 {
                    (Physical::INT64, Some(logical), None, Some((*p, *s)))
                } else {
                    (Physical::FIXED_LEN_BYTE_ARRAY, Some(logical), Some(16), Some((*p, *s)))
                }
            }
            ColType::Numeric(_) | ColType::Text(_) | ColType::Char(_) => {
                (Physical::BYTE_ARRAY, Some(LogicalType::String), None, None)
            }
            ColType::Json | ColType::Jsonb => {
                (Physical::BYTE_ARRAY, Some(LogicalType::Json), None, None)
            }
            ColType::Bytea => (Physical::BYTE_ARRAY, None, None, None),
            ColType::Date => (Physical::INT32, Some(LogicalType::Date), None, None),
            ColType::Time(_) => (
                Physical::INT64,
                Some(LogicalType::Time {
                    is_adjusted_to_u_t_c: false,
                    unit: TimeUnit::MICROS(Default::default()),
                }),
                None,
                None,
            ),
            ColType::Timestamp(_) | ColType::Timestamptz(_) => (
                Physical::INT64,
                Some(LogicalType::Timestamp {
                    is_adjusted_to_u_t_c: matches!(c.ty, ColType::Timestamptz(_)),
                    unit: TimeUnit::MICROS(Default::default()),
                }),
                None,
                None,
            ),
            ColType::Uuid => {
                (Physical::FIXED_LEN_BYTE_ARRAY, Some(LogicalType::Uuid), Some(16), None)
            }
        };
        let mut b = Type::primitive_type_builder(&c.name, physical)
            .with_repetition(if c.not_null { Repetition::REQUIRED } else { Repetition::OPTIONAL })
            .with_logical_type(logical);
        if let Some(len) = len {
            b = b.with_length(len);
        }
        if let Some((p, s)) = decimal {
            b = b.with_precision(p as i32).with_scale(s as i32);
        }
        fields.push(Arc::new(b.build().map_err(|e| format!("column {:?}: {e}", c.name))?));
    }
    let root = Type::group_type_builder("schema")
        .with_fields(fields)
        .build()
        .map_err(|e| format!("Parquet schema: {e}"))?;
    Ok(Arc::new(root))
}

/// The chunk as one Parquet file (one row group, Snappy).
pub fn parquet_file(
    chunk: &Chunk,
    columns: &[Column],
    schema: &Arc<Type>,
) -> Result<Vec<u8>, String> {
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by("polylog load".into())
            .build(),
    );
    let err = |e: parquet::errors::ParquetError| format!("writing Parquet: {e}");
    let mut w = SerializedFileWriter::new(Vec::new(), Arc::clone(schema), props).map_err(err)?;
    let mut rg = w.next_row_group().map_err(err)?;
    for (c, col) in chunk.cols.iter().enumerate() {
        let column = &columns[c];
        let defs: Vec<i16> = col.valid.iter().map(|&v| v as i16).collect();
        let defs = if column.not_null { None } else { Some(&defs[..]) };
        let mut cw = rg.next_column().map_err(err)?.ok_or("Parquet writer ran out of columns")?;
        match (&col.values, &column.ty) {
            (Values::Bool(v), _) => cw.typed::<BoolType>().write_batch(v, defs, None),
            (Values::I16(v), _) => {
                let v: Vec<i32> = v.iter().map(|&x| x as i32).collect();
                cw.typed::<Int32Type>().write_batch(&v, defs, None)
            }
            (Values::I32(v), ColType::Date) => {
                let v: Vec<i32> = v.iter().map(|&x| x.saturating_add(EPOCH_DAYS)).collect();
                cw.typed::<Int32Type>().write_batch(&v, defs, None)
            }
            (Values::I32(v), _) => cw.typed::<Int32Type>().write_batch(v, defs, None),
            (Values::I64(v), ColType::Timestamp(_) | ColType::Timestamptz(_)) => {
                let v: Vec<i64> = v.iter().map(|&x| x.saturating_add(EPOCH_US)).collect();
                cw.typed::<Int64Type>().write_batch(&v, defs, None)
            }
            (Values::I64(v), _) => cw.typed::<Int64Type>().write_batch(v, defs, None),
            (Values::F32(v), _) => cw.typed::<FloatType>().write_batch(v, defs, None),
            (Values::F64(v), _) => cw.typed::<DoubleType>().write_batch(v, defs, None),
            (Values::Uuid(v), _) => {
                let v: Vec<FixedLenByteArray> =
                    v.iter().map(|u| FixedLenByteArray::from(u.to_vec())).collect();
                cw.typed::<FixedLenByteArrayType>().write_batch(&v, defs, None)
            }
            (values @ Values::Bytes { .. }, ColType::Numeric(Some((p, _)))) if *p <= 38 => {
                let mut unscaled = Vec::with_capacity(values.len());
                for i in 0..values.len() {
                    let text = std::str::from_utf8(values.bytes(i)).unwrap_or("NaN");
                    unscaled.push(numeric_unscaled(text).ok_or_else(|| {
                        format!("column {:?}: {text} has no Parquet DECIMAL form", column.name)
                    })?);
                }
                if *p <= 18 {
                    let v: Vec<i64> = unscaled.iter().map(|&x| x as i64).collect();
                    cw.typed::<Int64Type>().write_batch(&v, defs, None)
                } else {
                    let v: Vec<FixedLenByteArray> = unscaled
                        .iter()
                        .map(|x| FixedLenByteArray::from(x.to_be_bytes().to_vec()))
                        .collect();
                    cw.typed::<FixedLenByteArrayType>().write_batch(&v, defs, None)
                }
            }
            (values @ Values::Bytes { .. }, _) => {
                let v: Vec<ByteArray> =
                    (0..values.len()).map(|i| ByteArray::from(values.bytes(i).to_vec())).collect();
                cw.typed::<ByteArrayType>().write_batch(&v, defs, None)
            }
        }
        .map_err(err)?;
        cw.close().map_err(err)?;
    }
    rg.close().map_err(err)?;
    w.into_inner().map_err(err)
}
