//! Admission control per source address: a cap on open connections
//! (`max_client_conn_per_addr`) and a token-bucket login rate (`client_login_rate_per_addr`), so
//! one retrying job cannot crowd out every other client. Decisions are made before
//! authentication and before any server work, which is what makes a refusal cheap.
//!
//! The table is plain data guarded by one mutex and driven by the caller's clock, so it is
//! tested without sockets on paused time. It must never grow without bound: a flood from many
//! source addresses (IPv6 hands out 2^64 of them per host, which is why an IPv6 source is keyed
//! by its /64) evicts idle entries first and, failing that, every entry without an open
//! connection; entries with open connections are bounded by `max_client_conn`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Most source addresses tracked at once: some 64 bytes each, so a few MB at worst.
pub const MAX_TRACKED_ADDRS: usize = 65_536;

/// The two per-address limits; 0 turns each off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// `max_client_conn_per_addr`: open client connections from one source.
    pub max_conn_per_addr: usize,
    /// `client_login_rate_per_addr`: logins per second from one source; the bucket holds one
    /// second's worth, so a source may burst that many at once.
    pub login_rate_per_addr: u32,
}

impl AdmissionLimits {
    pub fn is_off(&self) -> bool {
        self.max_conn_per_addr == 0 && self.login_rate_per_addr == 0
    }
}

/// Which limit refused a login, with what the client is told about retrying.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// `max_client_conn_per_addr`: retry once one of this source's connections closes.
    Connections { limit: usize },
    /// `client_login_rate_per_addr`: retry after `retry_after`.
    Rate { limit: u32, retry_after: Duration },
}

impl Refusal {
    /// The message for the client's 53300 ErrorResponse.
    pub fn message(&self, source: &str) -> String {
        match self {
            Refusal::Connections { limit } => format!(
                "too many connections from {source} (max_client_conn_per_addr = {limit}); \
                 retry when one of them has closed"
            ),
            Refusal::Rate { limit, retry_after } => format!(
                "too many logins from {source} (client_login_rate_per_addr = {limit} per second); \
                 retry in {} ms",
                retry_after.as_millis().max(1)
            ),
        }
    }
}

/// A login's verdict: `log` is set at most once per second per source, so a storm of refusals
/// writes a line a second, not a line a refusal.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub refusal: Option<Refusal>,
    pub log: bool,
}

#[derive(Debug)]
struct Entry {
    conns: usize,
    /// Logins this source may still make now, refilled at the rate since `refilled`.
    tokens: f64,
    refilled: Instant,
    logged: Option<Instant>,
}

impl Entry {
    fn refill(&mut self, now: Instant, rate: u32) {
        let capacity = f64::from(rate.max(1));
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(capacity);
        self.refilled = now;
    }

    /// Nothing to remember: no open connection and a full bucket.
    fn is_idle(&self, now: Instant, rate: u32) -> bool {
        if self.conns > 0 {
            return false;
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        rate == 0 || self.tokens + elapsed * f64::from(rate) >= f64::from(rate)
    }
}

#[derive(Debug)]
struct Table {
    entries: HashMap<IpAddr, Entry>,
    cap: usize,
    /// Times the table was full of busy entries and dropped every one without a connection.
    resets: u64,
}

/// The per-source table. Shared by every client task; each call holds the lock for a hash
/// lookup (and, rarely, a sweep), never across an await.
#[derive(Debug)]
pub struct Admission {
    table: Mutex<Table>,
    /// The limits, set at start and by RELOAD; read without the lock, so a process with both
    /// off pays two loads per connection.
    max_conn_per_addr: AtomicUsize,
    login_rate_per_addr: AtomicU32,
}

impl Default for Admission {
    fn default() -> Self {
        Admission::with_cap(MAX_TRACKED_ADDRS)
    }
}

/// Held for as long as a connection from a tracked source is open; gives its count back on
/// drop. `None` inside when the source is not tracked (a Unix socket, limits off, table full).
pub struct AddrSlot {
    /// Boxed: the slot lives as long as the connection, in every client's task, and most
    /// sources are untracked (the limits are off by default).
    held: Option<Box<(Arc<Admission>, IpAddr)>>,
    /// Open connections from this source, this one included (0 when untracked).
    pub count: usize,
}

impl Drop for AddrSlot {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            let (admission, key) = *held;
            admission.disconnect(key);
        }
    }
}

/// The key a source is tracked under: an IPv4 address (IPv4-mapped IPv6 included) as is, an
/// IPv6 address by its /64, the smallest block a host is normally given.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

impl Admission {
    pub fn with_cap(cap: usize) -> Admission {
        Admission {
            table: Mutex::new(Table {
                entries: HashMap::new(),
                cap,
                resets: 0,
            }),
            max_conn_per_addr: AtomicUsize::new(0),
            login_rate_per_addr: AtomicU32::new(0),
        }
    }

    /// New limits (start, RELOAD). Connections already open keep whether they were counted.
    pub fn set_limits(&self, limits: AdmissionLimits) {
        self.max_conn_per_addr
            .store(limits.max_conn_per_addr, Ordering::Relaxed);
        self.login_rate_per_addr
            .store(limits.login_rate_per_addr, Ordering::Relaxed);
    }

    pub fn limits(&self) -> AdmissionLimits {
        AdmissionLimits {
            max_conn_per_addr: self.max_conn_per_addr.load(Ordering::Relaxed),
            login_rate_per_addr: self.login_rate_per_addr.load(Ordering::Relaxed),
        }
    }

    /// Counts a new connection from `ip` (at accept). The returned slot holds the count until
    /// the connection ends.
    pub fn connect(self: &Arc<Self>, ip: Option<IpAddr>, now: Instant) -> AddrSlot {
        let limits = self.limits();
        let untracked = AddrSlot {
            held: None,
            count: 0,
        };
        let Some(ip) = ip.filter(|_| !limits.is_off()) else {
            return untracked;
        };
        let key = source_key(ip);
        let Ok(mut t) = self.table.lock() else {
            return untracked;
        };
        if !t.entries.contains_key(&key) && !t.make_room(now, limits.login_rate_per_addr) {
            return untracked;
        }
        let entry = t.entries.entry(key).or_insert_with(|| Entry {
            conns: 0,
            tokens: f64::from(limits.login_rate_per_addr.max(1)),
            refilled: now,
            logged: None,
        });
        entry.conns += 1;
        let count = entry.conns;
        drop(t);
        AddrSlot {
            held: Some(Box::new((self.clone(), key))),
            count,
        }
    }

    fn disconnect(&self, key: IpAddr) {
        if let Ok(mut t) = self.table.lock() {
            if let Some(e) = t.entries.get_mut(&key) {
                e.conns = e.conns.saturating_sub(1);
            }
        }
    }

    /// Decides a login from `ip`, which had `count` open connections (this one included) when
    /// it was accepted (`AddrSlot::count`; 0: untracked, admitted): over the connection cap,
    /// or out of tokens, is a refusal; an admitted login spends a token.
    pub fn login(&self, ip: Option<IpAddr>, count: usize, now: Instant) -> Verdict {
        let limits = self.limits();
        let admit = Verdict {
            refusal: None,
            log: false,
        };
        let Some(ip) = ip.filter(|_| count > 0) else {
            return admit;
        };
        let Ok(mut t) = self.table.lock() else {
            return admit;
        };
        let Some(e) = t.entries.get_mut(&source_key(ip)) else {
            return admit;
        };
        let refusal = if limits.max_conn_per_addr > 0 && count > limits.max_conn_per_addr {
            Some(Refusal::Connections {
                limit: limits.max_conn_per_addr,
            })
        } else if limits.login_rate_per_addr > 0 {
            let rate = limits.login_rate_per_addr;
            e.refill(now, rate);
            if e.tokens >= 1.0 {
                e.tokens -= 1.0;
                None
            } else {
                let wait = (1.0 - e.tokens) / f64::from(rate);
                Some(Refusal::Rate {
                    limit: rate,
                    retry_after: Duration::from_secs_f64(wait),
                })
            }
        } else {
            None
        };
        let log = refusal.is_some()
            && e.logged
                .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
        if log {
            e.logged = Some(now);
        }
        Verdict { refusal, log }
    }

    /// Sources tracked now (SHOW LISTS `client_addrs`).
    pub fn tracked(&self) -> usize {
        self.table.lock().map(|t| t.entries.len()).unwrap_or(0)
    }

    /// Times the table filled with busy entries and forgot every one without a connection.
    pub fn resets(&self) -> u64 {
        self.table.lock().map(|t| t.resets).unwrap_or(0)
    }
}

impl Table {
    /// Room for one more entry: first forget sources with nothing to remember; if every
    /// entry is busy (a flood from many addresses), forget every one without an open
    /// connection, which gives a flooding source a fresh bucket but keeps memory bounded.
    /// False only when every entry has an open connection.
    fn make_room(&mut self, now: Instant, rate: u32) -> bool {
        if self.entries.len() < self.cap {
            return true;
        }
        self.entries.retain(|_, e| !e.is_idle(now, rate));
        if self.entries.len() < self.cap {
            return true;
        }
        self.resets += 1;
        self.entries.retain(|_, e| e.conns > 0);
        self.entries.len() < self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    const RATE_5: AdmissionLimits = AdmissionLimits {
        max_conn_per_addr: 0,
        login_rate_per_addr: 5,
    };

    /// One connection that logs in and leaves at once.
    fn log_in_and_leave(a: &Arc<Admission>, src: &str) -> Verdict {
        let slot = a.connect(ip(src), Instant::now());
        a.login(ip(src), slot.count, Instant::now())
    }

    fn admission(cap: usize, limits: AdmissionLimits) -> Arc<Admission> {
        let a = Arc::new(Admission::with_cap(cap));
        a.set_limits(limits);
        a
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_may_burst_one_seconds_worth_then_logins_at_the_rate() {
        let a = admission(MAX_TRACKED_ADDRS, RATE_5);
        for _ in 0..5 {
            assert_eq!(log_in_and_leave(&a, "10.0.0.1").refusal, None);
        }
        let v = log_in_and_leave(&a, "10.0.0.1");
        match v.refusal {
            Some(Refusal::Rate { limit, retry_after }) => {
                assert_eq!(limit, 5);
                // One token comes back every 200 ms.
                assert!(retry_after > Duration::from_millis(190), "{retry_after:?}");
                assert!(retry_after <= Duration::from_millis(200), "{retry_after:?}");
            }
            other => panic!("expected a rate refusal, got {other:?}"),
        }
        // Not before the token is back, and right after it.
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(log_in_and_leave(&a, "10.0.0.1").refusal.is_some());
        tokio::time::advance(Duration::from_millis(60)).await;
        assert_eq!(log_in_and_leave(&a, "10.0.0.1").refusal, None);
        // Another source has its own bucket.
        assert_eq!(log_in_and_leave(&a, "10.0.0.2").refusal, None);
        // Over ten seconds a hammering source gets the rate, not more.
        let mut admitted = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            if log_in_and_leave(&a, "10.0.0.1").refusal.is_none() {
                admitted += 1;
            }
        }
        assert!((49..=51).contains(&admitted), "{admitted}");
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_at_most_once_a_second_per_source() {
        let a = admission(
            MAX_TRACKED_ADDRS,
            AdmissionLimits {
                max_conn_per_addr: 0,
                login_rate_per_addr: 1,
            },
        );
        assert!(!log_in_and_leave(&a, "10.0.0.1").log);
        let mut logged = 0;
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(19)).await;
            let v = log_in_and_leave(&a, "10.0.0.1");
            logged += usize::from(v.log);
            assert!(!v.log || v.refusal.is_some());
        }
        // 1.9 s of refusals (with one admitted login a second): two lines.
        assert_eq!(logged, 2);
        assert!(log_in_and_leave(&a, "10.0.0.2").refusal.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_connection_cap_counts_open_connections_and_frees_on_close() {
        let a = admission(
            MAX_TRACKED_ADDRS,
            AdmissionLimits {
                max_conn_per_addr: 2,
                login_rate_per_addr: 0,
            },
        );
        let now = Instant::now();
        let one = a.connect(ip("10.0.0.1"), now);
        let two = a.connect(ip("10.0.0.1"), now);
        assert_eq!(a.login(ip("10.0.0.1"), one.count, now).refusal, None);
        assert_eq!(a.login(ip("10.0.0.1"), two.count, now).refusal, None);
        let three = a.connect(ip("10.0.0.1"), now);
        assert_eq!(
            a.login(ip("10.0.0.1"), three.count, now).refusal,
            Some(Refusal::Connections { limit: 2 })
        );
        drop(three);
        drop(one);
        let again = a.connect(ip("10.0.0.1"), now);
        assert_eq!(a.login(ip("10.0.0.1"), again.count, now).refusal, None);
        // Unix sockets and limits that are off are not tracked at all.
        assert_eq!(a.connect(None, now).count, 0);
        drop((two, again));
        assert_eq!(a.tracked(), 1);
        a.set_limits(AdmissionLimits::default());
        assert_eq!(a.connect(ip("10.0.0.9"), now).count, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_sources_cannot_grow_the_table_past_its_cap() {
        let a = admission(
            100,
            AdmissionLimits {
                max_conn_per_addr: 10,
                login_rate_per_addr: 1,
            },
        );
        // Ten sources stay connected throughout.
        let held: Vec<_> = (0..10)
            .map(|i| a.connect(ip(&format!("10.1.0.{i}")), Instant::now()))
            .collect();
        for i in 0..10_000u32 {
            let src = format!("10.{}.{}.{}", 2 + i / 65536, (i / 256) % 256, i % 256);
            log_in_and_leave(&a, &src);
            assert!(a.tracked() <= 100);
        }
        assert!(a.resets() > 0);
        // The connected sources were never forgotten: their counts still hold.
        for (i, slot) in held.iter().enumerate() {
            let again = a.connect(ip(&format!("10.1.0.{i}")), Instant::now());
            assert_eq!(again.count, slot.count + 1);
        }
        // Idle sources are swept without a reset once their buckets refill.
        let resets = a.resets();
        tokio::time::advance(Duration::from_secs(2)).await;
        log_in_and_leave(&a, "10.200.0.1");
        assert_eq!(a.resets(), resets);
    }

    #[test]
    fn ipv6_sources_are_keyed_by_their_64_and_mapped_ipv4_as_ipv4() {
        let k = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2:aaaa::1"), k("2001:db8:1:2:bbbb::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:10.0.0.1"), k("10.0.0.1"));
        assert_eq!(k("10.0.0.1"), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn messages_name_the_limit_and_when_to_retry() {
        let m = Refusal::Rate {
            limit: 20,
            retry_after: Duration::from_millis(37),
        }
        .message("127.0.0.2");
        assert!(m.contains("client_login_rate_per_addr = 20"), "{m}");
        assert!(m.contains("retry in 37 ms"), "{m}");
        let m = Refusal::Connections { limit: 3 }.message("127.0.0.2");
        assert!(m.contains("max_client_conn_per_addr = 3"), "{m}");
    }
}
