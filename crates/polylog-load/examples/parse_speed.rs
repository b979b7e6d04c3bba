//! Parse speed of the reader alone: `cargo run --release -p polylog-load --example parse_speed -- FILE.csv`
//! (a file from `polylog gen wide-rows --columns 120`).

#![allow(clippy::unwrap_used)] // a test stops at its first failure

use polylog_load::gen::wide_columns;
use polylog_load::source::{Delimited, Header, Record, Source};
use polylog_load::types::{ColType, Column, ColumnData};

fn main() {
    let path = std::env::args().nth(1).expect("a CSV file");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(std::fs::File::open(&path).unwrap()),
        &mut first,
    )
    .unwrap();
    let ncols = first.split(',').count();
    let cols: Vec<Column> = wide_columns(ncols)
        .into_iter()
        .map(|(name, ty)| {
            let (typname, typmod) = match ty {
                "bigint" => ("int8", -1),
                "integer" => ("int4", -1),
                "smallint" => ("int2", -1),
                "date" => ("date", -1),
                "timestamptz" => ("timestamptz", -1),
                "timestamp" => ("timestamp", -1),
                "time" => ("time", -1),
                "numeric(14,2)" => ("numeric", (14 << 16 | 2) + 4),
                "numeric(28,6)" => ("numeric", (28 << 16 | 6) + 4),
                "numeric" => ("numeric", -1),
                "double precision" => ("float8", -1),
                "real" => ("float4", -1),
                "text" => ("text", -1),
                "boolean" => ("bool", -1),
                "varchar(64)" => ("varchar", 68),
                "uuid" => ("uuid", -1),
                "char(3)" => ("bpchar", 7),
                "jsonb" => ("jsonb", -1),
                "bytea" => ("bytea", -1),
                other => panic!("{other}"),
            };
            Column {
                name,
                ty: ColType::from_catalog(typname, typmod, false).unwrap(),
                not_null: false,
                sql_type: ty.into(),
            }
        })
        .collect();
    let t = std::time::Instant::now();
    let mut src = Delimited::open(path.as_ref(), true, None, None, Header::Auto, &cols).unwrap();
    let mut rec = Record::default();
    let mut rows = 0u64;
    let mut data: Vec<ColumnData> = cols.iter().map(|c| ColumnData::new(&c.ty)).collect();
    let only_split = std::env::var("SPLIT_ONLY").is_ok();
    while src.next(&mut rec).unwrap() {
        rows += 1;
        if !only_split {
            let whole = std::str::from_utf8(&rec.data).ok();
            for (i, c) in cols.iter().enumerate() {
                match rec.fields[i] {
                    None => data[i].push_null(),
                    Some((s, e)) => {
                        let text = whole.and_then(|w| w.get(s..e));
                        data[i].push_field(&c.ty, &rec.data[s..e], text).unwrap()
                    }
                }
            }
        }
        if rows.is_multiple_of(10_000) {
            data = cols.iter().map(|c| ColumnData::new(&c.ty)).collect();
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{rows} rows in {s:.2} s: {:.0} rows/s, {:.0} MB/s",
        rows as f64 / s,
        src.progress().done as f64 / s / 1e6
    );
}
