//! The `polylog` binary: command line, config loading, and the commands.

mod api;
mod config;
mod gen;
mod load;
mod logging;
mod quickstart;
mod run;
mod topics;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use polylog_log::{EmbeddedLog, Log};

use crate::config::{Backend, Config};

/// Polylog: change data capture, a durable log, denormalized views and sinks, in one binary.
#[derive(Debug, Parser)]
#[command(name = "polylog", version, propagate_version = true)]
struct Cli {
    /// Config file [default: polylog.toml, if present].
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory; overrides `data_dir` in the config.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// How running components log to stderr: readable lines, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List, inspect, read and write topics.
    Topics {
        #[command(subcommand)]
        command: topics::TopicsCommand,
    },
    /// The whole pipeline on this machine: a throwaway Postgres with a workload, captured,
    /// denormalized into documents, indexed and served for search. Needs the Postgres binaries.
    Quickstart(quickstart::QuickstartArgs),
    /// Run every configured source, view, sink, collector and rollup until Ctrl-C.
    Run,
    /// Show each source's, view's and sink's state and lag.
    Status(run::StatusArgs),
    /// Rebuild a sink's store from the log: its offsets go back, then it runs until it has
    /// written everything (stop `polylog run` first: one process writes a data directory).
    Replay(run::ReplayArgs),
    /// Generate sample data: `polylog gen events --rate 1000 --duration 60`.
    Gen {
        #[command(subcommand)]
        command: gen::GenCommand,
    },
    /// Bulk-load a CSV, text or Parquet file, or a topic, into a Postgres table (binary COPY,
    /// parallel, partition-aware) and Parquet files at once; resumable.
    Load(load::LoadArgs),
    /// Work with the config file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Parse and check the config file; print a summary.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `polylog topics tail ... | head` closes the pipe: that is a normal way to stop.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let explicit = cli.config.is_some();
    let path = cli.config.unwrap_or_else(|| PathBuf::from("polylog.toml"));
    let data_dir = cli.data_dir;
    let load = || -> anyhow::Result<Config> {
        let mut config = Config::load(&path, explicit)?;
        if let Some(dir) = data_dir.clone() {
            config.data_dir = dir;
        }
        Ok(config)
    };
    match cli.command {
        Command::Quickstart(args) => quickstart::run(&args),
        Command::Topics { command } => topics::run(&load()?, command),
        Command::Run => run::run(&load()?),
        Command::Status(args) => run::status(&load()?, &args),
        Command::Replay(args) => run::replay(&load()?, &args),
        Command::Load(args) => load::run(&args, load),
        Command::Gen { command: gen::GenCommand::WideRows(args) } => gen::wide_rows(&args),
        Command::Gen { command } => {
            // The config only supplies the collector's address, so it is optional here.
            let config = if explicit {
                Some(Config::load(&path, true)?)
            } else {
                Config::load(&path, false).ok()
            };
            let listen = config.and_then(|c| c.collector).map(|c| c.listen);
            gen::run(&command, listen)
        }
        Command::Config { command: ConfigCommand::Check } => {
            let config = load()?;
            println!(
                "{}: ok — data_dir {}, log {:?} (fsync {:?}), {} source(s), {} view(s), {} sink(s), {} rollup(s){}",
                path.display(),
                config.data_dir.display(),
                config.log.backend,
                config.log.fsync,
                config.sources.len(),
                config.views.len(),
                config.sinks.len(),
                config.rollups.len(),
                if config.collector.is_some() { ", a collector" } else { "" }
            );
            Ok(())
        }
    }
}

/// Opens the log to write: with the embedded log, this process becomes the data directory's one
/// writer; with Kafka, a client of the cluster.
pub(crate) fn open_log(config: &Config) -> anyhow::Result<Arc<dyn Log>> {
    match config.log.backend {
        Backend::Embedded => Ok(Arc::new(
            EmbeddedLog::open(&config.data_dir, config.log_options())
                .with_context(|| format!("cannot open the log in {}", config.data_dir.display()))?,
        )),
        Backend::Kafka => open_kafka(config),
    }
}

/// Opens the log to read, beside a process that may be writing it.
pub(crate) fn open_log_read_only(config: &Config) -> anyhow::Result<Arc<dyn Log>> {
    match config.log.backend {
        Backend::Embedded => Ok(Arc::new(
            EmbeddedLog::open_read_only(&config.data_dir, config.log_options())
                .with_context(|| format!("cannot read the log in {}", config.data_dir.display()))?,
        )),
        Backend::Kafka => open_kafka(config),
    }
}

fn open_kafka(config: &Config) -> anyhow::Result<Arc<dyn Log>> {
    let opts = config.kafka_options()?;
    let brokers = opts.brokers.clone();
    let log = polylog_kafka::KafkaLog::connect(opts)
        .with_context(|| format!("cannot use the Kafka cluster at {brokers} as the log"))?;
    Ok(Arc::new(log))
}
