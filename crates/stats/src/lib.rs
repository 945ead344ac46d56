//! Plain statistics for Breakwater. The data path writes relaxed atomics; the admin console, the
//! metrics exporter and the stats log read a [`PoolSnapshot`]. Nothing here ever locks a pool or
//! reaches into a session.

pub mod host;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

pub use host::{Breaker, HostSnapshot, HostStats, Phase};

/// Totals and gauges for one pool (database, user). Times are microseconds, as in PgBouncer.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub database: String,
    pub user: String,
    pub xact_count: AtomicU64,
    pub query_count: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub xact_time_us: AtomicU64,
    pub query_time_us: AtomicU64,
    pub wait_time_us: AtomicU64,
    pub wait_count: AtomicU64,
    pub server_resets: AtomicU64,
    /// Parse messages clients sent for named statements.
    pub client_parse_count: AtomicU64,
    /// Parse messages sent to servers (a client's, or one injected before a Bind).
    pub server_parse_count: AtomicU64,
    pub bind_count: AtomicU64,
    pub server_connects: AtomicU64,
    pub server_connect_failures: AtomicU64,
    /// Clients logged in to this pool that hold a server.
    pub cl_active: AtomicI64,
    /// Clients waiting for a server.
    pub cl_waiting: AtomicI64,
    /// Clients logged in to this pool and idle.
    pub cl_idle: AtomicI64,
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
    pub cl_active: i64,
    pub cl_waiting: i64,
    pub cl_idle: i64,
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
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    #[inline]
    pub fn gauge(gauge: &AtomicI64, delta: i64) {
        gauge.fetch_add(delta, Relaxed);
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        PoolSnapshot {
            database: self.database.clone(),
            user: self.user.clone(),
            xact_count: self.xact_count.load(Relaxed),
            query_count: self.query_count.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            xact_time_us: self.xact_time_us.load(Relaxed),
            query_time_us: self.query_time_us.load(Relaxed),
            wait_time_us: self.wait_time_us.load(Relaxed),
            wait_count: self.wait_count.load(Relaxed),
            server_resets: self.server_resets.load(Relaxed),
            client_parse_count: self.client_parse_count.load(Relaxed),
            server_parse_count: self.server_parse_count.load(Relaxed),
            bind_count: self.bind_count.load(Relaxed),
            server_connects: self.server_connects.load(Relaxed),
            server_connect_failures: self.server_connect_failures.load(Relaxed),
            cl_active: self.cl_active.load(Relaxed),
            cl_waiting: self.cl_waiting.load(Relaxed),
            cl_idle: self.cl_idle.load(Relaxed),
        }
    }
}

/// Process-wide counters that belong to no pool (logins are refused before a pool is known).
#[derive(Debug, Default)]
pub struct GlobalStats {
    pub clients_total: AtomicU64,
    pub clients_current: AtomicI64,
    pub login_failures: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub refused_max_client_conn: AtomicU64,
    pub cancel_requests: AtomicU64,
    /// Timeouts by setting, each also logged where it fires.
    pub timeouts_query_wait: AtomicU64,
    pub timeouts_client_login: AtomicU64,
    pub timeouts_client_idle: AtomicU64,
    pub timeouts_idle_transaction: AtomicU64,
    pub timeouts_query: AtomicU64,
    pub timeouts_server_unresponsive: AtomicU64,
}

impl GlobalStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
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
}
