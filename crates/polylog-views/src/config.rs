//! `[views.<name>]` as the config file writes it.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `[views.<name>]`: a root topic and nested LEFT JOINs; the output topic is `views.<name>`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    /// The root topic: one document per root row.
    pub root: String,
    /// Root columns in the document (default: all), in this order.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    /// `{ <column> = "<field name in the document>" }`.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// LEFT JOINs from the root.
    #[serde(default)]
    pub joins: Vec<JoinConfig>,
    /// Memory for the state store's page cache, in MiB; state beyond it stays on disk.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
}

fn default_cache_mb() -> u64 {
    64
}

/// One LEFT JOIN of a view, possibly with nested joins.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinConfig {
    /// Field of the parent document the joined rows go into.
    pub name: String,
    /// Topic of the joined table.
    pub topic: String,
    /// `{ <parent column> = "<joined column>" }`, one or more pairs.
    pub on: BTreeMap<String, String>,
    /// `one` (many-to-one: an object or null) or `many` (one-to-many: an array).
    pub kind: JoinKind,
    /// Columns of the joined rows in the document (default: all), in this order.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    /// `{ <column> = "<field name in the document>" }`.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// `many` only: columns the array is sorted by (ascending; ties and the default: by the
    /// joined rows' keys).
    #[serde(default)]
    pub order_by: Vec<String>,
    #[serde(default)]
    pub joins: Vec<JoinConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinKind {
    One,
    Many,
}
