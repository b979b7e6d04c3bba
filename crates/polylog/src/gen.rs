//! `polylog gen events`: realistic viewability traffic posted to a collector at a steady rate.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use polylog_events::gen::{post, GenOptions, Generator};

#[derive(Debug, clap::Subcommand)]
pub enum GenCommand {
    /// Post generated events to a collector (`POST /v1/events`) at a steady rate.
    Events(EventsArgs),
    /// Write wide summary rows as CSV (and the schema file that creates their table), for
    /// `polylog load`.
    WideRows(WideRowsArgs),
}

#[derive(Debug, clap::Args)]
pub struct WideRowsArgs {
    #[arg(long, default_value_t = 120)]
    pub columns: usize,
    #[arg(long, default_value_t = 100_000)]
    pub rows: u64,
    /// Rows spread over this many days from 2026-01-01 (column `day`).
    #[arg(long, default_value_t = 60)]
    pub days: u64,
    /// The CSV file [default: standard output].
    #[arg(long, value_name = "FILE")]
    pub out: Option<std::path::PathBuf>,
    /// Also write the schema file for `polylog load --schema`.
    #[arg(long, value_name = "FILE")]
    pub schema_out: Option<std::path::PathBuf>,
    /// In the schema file, partition the table by month of `day`.
    #[arg(long)]
    pub partitioned: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn wide_rows(args: &WideRowsArgs) -> anyhow::Result<()> {
    if args.columns < 3 {
        bail!("--columns must be at least 3 (id, day, updated_at)");
    }
    let g = polylog_load::gen::WideRows {
        columns: args.columns,
        rows: args.rows,
        days: args.days,
        null_percent: 5,
        seed: args.seed,
    };
    if let Some(p) = &args.schema_out {
        std::fs::write(p, polylog_load::gen::schema_toml(args.columns, args.partitioned))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    match &args.out {
        Some(p) => {
            let f =
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            g.write_csv(&mut w).with_context(|| format!("writing {}", p.display()))?;
        }
        None => {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
            g.write_csv(&mut w)?;
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Events per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds to run (0: until Ctrl-C).
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// The collector's address [default: `collector.listen` of the config, else 127.0.0.1:7701].
    #[arg(long)]
    pub collector: Option<String>,
    /// Distinct campaigns.
    #[arg(long, default_value_t = 10_000)]
    pub campaigns: u64,
    /// Distinct users.
    #[arg(long, default_value_t = 1_000_000)]
    pub users: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run(command: &GenCommand, collector: Option<String>) -> anyhow::Result<()> {
    let GenCommand::Events(args) = command else { bail!("not an events generator") };
    let addr = args.collector.clone().or(collector).unwrap_or_else(|| "127.0.0.1:7701".into());
    if args.rate == 0 {
        bail!("--rate must be at least 1 event per second");
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, std::sync::Arc::clone(&stop))
            .context("installing a signal handler")?;
    }
    let mut g = Generator::new(GenOptions {
        campaigns: args.campaigns.max(1),
        users: args.users.max(1),
        seed: args.seed,
        ..GenOptions::default()
    });
    eprintln!("polylog gen: {} events/s to http://{addr}/v1/events", args.rate);
    let (sent, rejected) = send(&mut g, &addr, args.rate, args.duration, &stop, true)?;
    eprintln!("polylog gen: {sent} events sent, {rejected} rejected");
    Ok(())
}

/// Posts `rate` events/s for `duration` s (0: until `stop`), ten requests a second; returns
/// (accepted, rejected). Stops at the first refused request.
pub fn send(
    g: &mut Generator,
    addr: &str,
    rate: u64,
    duration: u64,
    stop: &std::sync::atomic::AtomicBool,
    progress: bool,
) -> anyhow::Result<(u64, u64)> {
    let start = Instant::now();
    let (mut sent, mut rejected, mut last) = (0u64, 0u64, Instant::now());
    let tick = Duration::from_millis(100);
    let mut due = start;
    while !stop.load(std::sync::atomic::Ordering::SeqCst)
        && (duration == 0 || start.elapsed() < Duration::from_secs(duration))
    {
        // Events due by now, in requests of at most 5,000.
        let want = (start.elapsed().as_secs_f64() * rate as f64) as u64 + rate / 10 + 1;
        while sent + rejected < want {
            let now = polylog_log::now_ms();
            let (body, n) = g.batch((want - sent - rejected).min(5_000), now - 100, now);
            let (status, answer) =
                post(addr, &body).with_context(|| format!("posting to http://{addr}/v1/events"))?;
            if status != 200 {
                bail!("the collector answered {status}: {answer}");
            }
            let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
            let ok = v["accepted"].as_u64().unwrap_or(0);
            sent += ok;
            rejected += n.saturating_sub(ok);
        }
        if progress && last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            eprintln!(
                "polylog gen: {sent} events in {:.0} s ({:.0}/s)",
                start.elapsed().as_secs_f64(),
                sent as f64 / start.elapsed().as_secs_f64()
            );
        }
        due += tick;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok((sent, rejected))
}
