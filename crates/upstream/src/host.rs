//! Storm controls per upstream host: at most `server_connect_concurrency` connection attempts in
//! flight, exponential back-off with full jitter after failures (one trial at a time until a
//! connect succeeds again), and a circuit breaker that makes clients fail fast once a host has
//! failed `server_breaker_threshold` times in a row, with a half-open probe to close it.
//!
//! A host is shared by every pool that connects to it, so a thousand waiting clients still
//! produce at most a handful of connection attempts.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use stats::{Breaker, HostStats};

use crate::dns::DnsCache;
use crate::role::Role;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// Storm-control settings, from `[pooler]`.
#[derive(Debug, Clone)]
pub struct StormSettings {
    /// `server_connect_concurrency`: attempts in flight per host.
    pub connect_concurrency: usize,
    /// `server_login_retry`: base of the exponential back-off after a failed attempt.
    pub retry_base: Duration,
    /// `server_login_retry_max`: cap of the back-off, and the breaker's probe interval.
    pub retry_max: Duration,
    /// `server_breaker_threshold`: consecutive failures that open the breaker; 0 never opens it.
    pub breaker_threshold: u32,
}

impl Default for StormSettings {
    fn default() -> Self {
        StormSettings {
            connect_concurrency: 4,
            retry_base: Duration::from_millis(250),
            retry_max: Duration::from_secs(15),
            breaker_threshold: 10,
        }
    }
}

/// Why an attempt was not even made.
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream {host} is failing: circuit breaker open after {failures} failed connection attempts in a row; next probe in {retry_in:?}")]
pub struct BreakerOpen {
    pub host: String,
    pub failures: u32,
    pub retry_in: Duration,
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    /// No attempt before this instant (back-off, or the breaker's next probe).
    not_before: Option<Instant>,
    breaker: Option<Breaker>,
    /// After a failure only one attempt at a time, until one succeeds.
    trial_in_flight: bool,
}

pub struct Host {
    /// `host:port`, as in logs and SHOW commands.
    pub name: String,
    /// The host name (or address, or socket directory) and port, as configured.
    pub host: String,
    pub port: u16,
    /// The role the server last reported (login or probe), and a counter bumped whenever it
    /// changes, so connections opened under an older role can be told apart.
    role: Mutex<Option<Role>>,
    role_epoch: AtomicU64,
    /// The failure drill in force, and until when.
    drill: Mutex<Option<(DrillMode, Instant)>>,
    /// Whether `drill` may hold one: every checkout and release asks, and almost never is
    /// there one, so the answer costs a load rather than a lock.
    drilling: AtomicBool,
    /// Where host names are resolved; `None` uses the system resolver (bounded by dns_timeout).
    pub dns: Option<Arc<DnsCache>>,
    limiter: Semaphore,
    state: Mutex<State>,
    changed: Notify,
    settings: StormSettings,
    pub stats: Arc<HostStats>,
}

/// A failure drill: Breakwater treats the host as failing this way for a bounded time, so
/// operators can prove that failover works without touching the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrillMode {
    /// Connects hang until `server_connect_timeout`; idle connections are not reused.
    Blackhole,
    /// Connects are refused at once; idle connections are not reused.
    Refuse,
    /// Connects take one extra second.
    Slow,
}

impl DrillMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DrillMode::Blackhole => "blackhole",
            DrillMode::Refuse => "refuse",
            DrillMode::Slow => "slow",
        }
    }

    pub fn parse(s: &str) -> Option<DrillMode> {
        match s.to_ascii_lowercase().as_str() {
            "blackhole" => Some(DrillMode::Blackhole),
            "refuse" => Some(DrillMode::Refuse),
            "slow" => Some(DrillMode::Slow),
            _ => None,
        }
    }

    /// Does the host count as down (its idle connections unusable)?
    pub fn is_down(self) -> bool {
        !matches!(self, DrillMode::Slow)
    }
}

/// Why a host that is not to be waited for was skipped.
#[derive(Debug, Clone)]
pub enum Refusal {
    Breaker(BreakerOpen),
    /// In back-off after a failure, or a trial attempt is already in flight.
    Backoff {
        retry_in: Duration,
    },
}

/// Permission to make one attempt. Report its outcome with [`Attempt::succeeded`] or
/// [`Attempt::failed`]; dropping it (the client gave up) counts as neither.
pub struct Attempt<'a> {
    host: &'a Host,
    _permit: SemaphorePermit<'a>,
    trial: bool,
    reported: bool,
}

impl Host {
    fn new(host: &str, port: u16, settings: StormSettings, dns: Option<Arc<DnsCache>>) -> Host {
        let name = format!("{host}:{port}");
        Host {
            stats: Arc::new(HostStats::new(&name)),
            host: host.to_owned(),
            port,
            role: Mutex::new(None),
            role_epoch: AtomicU64::new(0),
            drill: Mutex::new(None),
            drilling: AtomicBool::new(false),
            dns,
            limiter: Semaphore::new(settings.connect_concurrency.max(1)),
            name,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            settings,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    pub fn breaker(&self) -> Breaker {
        self.lock().breaker.unwrap_or(Breaker::Closed)
    }

    /// Waits until an attempt may be made: not while the breaker is open (that fails at once),
    /// not before the back-off expires, not while a trial after a failure is in flight, and not
    /// above the concurrency limit.
    pub async fn admit(&self) -> Result<Attempt<'_>, BreakerOpen> {
        match self.admit_inner(true).await {
            Ok(a) => Ok(a),
            Err(Refusal::Breaker(b)) => Err(b),
            // A patient caller is never refused for back-off.
            Err(Refusal::Backoff { retry_in }) => Err(BreakerOpen {
                host: self.name.clone(),
                failures: 0,
                retry_in,
            }),
        }
    }

    /// Like [`Host::admit`], but refuses instead of waiting out a back-off or another trial, so
    /// a caller with other hosts to try can move on. Still waits for the concurrency limit.
    pub async fn admit_now(&self) -> Result<Attempt<'_>, Refusal> {
        self.admit_inner(false).await
    }

    async fn admit_inner(&self, patient: bool) -> Result<Attempt<'_>, Refusal> {
        let trial = loop {
            let mut notified = pin!(self.changed.notified());
            notified.as_mut().enable();
            let wait = {
                let mut st = self.lock();
                let now = Instant::now();
                match st.breaker.unwrap_or(Breaker::Closed) {
                    Breaker::Open | Breaker::HalfOpen => {
                        let due = st.not_before.is_none_or(|t| t <= now);
                        if due && !st.trial_in_flight {
                            st.breaker = Some(Breaker::HalfOpen);
                            self.stats.set_breaker(Breaker::HalfOpen);
                            st.trial_in_flight = true;
                            tracing::info!(host = %self.name, "circuit breaker half-open: probing");
                            break true;
                        }
                        stats::GlobalStats::bump(&self.stats.fast_failures);
                        return Err(Refusal::Breaker(BreakerOpen {
                            host: self.name.clone(),
                            failures: st.failures,
                            retry_in: st
                                .not_before
                                .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
                        }));
                    }
                    Breaker::Closed => match st.not_before {
                        Some(t) if t > now => Some(t - now),
                        _ if st.failures == 0 => break false,
                        _ if !st.trial_in_flight => {
                            st.trial_in_flight = true;
                            break true;
                        }
                        // A trial is running: wait for its outcome.
                        _ => None,
                    },
                }
            };
            if !patient {
                return Err(Refusal::Backoff {
                    retry_in: wait.unwrap_or(self.settings.retry_base),
                });
            }
            match wait {
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = notified => {}
                    }
                }
                None => notified.await,
            }
        };
        let permit = match self.limiter.acquire().await {
            Ok(p) => p,
            // The semaphore is never closed.
            Err(_) => unreachable!("host limiter closed"),
        };
        stats::GlobalStats::bump(&self.stats.attempts);
        Ok(Attempt {
            host: self,
            _permit: permit,
            trial,
            reported: false,
        })
    }

    /// Starts a failure drill that ends by itself after `duration`.
    pub fn start_drill(&self, mode: DrillMode, duration: Duration) {
        let until = Instant::now() + duration;
        if let Ok(mut d) = self.drill.lock() {
            *d = Some((mode, until));
            self.drilling.store(true, Ordering::Release);
        }
        self.stats.set_drill(Some((mode.as_str(), until)));
        stats::GlobalStats::bump(&self.stats.drills);
        tracing::warn!(host = %self.name, mode = mode.as_str(), ?duration,
            "failure drill started: treating this upstream host as failing");
    }

    /// The drill in force now, if any (an expired one is cleared here).
    pub fn drill(&self) -> Option<DrillMode> {
        if !self.drilling.load(Ordering::Acquire) {
            return None;
        }
        let mut d = match self.drill.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        match *d {
            Some((mode, until)) if until > Instant::now() => Some(mode),
            Some((mode, _)) => {
                *d = None;
                self.drilling.store(false, Ordering::Release);
                drop(d);
                self.stats.set_drill(None);
                tracing::warn!(host = %self.name, mode = mode.as_str(), "failure drill ended");
                None
            }
            None => None,
        }
    }

    /// The role the server last reported, if any connection or probe has seen it.
    pub fn role(&self) -> Option<Role> {
        match self.role.lock() {
            Ok(r) => *r,
            Err(p) => *p.into_inner(),
        }
    }

    pub fn role_epoch(&self) -> u64 {
        self.role_epoch.load(Ordering::Acquire)
    }

    /// Records the role a server reported; returns the epoch to stamp connections with. A change
    /// from a known role bumps the epoch, which retires connections opened under the old one.
    pub fn observe_role(&self, role: Role) -> u64 {
        let mut r = match self.role.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let before = r.replace(role);
        if before.is_some_and(|b| b != role) {
            tracing::warn!(host = %self.name, from = %before.map(|b| b.to_string()).unwrap_or_default(),
                to = %role, "upstream host changed role");
            self.role_epoch.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.role_epoch.load(Ordering::Acquire)
        }
    }

    /// Full jitter: a random delay up to min(max, base · 2^(failures-1)).
    fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        let ceiling = self
            .settings
            .retry_base
            .saturating_mul(1u32 << exp)
            .min(self.settings.retry_max);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

impl Attempt<'_> {
    pub fn succeeded(mut self) {
        self.reported = true;
        let host = self.host;
        let mut st = host.lock();
        if st.failures > 0 || st.breaker.is_some() {
            tracing::info!(host = %host.name, failures = st.failures, "upstream reachable again");
        }
        *st = State::default();
        drop(st);
        host.stats.set_breaker(Breaker::Closed);
        stats::GlobalStats::bump(&host.stats.successes);
        host.changed.notify_waiters();
    }

    pub fn failed(mut self) {
        self.reported = true;
        let host = self.host;
        let mut st = host.lock();
        st.failures = st.failures.saturating_add(1);
        st.trial_in_flight = false;
        let now = Instant::now();
        let threshold = host.settings.breaker_threshold;
        let was = st.breaker;
        if was == Some(Breaker::HalfOpen) || (threshold > 0 && st.failures >= threshold) {
            st.breaker = Some(Breaker::Open);
            st.not_before = Some(now + host.settings.retry_max);
            drop(st);
            host.stats.set_breaker(Breaker::Open);
            if was != Some(Breaker::Open) {
                tracing::warn!(host = %host.name, threshold, "circuit breaker open: failing clients fast until a probe succeeds");
            }
        } else {
            st.not_before = Some(now + host.backoff(st.failures));
            drop(st);
        }
        host.changed.notify_waiters();
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.reported && self.trial {
            let mut st = self.host.lock();
            st.trial_in_flight = false;
            if st.breaker == Some(Breaker::HalfOpen) {
                st.breaker = Some(Breaker::Open);
            }
            drop(st);
            self.host.changed.notify_waiters();
        }
    }
}

/// Every upstream host Breakwater has connected to, shared by all pools.
#[derive(Default)]
pub struct Hosts {
    map: Mutex<HashMap<String, Arc<Host>>>,
    settings: StormSettings,
    dns: Option<Arc<DnsCache>>,
}

impl Hosts {
    pub fn new(settings: StormSettings) -> Hosts {
        Hosts {
            map: Mutex::new(HashMap::new()),
            settings,
            dns: None,
        }
    }

    /// Resolves host names through `dns` instead of the system resolver.
    pub fn with_dns(mut self, dns: Arc<DnsCache>) -> Hosts {
        self.dns = Some(dns);
        self
    }

    pub fn dns(&self) -> Option<&Arc<DnsCache>> {
        self.dns.as_ref()
    }

    pub fn get(&self, host: &str, port: u16) -> Arc<Host> {
        let name = format!("{host}:{port}");
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry(name)
            .or_insert_with(|| {
                Arc::new(Host::new(
                    host,
                    port,
                    self.settings.clone(),
                    self.dns.clone(),
                ))
            })
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<Host>> {
        match self.map.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        }
    }
}

/// The host a connection was opened on, and the host's role epoch at the time.
#[derive(Clone)]
pub struct Origin {
    pub host: Arc<Host>,
    pub epoch: u64,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.host.name, self.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(threshold: u32) -> Host {
        Host::new(
            "db",
            5432,
            StormSettings {
                connect_concurrency: 2,
                retry_base: Duration::from_millis(10),
                retry_max: Duration::from_millis(50),
                breaker_threshold: threshold,
            },
            None,
        )
    }

    #[tokio::test]
    async fn the_breaker_opens_after_the_threshold_and_a_successful_probe_closes_it() {
        let h = host(3);
        for _ in 0..3 {
            h.admit().await.unwrap().failed();
        }
        assert_eq!(h.breaker(), Breaker::Open);
        let err = h.admit().await.err().expect("fails fast while open");
        assert_eq!(err.failures, 3);
        assert_eq!(
            h.stats
                .fast_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // After retry_max a single probe is let through; others still fail fast.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let probe = h.admit().await.unwrap();
        assert_eq!(h.breaker(), Breaker::HalfOpen);
        assert!(h.admit().await.is_err());
        probe.succeeded();
        assert_eq!(h.breaker(), Breaker::Closed);
        assert!(h.admit().await.is_ok());
    }

    #[tokio::test]
    async fn after_a_failure_attempts_are_spaced_and_one_at_a_time() {
        let h = host(0);
        h.admit().await.unwrap().failed();
        let trial = h.admit().await.unwrap();
        // A second caller waits for the trial's outcome instead of attempting too.
        let second = tokio::time::timeout(Duration::from_millis(100), h.admit()).await;
        assert!(
            second.is_err(),
            "second attempt must wait while a trial is in flight"
        );
        trial.succeeded();
        let a = h.admit().await.unwrap();
        let b = h.admit().await.unwrap();
        // Concurrency limit 2: the third waits.
        assert!(tokio::time::timeout(Duration::from_millis(50), h.admit())
            .await
            .is_err());
        drop((a, b));
    }

    #[test]
    fn backoff_is_full_jitter_below_the_cap() {
        let h = host(0);
        for failures in 1..30 {
            let d = h.backoff(failures);
            assert!(d <= Duration::from_millis(50), "{d:?}");
        }
        assert!(h.backoff(1) <= Duration::from_millis(10));
    }
}
