//! Failpoints: the durable points of the log and the state stores, where a fault-injection test
//! can make a write or an fsync fail in a running process.
//!
//! Off unless the process starts with `POLYLOG_FAILPOINTS`, a comma-separated list of
//! `name=chance` (a probability per hit, 0 to 1), for example
//! `POLYLOG_FAILPOINTS="log.fsync=0.01,state.commit=0.02"`. `POLYLOG_FAILPOINTS_SEED` fixes the
//! random sequence. The names:
//!
//! | name | where | what fails |
//! |---|---|---|
//! | `log.write` | a batch written to a segment | half of the batch is written, then an error (a torn write) |
//! | `log.fsync` | a segment's `fdatasync` | the sync, after the data was written |
//! | `state.commit` | a view's checkpoint (redb commit) | the commit; the transaction is dropped |
//! | `source.state` | a source's state file, written then renamed | the rename; the new file is left behind as `.tmp` |
//! | `search.commit` | the search sink's index commit | the commit |
//!
//! A fired failpoint is logged as a warning naming it. Unset, a check is one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Points {
    chances: Vec<(String, f64)>,
    rng: AtomicU64,
}

fn points() -> Option<&'static Points> {
    static POINTS: OnceLock<Option<Points>> = OnceLock::new();
    POINTS
        .get_or_init(|| {
            let spec = std::env::var("POLYLOG_FAILPOINTS").ok()?;
            let chances = parse(&spec).unwrap_or_else(|e| {
                // A test that asked for faults and gets none would pass for the wrong reason.
                panic!("POLYLOG_FAILPOINTS={spec:?}: {e}")
            });
            let seed = std::env::var("POLYLOG_FAILPOINTS_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| {
                    let t = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64);
                    t ^ u64::from(std::process::id()).rotate_left(32)
                });
            tracing::warn!("failpoints armed: {spec} (seed {seed})");
            Some(Points { chances, rng: AtomicU64::new(seed | 1) })
        })
        .as_ref()
}

/// Every failpoint there is.
const NAMES: [&str; 5] =
    ["log.write", "log.fsync", "state.commit", "source.state", "search.commit"];

fn parse(spec: &str) -> Result<Vec<(String, f64)>, String> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, chance) =
            item.split_once('=').ok_or_else(|| format!("{item:?} is not name=chance"))?;
        let chance: f64 = chance
            .trim()
            .parse()
            .ok()
            .filter(|c| (0.0..=1.0).contains(c))
            .ok_or_else(|| format!("{item:?}: the chance must be a number from 0 to 1"))?;
        let name = name.trim();
        if !NAMES.contains(&name) {
            return Err(format!("no failpoint {name:?} (there are {})", NAMES.join(", ")));
        }
        out.push((name.to_string(), chance));
    }
    Ok(out)
}

/// Whether the failpoint `name` fires on this hit.
pub fn fires(name: &str) -> bool {
    let Some(p) = points() else { return false };
    let Some(&(_, chance)) = p.chances.iter().find(|(n, _)| n == name) else { return false };
    // xorshift64*, advanced atomically so threads draw different numbers.
    let mut x = p.rng.load(Ordering::Relaxed);
    loop {
        let mut next = x;
        next ^= next >> 12;
        next ^= next << 25;
        next ^= next >> 27;
        match p.rng.compare_exchange_weak(x, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                x = next;
                break;
            }
            Err(current) => x = current,
        }
    }
    let draw = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
    let fired = draw < chance;
    if fired {
        tracing::warn!("failpoint {name} fired");
    }
    fired
}

/// An I/O error if the failpoint `name` fires on this hit.
pub fn check(name: &str) -> std::io::Result<()> {
    if fires(name) {
        return Err(std::io::Error::other(format!("injected failure at failpoint {name}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse("log.fsync=0.5, state.commit=1").expect("a good spec"),
            vec![("log.fsync".to_string(), 0.5), ("state.commit".to_string(), 1.0)]
        );
        assert!(parse("log.fsync").is_err());
        assert!(parse("log.fsync=2").is_err());
        assert!(parse("log.fsync=x").is_err());
        assert!(parse("log.fsnyc=0.5").is_err(), "a misspelt name would arm nothing");
        assert!(parse("").expect("an empty spec").is_empty());
    }
}
