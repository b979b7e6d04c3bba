//! `polylog quickstart`: the whole pipeline on this machine, with nothing set up but the
//! Postgres binaries: a throwaway Postgres with a small video platform (publishers, videos,
//! tags, video_tags) and a workload, captured by the CDC source, denormalized by a view into
//! one document per video, indexed by the search sink and served by the HTTP API; and ad
//! viewability events, generated and posted to the collector, rolled up into the same Postgres
//! and reported by the API.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use polylog_testkit::{PgCluster, Rng};

use crate::config::Config;

#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Where the quickstart keeps its config and data (replaced on every run).
    #[arg(long, default_value = "polylog-quickstart")]
    dir: PathBuf,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// Address of the HTTP API (default 127.0.0.1:7700, or a free port if that is taken).
    #[arg(long)]
    listen: Option<String>,
}

const WORDS: [&str; 16] = [
    "cats",
    "rust",
    "cooking",
    "travel",
    "chess",
    "guitar",
    "robots",
    "space",
    "coffee",
    "garden",
    "running",
    "jazz",
    "origami",
    "sailing",
    "pottery",
    "volcanoes",
];

/// A word for titles, from the workload's generator (seeded, so each run looks alike).
fn word(g: &mut Rng) -> &'static str {
    WORDS[g.below(WORDS.len() as u64) as usize]
}

const SCHEMA: &str = "
    CREATE TABLE publishers (id int PRIMARY KEY, name text NOT NULL, country text);
    CREATE TABLE videos (id int PRIMARY KEY, title text NOT NULL, publisher_id int,
                         duration_s int, published_at timestamptz DEFAULT now());
    CREATE TABLE tags (id int PRIMARY KEY, label text NOT NULL);
    CREATE TABLE video_tags (video_id int, tag_id int, position int, PRIMARY KEY (video_id, tag_id));
    INSERT INTO publishers SELECT g, 'publisher ' || g, (ARRAY['fr','de','us','jp'])[1 + g % 4]
      FROM generate_series(1, 50) g;
    INSERT INTO tags SELECT g, (ARRAY['cats','rust','cooking','travel','chess','guitar','robots',
      'space','coffee','garden','running','jazz','origami','sailing','pottery','volcanoes'])[g]
      FROM generate_series(1, 16) g;
    INSERT INTO videos SELECT g, 'video ' || g || ' about ' || (ARRAY['cats','rust','cooking','travel'])[1 + g % 4],
      1 + g % 50, 60 + g % 3600 FROM generate_series(1, 2000) g;
    INSERT INTO video_tags SELECT v, 1 + (v * 7 + k) % 16, k FROM generate_series(1, 2000) v, generate_series(0, 1) k;
";

fn config_text(pg: &PgCluster, data_dir: &Path, listen: &str, collector: &str) -> String {
    let mut sites = String::new();
    for (domain, category) in polylog_events::gen::site_categories() {
        sites.push_str(&format!("\"{domain}\" = \"{category}\"\n"));
    }
    format!(
        r#"# Written by `polylog quickstart`; run it yourself with `polylog -c {dir}/polylog.toml run`
# (while the quickstart's Postgres is up).
data_dir = "{data}"

[log]
fsync = "always"

[api]
listen = "{listen}"

[sources.demo]
kind = "postgres"
url = "{url}"
status_interval_ms = 200

[views.videos]
root = "demo.public.videos"

[[views.videos.joins]]
name = "publisher"
topic = "demo.public.publishers"
on = {{ publisher_id = "id" }}
kind = "one"

[[views.videos.joins]]
name = "tags"
topic = "demo.public.video_tags"
on = {{ id = "video_id" }}
kind = "many"
fields = ["position"]
order_by = ["position"]
joins = [{{ name = "tag", topic = "demo.public.tags", on = {{ tag_id = "id" }}, kind = "one" }}]

[sinks.videos]
kind = "search"
topic = "views.videos"

[collector]
listen = "{collector}"
topic = "events.viewability"

[rollups.viewability]
topic = "events.viewability"
url = "{analytics}"
dimensions = ["campaign_id", "site_category", "device", "browser"]

[collector.site_categories]
{sites}"#,
        dir = data_dir.parent().unwrap_or(data_dir).display(),
        data = data_dir.display(),
        url = pg.url("demo"),
        analytics = pg.url("analytics"),
    )
}

/// One random transaction of the workload.
fn change(g: &mut Rng, next_video: &mut u64) -> String {
    match g.below(10) {
        0..=3 => {
            *next_video += 1;
            let (id, w) = (*next_video, word(g));
            format!(
                "BEGIN; INSERT INTO videos (id, title, publisher_id, duration_s) VALUES ({id}, 'new video about {w}', {}, {});
                 INSERT INTO video_tags VALUES ({id}, {}, 0) ON CONFLICT DO NOTHING; COMMIT;",
                1 + g.below(50),
                60 + g.below(3600),
                1 + g.below(16)
            )
        }
        4 | 5 => format!(
            "UPDATE videos SET title = 'video {0} about {1}' WHERE id = {0}",
            1 + g.below(*next_video),
            word(g)
        ),
        6 => format!(
            "UPDATE publishers SET name = 'publisher {0} ({1})' WHERE id = {0}",
            1 + g.below(50),
            word(g)
        ),
        7 => format!(
            "INSERT INTO video_tags VALUES ({}, {}, 1) ON CONFLICT DO NOTHING",
            1 + g.below(*next_video),
            1 + g.below(16)
        ),
        8 => format!("DELETE FROM video_tags WHERE video_id = {}", 1 + g.below(*next_video)),
        _ => format!("DELETE FROM videos WHERE id = {}", 1 + g.below(*next_video)),
    }
}

fn free_listen(wanted: Option<&str>, default: &str) -> anyhow::Result<String> {
    if let Some(w) = wanted {
        return Ok(w.to_string());
    }
    if std::net::TcpListener::bind(default).is_ok() {
        return Ok(default.into());
    }
    Ok(format!("127.0.0.1:{}", polylog_testkit::free_port()?))
}

pub fn run(args: &QuickstartArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    if dir.exists() {
        if !dir.join("polylog.toml").exists() {
            bail!(
                "{} exists and is not a quickstart directory; pass --dir <new directory>",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    println!("1. Starting a throwaway Postgres with a small video platform (publishers, videos, tags, video_tags) ...");
    let pg = PgCluster::start().context("starting Postgres (the quickstart needs the Postgres 15 server binaries, e.g. `apt-get install postgresql`)")?;
    pg.create_database("demo")?;
    pg.psql("demo", SCHEMA)?;
    pg.create_database("analytics")?;
    let listen = free_listen(args.listen.as_deref(), "127.0.0.1:7700")?;
    let collector = free_listen(None, "127.0.0.1:7701")?;
    let config_path = dir.join("polylog.toml");
    std::fs::write(&config_path, config_text(&pg, &dir.join("data"), &listen, &collector))?;
    let config = Config::load(&config_path, true)?;
    println!("   {} (config: {})", pg.url("demo"), config_path.display());
    println!(
        "2. Capturing it (snapshot, then every change), keeping a document per video with its"
    );
    println!("   publisher and tags current, and indexing the documents for search.");
    println!("   Collecting ad viewability events (generated, 200/s) on {collector}, anonymized,");
    println!(
        "   rolled up per minute into Postgres (database analytics), reported up to the second."
    );

    let stop_arc = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop_arc))
            .context("installing a signal handler")?;
    }
    let me = std::env::current_exe().map_or_else(|_| "polylog".into(), |p| p.display().to_string());
    let stop = &*stop_arc;
    let result = std::thread::scope(|scope| {
        // The workload: a change every 200 ms.
        scope.spawn(|| {
            let mut g = Rng::new(0x5eed);
            let mut next_video = 2000;
            let mut changes = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if pg.psql("demo", &change(&mut g, &mut next_video)).is_ok() {
                    changes += 1;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            changes
        });
        // Viewability traffic, once the collector listens.
        let collector = &collector;
        scope.spawn(move || {
            let mut g = polylog_events::gen::Generator::new(Default::default());
            while !stop.load(Ordering::SeqCst) {
                if std::net::TcpStream::connect(collector).is_ok() {
                    if let Err(e) = crate::gen::send(&mut g, collector, 200, 0, stop, false) {
                        if !stop.load(Ordering::SeqCst) {
                            println!("   the event generator stopped: {e:#}");
                        }
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let started = Instant::now();
        let (listen, config_path, me, pg) = (&listen, &config_path, &me, &pg);
        scope.spawn(move || {
            // Tell the user what to try once the first documents are searchable.
            let url = format!("http://{listen}/v1/search/videos");
            let token = std::env::var("POLYLOG_API_TOKEN").ok().filter(|t| !t.is_empty());
            let curl = if token.is_some() {
                "curl -H \"Authorization: Bearer $POLYLOG_API_TOKEN\""
            } else {
                "curl"
            };
            while !stop.load(Ordering::SeqCst) {
                if search_works(listen, token.as_deref()) {
                    println!("3. Running. Open the dashboard: http://{listen}/");
                    println!("   Try, in another terminal:");
                    println!("     {curl} '{url}?q=title:rust&limit=3'");
                    println!(
                        "     {curl} '{url}?q=publisher.country:jp%20AND%20tags.tag.label:cats'"
                    );
                    println!(
                        "     {curl} '{url}/%7B%22id%22:1%7D'          # the document of video 1"
                    );
                    let reports = format!("http://{listen}/v1/reports/viewability");
                    println!("     {curl} '{reports}?from=now-1h&group_by=device'   # up to the second");
                    println!("     {curl} '{reports}?from=now-1h&interval=minute&group_by=site_category&format=csv'");
                    println!("     {curl} 'http://{listen}/v1/changes?table=videos'   # the live change feed");
                    println!("     {me} -c {} status", config_path.display());
                    println!(
                        "     {me} -c {} topics tail views.videos -n 2",
                        config_path.display()
                    );
                    println!(
                        "     psql '{}' -c \"UPDATE publishers SET name = 'Acme' WHERE id = 1\"",
                        pg.url("demo")
                    );
                    println!("   (a change every 200 ms meanwhile; Ctrl-C stops everything)");
                    break;
                }
                if started.elapsed() > Duration::from_secs(120) {
                    println!(
                        "   the search API did not answer within 120 s; see `{me} -c {} status`",
                        config_path.display()
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        if let Some(s) = args.seconds {
            scope.spawn(move || {
                let until = Instant::now() + Duration::from_secs(s);
                while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                stop.store(true, Ordering::SeqCst);
            });
        }
        let r = crate::run::run_with(&config, Arc::clone(&stop_arc));
        stop.store(true, Ordering::SeqCst);
        r
    });
    result?;
    let status: serde_json::Value =
        std::fs::read(config.data_dir.join("status").join("sources.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
    println!(
        "4. Stopped: {} change events captured, {} documents written by the view, {} indexed;",
        status["sources"]["demo"]["events"].as_u64().unwrap_or(0)
            + status["sources"]["demo"]["snapshot_rows"].as_u64().unwrap_or(0),
        status["views"]["videos"]["documents"].as_u64().unwrap_or(0),
        status["sinks"]["videos"]["records"].as_u64().unwrap_or(0),
    );
    println!(
        "   {} events collected, {} rolled up.",
        status["collector"]["accepted"].as_u64().unwrap_or(0),
        status["rollups"]["viewability"]["events"].as_u64().unwrap_or(0),
    );
    println!("   Everything is in {}; the Postgres it used is gone.", dir.display());
    Ok(())
}

/// Whether the search API answers with at least one document.
fn search_works(listen: &str, token: Option<&str>) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(listen) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req =
        format!("GET /v1/search/videos?q=*&limit=1 HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.starts_with("HTTP/1.1 200") && !body.contains("\"total\":0")
}
