//! `reserve_pool_size` / `reserve_pool_timeout` (PgBouncer's): a checkout that has waited
//! `reserve_pool_timeout` for a server may make the pool one connection larger, up to
//! `reserve_pool_size` beyond `pool_size`; once the pool is full again with idle connections
//! and nobody waits, it goes back to `pool_size`, closing the extra idle ones (sooner than
//! `server_idle_timeout`). This module decides the sizes; the pool applies them to its slots.
//! Nothing here waits or holds a lock across an await.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A pool's reserve, as configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReserveSettings {
    /// `reserve_pool_size`: connections beyond `pool_size`; 0 = no reserve.
    pub size: usize,
    /// `reserve_pool_timeout`: how long a checkout waits before it may use the reserve;
    /// `None` never.
    pub timeout: Option<Duration>,
}

#[derive(Debug, Default)]
pub(crate) struct Reserve {
    size: AtomicUsize,
    /// `reserve_pool_timeout` in microseconds; 0 = never.
    timeout_us: AtomicU64,
    /// `pool_size`: what the pool goes back to.
    base: AtomicUsize,
    /// Growing and shrinking read the size and then set it: one at a time.
    resizing: Mutex<()>,
}

impl Reserve {
    pub(crate) fn new(base: usize) -> Reserve {
        let r = Reserve::default();
        r.base.store(base, Relaxed);
        r
    }

    pub(crate) fn set(&self, s: ReserveSettings) {
        self.size.store(s.size, Relaxed);
        let us = s.timeout.map(|t| t.as_micros().max(1) as u64).unwrap_or(0);
        self.timeout_us.store(us, Relaxed);
    }

    pub(crate) fn settings(&self) -> ReserveSettings {
        let us = self.timeout_us.load(Relaxed);
        ReserveSettings {
            size: self.size.load(Relaxed),
            timeout: (us > 0).then(|| Duration::from_micros(us)),
        }
    }

    pub(crate) fn base(&self) -> usize {
        self.base.load(Relaxed)
    }

    /// A new `pool_size` (RELOAD); the caller resizes the pool to it, reserve given back.
    pub(crate) fn set_base(&self, base: usize) {
        self.base.store(base, Relaxed);
    }

    /// When a checkout that started at `started` may use the reserve, if it ever may.
    pub(crate) fn due(&self, started: Instant) -> Option<Instant> {
        if self.size.load(Relaxed) == 0 {
            return None;
        }
        match self.timeout_us.load(Relaxed) {
            0 => None,
            us => Some(started + Duration::from_micros(us)),
        }
    }

    /// The size for a pool of `max_size` one of whose checkouts waited past
    /// `reserve_pool_timeout`: one more, if the reserve has one left.
    pub(crate) fn grown(&self, max_size: usize) -> Option<usize> {
        let limit = self.base() + self.size.load(Relaxed);
        (max_size < limit).then_some(max_size + 1)
    }

    /// `pool_size` again, once as many connections as the reserve added are idle and nobody
    /// waits; `None` while the reserve is not in use or still needed.
    pub(crate) fn shrunk(&self, max_size: usize, idle: usize, waiting: usize) -> Option<usize> {
        let base = self.base();
        let extra = max_size.saturating_sub(base);
        (extra > 0 && waiting == 0 && idle >= extra).then_some(base)
    }

    /// Growing and shrinking read the size and then set it: one at a time.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        match self.resizing.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_grows_one_at_a_time_to_its_size_and_goes_back_when_idle() {
        let r = Reserve::new(2);
        let started = Instant::now();
        assert_eq!(r.due(started), None, "no reserve configured");
        assert_eq!(r.grown(2), None);
        r.set(ReserveSettings {
            size: 2,
            timeout: Some(Duration::from_secs(5)),
        });
        assert_eq!(r.due(started), Some(started + Duration::from_secs(5)));
        assert_eq!(r.grown(2), Some(3));
        assert_eq!(r.grown(3), Some(4));
        assert_eq!(
            r.grown(4),
            None,
            "never beyond pool_size + reserve_pool_size"
        );
        // (max_size, idle, waiting)
        assert_eq!(r.shrunk(4, 4, 1), None, "someone waits");
        assert_eq!(r.shrunk(4, 1, 0), None, "the reserve's two are not idle");
        assert_eq!(r.shrunk(4, 2, 0), Some(2));
        assert_eq!(r.shrunk(2, 2, 0), None, "no reserve in use");
        r.set(ReserveSettings {
            size: 2,
            timeout: None,
        });
        assert_eq!(r.due(started), None, "reserve_pool_timeout = 0: never");
        r.set_base(5);
        assert_eq!(r.grown(5), Some(6));
    }
}
