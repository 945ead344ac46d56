//! Why server connections were closed, counted per reason. `upstream` closes a connection with
//! exactly one [`CloseReason`] (as PgBouncer's `disconnect_server(…, "reason")`); operators read
//! the counts in `SHOW SERVER_CLOSES` and `breakwater_server_closes_total{reason}`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a server connection was closed instead of going back to its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client left mid-query and the server could not be brought back to idle (a message
    /// half sent, COPY IN, or no end within the cancel grace).
    ClientGone,
    /// The client left inside a transaction and the ROLLBACK did not leave the server idle.
    RollbackFailed,
    /// `server_reset_query` failed.
    ResetFailed,
    /// `server_reset_query` did not finish in time.
    ResetTimedOut,
    /// The SET that gives a server a client's session parameters failed.
    ParamSyncFailed,
    /// The client broke the protocol while it held the server.
    ClientProtocolError,
    /// The server sent something Breakwater could not account for (a malformed message, bytes
    /// after the transaction ended).
    ServerProtocolError,
    /// Reading from or writing to the server failed: it closed or the network broke.
    ServerLost,
    /// `query_timeout` expired and the server did not answer the cancel.
    QueryTimeout,
    /// `idle_transaction_timeout` expired with the transaction open.
    IdleTransactionTimeout,
    /// `client_idle_timeout` expired on a session-mode client holding the server.
    ClientIdleTimeout,
    /// `server_unresponsive_timeout` expired and the socket looked dead.
    Unresponsive,
    /// `server_lifetime` reached.
    Lifetime,
    /// `server_idle_timeout` reached while idle in the pool.
    IdleTimeout,
    /// Opened before RECONNECT, KILL or a RELOAD that re-pointed its database.
    StaleEpoch,
    /// Its host changed role (or a failure drill took the host down) since it was opened.
    RoleChanged,
    /// The server closed it (or sent something unasked) while it sat idle in the pool.
    ClosedWhileIdle,
    /// `server_check_query` failed on a connection idle past `server_check_delay`.
    CheckFailed,
    /// PAUSE closes idle server connections.
    Paused,
    /// The pool was closed (its database removed by RELOAD, or shutdown).
    PoolClosed,
    /// The pool's size was lowered (RELOAD, SET) below the connections it had.
    PoolResized,
    /// Idle, and its fleet slot is being given back (`fleet_release_delay`) or the control
    /// connection was lost (down to `fleet_min_share`).
    FleetRelease,
    /// The database's `connect_query` failed on the new connection.
    ConnectQueryFailed,
    /// A client's cancel for its query could not be confirmed delivered (the database did not
    /// take it in time): it may still arrive, and would stop the next client's query.
    CancelUnconfirmed,
}

impl CloseReason {
    /// Every reason, in the order views list them.
    pub const ALL: [CloseReason; 24] = [
        CloseReason::ClientGone,
        CloseReason::RollbackFailed,
        CloseReason::ResetFailed,
        CloseReason::ResetTimedOut,
        CloseReason::ParamSyncFailed,
        CloseReason::ClientProtocolError,
        CloseReason::ServerProtocolError,
        CloseReason::ServerLost,
        CloseReason::QueryTimeout,
        CloseReason::IdleTransactionTimeout,
        CloseReason::ClientIdleTimeout,
        CloseReason::Unresponsive,
        CloseReason::Lifetime,
        CloseReason::IdleTimeout,
        CloseReason::StaleEpoch,
        CloseReason::RoleChanged,
        CloseReason::ClosedWhileIdle,
        CloseReason::CheckFailed,
        CloseReason::Paused,
        CloseReason::PoolClosed,
        CloseReason::PoolResized,
        CloseReason::FleetRelease,
        CloseReason::ConnectQueryFailed,
        CloseReason::CancelUnconfirmed,
    ];

    /// The label in SHOW SERVER_CLOSES, the metric and the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientGone => "client_gone_mid_query",
            CloseReason::RollbackFailed => "rollback_failed",
            CloseReason::ResetFailed => "reset_failed",
            CloseReason::ResetTimedOut => "reset_timed_out",
            CloseReason::ParamSyncFailed => "param_sync_failed",
            CloseReason::ClientProtocolError => "client_protocol_error",
            CloseReason::ServerProtocolError => "server_protocol_error",
            CloseReason::ServerLost => "server_lost",
            CloseReason::QueryTimeout => "query_timeout",
            CloseReason::IdleTransactionTimeout => "idle_transaction_timeout",
            CloseReason::ClientIdleTimeout => "client_idle_timeout",
            CloseReason::Unresponsive => "server_unresponsive",
            CloseReason::Lifetime => "server_lifetime",
            CloseReason::IdleTimeout => "server_idle_timeout",
            CloseReason::StaleEpoch => "stale_epoch",
            CloseReason::RoleChanged => "role_changed",
            CloseReason::ClosedWhileIdle => "closed_while_idle",
            CloseReason::CheckFailed => "check_failed",
            CloseReason::Paused => "paused",
            CloseReason::PoolClosed => "pool_closed",
            CloseReason::PoolResized => "pool_resized",
            CloseReason::FleetRelease => "fleet_release",
            CloseReason::ConnectQueryFailed => "connect_query_failed",
            CloseReason::CancelUnconfirmed => "cancel_unconfirmed",
        }
    }

    /// Closes that are the pool working as configured (logged at info); the others mean
    /// something went wrong and are logged as warnings.
    pub fn is_routine(self) -> bool {
        matches!(
            self,
            CloseReason::Lifetime
                | CloseReason::IdleTimeout
                | CloseReason::StaleEpoch
                | CloseReason::RoleChanged
                | CloseReason::Paused
                | CloseReason::PoolClosed
                | CloseReason::PoolResized
                | CloseReason::FleetRelease
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One counter per [`CloseReason`].
#[derive(Debug, Default)]
pub struct CloseCounts {
    counts: [AtomicU64; CloseReason::ALL.len()],
}

impl CloseCounts {
    pub fn record(&self, reason: CloseReason) {
        if let Some(c) = self.counts.get(reason.index()) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// The count for each reason, in [`CloseReason::ALL`]'s order.
    pub fn snapshot(&self) -> [u64; CloseReason::ALL.len()] {
        std::array::from_fn(|i| self.counts.get(i).map_or(0, |c| c.load(Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_and_a_distinct_label() {
        let counts = CloseCounts::default();
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "ALL is in declaration order");
            for _ in 0..=i {
                counts.record(*r);
            }
        }
        let snap = counts.snapshot();
        for (i, n) in snap.iter().enumerate() {
            assert_eq!(*n, i as u64 + 1);
        }
        let mut labels: Vec<_> = CloseReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), CloseReason::ALL.len());
    }
}
