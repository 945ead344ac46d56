//! Storm controls per upstream host: at most `server_connect_concurrency` connection attempts in
//! flight, exponential back-off with full jitter after failures (one trial at a time until a
//! connect succeeds again), and a circuit breaker that makes clients fail fast once a host has
//! failed `server_breaker_threshold` times in a row, spread over time, with half-open probes to
//! close it. A restart must cost a blip: attempts in flight when a failure is seen count as
//! one, a busy server (53300, 57P03) means back off but never opens the breaker, a fresh
//! breaker still lets patient clients wait for its first (quick) probes, and a drill's failures
//! end with the drill.
//!
//! A host is shared by every pool that connects to it, so a thousand waiting clients still
//! produce at most a handful of connection attempts.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, so that unit tests can run the back-off and breaker on paused time.
use tokio::time::Instant;

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
    /// `server_login_retry_max`: cap of the back-off; how long a freshly opened breaker still
    /// lets patient clients wait; how often clients that can fail over probe an open breaker.
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
    /// Failures in the current streak. Attempts that were already in flight when a failure was
    /// counted fail from the same event (a restart refuses them all at once) and add nothing.
    failures: u32,
    /// When the streak's first failure was counted: the breaker opens only on failures spread
    /// over time (see `Host::breaker_span`), never on one burst.
    first_failure: Option<Instant>,
    /// Bumped at every counted failure, and never reset; an attempt remembers the value it was
    /// admitted under, so a failure counted since marks it as part of that event.
    failure_mark: u64,
    /// No attempt before this instant (back-off, or the breaker's next probe).
    not_before: Option<Instant>,
    breaker: Option<Breaker>,
    /// When the breaker opened: clients with time left wait for its first probes rather than
    /// fail fast, until it has been open for `server_login_retry_max`.
    opened_at: Option<Instant>,
    /// Probes that failed since the breaker opened: their back-off starts again from
    /// `server_login_retry`, so the first probes come quickly.
    failed_probes: u32,
    /// When the breaker last went (back) to open: the opening, or the last failed probe.
    last_open: Option<Instant>,
    /// After a failure only one attempt at a time, until one succeeds.
    trial_in_flight: bool,
    /// The last failed attempt's error, for clients whose own wait timed out without one.
    last_error: Option<String>,
}

impl State {
    /// Forgets the streak, the back-off and the breaker (keeping the failure mark monotonic).
    fn reset(&mut self) {
        *self = State {
            failure_mark: self.failure_mark,
            ..State::default()
        };
    }
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

/// Permission to make one attempt. Report its outcome with [`Attempt::succeeded`],
/// [`Attempt::failed`] or [`Attempt::server_busy`]; dropping it (the client gave up) counts as
/// none of them.
pub struct Attempt<'a> {
    host: &'a Host,
    /// The turn under `server_connect_concurrency`; `None` only while waiting for it.
    _permit: Option<SemaphorePermit<'a>>,
    trial: bool,
    reported: bool,
    /// The host's failure mark when this attempt was admitted.
    mark: u64,
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
        let (trial, mark) = loop {
            let mut notified = pin!(self.changed.notified());
            notified.as_mut().enable();
            // An expired drill ends here, and its failures with it.
            let drill_ends_in = self.drill_ends_in();
            let wait = {
                let mut st = self.lock();
                let now = Instant::now();
                match st.breaker.unwrap_or(Breaker::Closed) {
                    Breaker::Open | Breaker::HalfOpen => {
                        // Quick probes are for clients that would wait anyway; one that has
                        // other hosts to try (failover) probes only every retry_max, so a dead
                        // host costs it a connect timeout that rarely.
                        let due = st.not_before.is_none_or(|t| t <= now)
                            && (patient
                                || st.last_open.is_none_or(|t| {
                                    now.saturating_duration_since(t) >= self.settings.retry_max
                                }));
                        if due && !st.trial_in_flight {
                            st.breaker = Some(Breaker::HalfOpen);
                            self.stats.set_breaker(Breaker::HalfOpen);
                            st.trial_in_flight = true;
                            tracing::info!(host = %self.name, "circuit breaker half-open: probing");
                            break (true, st.failure_mark);
                        }
                        // Freshly open: a client with time left waits for the next probe (its
                        // own query_wait_timeout bounds it) instead of failing at once.
                        let young = st.opened_at.is_some_and(|t| {
                            now.saturating_duration_since(t) < self.settings.retry_max
                        });
                        if !(patient && young) {
                            stats::GlobalStats::bump(&self.stats.fast_failures);
                            return Err(Refusal::Breaker(BreakerOpen {
                                host: self.name.clone(),
                                failures: st.failures,
                                retry_in: st
                                    .not_before
                                    .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
                            }));
                        }
                        if st.trial_in_flight {
                            None
                        } else {
                            st.not_before.map(|t| t.saturating_duration_since(now))
                        }
                    }
                    Breaker::Closed => match st.not_before {
                        Some(t) if t > now => Some(t - now),
                        _ if st.failures == 0 => break (false, st.failure_mark),
                        _ if !st.trial_in_flight => {
                            st.trial_in_flight = true;
                            break (true, st.failure_mark);
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
            // Never past a drill's end: its failures end with it.
            let wait = match (wait, drill_ends_in) {
                (Some(w), Some(d)) => Some(w.min(d)),
                (w, d) => w.or(d),
            };
            match wait {
                Some(d) => {
                    tokio::select! {
                        _ = crate::timer::sleep(d) => {}
                        _ = notified => {}
                    }
                }
                None => notified.await,
            }
        };
        // The attempt exists before its turn under the concurrency limit: a caller that gives
        // up while it waits (its own timeout) drops it, and with it the trial it was to be.
        // Decided but never run, that trial would otherwise stay "in flight" for good, and
        // every later attempt would wait for its outcome.
        let mut attempt = Attempt {
            host: self,
            _permit: None,
            trial,
            reported: false,
            mark,
        };
        // The semaphore is never closed; were it, this would refuse like a back-off.
        let permit = self.limiter.acquire().await.map_err(|_| Refusal::Backoff {
            retry_in: self.settings.retry_base,
        })?;
        attempt._permit = Some(permit);
        stats::GlobalStats::bump(&self.stats.attempts);
        Ok(attempt)
    }

    /// Forgets failures, back-off and breaker: the operator changed what made them fail (RELOAD
    /// with new credentials), or a drill that caused them ended.
    pub fn reset_failures(&self, why: &str) {
        let mut st = self.lock();
        let had = st.failures > 0 || st.breaker.is_some();
        st.reset();
        drop(st);
        if had {
            tracing::info!(host = %self.name, "{why}: back-off and circuit breaker reset");
        }
        self.stats.set_breaker(Breaker::Closed);
        self.changed.notify_waiters();
    }

    /// The error of the last failed attempt of the current streak, if any.
    pub fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    /// How long the drill in force has left (ending an expired one).
    fn drill_ends_in(&self) -> Option<Duration> {
        self.drill()?;
        let d = match self.drill.lock() {
            Ok(d) => *d,
            Err(p) => *p.into_inner(),
        };
        d.map(|(_, until)| until.saturating_duration_since(Instant::now()))
    }

    /// Starts a failure drill that ends by itself after `duration`.
    pub fn start_drill(&self, mode: DrillMode, duration: Duration) {
        let until = Instant::now() + duration;
        if let Ok(mut d) = self.drill.lock() {
            *d = Some((mode, until));
            self.drilling.store(true, Ordering::Release);
        }
        self.stats
            .set_drill(Some((mode.as_str(), until.into_std())));
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
                // The drill's refusals said nothing about the host: service resumes now, not
                // after the back-off they built up.
                self.reset_failures("failure drill ended");
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

    /// How long a streak must last before it may open the breaker: as long as its failures
    /// would take one `server_login_retry` apart (capped at `server_login_retry_max`), so only
    /// failures spread over time open it, never a burst; a threshold of 1 opens at once.
    fn breaker_span(&self) -> Duration {
        let s = &self.settings;
        s.retry_base
            .saturating_mul(s.breaker_threshold.saturating_sub(1))
            .min(s.retry_max)
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
        st.reset();
        drop(st);
        host.stats.set_breaker(Breaker::Closed);
        stats::GlobalStats::bump(&host.stats.successes);
        host.changed.notify_waiters();
    }

    /// The attempt failed with `error`. Counts toward back-off and the breaker unless another
    /// failure was counted while it was in flight (then it is the same event).
    pub fn failed(mut self, error: &dyn std::fmt::Display) {
        self.reported = true;
        let host = self.host;
        let mut st = host.lock();
        st.last_error = Some(error.to_string());
        if self.trial {
            st.trial_in_flight = false;
        }
        if self.mark != st.failure_mark {
            drop(st);
            host.changed.notify_waiters();
            return;
        }
        st.failure_mark += 1;
        st.failures = st.failures.saturating_add(1);
        let now = Instant::now();
        let first = *st.first_failure.get_or_insert(now);
        let threshold = host.settings.breaker_threshold;
        let spread = now.saturating_duration_since(first) >= host.breaker_span();
        let was = st.breaker;
        if was == Some(Breaker::HalfOpen) || (threshold > 0 && st.failures >= threshold && spread) {
            if was == Some(Breaker::HalfOpen) {
                st.failed_probes = st.failed_probes.saturating_add(1);
            }
            st.breaker = Some(Breaker::Open);
            st.opened_at.get_or_insert(now);
            st.last_open = Some(now);
            st.not_before = Some(now + host.backoff(st.failed_probes + 1));
            drop(st);
            host.stats.set_breaker(Breaker::Open);
            if was != Some(Breaker::Open) && was != Some(Breaker::HalfOpen) {
                tracing::warn!(host = %host.name, threshold, "circuit breaker open: failing clients fast until a probe succeeds");
            }
        } else {
            st.not_before = Some(now + host.backoff(st.failures));
            drop(st);
        }
        host.changed.notify_waiters();
    }

    /// The server answered "too many connections" (53300) or "cannot connect now" (57P03): it
    /// is up and asks for patience. Back off as after a failure, but never toward the breaker:
    /// pooled connections may still serve the clients in turn.
    pub fn server_busy(mut self, error: &dyn std::fmt::Display) {
        self.reported = true;
        let host = self.host;
        let mut st = host.lock();
        st.last_error = Some(error.to_string());
        if self.trial {
            st.trial_in_flight = false;
        }
        let retry = host.backoff(st.failures.saturating_add(1));
        let now = Instant::now();
        st.not_before = Some(st.not_before.map_or(now + retry, |t| t.max(now + retry)));
        drop(st);
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

    /// Stands for the error of a failed attempt.
    const REFUSED: &str = "connection refused";

    /// Fails one attempt at a time, as many times as it takes for the breaker to open.
    async fn fail_until_open(h: &Host) -> u32 {
        let mut n = 0;
        while h.breaker() != Breaker::Open {
            h.admit().await.unwrap().failed(&REFUSED);
            n += 1;
            assert!(n < 1000, "the breaker never opened");
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_only_on_failures_spread_over_retry_max_and_a_probe_closes_it() {
        let h = host(3);
        let started = Instant::now();
        let failures = fail_until_open(&h).await;
        // Three failures in a burst are not enough: they must span two retry_base.
        assert!(failures >= 3);
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(h.last_error().as_deref(), Some(REFUSED));
        // Freshly open, a patient client waits for the probe rather than failing.
        let probe = h.admit().await.unwrap();
        assert_eq!(h.breaker(), Breaker::HalfOpen);
        probe.failed(&REFUSED);
        // Open for longer than retry_max: clients fail fast, and are told why.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut err = None;
        while err.is_none() {
            match h.admit().await {
                Ok(probe) => probe.failed(&REFUSED),
                Err(e) => err = Some(e),
            }
        }
        assert!(err.unwrap().failures >= 3);
        assert!(
            h.stats
                .fast_failures
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        );
        // The next probe comes within the back-off; a success closes the breaker.
        let probe = loop {
            if let Ok(p) = h.admit().await {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        probe.succeeded();
        assert_eq!(h.breaker(), Breaker::Closed);
        assert!(h.admit().await.is_ok());
    }

    /// A storm: connects hang, so every turn under the concurrency limit is taken when the
    /// host's back-off ends and the next caller becomes the trial. That caller gives up (its
    /// own timeout) while it waits for a turn. The host must not wait for that trial's outcome
    /// for ever: the next caller becomes the trial once a turn is free.
    #[tokio::test(start_paused = true)]
    async fn a_trial_given_up_while_waiting_for_a_turn_does_not_wedge_the_host() {
        let h = Arc::new(host(0));
        // Both turns (connect_concurrency 2) taken before anything failed.
        let a = h.admit().await.unwrap();
        let b = h.admit().await.unwrap();
        // A third caller, admitted while nothing had failed, waits for a turn.
        let queued = {
            let h = h.clone();
            tokio::spawn(async move {
                let c = h.admit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
                c.failed(&REFUSED);
            })
        };
        tokio::task::yield_now().await;
        // One attempt fails; its turn goes to the queued caller, so both are taken again.
        a.failed(&REFUSED);
        assert_eq!(h.lock().failures, 1);
        tokio::time::sleep(Duration::from_millis(60)).await; // past the back-off
                                                             // The next caller becomes the trial and waits for a turn; it gives up first.
        let gave_up = tokio::time::timeout(Duration::from_millis(20), h.admit()).await;
        assert!(
            gave_up.is_err(),
            "no turn was free, so the trial had to wait"
        );
        assert!(!h.lock().trial_in_flight, "the trial went with its caller");
        // The hanging attempts end; the next caller gets to try.
        drop(b);
        queued.await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), h.admit()).await;
        assert!(
            matches!(next, Ok(Ok(_))),
            "the host must let the next attempt through"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_in_flight_when_a_failure_is_seen_count_as_one() {
        let h = host(2);
        // A restart refuses every attempt in flight at once.
        let a = h.admit().await.unwrap();
        let b = h.admit().await.unwrap();
        a.failed(&REFUSED);
        b.failed(&REFUSED);
        assert_eq!(h.lock().failures, 1, "one event, one failure");
        // Even long after (spread), a burst never opens the breaker by itself.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(h.breaker(), Breaker::Closed);
        // The database is back: the next attempt comes within the first back-off and succeeds.
        let before = Instant::now();
        h.admit().await.unwrap().succeeded();
        assert!(before.elapsed() <= Duration::from_millis(10));
        assert_eq!(h.lock().failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_server_means_back_off_never_the_breaker() {
        let h = host(1);
        for _ in 0..50 {
            h.admit()
                .await
                .unwrap()
                .server_busy(&"53300 too many connections");
        }
        assert_eq!(h.breaker(), Breaker::Closed);
        assert_eq!(h.lock().failures, 0);
        assert_eq!(
            h.last_error().as_deref(),
            Some("53300 too many connections")
        );
        // It did back off: the attempt after one busy answer waits up to retry_base.
        h.admit().await.unwrap().server_busy(&"53300");
        assert!(h.lock().not_before.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_drills_failures_end_with_the_drill() {
        let h = host(2);
        h.start_drill(DrillMode::Refuse, Duration::from_secs(5));
        fail_until_open(&h).await;
        // While the drill lasts the breaker stays open (its probes fail too).
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_ne!(h.breaker(), Breaker::Closed);
        // At the drill's end, a waiting client is admitted at once, with nothing left over.
        tokio::time::sleep_until(Instant::now() + Duration::from_secs(4)).await;
        let admitted = tokio::time::timeout(Duration::from_millis(1), h.admit()).await;
        assert!(
            matches!(admitted, Ok(Ok(_))),
            "admitted when the drill ended"
        );
        assert_eq!(h.breaker(), Breaker::Closed);
        assert_eq!(h.lock().failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reset_failures_forgets_back_off_and_breaker() {
        let h = host(2);
        fail_until_open(&h).await;
        h.reset_failures("RELOAD changed the server credentials");
        assert_eq!(h.breaker(), Breaker::Closed);
        let admitted = tokio::time::timeout(Duration::ZERO, h.admit()).await;
        assert!(matches!(admitted, Ok(Ok(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failure_attempts_are_spaced_and_one_at_a_time() {
        let h = host(0);
        h.admit().await.unwrap().failed(&REFUSED);
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
