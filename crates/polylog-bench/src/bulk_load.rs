//! `bulk_load`: rows/s loading wide rows (120 columns) from CSV into Postgres with `polylog
//! load` (binary COPY), with one stream and with two streams into two partitions, and with
//! Parquet files written at the same time; against `psql \copy ... FREEZE` of the same CSV into
//! a table created in the same transaction, in the same run, on the same server.

use std::time::Instant;

use polylog_load::gen::{schema_toml, wide_columns, WideRows};
use polylog_load::{load, LoadOptions};
use polylog_testkit::PgCluster;

use crate::{Opts, ScratchDir};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

pub fn run(opts: &Opts) -> Result<(), String> {
    let rows: u64 = opts.get("rows", if opts.quick { 100_000 } else { 2_000_000 })?;
    let columns: usize = opts.get("columns", 120)?;
    let chunk_rows: usize = opts.get("chunk-rows", 50_000)?;
    let scratch = ScratchDir::new(opts, "bulk-load")?;
    let csv = scratch.0.join("wide.csv");
    let t = Instant::now();
    // 59 days from 2026-01-01: January and February, two monthly partitions.
    let g = WideRows { columns, rows, days: 59, null_percent: 5, seed: 1 };
    let f = std::fs::File::create(&csv).map_err(err)?;
    g.write_csv(&mut std::io::BufWriter::with_capacity(1 << 20, f)).map_err(err)?;
    let size = std::fs::metadata(&csv).map_err(err)?.len();
    println!(
        "bulk_load: {rows} rows of {columns} columns, {:.0} MB of CSV (generated in {:.1} s)",
        size as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let flat = scratch.0.join("flat.toml");
    let parted = scratch.0.join("parted.toml");
    std::fs::write(&flat, schema_toml(columns, false)).map_err(err)?;
    std::fs::write(&parted, schema_toml(columns, true)).map_err(err)?;

    let pg = PgCluster::start_with_settings("max_wal_size = '16GB'\ncheckpoint_timeout = '1h'\n")
        .map_err(err)?;
    let url = pg.url("postgres");
    let checkpoint = || pg.psql("postgres", "CHECKPOINT").map(|_| ()).map_err(err);

    // Baseline: psql \copy ... FREEZE into a table created in the same transaction.
    let cols: Vec<String> = wide_columns(columns).iter().map(|(n, t)| format!("{n} {t}")).collect();
    let script = scratch.0.join("baseline.sql");
    let baseline_run = |table: &str| -> Result<f64, String> {
        std::fs::write(
            &script,
            format!(
                "BEGIN;\nCREATE TABLE {table} ({});\n\\copy {table} FROM '{}' WITH (FORMAT csv, HEADER, FREEZE)\nCOMMIT;\n",
                cols.join(", "),
                csv.display()
            ),
        )
        .map_err(err)?;
        checkpoint()?;
        let t = Instant::now();
        let out = std::process::Command::new(pg.bin_dir().join("psql"))
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port().to_string(),
            ])
            .args(["-U", "postgres", "-d", "postgres", "-f"])
            .arg(&script)
            .output()
            .map_err(err)?;
        if !out.status.success() {
            return Err(format!("psql: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let rate = rows as f64 / t.elapsed().as_secs_f64();
        if !opts.quick || table != "baseline" {
            pg.psql("postgres", &format!("DROP TABLE {table}")).map_err(err)?;
        }
        Ok(rate)
    };
    // Run first and last; the faster of the two counts (this machine is shared and noisy).
    let b1 = baseline_run("baseline")?;
    println!("  psql \\copy FREEZE:                 {b1:>9.0} rows/s");
    let run = |table: &str,
               schema: &std::path::Path,
               parallel: usize,
               parquet: bool|
     -> Result<f64, String> {
        checkpoint()?;
        let mut o = LoadOptions::new(&csv, &url, table);
        o.schema_file = Some(schema.to_path_buf());
        o.parallel = parallel;
        o.chunk_rows = chunk_rows;
        if parquet {
            o.parquet = Some(scratch.0.join(format!("parquet-{table}")).display().to_string());
        }
        let t = Instant::now();
        let s = load(&o).map_err(err)?;
        let rate = rows as f64 / t.elapsed().as_secs_f64();
        if s.rows != rows {
            return Err(format!("{table}: loaded {} rows of {rows}", s.rows));
        }
        let n: u64 = pg
            .psql("postgres", &format!("SELECT count(*) FROM {table}"))
            .map_err(err)?
            .parse()
            .map_err(err)?;
        if n != rows {
            return Err(format!("{table} holds {n} rows, not {rows}"));
        }
        if parquet {
            println!(
                "    Parquet: {} files, {:.0} MB",
                s.parquet_files,
                s.parquet_bytes as f64 / 1e6
            );
            let _ = std::fs::remove_dir_all(scratch.0.join(format!("parquet-{table}")));
        }
        if !opts.quick {
            // Room on disk for the next run (2M wide rows are several GB per table).
            pg.psql("postgres", &format!("DROP TABLE {table}")).map_err(err)?;
        }
        Ok(rate)
    };
    let one = run("one_stream", &flat, 1, false)?;
    println!(
        "  polylog load, one stream:           {one:>9.0} rows/s  ({:.2}x the first psql run)",
        one / b1
    );
    let two = run("two_streams", &parted, 2, false)?;
    println!("  polylog load, two streams, two partitions: {two:>9.0} rows/s  ({:.2}x)", two / b1);
    let pq = run("with_parquet", &flat, 1, true)?;
    println!("  polylog load + Parquet, one stream: {pq:>9.0} rows/s  ({:.2}x)", pq / b1);
    let b2 = baseline_run("baseline_again")?;
    println!("  psql \\copy FREEZE, again:          {b2:>9.0} rows/s");
    let baseline = b1.max(b2);
    println!("  baseline (the faster psql run):     {baseline:>9.0} rows/s");
    if opts.quick {
        // The loaded values are Postgres' own parse of the CSV (on 2M rows this takes minutes).
        let diff: u64 = pg
            .psql(
                "postgres",
                "SELECT count(*) FROM ((SELECT x::text FROM one_stream x EXCEPT ALL SELECT y::text FROM baseline y) \
                 UNION ALL (SELECT y::text FROM baseline y EXCEPT ALL SELECT x::text FROM one_stream x)) d",
            )
            .map_err(err)?
            .parse()
            .map_err(err)?;
        if diff != 0 {
            return Err(format!("{diff} rows differ between the load and psql's"));
        }
    }
    println!(
        "RESULT bulk_load_parquet polylog={pq:.0}rows/s baseline={baseline:.0}rows/s ratio={:.2}",
        pq / baseline
    );
    println!("RESULT bulk_load_two_streams polylog={two:.0}rows/s baseline={baseline:.0}rows/s ratio={:.2}", two / baseline);
    println!(
        "RESULT bulk_load polylog={one:.0}rows/s baseline={baseline:.0}rows/s ratio={:.2}",
        one / baseline
    );
    Ok(())
}
