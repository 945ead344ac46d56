//! Counters per upstream host: connection attempts by outcome and phase, timeouts by phase, and
//! the circuit breaker's state. Written by `upstream`, read through [`HostSnapshot`].

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

/// Where a server connection attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Dns,
    Connect,
    Login,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl Breaker {
    pub fn as_str(self) -> &'static str {
        match self {
            Breaker::Closed => "closed",
            Breaker::Open => "open",
            Breaker::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug, Default)]
pub struct HostStats {
    pub host: String,
    pub attempts: AtomicU64,
    pub successes: AtomicU64,
    pub failures_dns: AtomicU64,
    pub failures_connect: AtomicU64,
    pub failures_login: AtomicU64,
    pub timeouts_dns: AtomicU64,
    pub timeouts_connect: AtomicU64,
    pub timeouts_login: AtomicU64,
    /// Attempts refused at once because the breaker was open.
    pub fast_failures: AtomicU64,
    pub breaker_opens: AtomicU64,
    /// Logins abandoned because the server asked for a method server_require_auth refuses.
    pub auth_refused: AtomicU64,
    /// RDS IAM tokens signed for logins to this host (`server_auth = "rds_iam"`).
    pub rds_iam_tokens: AtomicU64,
    /// Logins to this host that could not get an RDS IAM token (no credentials).
    pub rds_iam_failures: AtomicU64,
    breaker: AtomicU8,
    /// Failure drills started on this host.
    pub drills: AtomicU64,
    /// The failure drill in force (mode, until), if any.
    drill: std::sync::Mutex<Option<(&'static str, std::time::Instant)>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSnapshot {
    pub host: String,
    pub attempts: u64,
    pub successes: u64,
    pub failures_dns: u64,
    pub failures_connect: u64,
    pub failures_login: u64,
    pub timeouts_dns: u64,
    pub timeouts_connect: u64,
    pub timeouts_login: u64,
    pub fast_failures: u64,
    pub breaker_opens: u64,
    pub auth_refused: u64,
    pub rds_iam_tokens: u64,
    pub rds_iam_failures: u64,
    pub breaker: &'static str,
    pub drills: u64,
    /// The failure drill in force ("" when none) and its seconds left.
    pub drill: &'static str,
    pub drill_secs_left: u64,
}

impl HostStats {
    pub fn new(host: &str) -> Self {
        HostStats {
            host: host.to_owned(),
            ..Default::default()
        }
    }

    pub fn failed(&self, phase: Phase, timed_out: bool) {
        let (f, t) = match phase {
            Phase::Dns => (&self.failures_dns, &self.timeouts_dns),
            Phase::Connect => (&self.failures_connect, &self.timeouts_connect),
            Phase::Login => (&self.failures_login, &self.timeouts_login),
        };
        f.fetch_add(1, Relaxed);
        if timed_out {
            t.fetch_add(1, Relaxed);
        }
    }

    pub fn set_breaker(&self, b: Breaker) {
        let old = self.breaker.swap(b as u8, Relaxed);
        if b == Breaker::Open && old != Breaker::Open as u8 {
            self.breaker_opens.fetch_add(1, Relaxed);
        }
    }

    pub fn breaker(&self) -> Breaker {
        match self.breaker.load(Relaxed) {
            1 => Breaker::Open,
            2 => Breaker::HalfOpen,
            _ => Breaker::Closed,
        }
    }

    /// Records the drill in force (or its end).
    pub fn set_drill(&self, drill: Option<(&'static str, std::time::Instant)>) {
        if let Ok(mut d) = self.drill.lock() {
            *d = drill;
        }
    }

    pub fn snapshot(&self) -> HostSnapshot {
        let now = std::time::Instant::now();
        let (drill, drill_secs_left) = match self.drill.lock().ok().and_then(|d| *d) {
            Some((mode, until)) if until > now => (mode, (until - now).as_secs()),
            _ => ("", 0),
        };
        HostSnapshot {
            drills: self.drills.load(Relaxed),
            drill,
            drill_secs_left,
            host: self.host.clone(),
            attempts: self.attempts.load(Relaxed),
            successes: self.successes.load(Relaxed),
            failures_dns: self.failures_dns.load(Relaxed),
            failures_connect: self.failures_connect.load(Relaxed),
            failures_login: self.failures_login.load(Relaxed),
            timeouts_dns: self.timeouts_dns.load(Relaxed),
            timeouts_connect: self.timeouts_connect.load(Relaxed),
            timeouts_login: self.timeouts_login.load(Relaxed),
            fast_failures: self.fast_failures.load(Relaxed),
            breaker_opens: self.breaker_opens.load(Relaxed),
            auth_refused: self.auth_refused.load(Relaxed),
            rds_iam_tokens: self.rds_iam_tokens.load(Relaxed),
            rds_iam_failures: self.rds_iam_failures.load(Relaxed),
            breaker: self.breaker().as_str(),
        }
    }
}
