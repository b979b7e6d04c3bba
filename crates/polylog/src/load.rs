//! `polylog load`: bulk-load a file into a Postgres table and Parquet files at once.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::bail;
use polylog_load::load::TopicInput;
use polylog_load::source::{Format, Header};
use polylog_load::{load, LoadOptions};

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The input: a CSV file, a Postgres text-format file (.tsv: tab separated, \N for NULL,
    /// what COPY TO writes), a Parquet file, or a topic of the data directory (JSON objects, or
    /// change events' `after`; each run loads what the topic got since the last load).
    #[arg(long, value_name = "FILE|TOPIC")]
    pub from: PathBuf,
    /// The input's format [default: from the file name].
    #[arg(long, value_parser = ["csv", "tsv", "text", "parquet"])]
    pub format: Option<String>,
    /// The Postgres database: postgres://user:password@host:port/db
    #[arg(long, value_name = "URL")]
    pub to_postgres: String,
    /// The table (`schema.table` or `table`). Partitioned tables get their rows straight into
    /// the right partition.
    #[arg(long)]
    pub table: String,
    /// Create the table from this schema file when it does not exist (`polylog gen wide-rows
    /// --schema-out` writes one).
    #[arg(long, value_name = "FILE")]
    pub schema: Option<PathBuf>,
    /// Also write Parquet files with the table's schema: a directory or s3://bucket/prefix.
    #[arg(long, value_name = "DIR|URL")]
    pub to_parquet: Option<String>,
    /// Postgres connections loading at once.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Rows per chunk: each chunk commits on its own (the unit of resume) and is one Parquet file.
    #[arg(long, default_value_t = 50_000)]
    pub chunk_rows: usize,
    /// Whether the first CSV line names the columns (auto: when every field is a column name).
    #[arg(long, default_value = "auto", value_parser = ["auto", "yes", "no"])]
    pub header: String,
    /// Field delimiter [default: "," for CSV, tab for text].
    #[arg(long)]
    pub delimiter: Option<char>,
    /// The NULL string [default: an unquoted empty field for CSV, \N for text].
    #[arg(long)]
    pub null: Option<String>,
    /// Write bad rows here (in the input's format; reasons in FILE.reasons) instead of stopping.
    #[arg(long, value_name = "FILE")]
    pub rejects: Option<PathBuf>,
    /// Names the load for resuming [default: the table and the input file's path, size and time].
    #[arg(long)]
    pub load_id: Option<String>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: &LoadArgs, config: impl FnOnce() -> anyhow::Result<Config>) -> anyhow::Result<()> {
    let mut opts = LoadOptions::new(&args.from, &args.to_postgres, &args.table);
    let name = args.from.to_string_lossy().to_string();
    if !args.from.exists()
        && args.format.is_none()
        && polylog_log::validate_topic_name(&name).is_ok()
    {
        let config = config()?;
        let log = crate::open_log_read_only(&config)?;
        if !log.topics()?.contains(&name) {
            bail!(
                "{name} is neither a file nor a topic of the log (data directory {})",
                config.data_dir.display()
            );
        }
        opts.topic = Some(TopicInput { log, topic: name });
    }
    opts.format = match args.format.as_deref() {
        None => None,
        Some("csv") => Some(Format::Csv),
        Some("parquet") => Some(Format::Parquet),
        Some(_) => Some(Format::Text),
    };
    opts.schema_file = args.schema.clone();
    opts.parquet = args.to_parquet.clone();
    opts.parallel = args.parallel;
    opts.chunk_rows = args.chunk_rows;
    opts.header = match args.header.as_str() {
        "yes" => Header::Yes,
        "no" => Header::No,
        _ => Header::Auto,
    };
    opts.delimiter = match args.delimiter {
        None => None,
        Some(c) if c.is_ascii() && c != '\n' && c != '\r' && c != '"' && c != '\\' => Some(c as u8),
        Some(c) => bail!(
            "--delimiter {c:?}: use one ASCII character other than a quote, backslash or newline"
        ),
    };
    opts.null = args.null.clone();
    opts.rejects = args.rejects.clone();
    opts.load_id = args.load_id.clone();
    opts.progress = !args.quiet;
    if !args.quiet && !std::io::stderr().is_terminal() {
        eprintln!("polylog load: {} into {}", args.from.display(), args.table);
    }
    if opts.topic.is_none() && !args.from.exists() {
        bail!("{}: no such file (nor a topic name)", args.from.display());
    }
    let summary = load(&opts)?;
    eprintln!("{summary}");
    Ok(())
}
