//! `[sources.<name>]` with `kind = "postgres"`.

use serde::Deserialize;

/// How the source starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Snapshot every captured table once, when the slot is created; then stream.
    #[default]
    Initial,
    /// Only stream changes from the slot's creation on.
    Never,
    /// Snapshot on every start (the slot is recreated).
    Always,
}

/// A Postgres CDC source, as written in `polylog.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSourceConfig {
    /// Connection URL, `postgres://user[:password]@host:port/db?sslmode=...`.
    pub url: String,
    /// Tables to capture, as `schema.table` patterns (`*` matches any run of characters).
    #[serde(default = "default_tables")]
    pub tables: Vec<String>,
    /// Tables to leave out, same patterns.
    #[serde(default)]
    pub exclude_tables: Vec<String>,
    /// Columns never captured, as `schema.table.column` patterns.
    #[serde(default)]
    pub exclude_columns: Vec<String>,
    /// Columns replaced by a keyed hash (HMAC-SHA-256, hex) of their text value, as
    /// `schema.table.column` patterns; the key comes from `mask_key_env`.
    #[serde(default)]
    pub mask_columns: Vec<String>,
    /// Environment variable holding the masking key.
    #[serde(default = "default_mask_key_env")]
    pub mask_key_env: String,
    /// Topic names are `<topic_prefix>.<schema>.<table>`; defaults to the source's name.
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// `initial` | `never` | `always`.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Replication slot name; defaults to `polylog_<source>`.
    #[serde(default)]
    pub slot: Option<String>,
    /// Publication name; defaults to `polylog_<source>`.
    #[serde(default)]
    pub publication: Option<String>,
    /// Rows per snapshot chunk (one query each, resumable between chunks).
    #[serde(default = "default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: u64,
    /// Tables snapshotted at the same time.
    #[serde(default = "default_snapshot_parallelism")]
    pub snapshot_parallelism: usize,
    /// How often Postgres is told what is durably stored (ms).
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// While no captured change arrives, how often a heartbeat message is written to the WAL
    /// (`pg_logical_emit_message`) so the slot keeps advancing past other tables' changes
    /// (ms; 0 turns heartbeats off).
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// `schema.table` of the signal table: inserting `('<id>', 'execute-snapshot',
    /// '{"data-collections": ["schema.table"]}')` re-snapshots those tables while streaming
    /// (DBLog watermarks). Create it with `CREATE TABLE <name> (id text PRIMARY KEY, type text
    /// NOT NULL, data text)`.
    #[serde(default)]
    pub signal_table: Option<String>,
}

fn default_tables() -> Vec<String> {
    vec!["public.*".into()]
}
fn default_mask_key_env() -> String {
    "POLYLOG_MASK_KEY".into()
}
fn default_snapshot_chunk_rows() -> u64 {
    50_000
}
fn default_snapshot_parallelism() -> usize {
    2
}
fn default_status_interval_ms() -> u64 {
    1000
}
fn default_heartbeat_interval_ms() -> u64 {
    10_000
}

/// `*` glob match, for table and column patterns.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

impl PostgresSourceConfig {
    /// Checks the settings, naming the key at fault (relative to the source's table).
    pub fn validate(&self) -> Result<(), String> {
        crate::wire::ConnectParams::parse(&self.url).map_err(|e| format!("url: {e}"))?;
        if self.tables.is_empty() {
            return Err("tables: list at least one table pattern".into());
        }
        for t in self.tables.iter().chain(&self.exclude_tables) {
            if t.split('.').count() != 2 {
                return Err(format!(
                    "table pattern {t:?} must be `schema.table` (wildcards allowed)"
                ));
            }
        }
        for c in self.exclude_columns.iter().chain(&self.mask_columns) {
            if c.split('.').count() != 3 {
                return Err(format!(
                    "column pattern {c:?} must be `schema.table.column` (wildcards allowed)"
                ));
            }
        }
        if self.signal_table.as_ref().is_some_and(|t| t.split('.').count() != 2) {
            return Err("signal_table must be `schema.table`".into());
        }
        if self.snapshot_chunk_rows == 0 || self.snapshot_parallelism == 0 {
            return Err("snapshot_chunk_rows and snapshot_parallelism must be at least 1".into());
        }
        Ok(())
    }

    /// Whether `schema.table` is captured.
    pub fn captures(&self, schema: &str, table: &str) -> bool {
        let name = format!("{schema}.{table}");
        self.tables.iter().any(|p| glob_match(p, &name))
            && !self.exclude_tables.iter().any(|p| glob_match(p, &name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("public.*", "public.videos", true),
            ("public.*", "other.videos", false),
            ("*.audit_*", "app.audit_log", true),
            ("public.v*s", "public.videos", true),
            ("public.v*s", "public.video", false),
            ("public.videos", "public.videos", true),
            ("*", "", true),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} ~ {t}");
        }
    }
}
