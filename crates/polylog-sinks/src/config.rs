//! `[sinks.<name>]` as the config file writes it.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// Replicates tables into another Postgres, or stores documents as JSONB.
    Postgres(PostgresSinkConfig),
    /// The embedded full-text index, served by the API (not built yet).
    Search(SearchSinkConfig),
    /// JSON lines in files, rotated by size.
    File(FileSinkConfig),
    /// Elasticsearch or OpenSearch, through `_bulk`.
    #[serde(alias = "opensearch")]
    Elasticsearch(ElasticsearchSinkConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElasticsearchSinkConfig {
    /// `http://host:9200` (https is not supported yet).
    pub url: String,
    /// Topics to index, as `*` patterns.
    pub topics: Vec<String>,
    /// The index (default: the topic's name, lower-cased).
    #[serde(default)]
    pub index: Option<String>,
    /// Documents per `_bulk` request.
    #[serde(default = "default_batch_docs")]
    pub batch_docs: usize,
    /// Bytes per `_bulk` request (a single larger document goes alone).
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    /// Where documents the cluster rejects go, with the reason (default `dlq.<sink name>`).
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Create the index (with `mappings`, if given) when it does not exist.
    #[serde(default = "default_true")]
    pub create_index: bool,
    /// The index's mappings, as JSON (`{"properties": {...}}`).
    #[serde(default)]
    pub mappings: Option<String>,
    /// Per request.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_batch_docs() -> usize {
    1_000
}
fn default_batch_bytes() -> usize {
    5 * 1024 * 1024
}
fn default_true() -> bool {
    true
}
fn default_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    pub url: String,
    /// Topics to apply, as `*` patterns.
    pub topics: Vec<String>,
    /// `table` (one table per source table) or `document` (documents into a JSONB table).
    #[serde(default)]
    pub mode: PostgresSinkMode,
    /// `document` mode: the table (default: the topic's name with `.` as `_`).
    #[serde(default)]
    pub table: Option<String>,
    /// Changes applied per Postgres transaction.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PostgresSinkMode {
    #[default]
    Table,
    Document,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSinkConfig {
    /// The view topic to index.
    pub topic: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Topics to write, as `*` patterns.
    pub topics: Vec<String>,
    /// Directory of the files (`<topic>.<n>.jsonl`).
    pub path: std::path::PathBuf,
    /// Size at which a file is closed and the next one started.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

fn default_batch_rows() -> usize {
    5_000
}
fn default_max_bytes() -> u64 {
    128 * 1024 * 1024
}

impl SinkConfig {
    /// The topic patterns the sink reads.
    pub fn topics(&self) -> Vec<String> {
        match self {
            SinkConfig::Postgres(p) => p.topics.clone(),
            SinkConfig::Search(s) => vec![s.topic.clone()],
            SinkConfig::File(f) => f.topics.clone(),
            SinkConfig::Elasticsearch(e) => e.topics.clone(),
        }
    }

    /// Checks what can be checked without connecting anywhere.
    pub fn validate(&self) -> Result<(), String> {
        if self.topics().is_empty() {
            return Err("`topics`: list at least one topic pattern".into());
        }
        match self {
            SinkConfig::Postgres(p) if p.batch_rows == 0 => {
                Err("`batch_rows` must be at least 1".into())
            }
            SinkConfig::Postgres(p) => polylog_postgres::wire::ConnectParams::parse(&p.url)
                .map(|_| ())
                .map_err(|e| format!("`url`: {e}")),
            SinkConfig::File(f) if f.max_bytes < 1024 => {
                Err("`max_bytes` must be at least 1024".into())
            }
            _ => Ok(()),
        }
    }
}
