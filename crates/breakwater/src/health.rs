//! Liveness and readiness for probes (`/healthz`, `/readyz`). Both are answered from state the
//! daemon already keeps — flags, a heartbeat, each pool's open servers and the outcome of its
//! last connect attempt — so a probe costs no query and no lock on a pool.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use proxy::Proxy;

/// How often the heartbeat task ticks, and how late it may be before `/healthz` fails. Generous:
/// a loaded 2-core machine delays timers by tens of milliseconds, never by seconds, unless a
/// worker thread is stuck.
const HEARTBEAT: Duration = Duration::from_secs(1);
const STALLED_AFTER: Duration = Duration::from_secs(10);

/// What the probes read. The daemon sets the flags; the heartbeat task keeps `beat` fresh.
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` at the heartbeat task's last tick.
    beat: AtomicU64,
    listening: AtomicBool,
    shutting_down: AtomicBool,
}

/// What readiness needs to know of one pool.
pub struct PoolHealth {
    /// `database/user`, for the response body.
    pub name: String,
    pub open_servers: usize,
    pub last_connect_failed: bool,
}

/// A probe's answer: ready/alive or not, and why, in a line for the response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok(&'static str),
    Not(String),
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health {
            started: Instant::now(),
            beat: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The client listeners are bound.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Relaxed);
    }

    /// Shutdown began: from now on the pooler is not ready, even while it still serves.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Ticks until the process ends; a stuck runtime stops ticking, and `/healthz` notices.
    pub async fn heartbeat(self: Arc<Self>) {
        let mut tick = upstream::timer::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.beat.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// `/healthz`: the process answers, and its timers still run.
    pub fn liveness(&self) -> Verdict {
        liveness(self.beat.load(Ordering::Relaxed), self.now_ms())
    }

    /// `/readyz`: listening, not shutting down, and every pool can serve (see [`pool_ready`]).
    pub fn readiness_of(&self, proxy: &Proxy) -> Verdict {
        let pools: Vec<PoolHealth> = proxy
            .pools()
            .iter()
            .map(|p| PoolHealth {
                name: format!("{}/{}", p.stats.database, p.stats.user),
                open_servers: p.pool.status().size,
                last_connect_failed: p.stats.last_connect_failed(),
            })
            .collect();
        self.readiness(&pools)
    }

    pub fn readiness(&self, pools: &[PoolHealth]) -> Verdict {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Verdict::Not("shutting down".into());
        }
        if !self.listening.load(Ordering::Relaxed) {
            return Verdict::Not("not listening yet".into());
        }
        let mut down: Vec<&str> = pools
            .iter()
            .filter(|p| !pool_ready(p.open_servers, p.last_connect_failed))
            .map(|p| p.name.as_str())
            .collect();
        if down.is_empty() {
            Verdict::Ok("ready")
        } else {
            down.sort();
            Verdict::Not(format!(
                "no server connection, and the last connect failed, for {}",
                down.join(", ")
            ))
        }
    }
}

/// Alive unless the last heartbeat (at `beat_ms`) is more than [`STALLED_AFTER`] before `now_ms`.
fn liveness(beat_ms: u64, now_ms: u64) -> Verdict {
    let late = now_ms.saturating_sub(beat_ms);
    if late > STALLED_AFTER.as_millis() as u64 {
        Verdict::Not(format!("runtime stalled: no heartbeat for {late} ms"))
    } else {
        Verdict::Ok("alive")
    }
}

/// A pool can serve when it holds an open server connection (idle ones found closed by the
/// server are dropped by maintenance within a quarter second), or when its most recent connect
/// attempt succeeded: a pool that closed its idle servers after `server_idle_timeout` is still
/// fine. A pool that never tried is ready too: nothing says its database is down.
pub fn pool_ready(open_servers: usize, last_connect_failed: bool) -> bool {
    open_servers > 0 || !last_connect_failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_is_ready_with_a_server_or_a_last_connect_that_worked() {
        for (open, failed, ready) in [
            (0, false, true),
            (2, false, true),
            (2, true, true),
            (0, true, false),
        ] {
            assert_eq!(
                pool_ready(open, failed),
                ready,
                "open {open}, failed {failed}"
            );
        }
    }

    #[test]
    fn liveness_fails_only_after_the_heartbeat_is_ten_seconds_late() {
        assert_eq!(liveness(5_000, 5_900), Verdict::Ok("alive"));
        assert_eq!(
            liveness(5_000, 15_000),
            Verdict::Ok("alive"),
            "not before the bound"
        );
        assert!(matches!(liveness(5_000, 15_001), Verdict::Not(m) if m.contains("stalled")));
        // A beat read after `now` was taken is not "late".
        assert_eq!(liveness(6_000, 5_999), Verdict::Ok("alive"));
    }

    #[test]
    fn readiness_needs_the_listener_and_fails_at_once_on_shutdown() {
        let h = Health::new();
        assert!(matches!(h.readiness(&[]), Verdict::Not(m) if m.contains("listening")));
        h.set_listening();
        assert_eq!(h.readiness(&[]), Verdict::Ok("ready"));
        let pool = |name: &str, open_servers, last_connect_failed| PoolHealth {
            name: name.into(),
            open_servers,
            last_connect_failed,
        };
        let pools = [
            pool("b/u", 0, true),
            pool("a/u", 0, true),
            pool("c/u", 3, true),
            pool("d/u", 0, false),
        ];
        assert_eq!(
            h.readiness(&pools),
            Verdict::Not("no server connection, and the last connect failed, for a/u, b/u".into())
        );
        h.set_shutting_down();
        assert_eq!(h.readiness(&[]), Verdict::Not("shutting down".into()));
    }
}
