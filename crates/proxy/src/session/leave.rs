//! Giving a server up: back to the pool at a transaction boundary (reset first if the client
//! left session state), or, for a client that left mid-transaction, made clean for nobody or
//! closed. Every path asks the ledger's `handover()` what stands in the way.

use std::time::Instant;

use bytes::BytesMut;
use futures_util::FutureExt;
use proto::frontend;
use stats::PoolStats;
use upstream::{discard, CloseReason};

use super::timers::CANCEL_GRACE;
use super::{Held, Session};
use crate::cancel::ClientState;
use crate::internal_timeout;
use crate::ledger::{Handover, Sent};
use crate::settings::PoolMode;

impl Session {
    /// Gives a server back at a transaction boundary, resetting it first if the client left
    /// session state (or always, in session mode).
    pub(super) async fn release(&mut self, mut h: Held) {
        // A server that held the client's advisory locks is reset whatever its last
        // transaction did: the locks were taken transactions ago.
        let reset = h.ledger.leaves_state() || self.mode == PoolMode::Session || h.pinned;
        // The ledger (its queue's allocation) stays for the next transaction.
        h.ledger.clear();
        std::mem::swap(&mut self.scratch.spare_ledger, &mut h.ledger);
        if !self.cancel.slot.clear_now() {
            self.cancel.slot.cancels_sent().await;
        }
        if self.cancel.slot.take_unconfirmed() {
            h.server.mark_broken(CloseReason::CancelUnconfirmed);
        }
        self.enter(ClientState::Idle);
        // A broken server is closed as it is: a reset on it would be a round trip for nothing,
        // and could read a late reply as the reset's.
        if let Some(reason) = h.server.broken_reason() {
            discard(h.server, reason);
            return;
        }
        let stats = &self.entry.stats;
        if reset {
            PoolStats::add(&stats.server_resets, 1);
            let reset = Box::pin(upstream::timer::timeout(
                internal_timeout(&self.settings),
                h.server.simple_query(&self.settings.server_reset_query),
            ))
            .await;
            match reset {
                Ok(Ok(())) => {
                    // DISCARD ALL (the default) also drops prepared statements.
                    h.server.after_reset();
                    // Idle from now, not from the transaction's end.
                    h.clock.last_server_byte = Instant::now();
                }
                Ok(Err(e)) => {
                    tracing::warn!(server = h.server.id(), error = %e, "server_reset_query failed");
                    discard(h.server, CloseReason::ResetFailed);
                    return;
                }
                Err(_) => {
                    discard(h.server, CloseReason::ResetTimedOut);
                    return;
                }
            }
        }
        // Not broken: checked above, and a reset that succeeds leaves it as it was.
        if !h.server.buf().is_empty() {
            // The server sent something after the ReadyForQuery that ended the transaction.
            discard(h.server, CloseReason::ServerProtocolError);
        } else if !self.entry.pool.still_wanted(&h.server) {
            discard(h.server, CloseReason::RoleChanged);
        } else {
            // The transaction ended with the server's last bytes: no clock read of its own.
            h.server.give_back_at(h.clock.last_server_byte);
        }
    }

    /// Counts the transaction in SHOW STATS (xact_count, xact_time): the pump when it ends, or
    /// `abandon` when its client left. The clock then runs for the next one on the same server
    /// (in session mode, or for a client pinned by an advisory lock).
    pub(super) fn count_transaction(&self, h: &mut Held) {
        let stats = &self.entry.stats;
        PoolStats::add(&stats.xact_count, 1);
        // The transaction ended with the server's last bytes: no clock read of its own.
        let ended = h.clock.last_server_byte;
        let took = ended.saturating_duration_since(h.clock.since);
        PoolStats::add(&stats.xact_time_us, took.as_micros() as u64);
        h.clock.since = ended;
    }

    /// The client left (or broke the protocol) while holding a server. Nothing it started may
    /// outlive it: a running query is stopped and its replies read (see `finish_for_nobody`),
    /// an open transaction is rolled back, and the server verified idle; anything less certain
    /// (a half-sent message, COPY IN, a server that does not finish) closes the connection.
    pub(super) async fn abandon(&mut self, mut h: Held) {
        if h.ledger.handover() == Handover::Owes && !self.finish_for_nobody(&mut h).await {
            return self.close_server(h, CloseReason::ClientGone).await;
        }
        match h.ledger.handover() {
            Handover::Clean => {}
            Handover::NeedsRollback => {
                let rollback = Box::pin(upstream::timer::timeout(
                    internal_timeout(&self.settings),
                    h.server.simple_query("ROLLBACK"),
                ))
                .await;
                if !matches!(rollback, Ok(Ok(()))) {
                    return self.close_server(h, CloseReason::RollbackFailed).await;
                }
                h.ledger.rolled_back();
            }
            Handover::Owes => {
                return self.close_server(h, CloseReason::ClientGone).await;
            }
            Handover::HalfMessage => {
                return self.close_server(h, CloseReason::ClientGone).await;
            }
            Handover::CopyIn => {
                return self.close_server(h, CloseReason::ClientGone).await;
            }
        }
        if !h.server.buf().is_empty() {
            return self.close_server(h, CloseReason::ServerProtocolError).await;
        }
        self.count_transaction(&mut h);
        self.release(h).await;
    }

    /// Closes a server that cannot be given to anyone else; `discard` logs and counts why.
    pub(super) async fn close_server(&mut self, h: Held, reason: CloseReason) {
        self.cancel.slot.clear().await;
        discard(h.server, reason);
    }

    /// The client left while the server still owed it replies. Closing the server connection
    /// would have the pool open another, a fork and a login on the database, and clients vanish
    /// mid-query mostly when the database is slow already (applications time out and hang
    /// up). So: stop the query (a cancel, unless the replies are in already), read what the
    /// server still sends, for nobody, and keep the connection. Its replies go through the
    /// same scan as ever, so a SET, a failed Parse or a temp table in them is accounted for.
    /// `false` when not done in CANCEL_GRACE: then it is closed, as before.
    async fn finish_for_nobody(&mut self, h: &mut Held) -> bool {
        if self.shutting_down() {
            return false;
        }
        if h.ledger.batch_open() {
            // The server waits for the rest of the batch; a Sync ends it.
            let mut sync = BytesMut::with_capacity(proto::frame::HEADER_LEN);
            frontend::write_sync(&mut sync);
            if h.server.write_all(&sync).await.is_err() {
                return false;
            }
            let _ = h.ledger.on_client(Sent::Sync);
        }
        // What has arrived already, buffered or in the socket: a cancel costs the database a
        // process of its own, not worth it for replies that are in. A few reads at most: a
        // server streaming a large result always has more.
        for _ in 0..4 {
            match self.drain_for_nobody(h) {
                Ok(true) => return true,
                Ok(false) => {}
                Err(_) => return false,
            }
            match h.server.read().now_or_never() {
                Some(Ok(_)) => {}
                Some(Err(_)) => return false,
                None => break,
            }
        }
        // The cancel's wait for the server to close its end means the signal is delivered
        // before anything else is sent on this connection; arriving at an idle backend, it is
        // ignored there. A cancel not confirmed in time may still arrive, during the next
        // client's query: then the server is not kept.
        if h.server.cancel_target().send(CANCEL_GRACE).await.is_err() {
            return false;
        }
        let drained = upstream::timer::timeout(CANCEL_GRACE, async {
            loop {
                match self.drain_for_nobody(h) {
                    Ok(true) => return true,
                    Ok(false) => {}
                    Err(_) => return false,
                }
                if h.server.read().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        let kept = drained == Ok(true);
        tracing::debug!(server = h.server.id(), kept, "client left mid-query");
        kept
    }

    /// Scans what the server has sent, as for a client, and drops it. True once it owes
    /// nothing more.
    fn drain_for_nobody(&mut self, h: &mut Held) -> Result<bool, proto::error::PgError> {
        let scanned = self.scan_server(h);
        self.scratch.to_client.clear();
        scanned?;
        Ok(h.ledger.handover() != Handover::Owes)
    }
}
