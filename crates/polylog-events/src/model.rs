//! The event model: what a tag on a page posts (`RawEvent`), checked field by field, and what
//! is stored (`Event`): anonymized, categorized, with viewability decided by the MRC rule.
//!
//! A posted event is a JSON object:
//!
//! | field | type | required | meaning |
//! |---|---|---|---|
//! | `type` | `"impression"`, `"viewability"`, `"click"` | yes | what happened |
//! | `ts` | integer ms since the epoch | yes | when, at most 1 day in the future, 31 days in the past |
//! | `impression_id` | string | yes | ties samples and clicks to their impression |
//! | `campaign_id`, `creative_id`, `placement_id` | string | campaign yes | the ad |
//! | `site_domain` | string | yes | where it was shown |
//! | `page_url` | string | no | stored without its query string and fragment |
//! | `ip` | string | no | stored as its /24 (IPv4) or /48 (IPv6) |
//! | `user_agent` | string | no | device class, browser, bots |
//! | `user_id` | string | no | stored as a keyed hash whose key rotates daily |
//! | `ad_format` | `"display"`, `"video"` | viewability: yes | the MRC rule differs |
//! | `ad_size` | string like `"300x250"` | no | |
//! | `in_view_pct` | number 0–100 | viewability: yes | share of the ad's pixels in view |
//! | `in_view_ms` | integer 0–86,400,000 | viewability: yes | continuous time at that share |
//!
//! Unknown fields are refused (a typo would otherwise lose data silently); strings are at
//! most 2,048 bytes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest string accepted in any field.
pub const STRING_MAX: usize = 2048;
/// Longest continuous in-view time accepted: a day.
const IN_VIEW_MS_MAX: u64 = 86_400_000;
const FUTURE_MAX_MS: i64 = 24 * 3600 * 1000;
const PAST_MAX_MS: i64 = 31 * 24 * 3600 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Impression,
    Viewability,
    Click,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdFormat {
    Display,
    Video,
}

/// An event as posted, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    pub kind: EventKind,
    pub ts_ms: i64,
    pub impression_id: String,
    pub campaign_id: String,
    pub creative_id: Option<String>,
    pub placement_id: Option<String>,
    pub site_domain: String,
    pub page_url: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub user_id: Option<String>,
    pub ad_format: Option<AdFormat>,
    pub ad_size: Option<String>,
    pub in_view_pct: Option<f64>,
    pub in_view_ms: Option<u64>,
}

/// An event as stored: nothing in it identifies a person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub ts_ms: i64,
    pub impression_id: String,
    pub campaign_id: String,
    pub creative_id: Option<String>,
    pub placement_id: Option<String>,
    pub site_domain: String,
    pub site_category: Option<String>,
    pub page_url: Option<String>,
    /// `203.0.113.0/24` or `2001:db8:1::/48`.
    pub ip_prefix: Option<String>,
    /// Keyed hash of the user id (the key changes every day).
    pub user_hash: Option<String>,
    pub device: String,
    pub browser: String,
    /// Bots, crawlers and other invalid traffic: kept out of billable counts.
    pub invalid: bool,
    pub country: Option<String>,
    pub ad_format: Option<AdFormat>,
    pub ad_size: Option<String>,
    pub in_view_pct: Option<f64>,
    pub in_view_ms: Option<u64>,
    /// For viewability samples: whether the MRC rule is met.
    pub viewable: Option<bool>,
}

/// The MRC rule: display is viewable at ≥50% of its pixels in view for ≥1 continuous second,
/// video at ≥50% for ≥2 continuous seconds.
pub fn mrc_viewable(format: AdFormat, in_view_pct: f64, continuous_ms: u64) -> bool {
    let needed = match format {
        AdFormat::Display => 1_000,
        AdFormat::Video => 2_000,
    };
    in_view_pct >= 50.0 && continuous_ms >= needed
}

fn string(obj: &Map<String, Value>, key: &str, required: bool) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) if required => Err(format!("`{key}` is missing")),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() > STRING_MAX => {
            Err(format!("`{key}` is longer than {STRING_MAX} bytes"))
        }
        Some(Value::String(s)) if s.is_empty() && required => Err(format!("`{key}` is empty")),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("`{key}` must be a string, not {}", kind_of(other))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

const FIELDS: &[&str] = &[
    "type",
    "ts",
    "impression_id",
    "campaign_id",
    "creative_id",
    "placement_id",
    "site_domain",
    "page_url",
    "ip",
    "user_agent",
    "user_id",
    "ad_format",
    "ad_size",
    "in_view_pct",
    "in_view_ms",
];

impl RawEvent {
    /// Checks a posted event; the error says which field is wrong and how.
    pub fn parse(v: &Value, now_ms: i64) -> Result<RawEvent, String> {
        let Value::Object(obj) = v else {
            return Err(format!("an event must be a JSON object, not {}", kind_of(v)));
        };
        if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(format!("unknown field `{unknown}`"));
        }
        let kind = match string(obj, "type", true)?.as_deref() {
            Some("impression") => EventKind::Impression,
            Some("viewability") => EventKind::Viewability,
            Some("click") => EventKind::Click,
            Some(other) => {
                return Err(format!(
                    "`type` must be impression, viewability or click, not {other:?}"
                ))
            }
            None => return Err("`type` is missing".into()),
        };
        let ts_ms = match obj.get("ts") {
            Some(Value::Number(n)) => {
                n.as_i64().ok_or("`ts` must be an integer (ms since the epoch)")?
            }
            Some(other) => {
                return Err(format!(
                    "`ts` must be an integer (ms since the epoch), not {}",
                    kind_of(other)
                ))
            }
            None => return Err("`ts` is missing".into()),
        };
        if ts_ms > now_ms + FUTURE_MAX_MS {
            return Err("`ts` is more than a day in the future".into());
        }
        if ts_ms < now_ms - PAST_MAX_MS {
            return Err("`ts` is more than 31 days in the past".into());
        }
        let ad_format = match string(obj, "ad_format", false)?.as_deref() {
            None => None,
            Some("display") => Some(AdFormat::Display),
            Some("video") => Some(AdFormat::Video),
            Some(other) => {
                return Err(format!("`ad_format` must be display or video, not {other:?}"))
            }
        };
        let in_view_pct = match obj.get("in_view_pct") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(p) if (0.0..=100.0).contains(&p) => Some(p),
                _ => return Err("`in_view_pct` must be between 0 and 100".into()),
            },
            Some(other) => {
                return Err(format!("`in_view_pct` must be a number, not {}", kind_of(other)))
            }
        };
        let in_view_ms = match obj.get("in_view_ms") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(
                n.as_u64()
                    .filter(|ms| *ms <= IN_VIEW_MS_MAX)
                    .ok_or("`in_view_ms` must be a whole number from 0 to 86400000 (a day)")?,
            ),
            Some(other) => {
                return Err(format!("`in_view_ms` must be a number, not {}", kind_of(other)))
            }
        };
        if kind == EventKind::Viewability {
            if ad_format.is_none() {
                return Err("a viewability sample needs `ad_format`".into());
            }
            if in_view_pct.is_none() || in_view_ms.is_none() {
                return Err("a viewability sample needs `in_view_pct` and `in_view_ms`".into());
            }
        }
        Ok(RawEvent {
            kind,
            ts_ms,
            impression_id: string(obj, "impression_id", true)?.unwrap_or_default(),
            campaign_id: string(obj, "campaign_id", true)?.unwrap_or_default(),
            creative_id: string(obj, "creative_id", false)?,
            placement_id: string(obj, "placement_id", false)?,
            site_domain: string(obj, "site_domain", true)?.unwrap_or_default().to_ascii_lowercase(),
            page_url: string(obj, "page_url", false)?,
            ip: string(obj, "ip", false)?,
            user_agent: string(obj, "user_agent", false)?,
            user_id: string(obj, "user_id", false)?,
            ad_format,
            ad_size: string(obj, "ad_size", false)?,
            in_view_pct,
            in_view_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_795_680_000_000;

    fn base() -> Value {
        json!({"type": "viewability", "ts": NOW, "impression_id": "i1", "campaign_id": "c1",
               "site_domain": "News.Example.com", "ad_format": "video", "in_view_pct": 60, "in_view_ms": 2500})
    }

    #[test]
    fn the_mrc_rule_at_its_edges() {
        assert!(mrc_viewable(AdFormat::Display, 50.0, 1000));
        assert!(!mrc_viewable(AdFormat::Display, 49.9, 5000));
        assert!(!mrc_viewable(AdFormat::Display, 100.0, 999));
        assert!(mrc_viewable(AdFormat::Video, 50.0, 2000));
        assert!(!mrc_viewable(AdFormat::Video, 80.0, 1999));
    }

    #[test]
    fn every_bad_field_is_named() {
        assert!(RawEvent::parse(&base(), NOW).is_ok());
        let cases: Vec<(Value, &str)> = vec![
            (json!([1]), "JSON object"),
            (json!({"type": "view"}), "`type`"),
            (json!({"type": "click", "ts": "now"}), "`ts` must be an integer"),
            (
                json!({"type": "click", "ts": NOW + 2 * 86_400_000, "impression_id": "i", "campaign_id": "c", "site_domain": "d"}),
                "future",
            ),
            (
                json!({"type": "click", "ts": NOW - 40 * 86_400_000, "impression_id": "i", "campaign_id": "c", "site_domain": "d"}),
                "past",
            ),
            (
                json!({"type": "click", "ts": NOW, "impression_id": "i", "site_domain": "d"}),
                "`campaign_id` is missing",
            ),
            (
                json!({"type": "click", "ts": NOW, "impression_id": "i", "campaign_id": 7, "site_domain": "d"}),
                "must be a string",
            ),
            (
                json!({"type": "click", "ts": NOW, "impression_id": "i", "campaign_id": "c", "site_domain": "d", "colour": 1}),
                "unknown field `colour`",
            ),
            (
                json!({"type": "viewability", "ts": NOW, "impression_id": "i", "campaign_id": "c", "site_domain": "d", "ad_format": "display"}),
                "needs `in_view_pct`",
            ),
            (
                json!({"type": "viewability", "ts": NOW, "impression_id": "i", "campaign_id": "c", "site_domain": "d", "ad_format": "display", "in_view_pct": 120, "in_view_ms": 1}),
                "between 0 and 100",
            ),
            (
                json!({"type": "click", "ts": NOW, "impression_id": "i", "campaign_id": "x".repeat(3000), "site_domain": "d"}),
                "longer than",
            ),
        ];
        for (v, want) in cases {
            let e = RawEvent::parse(&v, NOW).expect_err(want);
            assert!(e.contains(want), "{v}: {e}");
        }
    }
}
