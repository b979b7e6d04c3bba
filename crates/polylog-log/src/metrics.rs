//! Process-wide measurements the API exports (`/metrics`): the log's fsync latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket upper bounds in seconds (Prometheus' `le`), for durations from 50 µs to 2.5 s.
pub const BUCKETS: [f64; 12] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5];

/// A latency histogram that any thread records into without a lock.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// What a histogram held at one moment: cumulative counts per bucket bound, the count of all
/// observations (the `+Inf` bucket) and their sum in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0;
        let buckets = BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(b, n)| {
                running += n.load(Ordering::Relaxed);
                (*b, running)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            // At least the buckets' total: a concurrent observation may be half recorded.
            count: self.count.load(Ordering::Relaxed).max(running),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new()
    }
}

/// Every fsync of a partition's data in this process (appends and segment rolls).
pub static FSYNC: Histogram = Histogram::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_the_sum_adds_up() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(3));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.00005, 1));
        assert_eq!(s.buckets.iter().find(|(b, _)| *b == 0.001).map(|x| x.1), Some(2));
        assert_eq!(s.buckets.last().map(|x| x.1), Some(2), "3 s is only in +Inf");
        assert!((s.sum_seconds - 3.00073).abs() < 1e-9);
    }
}
