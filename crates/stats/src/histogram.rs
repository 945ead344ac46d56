//! A lock-free log-bucket histogram of microsecond durations.
//!
//! Recording is one relaxed `fetch_add` on a bucket chosen with a few integer operations (no
//! locks, no allocation), so the data path can record every wait, transaction and query.
//! Buckets are exact below 16 µs and then split each power of two into 8 sub-buckets, so a
//! quantile read from them is within 12.5 % of the true value. Durations above ~12 days share the
//! last bucket.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const LINEAR: usize = 16;
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Highest power of two with its own buckets (2^40 µs ≈ 12.7 days).
const MAX_EXP: u32 = 40;
pub const BUCKETS: usize = LINEAR + (MAX_EXP as usize - 3) * SUB;

pub struct Histogram {
    counts: Box<[AtomicU64]>,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.snapshot().count())
            .finish()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket_of(us: u64) -> usize {
    if us < LINEAR as u64 {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros(); // >= 4
    if exp > MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = ((us >> (exp - SUB_BITS)) as usize) & (SUB - 1);
    LINEAR + (exp as usize - 4) * SUB + sub
}

/// The smallest value that falls into bucket `i`.
fn lower_bound(i: usize) -> u64 {
    if i < LINEAR {
        return i as u64;
    }
    let exp = (i - LINEAR) / SUB + 4;
    let sub = ((i - LINEAR) % SUB) as u64;
    (1u64 << exp) + (sub << (exp as u32 - SUB_BITS))
}

/// The largest value that falls into bucket `i`.
fn upper_bound(i: usize) -> u64 {
    if i + 1 >= BUCKETS {
        return u64::MAX;
    }
    lower_bound(i + 1) - 1
}

impl Histogram {
    #[inline]
    pub fn record(&self, us: u64) {
        if let Some(c) = self.counts.get(bucket_of(us)) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.counts.iter().map(|c| c.load(Relaxed)).collect(),
        }
    }
}

/// Bucket counts copied out of a [`Histogram`]; subtract two to get a period's distribution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    counts: Vec<u64>,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Counts recorded since `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self
                .counts
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// How many values were below each of `edges` (ascending microseconds, each a power of two
    /// of at least 16, which are bucket boundaries): Prometheus' cumulative `le` counts, exact.
    pub fn counts_below(&self, edges: &[u64]) -> Vec<u64> {
        let mut out = Vec::with_capacity(edges.len());
        let mut seen = 0;
        let mut buckets = self.counts.iter().enumerate().peekable();
        for &edge in edges {
            debug_assert!(edge >= LINEAR as u64 && edge.is_power_of_two());
            while let Some((_, c)) = buckets.next_if(|(i, _)| upper_bound(*i) < edge) {
                seen += c;
            }
            out.push(seen);
        }
        out
    }

    /// The value at quantile `q` (0.0–1.0), as the midpoint of its bucket; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = (lower_bound(i), upper_bound(i));
                if hi == u64::MAX {
                    return lo;
                }
                return lo + (hi - lo) / 2;
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_ordered() {
        for i in 0..BUCKETS - 1 {
            assert_eq!(upper_bound(i) + 1, lower_bound(i + 1), "bucket {i}");
        }
        for v in [
            0u64,
            1,
            15,
            16,
            17,
            31,
            32,
            100,
            1000,
            123_456,
            1 << 40,
            u64::MAX,
        ] {
            let b = bucket_of(v);
            assert!(
                lower_bound(b) <= v && v <= upper_bound(b),
                "{v} in bucket {b}"
            );
        }
    }

    #[test]
    fn quantiles_are_within_an_eighth_of_the_truth() {
        let h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        let s = h.snapshot();
        for (q, truth) in [(0.5, 5_000f64), (0.99, 9_900f64), (0.01, 100f64)] {
            let got = s.quantile(q) as f64;
            assert!(
                (got - truth).abs() / truth < 0.125,
                "q{q}: {got} vs {truth}"
            );
        }
        assert_eq!(s.count(), 10_000);
    }

    #[test]
    fn counts_below_powers_of_two_are_exact() {
        let h = Histogram::default();
        for v in [0, 15, 16, 63, 64, 65, 1_000, 1_023, 1_024, 5_000_000] {
            h.record(v);
        }
        assert_eq!(
            h.snapshot().counts_below(&[16, 64, 1024, 1 << 20, 1 << 30]),
            vec![2, 4, 8, 9, 10]
        );
        assert_eq!(HistogramSnapshot::default().counts_below(&[16]), vec![0]);
    }

    #[test]
    fn a_period_is_the_difference_of_two_snapshots() {
        let h = Histogram::default();
        h.record(10);
        let before = h.snapshot();
        h.record(1_000_000);
        let period = h.snapshot().since(&before);
        assert_eq!(period.count(), 1);
        assert!(period.quantile(0.5) > 900_000);
        assert_eq!(HistogramSnapshot::default().quantile(0.99), 0);
    }
}

#[cfg(test)]
mod cost {
    #[test]
    #[ignore = "timing, run by hand with --release"]
    fn record_cost() {
        let h = super::Histogram::default();
        let n = 50_000_000u64;
        let t = std::time::Instant::now();
        for i in 0..n {
            h.record(std::hint::black_box(i % 100_000));
        }
        let el = t.elapsed();
        println!("{:.2} ns per record", el.as_nanos() as f64 / n as f64);
        let t = std::time::Instant::now();
        let s = h.snapshot();
        let q = s.quantile(0.99);
        println!("snapshot + p99: {:?} (p99 {q})", t.elapsed());
    }
}
