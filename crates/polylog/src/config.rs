//! `polylog.toml`: the pipeline's shape (DESIGN 3.7). Every table rejects keys it does not know,
//! and every error names the key it is about.

// Sections for components that later issues build (sources, views, sinks, the collector, rollups)
// are parsed and checked now, so a config written today keeps working; their fields are read
// when those components land.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use polylog_log::FsyncPolicy;
pub use polylog_postgres::PostgresSourceConfig;
use polylog_sinks::SinkConfig;
use polylog_views::ViewConfig;
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the embedded log and state (relative to the working directory).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where topics are stored.
    #[serde(default)]
    pub log: LogConfig,
    /// The HTTP API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Change data capture sources, by name.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    /// Denormalized views, by name; each writes the topic `views.<name>`.
    #[serde(default)]
    pub views: BTreeMap<String, ViewConfig>,
    /// Sinks, by name.
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    /// The HTTP event collector.
    #[serde(default)]
    pub collector: Option<CollectorConfig>,
    /// Rollups of event topics into Postgres, by name.
    #[serde(default)]
    pub rollups: BTreeMap<String, RollupConfig>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("polylog-data")
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `embedded` (files under `data_dir`) or `kafka`.
    #[serde(default)]
    pub backend: Backend,
    /// Kafka bootstrap servers, `host:port,...` (backend = "kafka").
    #[serde(default)]
    pub brokers: Option<String>,
    /// Kafka: replication factor of the topics Polylog creates (default: the cluster's
    /// `default.replication.factor`).
    #[serde(default)]
    pub replication_factor: Option<u16>,
    /// Kafka: connect over TLS (`tls_ca`, `tls_cert` and `tls_key` imply it).
    #[serde(default)]
    pub tls: bool,
    /// Kafka: PEM file of the CA that signed the brokers' certificates (default: the system's).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Kafka: PEM files of a client certificate and its key, for clusters that ask for one.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Kafka: SASL mechanism: `SCRAM-SHA-256`, `SCRAM-SHA-512` or `PLAIN`.
    #[serde(default)]
    pub sasl_mechanism: Option<String>,
    #[serde(default)]
    pub sasl_username: Option<String>,
    /// The SASL password; or leave it out and set `POLYLOG_KAFKA_PASSWORD`.
    #[serde(default)]
    pub sasl_password: Option<String>,
    /// Kafka: several processes run this same config's views and sinks and split their
    /// partitions (consumer-group membership); one that stops is taken over by the others.
    #[serde(default)]
    pub scale_out: bool,
    /// Kafka: further librdkafka settings, applied to every client (`[log.kafka]`,
    /// e.g. `"message.max.bytes" = "2000000"`).
    #[serde(default)]
    pub kafka: BTreeMap<String, String>,
    /// When appended records are fsynced: `always` (per batch, group commit), `interval`, `never`.
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// With `fsync = "interval"`: milliseconds between fsyncs.
    #[serde(default = "default_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
    /// Partitions of topics Polylog creates.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Size at which a partition rolls to a new segment file.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// Milliseconds between retention and compaction rounds.
    #[serde(default = "default_maintenance_interval_ms")]
    pub maintenance_interval_ms: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            backend: Backend::Embedded,
            brokers: None,
            replication_factor: None,
            tls: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            kafka: BTreeMap::new(),
            scale_out: false,
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: default_fsync_interval_ms(),
            partitions: default_partitions(),
            segment_bytes: default_segment_bytes(),
            maintenance_interval_ms: default_maintenance_interval_ms(),
        }
    }
}

fn default_fsync_interval_ms() -> u64 {
    200
}
fn default_partitions() -> u32 {
    1
}
fn default_segment_bytes() -> u64 {
    128 * 1024 * 1024
}
fn default_maintenance_interval_ms() -> u64 {
    30_000
}

/// Where topics live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Embedded,
    Kafka,
}

/// `[api]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the HTTP API listens on.
    #[serde(default = "default_api_listen")]
    pub listen: String,
    /// Bearer token required by every route but `/health` (or set `POLYLOG_API_TOKEN`).
    #[serde(default)]
    pub token: Option<String>,
    /// The config has an `[api]` table: `run` serves the API even with nothing to search.
    #[serde(skip)]
    pub configured: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { listen: default_api_listen(), token: None, configured: false }
    }
}

fn default_api_listen() -> String {
    "127.0.0.1:7700".into()
}

/// `[sources.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// Change data capture from Postgres logical replication.
    Postgres(PostgresSourceConfig),
}

/// `[collector]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    #[serde(default = "default_collector_listen")]
    pub listen: String,
    /// Topic accepted events are appended to.
    pub topic: String,
    /// Largest request body, compressed and once decompressed.
    #[serde(default = "default_body_max_bytes")]
    pub body_max_bytes: usize,
    /// Most events in one request.
    #[serde(default = "default_events_max")]
    pub events_max: usize,
    /// Days a key for hashing user ids is kept before it is discarded.
    #[serde(default = "default_keep_key_days")]
    pub keep_key_days: u32,
    /// Site domain → category (a domain matches itself and its subdomains).
    #[serde(default)]
    pub site_categories: BTreeMap<String, String>,
    /// A MaxMind DB file (GeoIP2/GeoLite2 Country or City) for the events' `country`.
    #[serde(default)]
    pub geoip_db: Option<PathBuf>,
}

fn default_body_max_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_events_max() -> usize {
    10_000
}
fn default_keep_key_days() -> u32 {
    2
}

fn default_collector_listen() -> String {
    "127.0.0.1:7701".into()
}

/// `[rollups.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupConfig {
    /// Event topic to roll up.
    pub topic: String,
    /// Postgres database the closed buckets are written to.
    pub url: String,
    /// Fields the buckets are grouped by.
    pub dimensions: Vec<String>,
    /// Prefix of the tables (`<table>_minute`, `_hour`, `_day`) [default: the rollup's name].
    #[serde(default)]
    pub table: Option<String>,
    /// Seconds after its end a minute still takes events; later ones are counted as late.
    #[serde(default = "default_lateness")]
    pub lateness_seconds: u64,
    /// Milliseconds between looks for closed minutes to flush.
    #[serde(default = "default_flush_interval")]
    pub flush_interval_ms: u64,
    /// Most buckets held open in memory (reading pauses above it).
    #[serde(default = "default_open_buckets")]
    pub open_buckets_max: usize,
}

fn default_lateness() -> u64 {
    60
}

fn default_flush_interval() -> u64 {
    1000
}

fn default_open_buckets() -> usize {
    2_000_000
}

impl RollupConfig {
    pub fn options(&self, name: &str) -> polylog_events::RollupOptions {
        let mut o = polylog_events::RollupOptions::new(name, &self.topic, &self.url, &[]);
        o.dimensions = self.dimensions.clone();
        o.table = self.table.clone().unwrap_or_else(|| name.to_string());
        o.lateness = std::time::Duration::from_secs(self.lateness_seconds);
        o.flush_interval = std::time::Duration::from_millis(self.flush_interval_ms.max(10));
        o.open_max = self.open_buckets_max.max(1000);
        o
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: default_data_dir(),
            log: LogConfig::default(),
            api: ApiConfig::default(),
            sources: BTreeMap::new(),
            views: BTreeMap::new(),
            sinks: BTreeMap::new(),
            collector: None,
            rollups: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Parses and checks a config file's text; errors name the key and the problem.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let de = toml::Deserializer::new(text);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let msg = inner.message().to_string();
            let at = inner
                .span()
                .map(|s| line_col(text, s.start))
                .map(|(l, c)| format!(" (line {l}, column {c})"));
            if path == "." || path.is_empty() {
                anyhow::anyhow!("{msg}{}", at.unwrap_or_default())
            } else {
                anyhow::anyhow!("`{path}`: {msg}{}", at.unwrap_or_default())
            }
        })?;
        config.api.configured = text.parse::<toml::Table>().is_ok_and(|t| t.contains_key("api"));
        config.validate()?;
        Ok(config)
    }

    /// Loads `path`; a missing file is an error only if the user named it.
    pub fn load(path: &Path, explicit: bool) -> anyhow::Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                Config::parse(&text).with_context(|| format!("invalid config {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(e) => Err(e).with_context(|| format!("cannot read config {}", path.display())),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.log.backend == Backend::Kafka {
            self.kafka_options()?;
        } else if self.log.scale_out {
            bail!("`log.scale_out`: sharing work between processes needs backend = \"kafka\"");
        }
        let segment = polylog_log::SEGMENT_BYTES_MIN..=polylog_log::SEGMENT_BYTES_MAX;
        if !segment.contains(&self.log.segment_bytes) {
            bail!("`log.segment_bytes`: must be between {} and {}", segment.start(), segment.end());
        }
        if self.log.partitions == 0 {
            bail!("`log.partitions`: must be at least 1");
        }
        let addr = |key: String, v: &str| -> anyhow::Result<()> {
            v.parse::<std::net::SocketAddr>().map(|_| ()).map_err(|_| {
                anyhow::anyhow!("`{key}`: {v:?} is not a host:port address such as 127.0.0.1:7700")
            })
        };
        addr("api.listen".into(), &self.api.listen)?;
        if let Some(c) = &self.collector {
            addr("collector.listen".into(), &c.listen)?;
            polylog_log::validate_topic_name(&c.topic)
                .with_context(|| "`collector.topic`".to_string())?;
        }
        for (name, s) in &self.sources {
            let SourceConfig::Postgres(pg) = s;
            pg.validate().map_err(|e| anyhow::anyhow!("`sources.{name}`: {e}"))?;
        }
        for (name, v) in &self.views {
            polylog_views::ViewSpec::new(name, v)?;
        }
        for (name, s) in &self.sinks {
            s.validate()
                .map_err(|e| anyhow::anyhow!("`sinks.{name}.{}", e.trim_start_matches('`')))?;
            if let SinkConfig::Search(s) = s {
                polylog_log::validate_topic_name(&s.topic)
                    .with_context(|| format!("`sinks.{name}.topic`"))?;
            }
        }
        for (name, r) in &self.rollups {
            polylog_events::rollup::parse_dims(&r.dimensions)
                .map_err(|e| anyhow::anyhow!("`rollups.{name}.dimensions`: {e}"))?;
            polylog_log::validate_topic_name(&r.topic)
                .with_context(|| format!("`rollups.{name}.topic`"))?;
            polylog_postgres::wire::ConnectParams::parse(&r.url)
                .map_err(|e| anyhow::anyhow!("`rollups.{name}.url`: {e}"))?;
            let table = r.table.clone().unwrap_or_else(|| name.clone());
            if !polylog_events::rollup::valid_table(&table) {
                bail!(
                    "`rollups.{name}{}`: {table:?} must be lowercase letters, digits and _ (at most \
                     40), not starting with a digit (it prefixes the table names)",
                    if r.table.is_some() { ".table" } else { "" }
                );
            }
        }
        Ok(())
    }

    /// The Kafka backend's client settings as configured.
    pub fn kafka_options(&self) -> anyhow::Result<polylog_kafka::KafkaOptions> {
        let l = &self.log;
        let Some(brokers) = l.brokers.as_deref().filter(|b| !b.trim().is_empty()) else {
            bail!("`log.brokers`: backend = \"kafka\" needs brokers = \"host:9092,...\"");
        };
        let mut o = polylog_kafka::KafkaOptions::new(brokers);
        o.replication_factor = match l.replication_factor {
            None => -1,
            Some(n @ 1..=32767) => i32::from(n),
            Some(n) => bail!("`log.replication_factor`: {n} is not between 1 and 32767"),
        };
        let tls = l.tls || l.tls_ca.is_some() || l.tls_cert.is_some() || l.tls_key.is_some();
        if l.tls_cert.is_some() != l.tls_key.is_some() {
            bail!("`log.tls_cert` and `log.tls_key`: a client certificate needs both");
        }
        let password =
            l.sasl_password.clone().or_else(|| std::env::var("POLYLOG_KAFKA_PASSWORD").ok());
        let sasl = match l.sasl_mechanism.as_deref() {
            None => {
                if l.sasl_username.is_some() || l.sasl_password.is_some() {
                    bail!("`log.sasl_username`: set `log.sasl_mechanism` too (SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN)");
                }
                false
            }
            Some(m @ ("SCRAM-SHA-256" | "SCRAM-SHA-512" | "PLAIN")) => {
                let Some(user) = &l.sasl_username else {
                    bail!("`log.sasl_username`: SASL {m} needs a user name");
                };
                let Some(password) = &password else {
                    bail!("`log.sasl_password`: SASL {m} needs a password (or set POLYLOG_KAFKA_PASSWORD)");
                };
                o.settings.push(("sasl.mechanism".into(), m.into()));
                o.settings.push(("sasl.username".into(), user.clone()));
                o.settings.push(("sasl.password".into(), password.clone()));
                true
            }
            Some(m) => bail!(
                "`log.sasl_mechanism`: {m:?} is not one of SCRAM-SHA-256, SCRAM-SHA-512, PLAIN"
            ),
        };
        let protocol = match (tls, sasl) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        o.settings.push(("security.protocol".into(), protocol.into()));
        let path = |key: &str, p: &Option<PathBuf>| -> anyhow::Result<Option<String>> {
            match p {
                None => Ok(None),
                Some(p) => match std::fs::File::open(p) {
                    Ok(_) if p.is_file() => Ok(Some(p.to_string_lossy().into_owned())),
                    Ok(_) => bail!("`log.{key}`: {} is not a file", p.display()),
                    Err(e) => bail!("`log.{key}`: cannot read {}: {e}", p.display()),
                },
            }
        };
        for (key, setting, p) in [
            ("tls_ca", "ssl.ca.location", &l.tls_ca),
            ("tls_cert", "ssl.certificate.location", &l.tls_cert),
            ("tls_key", "ssl.key.location", &l.tls_key),
        ] {
            if let Some(v) = path(key, p)? {
                o.settings.push((setting.into(), v));
            }
        }
        for (k, v) in &l.kafka {
            o.settings.push((k.clone(), v.clone()));
        }
        Ok(o)
    }

    /// The embedded log's options as configured.
    pub fn log_options(&self) -> polylog_log::LogOptions {
        polylog_log::LogOptions {
            fsync: self.log.fsync,
            fsync_interval_ms: self.log.fsync_interval_ms,
            maintenance_interval_ms: self.log.maintenance_interval_ms,
            ..polylog_log::LogOptions::default()
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;
    use polylog_postgres::SnapshotMode;

    /// The example of DESIGN 3.7, verbatim.
    const DESIGN_EXAMPLE: &str = include_str!("../../../docs/polylog.example.toml");

    #[test]
    fn the_design_example_parses() {
        let c = Config::parse(DESIGN_EXAMPLE).expect("example parses");
        assert_eq!(c.data_dir, PathBuf::from("polylog-data"));
        assert_eq!(c.log.fsync, FsyncPolicy::Always);
        let SourceConfig::Postgres(app) = &c.sources["app"];
        assert_eq!(app.exclude_tables, vec!["public.audit_log".to_string()]);
        assert_eq!(app.snapshot, SnapshotMode::Initial);
        let v = &c.views["videos"];
        assert_eq!(v.joins[1].joins[0].name, "tag");
        assert_eq!(v.joins[1].kind, polylog_views::JoinKind::Many);
        assert!(matches!(c.sinks["replica"], SinkConfig::Postgres(_)));
        assert_eq!(c.rollups["viewability"].dimensions.len(), 4);
    }

    fn check_error(toml: &str, expected: &[&str]) {
        let err = format!("{:#}", Config::parse(toml).expect_err(toml));
        for e in expected {
            assert!(err.contains(e), "error for {toml:?} is {err:?}; expected it to mention {e:?}");
        }
    }

    #[test]
    fn kafka_settings_become_librdkafka_settings() {
        let dir = std::env::temp_dir().join(format!("polylog-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "x").expect("ca");
        let c = Config::parse(&format!(
            "[log]\nbackend = \"kafka\"\nbrokers = \"k1:9093,k2:9093\"\nreplication_factor = 3\n\
             tls_ca = \"{}\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"polylog\"\n\
             sasl_password = \"secret\"\n[log.kafka]\n\"message.max.bytes\" = \"2000000\"\n",
            ca.display()
        ))
        .expect("config");
        let o = c.kafka_options().expect("options");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(o.brokers, "k1:9093,k2:9093");
        assert_eq!(o.replication_factor, 3);
        let get = |k: &str| o.settings.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(get("sasl.username"), Some("polylog"));
        assert_eq!(get("sasl.password"), Some("secret"));
        assert_eq!(get("ssl.ca.location"), Some(ca.to_string_lossy().as_ref()));
        assert_eq!(get("message.max.bytes"), Some("2000000"));
        let plain =
            Config::parse("[log]\nbackend = \"kafka\"\nbrokers = \"k:9092\"\n").expect("plain");
        let o = plain.kafka_options().expect("options");
        assert_eq!(o.replication_factor, -1, "the cluster's default replication factor");
        assert!(o.settings.contains(&("security.protocol".into(), "plaintext".into())));
        let tls = Config::parse("[log]\nbackend = \"kafka\"\nbrokers = \"k:9093\"\ntls = true\n")
            .expect("tls");
        let o = tls.kafka_options().expect("options");
        assert!(o.settings.contains(&("security.protocol".into(), "ssl".into())));
        check_error(
            "[log]\nbackend = \"kafka\"\nbrokers = \"k:1\"\ntls_cert = \"/etc/hostname\"\n",
            &["`log.tls_cert`", "both"],
        );
        check_error(
            "[log]\nbackend = \"kafka\"\nbrokers = \"k:1\"\nsasl_username = \"u\"\n",
            &["`log.sasl_username`", "sasl_mechanism"],
        );
    }

    #[test]
    fn errors_name_the_key() {
        check_error("data_dri = \"x\"", &["unknown field `data_dri`", "line 1"]);
        check_error(
            "[log]\nfsync = \"sometimes\"",
            &["`log.fsync`", "unknown variant `sometimes`", "line 2"],
        );
        check_error(
            "[log]\nfsyncc = \"always\"",
            &["`log.fsyncc`", "unknown field `fsyncc`", "expected one of"],
        );
        check_error("[log]\nsegment_bytes = \"big\"", &["`log.segment_bytes`", "invalid type"]);
        check_error("[log]\nsegment_bytes = 1", &["`log.segment_bytes`", "between"]);
        check_error("[log]\nbackend = \"kafka\"", &["`log.brokers`"]);
        check_error("[api]\nlisten = \"nowhere\"", &["`api.listen`"]);
        check_error(
            "[sources.app]\nkind = \"mysql\"\nurl = \"x\"",
            &["`sources.app", "unknown variant `mysql`"],
        );
        check_error(
            "[sources.app]\nkind = \"postgres\"\nurl = \"postgres://x\"\ntabels = []",
            &["`sources.app", "unknown field `tabels`"],
        );
        check_error("[sources.app]\nkind = \"postgres\"", &["`sources.app", "missing field `url`"]);
        check_error(
            "[sources.app]\nkind = \"postgres\"\nurl = \"postgres://x\"\ntables = [\"videos\"]",
            &["schema.table"],
        );
        check_error("[views.v]\nroot = \"bad topic\"", &["`views.v.root`"]);
        check_error(
            "[views.v]\nroot = \"a\"\njoins = [{ name = \"p\", topic = \"b\", on = {}, kind = \"one\" }]",
            &["`views.v.joins[0].on`"],
        );
        check_error(
            "[views.v]\nroot = \"a\"\njoins = [{ name = \"p\", topic = \"b\", on = { x = \"y\" }, kind = \"some\" }]",
            &["unknown variant `some`"],
        );
        check_error(
            "[sinks.s]\nkind = \"search\"\ntopic = \"views.v\"\nextra = 1",
            &["`sinks.s", "unknown field `extra`"],
        );
        check_error("[collector]\nlisten = \"127.0.0.1:1\"", &["missing field `topic`"]);
    }
}
