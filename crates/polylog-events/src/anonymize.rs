//! Anonymization, before anything is stored: IPs to their /24 (IPv4) or /48 (IPv6), user ids
//! to an HMAC-SHA256 with a key of the event's day (random, kept in `keys.json`, discarded
//! after `keep_days`), URLs without query string or fragment.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hmac::{Hmac, Mac};

pub struct Anonymizer {
    path: PathBuf,
    keep_days: i64,
    /// Day number (days since the epoch) → key.
    keys: Mutex<BTreeMap<i64, [u8; 32]>>,
}

fn day_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(86_400_000)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Anonymizer {
    /// Opens (or starts) the key file in `dir`.
    pub fn open(dir: &Path, keep_days: u32) -> std::io::Result<Anonymizer> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("keys.json");
        let mut keys = BTreeMap::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            let stored: BTreeMap<String, String> = serde_json::from_str(&text).unwrap_or_default();
            for (day, key) in stored {
                if let (Ok(d), Some(k)) = (day.parse::<i64>(), unhex(&key)) {
                    keys.insert(d, k);
                }
            }
        }
        Ok(Anonymizer { path, keep_days: i64::from(keep_days.max(1)), keys: Mutex::new(keys) })
    }

    /// The key of a day: created (and stored) on first use; `None` once discarded.
    fn key(&self, day: i64, today: i64) -> std::io::Result<Option<[u8; 32]>> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = today - self.keep_days + 1;
        let before = keys.len();
        keys.retain(|&d, _| d >= oldest);
        if day < oldest {
            if keys.len() != before {
                self.save(&keys)?;
            }
            return Ok(None);
        }
        if let Some(k) = keys.get(&day) {
            let k = *k;
            if keys.len() != before {
                self.save(&keys)?;
            }
            return Ok(Some(k));
        }
        let mut k = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
        keys.insert(day, k);
        self.save(&keys)?;
        Ok(Some(k))
    }

    fn save(&self, keys: &BTreeMap<i64, [u8; 32]>) -> std::io::Result<()> {
        let stored: BTreeMap<String, String> =
            keys.iter().map(|(d, k)| (d.to_string(), hex(k))).collect();
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string(&stored).unwrap_or_default().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The user id's keyed hash for the event's day (`None` if that day's key is gone).
    pub fn user_hash(
        &self,
        ts_ms: i64,
        now_ms: i64,
        user_id: &str,
    ) -> std::io::Result<Option<String>> {
        let Some(key) = self.key(day_of(ts_ms), day_of(now_ms))? else { return Ok(None) };
        let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(&key) else { return Ok(None) };
        mac.update(user_id.as_bytes());
        Ok(Some(hex(&mac.finalize().into_bytes()[..16])))
    }
}

/// An address's network: /24 for IPv4, /48 for IPv6; `None` if it is not an address.
pub fn ip_prefix(ip: &str) -> Option<String> {
    match ip.trim().parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            Some(format!("{}.{}.{}.0/24", o[0], o[1], o[2]))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0);
            Some(format!("{net}/48"))
        }
    }
}

/// A URL without its query string and fragment.
pub fn strip_url(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    url[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_urls_and_daily_keys() {
        assert_eq!(ip_prefix("203.0.113.77").as_deref(), Some("203.0.113.0/24"));
        assert_eq!(ip_prefix("2001:db8:abcd:12:1:2:3:4").as_deref(), Some("2001:db8:abcd::/48"));
        assert_eq!(ip_prefix("not an ip"), None);
        assert_eq!(strip_url("https://x.com/a/b?user=9#frag"), "https://x.com/a/b");
        let dir = polylog_testkit::TempDir::new("anon");
        let a = Anonymizer::open(dir.path(), 2).expect("open");
        let day = 86_400_000i64;
        let now = 20_000 * day + 5;
        let h1 = a.user_hash(now, now, "alice").expect("io").expect("a key");
        assert_eq!(
            a.user_hash(now + 10, now, "alice").expect("io"),
            Some(h1.clone()),
            "same day, same hash"
        );
        assert_ne!(
            a.user_hash(now - day, now, "alice").expect("io"),
            Some(h1.clone()),
            "another day's key"
        );
        assert_eq!(a.user_hash(now - 3 * day, now, "alice").expect("io"), None, "a discarded day");
        // The keys survive a restart; the next day's run discards the oldest.
        let b = Anonymizer::open(dir.path(), 2).expect("reopen");
        assert_eq!(b.user_hash(now, now, "alice").expect("io"), Some(h1.clone()));
        assert_eq!(b.user_hash(now - day, now + 2 * day, "alice").expect("io"), None);
        let stored = std::fs::read_to_string(dir.path().join("keys.json")).expect("keys");
        assert!(
            !stored.contains("alice") && !stored.contains(&(20_000 - 1).to_string()),
            "{stored}"
        );
    }
}
