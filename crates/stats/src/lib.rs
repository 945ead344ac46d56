//! Plain statistics for Breakwater. The data path writes relaxed atomics (and records durations
//! into lock-free histograms); the admin console, the metrics exporter and the stats log read a
//! [`PoolSnapshot`]. Nothing here ever locks a pool or reaches into a session. This is the only
//! crate that calls the `metrics` macros ([`export`]).

pub mod close;
pub mod export;
pub mod histogram;

pub mod host;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

pub use close::{CloseCounts, CloseReason};
pub use host::{Breaker, HostSnapshot, HostStats, Phase};

pub use histogram::{Histogram, HistogramSnapshot};

/// Something the data path adds to: a plain counter, or a time total that also records each
/// addition as one sample in its histogram.
pub trait Counter {
    fn add(&self, n: u64);
}

impl Counter for AtomicU64 {
    #[inline]
    fn add(&self, n: u64) {
        self.fetch_add(n, Relaxed);
    }
}

/// A total of microseconds plus the distribution of the individual durations that made it.
#[derive(Debug, Default)]
pub struct TimeStat {
    total_us: AtomicU64,
    hist: Histogram,
}

impl Counter for TimeStat {
    #[inline]
    fn add(&self, us: u64) {
        self.total_us.fetch_add(us, Relaxed);
        self.hist.record(us);
    }
}

impl TimeStat {
    pub fn total_us(&self) -> u64 {
        self.total_us.load(Relaxed)
    }
}

/// Orders every [`StampedCounter`] move in the process, so two of them can tell which moved
/// last without a clock (two moves in the same millisecond are still ordered).
static MOVES: AtomicU64 = AtomicU64::new(0);

/// A counter that also remembers when, among all stamped counters, it last moved. Readiness
/// asks of a pool "did its last connect attempt succeed?" by comparing the stamps of its
/// success and failure counters: no lock, no extra write on the path that counts.
#[derive(Debug, Default)]
pub struct StampedCounter {
    count: AtomicU64,
    /// 0 until the first move.
    stamp: AtomicU64,
}

impl Counter for StampedCounter {
    #[inline]
    fn add(&self, n: u64) {
        self.count.fetch_add(n, Relaxed);
        self.stamp.store(MOVES.fetch_add(1, Relaxed) + 1, Relaxed);
    }
}

impl StampedCounter {
    pub fn load(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Larger for a later move; 0 when it never moved.
    pub fn last_moved(&self) -> u64 {
        self.stamp.load(Relaxed)
    }
}

/// Adds one to a gauge for as long as it lives: a connect counted in `sv_login` stops counting
/// however it ends, including when the checkout driving it is dropped.
pub struct GaugeGuard<'a>(&'a AtomicI64);

impl<'a> GaugeGuard<'a> {
    pub fn new(gauge: &'a AtomicI64) -> Self {
        gauge.fetch_add(1, Relaxed);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(-1, Relaxed);
    }
}

/// Totals and gauges for one pool (database, user). Times are microseconds, as in PgBouncer.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub database: String,
    pub user: String,
    pub xact_count: AtomicU64,
    pub query_count: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// One sample per transaction (server held from checkout to release).
    pub xact_time_us: TimeStat,
    /// One sample per query (request sent until its CommandComplete/ReadyForQuery).
    pub query_time_us: TimeStat,
    /// One sample per checkout: how long the client waited for a server.
    pub wait_time_us: TimeStat,
    /// Checkouts (PgBouncer's `server_assignment_count`).
    pub wait_count: AtomicU64,
    pub server_resets: AtomicU64,
    /// Parse messages clients sent for named statements.
    pub client_parse_count: AtomicU64,
    /// Parse messages sent to servers (a client's, or one injected before a Bind).
    pub server_parse_count: AtomicU64,
    pub bind_count: AtomicU64,
    /// Connection attempts to servers that succeeded / failed (any phase); readiness compares
    /// when each last moved.
    pub server_connects: StampedCounter,
    pub server_connect_failures: StampedCounter,
    /// One sample per successful connect + login.
    pub connect_time_us: TimeStat,
    /// Failed connection attempts by phase.
    pub connect_timeouts: AtomicU64,
    pub login_timeouts: AtomicU64,
    pub connect_refused: AtomicU64,
    /// Checkouts that gave up after `query_wait_timeout`.
    pub wait_timeouts: AtomicU64,
    /// Times a client that waited `reserve_pool_timeout` made the pool one larger.
    pub reserve_used: AtomicU64,
    /// Clients that logged in to this pool.
    pub client_logins: AtomicU64,
    /// Clients logged in to this pool that hold a server.
    pub cl_active: AtomicI64,
    /// Clients waiting for a server.
    pub cl_waiting: AtomicI64,
    /// Clients logged in to this pool, holding no server and not waiting for one. A client
    /// is in exactly one of cl_active, cl_waiting and cl_idle.
    pub cl_idle: AtomicI64,
    /// Server connections being opened: connect, TLS and login (PgBouncer's `sv_login`).
    pub sv_login: AtomicI64,
    /// Server connections closed, by reason.
    pub server_closes: CloseCounts,
    /// Transaction-mode LISTEN (the pool's listener connection): clients listening, channels
    /// it listens to, notifications put into clients' inboxes, notifications a full inbox
    /// dropped, and times its connection was lost.
    pub listen_clients: AtomicI64,
    pub listen_channels: AtomicI64,
    pub notifications_sent: AtomicU64,
    pub notifications_dropped: AtomicU64,
    pub listener_reconnects: AtomicU64,
}

/// A consistent-enough copy of one pool's counters for readers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolSnapshot {
    pub database: String,
    pub user: String,
    pub xact_count: u64,
    pub query_count: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub xact_time_us: u64,
    pub query_time_us: u64,
    pub wait_time_us: u64,
    pub wait_count: u64,
    pub server_resets: u64,
    pub client_parse_count: u64,
    pub server_parse_count: u64,
    pub bind_count: u64,
    pub server_connects: u64,
    pub server_connect_failures: u64,
    pub connect_time_us: u64,
    pub connect_timeouts: u64,
    pub login_timeouts: u64,
    pub connect_refused: u64,
    pub wait_timeouts: u64,
    pub reserve_used: u64,
    pub client_logins: u64,
    pub cl_active: i64,
    pub cl_waiting: i64,
    pub cl_idle: i64,
    pub sv_login: i64,
    pub listen_clients: i64,
    pub listen_channels: i64,
    pub notifications_sent: u64,
    pub notifications_dropped: u64,
    pub listener_reconnects: u64,
    /// Server connections closed, by reason, in [`CloseReason::ALL`]'s order.
    pub server_closes: [u64; CloseReason::ALL.len()],
    pub xact_hist: HistogramSnapshot,
    pub query_hist: HistogramSnapshot,
    pub wait_hist: HistogramSnapshot,
    pub connect_hist: HistogramSnapshot,
}

impl PoolStats {
    pub fn new(database: &str, user: &str) -> Self {
        PoolStats {
            database: database.to_owned(),
            user: user.to_owned(),
            ..Default::default()
        }
    }

    #[inline]
    pub fn add<C: Counter + ?Sized>(counter: &C, n: u64) {
        counter.add(n);
    }

    #[inline]
    pub fn gauge(gauge: &AtomicI64, delta: i64) {
        gauge.fetch_add(delta, Relaxed);
    }

    /// Whether the most recent connection attempt of this pool failed (false before any).
    pub fn last_connect_failed(&self) -> bool {
        self.server_connect_failures.last_moved() > self.server_connects.last_moved()
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        PoolSnapshot {
            database: self.database.clone(),
            user: self.user.clone(),
            xact_count: self.xact_count.load(Relaxed),
            query_count: self.query_count.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            xact_time_us: self.xact_time_us.total_us(),
            query_time_us: self.query_time_us.total_us(),
            wait_time_us: self.wait_time_us.total_us(),
            wait_count: self.wait_count.load(Relaxed),
            server_resets: self.server_resets.load(Relaxed),
            client_parse_count: self.client_parse_count.load(Relaxed),
            server_parse_count: self.server_parse_count.load(Relaxed),
            bind_count: self.bind_count.load(Relaxed),
            server_connects: self.server_connects.load(),
            server_connect_failures: self.server_connect_failures.load(),
            connect_time_us: self.connect_time_us.total_us(),
            connect_timeouts: self.connect_timeouts.load(Relaxed),
            login_timeouts: self.login_timeouts.load(Relaxed),
            connect_refused: self.connect_refused.load(Relaxed),
            wait_timeouts: self.wait_timeouts.load(Relaxed),
            reserve_used: self.reserve_used.load(Relaxed),
            client_logins: self.client_logins.load(Relaxed),
            cl_active: self.cl_active.load(Relaxed),
            cl_waiting: self.cl_waiting.load(Relaxed),
            cl_idle: self.cl_idle.load(Relaxed),
            sv_login: self.sv_login.load(Relaxed),
            listen_clients: self.listen_clients.load(Relaxed),
            listen_channels: self.listen_channels.load(Relaxed),
            notifications_sent: self.notifications_sent.load(Relaxed),
            notifications_dropped: self.notifications_dropped.load(Relaxed),
            listener_reconnects: self.listener_reconnects.load(Relaxed),
            server_closes: self.server_closes.snapshot(),
            xact_hist: self.xact_time_us.hist.snapshot(),
            query_hist: self.query_time_us.hist.snapshot(),
            wait_hist: self.wait_time_us.hist.snapshot(),
            connect_hist: self.connect_time_us.hist.snapshot(),
        }
    }
}

/// Per-second rates and per-event mean times between two snapshots of the same pool, as
/// PgBouncer's `avg_*` columns (times in microseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Averages {
    pub server_assignment_count: u64,
    pub xact_count: u64,
    pub query_count: u64,
    pub recv: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
    pub client_parse_count: u64,
    pub server_parse_count: u64,
    pub bind_count: u64,
    pub client_connect_count: u64,
}

/// Percentiles over a period (or a lifetime), in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub wait_p50: u64,
    pub wait_p99: u64,
    pub xact_p50: u64,
    pub xact_p99: u64,
    pub query_p50: u64,
    pub query_p99: u64,
    pub connect_p50: u64,
    pub connect_p99: u64,
}

impl PoolSnapshot {
    /// Rates per second and mean times from `earlier` to `self`, `secs` apart.
    pub fn averages(&self, earlier: &PoolSnapshot, secs: f64) -> Averages {
        let d = |now: u64, then: u64| now.saturating_sub(then);
        let rate = |now: u64, then: u64| {
            if secs > 0.0 {
                (d(now, then) as f64 / secs) as u64
            } else {
                0
            }
        };
        let mean = |now: u64, then: u64, n: u64| d(now, then).checked_div(n).unwrap_or(0);
        let xacts = d(self.xact_count, earlier.xact_count);
        let queries = d(self.query_count, earlier.query_count);
        let waits = d(self.wait_count, earlier.wait_count);
        Averages {
            server_assignment_count: rate(self.wait_count, earlier.wait_count),
            xact_count: rate(self.xact_count, earlier.xact_count),
            query_count: rate(self.query_count, earlier.query_count),
            recv: rate(self.bytes_received, earlier.bytes_received),
            sent: rate(self.bytes_sent, earlier.bytes_sent),
            xact_time: mean(self.xact_time_us, earlier.xact_time_us, xacts),
            query_time: mean(self.query_time_us, earlier.query_time_us, queries),
            wait_time: mean(self.wait_time_us, earlier.wait_time_us, waits),
            client_parse_count: rate(self.client_parse_count, earlier.client_parse_count),
            server_parse_count: rate(self.server_parse_count, earlier.server_parse_count),
            bind_count: rate(self.bind_count, earlier.bind_count),
            client_connect_count: rate(self.client_logins, earlier.client_logins),
        }
    }

    /// p50/p99 of what was recorded since `earlier` (or over the pool's lifetime with `None`).
    pub fn percentiles(&self, earlier: Option<&PoolSnapshot>) -> Percentiles {
        let pick = |now: &HistogramSnapshot, then: Option<&HistogramSnapshot>| match then {
            Some(t) => now.since(t),
            None => now.clone(),
        };
        let wait = pick(&self.wait_hist, earlier.map(|e| &e.wait_hist));
        let xact = pick(&self.xact_hist, earlier.map(|e| &e.xact_hist));
        let query = pick(&self.query_hist, earlier.map(|e| &e.query_hist));
        let connect = pick(&self.connect_hist, earlier.map(|e| &e.connect_hist));
        Percentiles {
            wait_p50: wait.quantile(0.5),
            wait_p99: wait.quantile(0.99),
            xact_p50: xact.quantile(0.5),
            xact_p99: xact.quantile(0.99),
            query_p50: query.quantile(0.5),
            query_p99: query.quantile(0.99),
            connect_p50: connect.quantile(0.5),
            connect_p99: connect.quantile(0.99),
        }
    }

    /// Adds another pool's counters into this one (for per-database and global totals).
    /// Histograms are not merged.
    pub fn accumulate(&mut self, o: &PoolSnapshot) {
        self.xact_count += o.xact_count;
        self.query_count += o.query_count;
        self.bytes_received += o.bytes_received;
        self.bytes_sent += o.bytes_sent;
        self.xact_time_us += o.xact_time_us;
        self.query_time_us += o.query_time_us;
        self.wait_time_us += o.wait_time_us;
        self.wait_count += o.wait_count;
        self.server_resets += o.server_resets;
        self.client_parse_count += o.client_parse_count;
        self.server_parse_count += o.server_parse_count;
        self.bind_count += o.bind_count;
        self.server_connects += o.server_connects;
        self.server_connect_failures += o.server_connect_failures;
        self.connect_time_us += o.connect_time_us;
        self.connect_timeouts += o.connect_timeouts;
        self.login_timeouts += o.login_timeouts;
        self.connect_refused += o.connect_refused;
        self.wait_timeouts += o.wait_timeouts;
        self.client_logins += o.client_logins;
        self.cl_active += o.cl_active;
        self.cl_waiting += o.cl_waiting;
        self.cl_idle += o.cl_idle;
        self.sv_login += o.sv_login;
        for (a, b) in self.server_closes.iter_mut().zip(o.server_closes) {
            *a += b;
        }
    }

    /// `(reason, count)` for every reason that closed at least one connection.
    pub fn closes(&self) -> impl Iterator<Item = (CloseReason, u64)> + '_ {
        CloseReason::ALL
            .into_iter()
            .zip(self.server_closes)
            .filter(|(_, n)| *n > 0)
    }
}

/// One database's fleet budget as this process sees it (SHOW FLEET, `breakwater_fleet_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetSnapshot {
    pub database: String,
    pub budget: usize,
    pub min_share: usize,
    /// Slots this process holds advisory locks for.
    pub held: usize,
    /// Slots it wants now: what its pools need, at least the min share, at most the budget.
    pub wanted: usize,
    /// Server connections it may open now (the slot semaphore's permits, used or not).
    pub allowed: usize,
    /// Slots the whole fleet holds, as `pg_locks` last showed them.
    pub fleet_total: Option<usize>,
    /// The control connection is up.
    pub connected: bool,
    /// The advisory-lock key (`k1`) of the database's slots.
    pub key: i32,
}

/// Process-wide counters that belong to no pool (logins are refused before a pool is known).
#[derive(Debug, Default)]
pub struct GlobalStats {
    pub clients_total: AtomicU64,
    pub clients_current: AtomicI64,
    /// Idle clients parked without a task of their own (see the proxy's `park`), now.
    pub clients_parked: AtomicI64,
    pub login_failures: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub refused_max_client_conn: AtomicU64,
    pub refused_max_user_client_connections: AtomicU64,
    pub refused_max_db_client_connections: AtomicU64,
    /// Logins refused by `max_client_conn_per_addr` / `client_login_rate_per_addr`.
    pub refused_client_conn_per_addr: AtomicU64,
    pub refused_client_login_rate: AtomicU64,
    pub cancel_requests: AtomicU64,
    /// Clients that closed their connection while queued for a server (never served).
    pub clients_left_waiting: AtomicU64,
    /// Client connections that broke (a read or write error: reset, or keepalive or
    /// client_tcp_user_timeout gave up on a vanished host) while the client held a server.
    pub clients_lost: AtomicU64,
    /// Timeouts by setting, each also logged where it fires.
    pub timeouts_query_wait: AtomicU64,
    pub timeouts_client_login: AtomicU64,
    pub timeouts_client_idle: AtomicU64,
    pub timeouts_idle_transaction: AtomicU64,
    pub timeouts_query: AtomicU64,
    pub timeouts_server_unresponsive: AtomicU64,
    pub admin_logins: AtomicU64,
    /// auth_query: lookups run on the database, logins answered from the cache (or by a
    /// lookup another login ran), and lookups that failed (each login that shared one counts).
    pub auth_query_lookups: AtomicU64,
    pub auth_query_cache_hits: AtomicU64,
    pub auth_query_failures: AtomicU64,
    /// ErrorResponses Breakwater itself sent to clients, by SQLSTATE class.
    pub client_errors: ErrorClasses,
}

/// SQLSTATE classes Breakwater raises; anything else counts as `other`.
pub const ERROR_CLASSES: [&str; 12] = [
    "08", "0A", "22", "25", "28", "3D", "42", "53", "54", "57", "XX", "other",
];

/// One counter per SQLSTATE class in [`ERROR_CLASSES`].
#[derive(Debug, Default)]
pub struct ErrorClasses {
    counts: [AtomicU64; ERROR_CLASSES.len()],
}

impl ErrorClasses {
    pub fn record(&self, sqlstate: &str) {
        let class = sqlstate.get(..2).unwrap_or("");
        let i = ERROR_CLASSES
            .iter()
            .position(|c| *c == class)
            .unwrap_or(ERROR_CLASSES.len() - 1);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// `(class, count)` for every class.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        ERROR_CLASSES
            .iter()
            .zip(&self.counts)
            .map(|(class, c)| (*class, c.load(Relaxed)))
            .collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GlobalSnapshot {
    pub clients_total: u64,
    pub login_failures: u64,
    pub protocol_errors: u64,
    pub refused_max_client_conn: u64,
    pub refused_max_user_client_connections: u64,
    pub refused_max_db_client_connections: u64,
    pub refused_client_conn_per_addr: u64,
    pub refused_client_login_rate: u64,
    pub cancel_requests: u64,
    pub clients_left_waiting: u64,
    pub clients_lost: u64,
    pub clients_parked: u64,
    pub admin_logins: u64,
    pub auth_query_lookups: u64,
    pub auth_query_cache_hits: u64,
    pub auth_query_failures: u64,
    pub client_errors: Vec<(&'static str, u64)>,
    pub timeouts_query_wait: u64,
    pub timeouts_client_login: u64,
    pub timeouts_client_idle: u64,
    pub timeouts_idle_transaction: u64,
    pub timeouts_query: u64,
    pub timeouts_server_unresponsive: u64,
}

impl GlobalStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> GlobalSnapshot {
        GlobalSnapshot {
            clients_total: self.clients_total.load(Relaxed),
            login_failures: self.login_failures.load(Relaxed),
            protocol_errors: self.protocol_errors.load(Relaxed),
            refused_max_client_conn: self.refused_max_client_conn.load(Relaxed),
            refused_max_user_client_connections: self
                .refused_max_user_client_connections
                .load(Relaxed),
            refused_max_db_client_connections: self.refused_max_db_client_connections.load(Relaxed),
            refused_client_conn_per_addr: self.refused_client_conn_per_addr.load(Relaxed),
            refused_client_login_rate: self.refused_client_login_rate.load(Relaxed),
            cancel_requests: self.cancel_requests.load(Relaxed),
            clients_left_waiting: self.clients_left_waiting.load(Relaxed),
            clients_lost: self.clients_lost.load(Relaxed),
            clients_parked: self.clients_parked.load(Relaxed).max(0) as u64,
            admin_logins: self.admin_logins.load(Relaxed),
            auth_query_lookups: self.auth_query_lookups.load(Relaxed),
            auth_query_cache_hits: self.auth_query_cache_hits.load(Relaxed),
            auth_query_failures: self.auth_query_failures.load(Relaxed),
            client_errors: self.client_errors.snapshot(),
            timeouts_query_wait: self.timeouts_query_wait.load(Relaxed),
            timeouts_client_login: self.timeouts_client_login.load(Relaxed),
            timeouts_client_idle: self.timeouts_client_idle.load(Relaxed),
            timeouts_idle_transaction: self.timeouts_idle_transaction.load(Relaxed),
            timeouts_query: self.timeouts_query.load(Relaxed),
            timeouts_server_unresponsive: self.timeouts_server_unresponsive.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reflects_what_the_data_path_added() {
        let s = PoolStats::new("app", "u");
        PoolStats::add(&s.xact_count, 3);
        PoolStats::add(&s.bytes_sent, 100);
        PoolStats::gauge(&s.cl_waiting, 2);
        PoolStats::gauge(&s.cl_waiting, -1);
        let snap = s.snapshot();
        assert_eq!(
            (snap.xact_count, snap.bytes_sent, snap.cl_waiting),
            (3, 100, 1)
        );
        assert_eq!(snap.database, "app");
    }

    #[test]
    fn the_last_connect_outcome_is_whichever_counter_moved_last() {
        let s = PoolStats::new("app", "u");
        assert!(!s.last_connect_failed(), "no attempt yet");
        PoolStats::add(&s.server_connects, 1);
        assert!(!s.last_connect_failed());
        PoolStats::add(&s.server_connect_failures, 1);
        PoolStats::add(&s.server_connect_failures, 1);
        assert!(s.last_connect_failed());
        PoolStats::add(&s.server_connects, 1);
        assert!(!s.last_connect_failed());
        let snap = s.snapshot();
        assert_eq!((snap.server_connects, snap.server_connect_failures), (2, 2));
    }

    #[test]
    fn time_totals_also_feed_their_histogram() {
        let s = PoolStats::new("app", "u");
        PoolStats::add(&s.wait_time_us, 100);
        PoolStats::add(&s.wait_time_us, 300);
        let snap = s.snapshot();
        assert_eq!(snap.wait_time_us, 400);
        assert_eq!(snap.wait_hist.count(), 2);
        let p = snap.percentiles(None);
        assert!(p.wait_p99 >= 280 && p.wait_p99 <= 320, "{p:?}");
    }

    #[test]
    fn averages_are_rates_and_means_over_the_period() {
        let s = PoolStats::new("app", "u");
        let before = s.snapshot();
        PoolStats::add(&s.xact_count, 20);
        PoolStats::add(&s.xact_time_us, 2_000);
        PoolStats::add(&s.wait_count, 4);
        PoolStats::add(&s.wait_time_us, 400);
        let a = s.snapshot().averages(&before, 2.0);
        assert_eq!(a.xact_count, 10);
        assert_eq!(a.xact_time, 100);
        assert_eq!(a.wait_time, 100);
        assert_eq!(a.server_assignment_count, 2);
    }
}
