//! Getting a server: waiting in the pool's queue (with the query_wait_notify notice, and leaving
//! the queue when the client leaves), then making the server's session parameters the
//! client's. The welcome after login is here too: it may need a server to answer.

use std::future::Future;
use std::task::Poll;
use std::time::Instant;

use proto::backend::{self, TxStatus};
use proto::error::{PgError, SqlState};
use stats::{GlobalStats, PoolStats};
use upstream::{CheckoutError, CloseReason, ConnectError, PooledServer, QueryError};

use super::{Held, Session};
use crate::cancel::ClientState;
use crate::ledger::TxLedger;
use crate::settings::PoolMode;
use crate::{fmt_duration, internal_timeout, WelcomeParams};

/// How a wait for a server ended.
enum Waited {
    Served(Result<PooledServer, CheckoutError>),
    /// The client closed its connection while queued.
    ClientLeft,
    /// query_wait_notify's time has passed.
    Notify,
}

impl Session {
    /// Tells the client its session parameters, cancel key and readiness. The parameters come
    /// from the pool's cached welcome when the client asked for nothing that needs a server to
    /// canonicalise; otherwise one server round trip answers (and, in session mode, that server
    /// stays with the client).
    pub(super) async fn welcome(&mut self) -> Result<Option<Held>, PgError> {
        let cached = match self.entry.welcome.lock() {
            Ok(w) => w.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let mut held = None;
        let checked = self.entry.startup_settings_accepted(&self.params.extra);
        let server_params = match cached.filter(|w| checked && self.resolvable(&w.params)) {
            Some(w) => w,
            None => {
                self.enter(ClientState::Waiting);
                let server = self.checkout_raw().await;
                let (mut server, at) = server.inspect_err(|_| self.enter(ClientState::Idle))?;
                if server.is_pristine() {
                    if let Ok(mut w) = self.entry.welcome.lock() {
                        *w = Some(WelcomeParams::new(server.params()));
                    }
                }
                let synced = self.sync_params(&mut server).await;
                synced.inspect_err(|_| self.enter(ClientState::Idle))?;
                self.entry.accept_startup_settings(&self.params.extra);
                let p = WelcomeParams::new(server.params());
                if self.mode == PoolMode::Session {
                    self.cancel.slot.hold(server.cancel_target());
                    self.enter(ClientState::Active);
                    held = Some(Held::new(server, TxLedger::default(), at));
                } else {
                    self.enter(ClientState::Idle);
                }
                p
            }
        };
        self.params.complete_from(server_params.tracked());
        server_params.write_to(&mut self.client.out, |t| self.params.get_at(t));
        backend::write_backend_key_data(&mut self.client.out, self.cancel.pid, self.cancel.key);
        backend::write_ready_for_query(&mut self.client.out, TxStatus::Idle);
        if self.client.flush().await.is_err() {
            return Err(PgError::fatal(
                SqlState::CONNECTION_FAILURE,
                "client went away during login",
            ));
        }
        Ok(held)
    }

    /// Can the client's startup parameters be answered from the cached welcome without asking a
    /// server for their canonical spelling?
    fn resolvable(&self, welcome: &[(String, String)]) -> bool {
        self.params.reported().all(|(name, value)| {
            let server = welcome
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str());
            match server {
                Some(v) if v == value => true,
                // The server echoes short printable application names unchanged.
                Some(_) if name == "application_name" => {
                    value.len() < 64 && value.bytes().all(|b| (0x20..0x7f).contains(&b))
                }
                Some(_) => false,
                None => true,
            }
        })
    }

    /// Waits in the pool's queue for a server; returns it with when it was had.
    async fn checkout_raw(&mut self) -> Result<(PooledServer, Instant), PgError> {
        // Most checkouts find a server idle and a turn free: no future, one clock read (which
        // the pool's checks and the transaction's clock share), and a wait of zero (which adds
        // nothing to wait_time).
        let now = Instant::now();
        if let Some(server) = self.entry.pool.try_checkout_idle(now) {
            PoolStats::add(&self.entry.stats.wait_count, 1);
            return Ok((server, now));
        }
        let entry = self.entry.clone();
        let stats = &entry.stats;
        // The line the client waits in if it must (fair waiting), grouped as admission control
        // groups sources (an IPv6 host by its /64). From the address accept gave (the SHOW
        // CLIENTS row keeps it), not the socket's: getpeername was a system call per waiting
        // checkout, and at 256 clients on a pool of 16 nearly every checkout waits.
        let source = upstream::Source(
            self.cancel
                .remote
                .map(|a| crate::admission::source_key(a.ip())),
        );
        // The fast path's clock reading is the wait's start: it was taken just now.
        let start = now;
        // query_wait_notify's notice is due at `notify_at`; the checkout has the session's
        // alarm ring then (a timer of its own per waiting checkout, created, polled and
        // dropped, was about 350 instructions per transaction at 64 clients).
        let mut notify_at = self.settings.query_wait_notify.map(|n| start + n);
        // In a block: the checkout borrows the alarm, and must be gone before `self` is used.
        let (result, served_at) = {
            let scratch = &mut *self.scratch;
            let mut checkout = std::pin::pin!(entry.pool.checkout(
                start,
                self.settings.query_wait_timeout,
                notify_at,
                &mut scratch.alarm,
                &scratch.connecting,
                source,
            ));
            // One poll_fn rather than a select, so a waiting checkout is polled once per
            // wake-up, not once more for the client's sake.
            let mut left = false;
            let mut first = true;
            let result = loop {
                let client = &self.client.stream;
                let waited = std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = checkout.as_mut().poll(cx) {
                        return Poll::Ready(Waited::Served(r));
                    }
                    let connecting = checkout.is_connecting();
                    // A client that left while queued must not be served: its server would run
                    // a request nobody waits for any more (possibly minutes later, after the
                    // application retried it elsewhere). It leaves the queue at once, unless
                    // its checkout is making a connection: abandoned, that would waste the
                    // database's work on it (a backend forked, a login begun), when connects
                    // are slow already. That one is finished and the server given back.
                    if !left && client.poll_peer_closed(cx).is_ready() {
                        left = true;
                    }
                    if left {
                        return if connecting {
                            Poll::Pending
                        } else {
                            Poll::Ready(Waited::ClientLeft)
                        };
                    }
                    // The first poll comes right after `start`: no clock read for it.
                    if !std::mem::take(&mut first)
                        && notify_at.is_some_and(|at| Instant::now() >= at)
                    {
                        return Poll::Ready(Waited::Notify);
                    }
                    Poll::Pending
                })
                .await;
                match waited {
                    // Served after leaving: the server goes back to the pool unused.
                    Waited::Served(_) if left => break None,
                    Waited::Served(r) => break Some(r),
                    Waited::ClientLeft => break None,
                    Waited::Notify => {
                        // Tell the client why it waits, then keep waiting.
                        notify_at = None;
                        let after = self.settings.query_wait_notify.unwrap_or_default();
                        let status = entry.pool.status();
                        PgError::notice(format!(
                            "waiting for a server connection to database \"{}\" ({} of {} in use, {} clients waiting; query_wait_notify = {})",
                            entry.route.name,
                            status.active,
                            status.max_size,
                            status.waiting,
                            fmt_duration(after),
                        ))
                        .write(&mut self.client.out);
                        let _ = self.client.flush().await;
                    }
                }
            };
            (result, checkout.served_at())
        };
        let served = served_at.unwrap_or_else(Instant::now);
        PoolStats::add(
            &stats.wait_time_us,
            served.saturating_duration_since(start).as_micros() as u64,
        );
        PoolStats::add(&stats.wait_count, 1);
        let global = self.global();
        let Some(result) = result else {
            GlobalStats::bump(&global.clients_left_waiting);
            tracing::info!(waited = ?start.elapsed(), "client left while waiting for a server");
            return Err(PgError::fatal(
                SqlState::CONNECTION_FAILURE,
                "client closed the connection while waiting for a server",
            ));
        };
        result.map(|server| (server, served)).map_err(|e| {
            if matches!(e, CheckoutError::WaitTimeout { .. }) {
                GlobalStats::bump(&global.timeouts_query_wait);
            }
            tracing::warn!(error = %e, "no server connection for client");
            checkout_error(e)
        })
    }

    /// Waiting, then Active with a server whose parameters are the client's; returns it with
    /// when it was had (the transaction's start).
    pub(super) async fn checkout(&mut self) -> Result<(PooledServer, Instant), PgError> {
        self.enter(ClientState::Waiting);
        let server = self.checkout_raw().await;
        let (mut server, at) = server.inspect_err(|_| self.enter(ClientState::Idle))?;
        if let Err(e) = self.sync_params(&mut server).await {
            self.enter(ClientState::Idle);
            return Err(e);
        }
        self.cancel.slot.hold(server.cancel_target());
        self.enter(ClientState::Active);
        Ok((server, at))
    }

    /// Makes the server's session parameters match this client's; no round trip when they
    /// already do.
    pub(super) async fn sync_params(&mut self, server: &mut PooledServer) -> Result<(), PgError> {
        self.sync_params_in(server, TxStatus::Idle).await
    }

    /// [`Session::sync_params`] on a server whose transaction status is `status` (a client's
    /// open transaction, after a RESET in it).
    pub(super) async fn sync_params_in(
        &mut self,
        server: &mut PooledServer,
        status: TxStatus,
    ) -> Result<(), PgError> {
        let wanted = self.params.fingerprint();
        if server.params_match(wanted) {
            return Ok(());
        }
        let Some(sql) = self.params.sync_sql(server.params(), server.applied()) else {
            server.record_params_synced(wanted, None);
            return Ok(());
        };
        server.begin_params_sync();
        let result = Box::pin(upstream::timer::timeout(
            internal_timeout(&self.settings),
            async {
                match status {
                    TxStatus::InTransaction => server.simple_query_in_transaction(&sql).await,
                    _ => server.simple_query(&sql).await,
                }
            },
        ))
        .await;
        match result {
            Ok(Ok(())) => {
                let applied = self.params.unreported(server.params());
                self.params
                    .adopt_canonical(|name| server.param(name).map(str::to_owned));
                server.record_params_synced(self.params.fingerprint(), Some(applied));
                Ok(())
            }
            Ok(Err(QueryError::Server(f))) => {
                server.mark_broken(CloseReason::ParamSyncFailed);
                // An unknown name keeps PostgreSQL's own code, as a direct login would get.
                let code = if f.code == SqlState::UNDEFINED_OBJECT.0 {
                    SqlState::UNDEFINED_OBJECT
                } else {
                    SqlState::INVALID_PARAMETER_VALUE
                };
                Err(PgError::fatal(
                    code,
                    format!("could not apply session parameters: {}", f.message),
                ))
            }
            Ok(Err(e)) => {
                server.mark_broken(CloseReason::ParamSyncFailed);
                Err(PgError::fatal(
                    SqlState::CONNECTION_FAILURE,
                    format!("server connection failed while applying session parameters: {e}"),
                ))
            }
            Err(_) => {
                server.mark_broken(CloseReason::ParamSyncFailed);
                Err(PgError::fatal(
                    SqlState::CONNECTION_FAILURE,
                    "server did not answer while applying session parameters",
                ))
            }
        }
    }
}

/// Turns a failed checkout into what the client is told.
fn checkout_error(e: CheckoutError) -> PgError {
    match e {
        CheckoutError::Connect(ConnectError::BreakerOpen(_)) => {
            PgError::fatal(SqlState::CANNOT_CONNECT_NOW, e.to_string())
        }
        CheckoutError::WaitTimeout { .. } => {
            PgError::fatal(SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH, e.to_string())
        }
        CheckoutError::Connect(ConnectError::Refused { ref fields, .. }) => {
            let code = match fields.code.as_str() {
                "28P01" => SqlState::INVALID_PASSWORD,
                "28000" => SqlState::INVALID_AUTHORIZATION,
                "3D000" => SqlState::INVALID_CATALOG_NAME,
                "53300" => SqlState::TOO_MANY_CONNECTIONS,
                "57P03" => SqlState::CANNOT_CONNECT_NOW,
                _ => SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH,
            };
            PgError::fatal(code, e.to_string())
        }
        CheckoutError::Connect(_) => {
            PgError::fatal(SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH, e.to_string())
        }
        CheckoutError::Closed { .. } => PgError::fatal(SqlState::CANNOT_CONNECT_NOW, e.to_string()),
    }
}
