//! The state machine of one logged-in client.
//!
//! ```text
//!          readable            needs a server          idle ReadyForQuery, nothing owed
//!   Idle ───────────► Active ──────────────► (checkout, sync) ── pump ──► release ──► Idle
//!    │                  │ answered locally (Close/Parse/Sync), nothing unread ─────────► Idle
//!    │                  │ client gone or broke the protocol: abandon (roll back, or close)
//!    │                  │ server gone / timeout: close the server, FATAL to the client
//!    └─ EOF / timeout / shutdown ──► end
//! ```
//! Where each part lives: `idle.rs` waits for the client and answers what needs no server;
//! `checkout.rs` gets a server and makes its parameters the client's; `pump.rs` streams both
//! ways, telling the transaction ledger (`crate::ledger`) every message; `leave.rs` gives the
//! server back, or abandons it for a client that left, by the ledger's `handover()`;
//! `timers.rs` says which timeout comes next; `workspace.rs` lends the Active state its memory.
//!
//! What a client is doing is one [`ClientState`], changed only by [`Session::enter`], which
//! moves the pool's gauges and the SHOW CLIENTS row together.

mod checkout;
mod idle;
mod leave;
mod listen;
mod pump;
mod timers;
mod workspace;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use proto::error::{PgError, SqlState};
use stats::{GlobalStats, PoolStats};
use tokio::io::AsyncWriteExt;
use upstream::{CloseReason, PooledServer};

use crate::cancel::ClientState;
use crate::client_conn::ClientConn;
use crate::ledger::TxLedger;
use crate::params::ClientParams;
use crate::prepared::ClientStatements;
use crate::settings::{PoolMode, ProxySettings};
use crate::{PoolEntry, Shared};
use timers::Clock;
pub(crate) use workspace::{LentScratch, Workspaces};

/// A server this client holds, what the protocol still owes on it, and when things happened.
struct Held {
    server: PooledServer,
    ledger: TxLedger,
    clock: Clock,
    /// The statement in flight puts parameters the startup packet set back to the server's
    /// defaults; its replies are corrected to the startup values (see `pump`).
    reset: Option<crate::scan::Reset>,
    /// A reset left this server with defaults where the client has startup values: SET them
    /// before the client's next statement goes to it.
    restore_due: bool,
    /// The client's statements named an advisory lock function since the server last said
    /// whether it holds session advisory locks: ask again at the end of the transaction.
    advisory_unknown: bool,
    /// The server holds session advisory locks of this client (transaction mode): it stays
    /// with the client across transactions until they are released.
    pinned: bool,
    /// A LISTEN or UNLISTEN the client sent inside its transaction, taken out of the stream
    /// for Breakwater to answer (see `listen.rs`).
    listen: Option<crate::listen::Command>,
}

impl Held {
    /// `ledger` is a clear one handed down from the last transaction, so that a steady stream
    /// of transactions does not allocate a reply queue each.
    /// `at`: when the server was had, the transaction's start.
    fn new(server: PooledServer, ledger: TxLedger, at: Instant) -> Held {
        Held {
            server,
            ledger,
            clock: Clock::new(at),
            reset: None,
            restore_due: false,
            advisory_unknown: false,
            pinned: false,
            listen: None,
        }
    }
}

/// How the pump ended.
enum Step {
    /// The transaction ended; the server is idle and owes nothing.
    TxDone,
    /// The client disconnected (or sent Terminate).
    ClientGone,
    /// The client broke the protocol: tell it and close; the server did nothing wrong and is
    /// abandoned as for a client that left.
    ClientError(PgError),
    /// Tell the client this and close; the server (if held) is not reusable.
    Fatal(PgError),
}

/// What the client did while no server was needed.
enum Work {
    /// Sent something (Idle returns here, before reading: reading is the Active state's).
    Readable,
    /// Sent a request that needs a server.
    Message,
    /// Sent only what Breakwater answered itself, and nothing more yet.
    Answered,
    /// Left, or was told why it must (the error is sent already).
    Gone,
    /// Idle long enough to leave its task (see `crate::park`).
    Park,
}

/// Where a session goes after its Active state.
pub(crate) enum Next {
    /// Back to Idle: the transaction ended and the server went back to the pool.
    Idle,
    /// The client is gone, or was told why it must go.
    End,
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    settings: Arc<ProxySettings>,
    client: ClientConn,
    entry: Arc<PoolEntry>,
    params: ClientParams,
    /// This client's named prepared statements.
    statements: ClientStatements,
    /// The Active state's buffers and timer, lent by a workspace for one transaction;
    /// nothing while the client is idle.
    scratch: LentScratch,
    /// The client's SHOW CLIENTS row, which holds its BackendKeyData and its cancel slot.
    cancel: Arc<crate::registry::ClientInfo>,
    mode: PoolMode,
    /// What the client is doing; see [`Session::enter`].
    state: ClientState,
    /// client_idle_timeout's timer, re-armed for each idle period. Boxed, and only when the
    /// setting is on: inline, every idle client's task would carry a `Sleep` whether or not.
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The pool must write, so a 25006 from its server triggers a role re-check.
    watch_read_only: bool,
    /// Places under max_user_client_connections / max_db_client_connections, given back
    /// when the session is dropped.
    pub(crate) places: Option<Box<crate::caps::Places>>,
    /// The channels this client LISTENs to through its pool's listener connection
    /// (transaction and statement mode), from its first LISTEN on; dropped with the session,
    /// which takes it off them.
    listening: Option<Box<crate::listen::Subscription>>,
    /// The connection's places under max_client_conn and max_client_conn_per_addr, given
    /// back when the session is dropped: after its socket closes, as this field comes after
    /// `client`. Here rather than in the client's task, which is as large as its largest
    /// state (see `client::serve`).
    pub(crate) open: Option<(crate::ClientSlot, crate::admission::AddrSlot)>,
}

/// A session ends when it is dropped, however it ended: the client leaves the pool's gauges
/// and SHOW CLIENTS here, before the fields drop and its socket closes, so a row's kill handle
/// never outlives the socket it names.
impl Drop for Session {
    fn drop(&mut self) {
        PoolStats::gauge(gauge(&self.entry.stats, self.state), -1);
        self.shared.registry.unlist(&self.cancel);
        if self.shared.settings().log_disconnections {
            // From the row's connect time (the login's end): a second clock per client would
            // be 16 bytes of every idle client for one log line.
            let duration = self.cancel.connect_time.elapsed().unwrap_or_default();
            tracing::info!(?duration, "client closed");
        }
    }
}

/// The pool gauge that counts clients in `state`.
fn gauge(stats: &PoolStats, state: ClientState) -> &std::sync::atomic::AtomicI64 {
    match state {
        ClientState::Idle => &stats.cl_idle,
        ClientState::Waiting => &stats.cl_waiting,
        ClientState::Active => &stats.cl_active,
    }
}

impl Session {
    pub fn new(
        shared: &Arc<Shared>,
        settings: Arc<ProxySettings>,
        client: ClientConn,
        entry: Arc<PoolEntry>,
        params: ClientParams,
        cancel: Arc<crate::registry::ClientInfo>,
    ) -> Self {
        let mode = entry.route.pool_mode;
        let watch_read_only = entry.route.target_session_attrs.wants_writer();
        PoolStats::gauge(&entry.stats.cl_idle, 1);
        cancel.slot.set_state(ClientState::Idle);
        Session {
            shared: shared.clone(),
            settings,
            client,
            entry,
            params,
            statements: ClientStatements::default(),
            scratch: LentScratch::default(),
            cancel,
            mode,
            state: ClientState::Idle,
            idle_timer: None,
            watch_read_only,
            places: None,
            listening: None,
            open: None,
        }
    }

    /// The one place a client's state changes: the pool's gauges and the SHOW CLIENTS row
    /// move with it.
    fn enter(&mut self, next: ClientState) {
        if next == self.state {
            return;
        }
        let stats = &self.entry.stats;
        PoolStats::gauge(gauge(stats, self.state), -1);
        PoolStats::gauge(gauge(stats, next), 1);
        self.cancel.slot.set_state(next);
        self.state = next;
    }

    fn shutting_down(&self) -> bool {
        self.shared
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn global(&self) -> &GlobalStats {
        &self.shared.stats
    }

    /// Idle ⇄ Active until the client leaves. Idle runs here, in the client's task; Active
    /// runs in a workspace. Gives the session back so the caller decides when its socket
    /// closes.
    ///
    /// `None`: the client was parked (see `crate::park`), which resumes it in a new task.
    pub async fn run(self: Box<Self>) -> Option<Box<Self>> {
        // Boxed, like every rarely taken await that holds a large future: a task's memory is
        // its largest state, and an idle client should not carry the login path's.
        let (this, next) = Box::pin(self.start()).await;
        this.serve(next).await
    }

    /// [`Session::run`] for a parked session, in its new task: Idle again.
    /// `expired`: its client_idle_timeout expired while it was parked; it is told and ends.
    pub(crate) async fn resume(mut self: Box<Self>, expired: bool) -> Option<Box<Self>> {
        self.cancel.slot.unparked();
        if expired {
            Box::pin(self.idle_expired()).await;
            return Some(self);
        }
        self.serve(Next::Idle).await
    }

    async fn serve(mut self: Box<Self>, mut next: Next) -> Option<Box<Self>> {
        while let Next::Idle = next {
            match self.wait_for_client().await {
                Work::Gone => break,
                Work::Park => {
                    let shared = self.shared.clone();
                    match crate::park::park(&shared, self) {
                        Ok(()) => return None,
                        Err(back) => {
                            self = back;
                            self.cancel.slot.park_declined();
                            continue;
                        }
                    }
                }
                Work::Readable | Work::Message | Work::Answered => {}
            }
            (self, next) = self.activate(None).await;
        }
        // TLS says goodbye with close_notify. A plain socket's close sends the FIN by itself, so
        // it gets no shutdown(2): one syscall less per connection in a connection storm.
        if self.client.stream.is_tls() {
            let _ = self.client.stream.shutdown().await;
        }
        Some(self)
    }

    /// The client's socket, for the park to take off the reactor and put back.
    pub(crate) fn client_stream_mut(&mut self) -> &mut upstream::Stream {
        &mut self.client.stream
    }

    /// The deadline of client_idle_timeout's timer, which is dropped (the park keeps the
    /// deadline instead: a timer left in tokio's wheel would keep the ending task's waker).
    pub(crate) fn take_idle_deadline(&mut self) -> Option<tokio::time::Instant> {
        self.idle_timer.take().map(|t| t.deadline())
    }

    /// Before the session's task ends (it parks): see `CancelSlot::forget_waker`.
    pub(crate) fn forget_task_waker(&self) {
        self.cancel.slot.forget_waker();
    }

    /// The client's span, as its login made it, for a task that resumes it.
    pub(crate) fn span(&self) -> tracing::Span {
        let row = &self.cancel;
        tracing::info_span!(
            "client",
            id = row.id,
            addr = %crate::Peer(row.remote),
            db = %row.database,
            user = %row.user
        )
    }

    /// The welcome, then Idle; or in session mode, when a server answered the welcome, Active
    /// with that server.
    async fn start(mut self: Box<Self>) -> (Box<Self>, Next) {
        match self.welcome().await {
            Ok(held) => {
                // The login buffers go back: many clients log in and then sit idle, and the
                // first read or reply allocates what a working client keeps from then on.
                if self.client.buf.is_empty() {
                    self.client.buf = BytesMut::new();
                }
                if self.client.out.is_empty() {
                    self.client.out = BytesMut::new();
                }
                match held {
                    None => (self, Next::Idle),
                    Some(h) => self.activate(Some(Box::new(h))).await,
                }
            }
            Err(e) => {
                self.client.send_error(&e).await;
                (self, Next::End)
            }
        }
    }

    /// Runs the Active state in a spare workspace (or a new one) and gives the workspace back.
    /// `held` is boxed (it is rare: a server kept from the welcome in session mode) so that this
    /// future, which the Idle task holds, stays small.
    async fn activate(mut self: Box<Self>, held: Option<Box<Held>>) -> (Box<Self>, Next) {
        let held = held.map(|h| *h);
        // The scratch trades places with the session's empty one (no drop, no new one).
        let mut ws = match self.shared.workspaces.take() {
            Some(mut ws) => {
                self.scratch.swap(&mut ws.scratch);
                ws.future.restart(self, held);
                ws
            }
            None => Box::new(workspace::Workspace {
                future: Box::new(workspace::Restartable {
                    future: Box::pin(self.active(held)),
                    make: Session::active,
                }),
                scratch: LentScratch::default(),
            }),
        };
        let (mut session, next) = std::future::poll_fn(|cx| ws.future.poll_active(cx)).await;
        session.scratch.swap(&mut ws.scratch);
        session.shared.workspaces.give_back(ws);
        (session, next)
    }

    /// The future a workspace holds: owns the session for the length of the Active state.
    ///
    /// The client's read buffer comes with the workspace and goes back with it once the
    /// client has nothing unread: a client that worked and went idle again keeps no buffer
    /// (a read buffer grows to a few KiB, more than the rest of an idle client together).
    async fn active(mut self: Box<Self>, held: Option<Held>) -> (Box<Self>, Next) {
        // The scratch's alarm may last have been waited on by another client's task.
        self.scratch.alarm.new_owner();
        if self.client.buf.is_empty() {
            self.client.buf = std::mem::take(&mut self.scratch.client_buf);
        }
        let next = self.transaction(held).await;
        if self.client.buf.is_empty() {
            let buf = std::mem::take(&mut self.client.buf);
            if buf.capacity() > self.scratch.client_buf.capacity() {
                self.scratch.client_buf = buf;
            }
        } else if self.client.buf.capacity() > workspace::KEEP_CAPACITY {
            // Grown for a large message, with a little left unread: keep only that.
            self.client.buf = BytesMut::from(&self.client.buf[..]);
        }
        self.scratch.reset();
        (self, next)
    }

    /// Active: get a server (unless one is held already), stream until the transaction ends,
    /// give the server back. In session mode the server stays until the client leaves.
    async fn transaction(&mut self, mut held: Option<Held>) -> Next {
        if held.is_none() {
            match self.wait_for_work().await {
                Work::Message => {}
                Work::Answered | Work::Readable => return Next::Idle,
                Work::Gone => return Next::End,
                // Only the idle wait parks.
                Work::Park => return Next::Idle,
            }
        }
        loop {
            let h = match held.as_mut() {
                Some(h) => h,
                None => match self.checkout().await {
                    Ok((server, at)) => {
                        let ledger = std::mem::take(&mut self.scratch.spare_ledger);
                        held.insert(Held::new(server, ledger, at))
                    }
                    Err(e) => {
                        self.client.send_error(&e).await;
                        return Next::End;
                    }
                },
            };
            let step = self.pump(h).await;
            match step {
                Step::TxDone => {
                    let shutting_down = self.shutting_down();
                    if self.mode == PoolMode::Session && !shutting_down {
                        continue;
                    }
                    // A session advisory lock pins the client to its server until released:
                    // a reset would release it behind the client's back, and another client
                    // would be handed a server holding someone else's lock.
                    if !shutting_down
                        && (h.pinned || h.advisory_unknown)
                        && self.pinned_by_advisory_locks(h).await
                    {
                        // Its transaction ended: what it was sent meanwhile goes now (it gets
                        // nothing while it idles pinned, until the next one ends).
                        if Box::pin(self.deliver_notifications()).await.is_err() {
                            if let Some(h) = held.take() {
                                self.abandon(h).await;
                            }
                            return Next::End;
                        }
                        continue;
                    }
                    if let Some(h) = held.take() {
                        self.release(h).await;
                    }
                    if shutting_down {
                        self.client.send_error(&shutdown_error()).await;
                        return Next::End;
                    }
                    return Next::Idle;
                }
                Step::ClientGone => {
                    if let Some(h) = held.take() {
                        self.abandon(h).await;
                    }
                    return Next::End;
                }
                Step::ClientError(e) => {
                    tracing::warn!(code = e.code.0, "closing client: {}", e.message);
                    self.client.send_error(&e).await;
                    if let Some(h) = held.take() {
                        self.abandon(h).await;
                    }
                    return Next::End;
                }
                Step::Fatal(e) => {
                    if let Some(h) = held.take() {
                        // A fatal error that did not break the server is the client's doing
                        // (a transaction block in statement mode).
                        let reason = h
                            .server
                            .broken_reason()
                            .unwrap_or(CloseReason::ClientProtocolError);
                        self.close_server(h, reason).await;
                    }
                    tracing::warn!(code = e.code.0, "closing client: {}", e.message);
                    self.client.send_error(&e).await;
                    return Next::End;
                }
            }
        }
    }
}

impl Session {
    /// Does the server hold a session advisory lock taken by this client? Asked only after a
    /// transaction whose text named an advisory lock function (one round trip then); the
    /// answer stands until such text comes again, so a pinned client stays pinned through
    /// transactions that do not touch its locks.
    async fn pinned_by_advisory_locks(&mut self, h: &mut Held) -> bool {
        if !h.advisory_unknown {
            return h.pinned;
        }
        h.advisory_unknown = false;
        let check = Box::pin(upstream::timer::timeout(
            crate::internal_timeout(&self.settings),
            h.server.query_first_row(
                "SELECT count(*) FROM pg_catalog.pg_locks \
                 WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()",
            ),
        ))
        .await;
        let held = match check {
            Ok(Ok(row)) => row
                .first()
                .and_then(|v| v.as_deref())
                .is_some_and(|n| n != "0"),
            // The server is broken now (a failed internal query leaves it so): released, it
            // is closed, and its locks with it.
            _ => {
                tracing::warn!(
                    server = h.server.id(),
                    "could not ask the server about advisory locks; closing it"
                );
                false
            }
        };
        if held != h.pinned {
            tracing::info!(
                server = h.server.id(),
                "session advisory locks {} the client to its server",
                if held { "pin" } else { "no longer pin" }
            );
        }
        h.pinned = held;
        held
    }
}

fn shutdown_error() -> PgError {
    PgError::fatal(SqlState::ADMIN_SHUTDOWN, "Breakwater is shutting down")
}

fn server_lost(detail: &str) -> PgError {
    PgError::fatal(
        SqlState::CONNECTION_FAILURE,
        format!("server connection lost: {detail}"),
    )
}

fn protocol_violation(detail: impl Into<String>) -> PgError {
    PgError::fatal(SqlState::PROTOCOL_VIOLATION, detail)
}

#[cfg(test)]
mod sizes {
    fn output_size<A, B, C, D, R>(_: impl FnOnce(A, B, C, D) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// A tokio task is 96 bytes of its own plus its future, rounded up to 128: every idle
    /// client's task is `client::serve`'s future (and the binary's 8-byte wrapper), and at
    /// 160 bytes or less it is a 256-byte task, one of the blocks `breakwater::blocks` packs.
    /// It was 264 while the idle wait was a `select!` (a 384-byte task).
    #[test]
    fn an_idle_clients_task_fits_in_256_bytes() {
        let future = output_size(crate::client::serve);
        assert!(
            future + 8 <= 160,
            "client::serve's future is {future} bytes: an idle client's task grows by 128 \
             (box what only a rare path needs; see Session::wait_for_client)"
        );
    }
}
