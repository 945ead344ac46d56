//! The state machine of one logged-in client.
//!
//! ```text
//!          readable            needs a server          idle ReadyForQuery, nothing owed
//!   Idle ───────────► Active ──────────────► (checkout, sync) ── stream ──► release ──► Idle
//!    │                  │ answered locally (Close/Sync), nothing unread ──────────────► Idle
//!    │                  │ client gone: roll back and return, or close the server
//!    │                  │ server gone / protocol error: close server, FATAL to client
//!    └─ EOF / timeout / shutdown ──► end
//! ```
//! Idle runs in the client's task and only waits for the socket (no buffer, no server). Active
//! runs in a [`Workspace`] lent for the length of the transaction: it reads, answers what needs
//! no server, checks out, and streams. In the stream, only message headers are read, except
//! the few messages that decide where a transaction ends or what state it leaves:
//! ReadyForQuery, ParameterStatus, CommandComplete (server side) and Query, Parse, Sync,
//! FunctionCall, Terminate (client side). Everything else is forwarded as it arrives, even
//! before the whole message is in.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use proto::backend;
use proto::error::{PgError, SqlState};
use proto::frame::{self, HEADER_LEN};
use proto::frontend;
use stats::{GlobalStats, PoolStats};
use tokio::io::AsyncWriteExt;
use upstream::{discard, Alarm, CheckoutError, ConnectError, PooledServer, QueryError};

use crate::cancel::Registration;
use crate::client::{fmt_duration, ClientConn};
use crate::params::{tracked_name, ClientParams};
use crate::prepared::{
    write_close_statement, ClientStatements, Expect, Expectations, Statement, Verdict,
};
use crate::scan;
use crate::settings::{PoolMode, ProxySettings};
use crate::{internal_timeout, read_into, PoolEntry, Shared, WelcomeParams};

/// A server this client holds, and what the protocol still owes on it.
struct Held {
    server: PooledServer,
    /// ReadyForQuery messages still to come: one per Query, Sync and FunctionCall sent.
    owed: u32,
    /// Extended-protocol messages were sent since the last Sync.
    batch_open: bool,
    /// Transaction status from the last ReadyForQuery.
    status: u8,
    /// Bytes of a client message still to forward unexamined (a large CopyData or Bind).
    client_skip: usize,
    /// Bytes of a server message still to forward unexamined (a large DataRow).
    server_skip: usize,
    /// The client left session state on the server: reset it before anyone else gets it.
    dirty: bool,
    /// Requests sent (or answered by Breakwater) whose replies are still to come.
    expect: Expectations,
    /// The server is in COPY IN and the client has not ended it yet.
    copy_in_open: bool,
    since: Instant,
    query_since: Option<Instant>,
    last_server_byte: Instant,
    last_client_byte: Instant,
    /// When Breakwater cancelled the running query for query_timeout.
    cancel_sent: Option<Instant>,
}

impl Held {
    /// `expect` is an empty queue handed down from the last transaction, so that a steady
    /// stream of transactions does not allocate one each.
    fn new(server: PooledServer, expect: Expectations) -> Held {
        debug_assert!(expect.is_empty());
        let now = Instant::now();
        Held {
            server,
            owed: 0,
            batch_open: false,
            status: b'I',
            client_skip: 0,
            server_skip: 0,
            dirty: false,
            expect,
            copy_in_open: false,
            since: now,
            query_since: None,
            last_server_byte: now,
            last_client_byte: now,
            cancel_sent: None,
        }
    }

    /// At a transaction boundary the server can serve someone else.
    fn at_boundary(&self) -> bool {
        self.owed == 0
            && !self.batch_open
            && self.status == b'I'
            && self.client_skip == 0
            && self.server_skip == 0
            && self.expect.is_empty()
    }
}

enum Step {
    /// The transaction ended; the server is idle and owes nothing.
    TxDone,
    /// The client disconnected (or sent Terminate).
    ClientGone,
    /// Tell the client this and close; the server (if held) is not reusable.
    Fatal(PgError),
}

#[derive(Debug, Clone, Copy)]
enum Timer {
    None,
    IdleTransaction,
    ClientIdle,
    Query,
    CancelGrace,
    Unresponsive,
}

/// SQLSTATE of "cannot execute … in a read-only transaction".
const READ_ONLY_SQL_TRANSACTION: &str = "25006";

/// How long a cancelled query may take to stop before its server connection is dropped.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

enum Local {
    /// The batch was answered without a server.
    Answered,
    /// The batch so far needs no server, but it is not complete.
    NeedMore,
    NeedServer,
}

/// How a wait for a server ended.
enum Waited {
    Served(Result<PooledServer, CheckoutError>),
    /// The client closed its connection while queued.
    ClientLeft,
    /// query_wait_notify's time has passed.
    Notify(Duration),
}

/// A request in a batch answered without a server (see `Session::answer_locally`).
enum LocalAnswer {
    /// Close of the statement whose name is at `at..at + len` in the batch.
    Close { at: usize, len: usize },
    /// Parse of a known statement, named at `at..at + len`.
    Parse {
        at: usize,
        len: usize,
        stmt: Arc<Statement>,
    },
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
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    settings: Arc<ProxySettings>,
    client: ClientConn,
    entry: Arc<PoolEntry>,
    params: ClientParams,
    /// This client's named prepared statements.
    statements: ClientStatements,
    /// The Active state's buffers and timer, lent by a [`Workspace`] for one transaction;
    /// nothing while the client is idle.
    scratch: LentScratch,
    cancel: Registration,
    mode: PoolMode,
    /// client_idle_timeout's timer, re-armed for each idle period. Boxed, and only when the
    /// setting is on: inline, every idle client's task would carry a `Sleep` whether or not.
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The pool must write, so a 25006 from its server triggers a role re-check.
    watch_read_only: bool,
    /// Logged in at, for the disconnection log line.
    since: Instant,
}

/// A session ends when it is dropped, however it ended: the client leaves SHOW CLIENTS here,
/// before the fields drop and its socket closes, so a row's kill handle never outlives the
/// socket it names.
impl Drop for Session {
    fn drop(&mut self) {
        self.shared.registry.unlist(self.client.id);
        if self.shared.settings().log_disconnections {
            tracing::info!(duration = ?self.since.elapsed(), "client closed");
        }
    }
}

/// A session's [`Scratch`] while it is Active, lent by its workspace: one pointer, empty while
/// the client is idle (which most clients are, most of the time: inline, the empty scratch was
/// 152 of an idle session's 464 bytes). Only the Active state uses it; were anything to touch
/// it while idle, a mutable use would allocate one (see `DerefMut`), not fail.
#[derive(Default)]
pub(crate) struct LentScratch(Option<Box<Scratch>>);

impl std::ops::Deref for LentScratch {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        static EMPTY: std::sync::LazyLock<Scratch> = std::sync::LazyLock::new(Scratch::default);
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl std::ops::DerefMut for LentScratch {
    fn deref_mut(&mut self) -> &mut Scratch {
        self.0.get_or_insert_with(Box::default)
    }
}

/// What a transaction works with besides the server: reused from one transaction to the next
/// (of any client), so that a steady stream of transactions allocates nothing.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The session's timer for the Active state's timeouts.
    alarm: Alarm,
    /// The reply queue of the last transaction, kept (empty) for the next one.
    spare_expect: Expectations,
    /// Bytes on their way to the server / the client.
    to_server: BytesMut,
    to_client: BytesMut,
    /// A read buffer for the client: an idle client holds none (see `Session::active`).
    client_buf: BytesMut,
}

/// Where the Active state runs: the transaction's future on the heap, and its scratch.
///
/// A task's memory is the size of its largest state, and the Active state (checkout, pump,
/// release: some 2.8 KB) is many times the Idle one. Most clients are idle most of the time,
/// so the Active state lives in this box instead of in the task, and the box goes back to the
/// [`Workspaces`] list when the transaction ends. The next transaction of any client restarts
/// it in place (same future type: no allocation), so an idle client holds no room for a
/// transaction and a busy one allocates nothing per transaction. The price is a mutex to take
/// and give back the box and one move of the future per transaction (about 7 % more user-space
/// instructions per transaction by callgrind).
pub(crate) struct Workspace {
    future: Box<dyn ActiveFuture>,
    scratch: LentScratch,
}

/// The Active state's future, restarted in place for each transaction.
trait ActiveFuture: Send {
    /// Starts `session`'s Active state in place of the finished one: no allocation, and one
    /// move of the (large) future. tokio-util's `ReusableBoxFuture::set` moved it three times
    /// on the way in, which showed in the instructions per transaction.
    fn restart(&mut self, session: Box<Session>, held: Option<Held>);
    fn poll_active(&mut self, cx: &mut std::task::Context<'_>) -> Poll<(Box<Session>, Next)>;
}

/// `make` is [`Session::active`]; a generic is how its future's type gets a name.
struct Restartable<F> {
    future: Pin<Box<F>>,
    make: fn(Box<Session>, Option<Held>) -> F,
}

impl<F: Future<Output = (Box<Session>, Next)> + Send> ActiveFuture for Restartable<F> {
    fn restart(&mut self, session: Box<Session>, held: Option<Held>) {
        self.future.set((self.make)(session, held));
    }

    fn poll_active(&mut self, cx: &mut std::task::Context<'_>) -> Poll<(Box<Session>, Next)> {
        self.future.as_mut().poll(cx)
    }
}

/// Workspaces not in use, shared by every session. Boxed so that the one a transaction has
/// taken is a pointer in the Idle task's `activate` future, not 168 bytes of every client.
#[derive(Default)]
#[allow(clippy::vec_box)]
pub(crate) struct Workspaces(std::sync::Mutex<Vec<Box<Workspace>>>);

/// Spare workspaces kept after a burst of concurrent transactions; more are freed. As many
/// are in use as clients are in the Active state (waiting for a server included), so this only
/// bounds what a burst leaves behind.
const MAX_SPARE_WORKSPACES: usize = 256;

impl Workspaces {
    fn take(&self) -> Option<Box<Workspace>> {
        match self.0.lock() {
            Ok(mut spare) => spare.pop(),
            Err(poisoned) => poisoned.into_inner().pop(),
        }
    }

    fn give_back(&self, w: Box<Workspace>) {
        let mut spare = match self.0.lock() {
            Ok(spare) => spare,
            Err(poisoned) => poisoned.into_inner(),
        };
        if spare.len() < MAX_SPARE_WORKSPACES {
            spare.push(w);
        }
    }
}

/// Where a session goes after its Active state.
pub(crate) enum Next {
    /// Back to Idle: the transaction ended and the server went back to the pool.
    Idle,
    /// The client is gone, or was told why it must go.
    End,
}

impl Session {
    pub fn new(
        shared: &Arc<Shared>,
        settings: Arc<ProxySettings>,
        client: ClientConn,
        entry: Arc<PoolEntry>,
        params: ClientParams,
        cancel: Registration,
    ) -> Self {
        let mode = entry.route.pool_mode;
        let entry_wants_writer = entry.route.target_session_attrs.wants_writer();
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
            idle_timer: None,
            watch_read_only: entry_wants_writer,
            since: Instant::now(),
        }
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
    /// runs in a [`Workspace`]. Gives the session back so the caller decides when its socket
    /// closes.
    pub async fn run(self: Box<Self>) -> Box<Self> {
        PoolStats::gauge(&self.entry.stats.cl_idle, 1);
        // Boxed, like every rarely taken await that holds a large future: a task's memory is
        // its largest state, and an idle client should not carry the login path's.
        let (mut this, mut next) = Box::pin(self.start()).await;
        while let Next::Idle = next {
            if let Work::Gone = this.wait_for_client().await {
                break;
            }
            (this, next) = this.activate(None).await;
        }
        PoolStats::gauge(&this.entry.stats.cl_idle, -1);
        // TLS says goodbye with close_notify. A plain socket's close sends the FIN by itself, so
        // it gets no shutdown(2): one syscall less per connection in a connection storm.
        if this.client.stream.is_tls() {
            let _ = this.client.stream.shutdown().await;
        }
        this
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
                std::mem::swap(&mut self.scratch, &mut ws.scratch);
                ws.future.restart(self, held);
                ws
            }
            None => Box::new(Workspace {
                future: Box::new(Restartable {
                    future: Box::pin(self.active(held)),
                    make: Session::active,
                }),
                scratch: LentScratch::default(),
            }),
        };
        let (mut session, next) = std::future::poll_fn(|cx| ws.future.poll_active(cx)).await;
        std::mem::swap(&mut session.scratch, &mut ws.scratch);
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
        }
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
            }
        }
        loop {
            let h = match held.as_mut() {
                Some(h) => h,
                None => match self.checkout().await {
                    Ok(server) => {
                        let expect = std::mem::take(&mut self.scratch.spare_expect);
                        held.insert(Held::new(server, expect))
                    }
                    Err(e) => {
                        self.client.send_error(&e).await;
                        return Next::End;
                    }
                },
            };
            let stats = &self.entry.stats;
            PoolStats::gauge(&stats.cl_idle, -1);
            PoolStats::gauge(&stats.cl_active, 1);
            let step = self.pump(h).await;
            let stats = &self.entry.stats;
            PoolStats::gauge(&stats.cl_active, -1);
            PoolStats::gauge(&stats.cl_idle, 1);
            match step {
                Step::TxDone => {
                    let shutting_down = self.shutting_down();
                    if self.mode == PoolMode::Session && !shutting_down {
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
                Step::Fatal(e) => {
                    if let Some(h) = held.take() {
                        self.cancel.slot.set(None).await;
                        discard(h.server);
                    }
                    tracing::warn!(code = e.code.0, "closing client: {}", e.message);
                    self.client.send_error(&e).await;
                    return Next::End;
                }
            }
        }
    }

    /// Tells the client its session parameters, cancel key and readiness. The parameters come
    /// from the pool's cached welcome when the client asked for nothing that needs a server to
    /// canonicalise; otherwise one server round trip answers (and, in session mode, that server
    /// stays with the client).
    async fn welcome(&mut self) -> Result<Option<Held>, PgError> {
        let cached = match self.entry.welcome.lock() {
            Ok(w) => w.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let mut held = None;
        let checked = self.entry.startup_settings_accepted(&self.params.extra);
        let server_params = match cached.filter(|w| checked && self.resolvable(&w.params)) {
            Some(w) => w,
            None => {
                let mut server = self.checkout_raw().await?;
                if server.pristine {
                    if let Ok(mut w) = self.entry.welcome.lock() {
                        *w = Some(WelcomeParams::new(server.params()));
                    }
                }
                self.sync_params(&mut server).await?;
                self.entry.accept_startup_settings(&self.params.extra);
                let p = WelcomeParams::new(server.params());
                if self.mode == PoolMode::Session {
                    self.cancel.slot.set(Some(server.cancel_target())).await;
                    held = Some(Held::new(server, Expectations::default()));
                }
                p
            }
        };
        self.params.complete_from(server_params.tracked());
        server_params.write_to(&mut self.client.out, |t| self.params.get_at(t));
        backend::write_backend_key_data(&mut self.client.out, self.cancel.pid, self.cancel.key);
        backend::write_ready_for_query(&mut self.client.out, backend::TxStatus::Idle);
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

    /// Idle: waits until the client sends something, without reading it (so without a read
    /// buffer), or until it must go.
    async fn wait_for_client(&mut self) -> Work {
        loop {
            if !self.client.buf.is_empty() {
                return Work::Readable;
            }
            if self.shutting_down() {
                return Box::pin(self.send_fatal(shutdown_error())).await;
            }
            let idle = self.arm_idle_timer();
            tokio::select! {
                r = self.client.stream.readable() => return match r {
                    Ok(()) => Work::Readable,
                    Err(_) => Work::Gone,
                },
                () = self.cancel.slot.shutdown(&self.shared.shutting_down) => {}
                _ = expired(&mut self.idle_timer), if idle.is_some() => {
                    return Box::pin(self.send_fatal(idle_timeout_expired(self.global(), idle))).await;
                }
            }
        }
    }

    /// Active, before a server: reads until the client sends something that needs one,
    /// answering what needs none.
    async fn wait_for_work(&mut self) -> Work {
        loop {
            if self.client.buf.len() >= HEADER_LEN {
                if let Err(e) = frame::message_len(&self.client.buf, self.settings.max_message) {
                    let e = PgError::fatal(SqlState::PROTOCOL_VIOLATION, e.to_string());
                    return self.send_fatal(e).await;
                }
                match self.client.buf[0] {
                    frontend::TERMINATE => {
                        // Nothing after a Terminate counts. Emptied, the read buffer goes back
                        // to the workspace for the next client (see `active`) instead of being
                        // freed with this one: in a connection storm, where every client ends
                        // this way, that was a 4 KiB allocation per login.
                        self.client.buf.clear();
                        return Work::Gone;
                    }
                    _ => match self.answer_locally() {
                        Local::NeedServer => return Work::Message,
                        Local::Answered => {
                            if self.client.flush().await.is_err() {
                                return Work::Gone;
                            }
                            if self.client.buf.is_empty() {
                                return Work::Answered;
                            }
                            continue;
                        }
                        Local::NeedMore => {}
                    },
                }
            }
            // Idle found the client readable, so this read almost always completes at once:
            // try it before setting up the select (the shutdown watch, the idle timer).
            match read_into(&mut self.client.stream, &mut self.client.buf).now_or_never() {
                Some(Ok(0) | Err(_)) => return Work::Gone,
                Some(Ok(_)) => continue,
                None => {}
            }
            if self.shutting_down() {
                return self.send_fatal(shutdown_error()).await;
            }
            let idle = self.arm_idle_timer();
            tokio::select! {
                r = read_into(&mut self.client.stream, &mut self.client.buf) => match r {
                    Ok(0) | Err(_) => return Work::Gone,
                    Ok(_) => {}
                },
                () = self.cancel.slot.shutdown(&self.shared.shutting_down) => {}
                _ = expired(&mut self.idle_timer), if idle.is_some() => {
                    return self.send_fatal(idle_timeout_expired(self.global(), idle)).await;
                }
            }
        }
    }

    /// Arms client_idle_timeout's timer for a wait that starts now; returns the setting.
    fn arm_idle_timer(&mut self) -> Option<Duration> {
        let idle = self.settings.client_idle_timeout;
        if let Some(d) = idle {
            let at = tokio::time::Instant::now() + d;
            match &mut self.idle_timer {
                Some(timer) => timer.as_mut().reset(at),
                None => self.idle_timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        idle
    }

    /// Tells an idle client why it must go. Sent from inside the Idle state rather than
    /// returned, and boxed: an error and its send, carried in the Idle state's future, would
    /// take room in every client's task.
    async fn send_fatal(&mut self, e: PgError) -> Work {
        self.client.send_error(&e).await;
        Work::Gone
    }

    /// Outside a transaction, a batch of only Close (of a named statement), Parse (of a named
    /// statement this pool's servers have parsed for clients like this one), Flush and Sync
    /// needs no server: drivers close a statement whenever they drop it (tokio-postgres does),
    /// and many prepare each statement on its own round trip before using it (libpq's
    /// PQprepare). Answering here saves a checkout and a round trip, keeps such housekeeping
    /// off server connections that may be failing, and a client that prepares while other
    /// clients hold every server needs none (see [`prepared::KnownStatements`]).
    fn answer_locally(&mut self) -> Local {
        if self.settings.max_prepared_statements == 0 {
            return Local::NeedServer;
        }
        let buf = &self.client.buf;
        let mut pos = 0;
        // Where each Close's statement name is, and each Parse's statement, in batch order.
        let mut answers: Vec<LocalAnswer> = Vec::new();
        let end = loop {
            let rest = &buf[pos..];
            let Ok(Some(total)) = frame::message_len(rest, self.settings.max_message) else {
                // An incomplete message: a real request, or the rest of this batch.
                return if answers.is_empty() {
                    Local::NeedServer
                } else {
                    Local::NeedMore
                };
            };
            let body = &rest[HEADER_LEN..total];
            match rest[0] {
                frontend::CLOSE
                    if body.first() == Some(&b'S') && body.get(1).is_some_and(|b| *b != 0) =>
                {
                    answers.push(LocalAnswer::Close {
                        at: pos + HEADER_LEN + 1,
                        len: total - HEADER_LEN - 2,
                    });
                }
                // The unnamed statement (most extended-protocol queries) is the server's to
                // parse: its first byte, the name's terminator, says so.
                frontend::PARSE if body.first() == Some(&0) => return Local::NeedServer,
                frontend::PARSE => {
                    let Ok((name, _)) = frontend::parse_parse(body) else {
                        // Malformed: the Active state says so.
                        return Local::NeedServer;
                    };
                    let stmt = Statement::new(Bytes::copy_from_slice(&body[name.len() + 1..]));
                    if !self
                        .entry
                        .known_statements
                        .contains(self.params.fingerprint(), &stmt.global)
                    {
                        return Local::NeedServer;
                    }
                    answers.push(LocalAnswer::Parse {
                        at: pos + HEADER_LEN,
                        len: name.len(),
                        stmt: Arc::new(stmt),
                    });
                }
                // Flush: the client wants the replies so far, and no ReadyForQuery.
                frontend::FLUSH => break (pos + total, false),
                frontend::SYNC => break (pos + total, true),
                _ => return Local::NeedServer,
            }
            pos += total;
            if pos == buf.len() {
                return Local::NeedMore;
            }
        };
        let (end, sync) = end;
        let batch = self.client.buf.split_to(end).freeze();
        for answer in answers {
            match answer {
                LocalAnswer::Close { at, len } => {
                    self.statements.remove(&batch[at..at + len]);
                    backend::write_close_complete(&mut self.client.out);
                }
                LocalAnswer::Parse { at, len, stmt } => {
                    PoolStats::add(&self.entry.stats.client_parse_count, 1);
                    self.statements.insert(batch.slice(at..at + len), stmt);
                    backend::write_parse_complete(&mut self.client.out);
                }
            }
        }
        if sync {
            backend::write_ready_for_query(&mut self.client.out, backend::TxStatus::Idle);
        }
        Local::Answered
    }

    async fn checkout_raw(&mut self) -> Result<PooledServer, PgError> {
        let entry = self.entry.clone();
        let stats = &entry.stats;
        PoolStats::gauge(&stats.cl_waiting, 1);
        let start = Instant::now();
        // In a block: the checkout borrows the alarm, and must be gone before `self` is used.
        let result = {
            let mut checkout = std::pin::pin!(entry
                .pool
                .checkout(self.settings.query_wait_timeout, &mut self.scratch.alarm));
            // The notice's timer is set only once the checkout has to wait: most find a server
            // at once, and setting a timer and dropping it is a trip through the timer wheel's
            // lock each way (some 600 instructions per transaction). One poll_fn rather than a
            // select, so a waiting checkout is polled once per wake-up, not once more for the
            // timer's or the client's sake.
            let mut notify = self.settings.query_wait_notify;
            let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
            let mut left = false;
            loop {
                let client = &self.client.stream;
                let waited = std::future::poll_fn(|cx| {
                    upstream::took_connect_poll();
                    if let Poll::Ready(r) = checkout.as_mut().poll(cx) {
                        return Poll::Ready(Waited::Served(r));
                    }
                    let connecting = upstream::took_connect_poll();
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
                    if let Some(after) = notify {
                        if timer.is_none() {
                            timer.set(Some(tokio::time::sleep(after)));
                        }
                        if let Some(Poll::Ready(())) =
                            timer.as_mut().as_pin_mut().map(|t| t.poll(cx))
                        {
                            return Poll::Ready(Waited::Notify(after));
                        }
                    }
                    Poll::Pending
                })
                .await;
                match waited {
                    // Served after leaving: the server goes back to the pool unused.
                    Waited::Served(_) if left => break None,
                    Waited::Served(r) => break Some(r),
                    Waited::ClientLeft => break None,
                    Waited::Notify(after) => {
                        // Tell the client why it waits, then keep waiting.
                        notify = None;
                        let status = entry.pool.status();
                        PgError::notice(format!(
                            "waiting for a server connection to database \"{}\" ({} of {} in use, {} clients waiting; query_wait_notify = {})",
                            entry.route.name,
                            status.size.saturating_sub(status.available),
                            status.max_size,
                            status.waiting,
                            fmt_duration(after),
                        ))
                        .write(&mut self.client.out);
                        let _ = self.client.flush().await;
                    }
                }
            }
        };
        PoolStats::gauge(&stats.cl_waiting, -1);
        PoolStats::add(&stats.wait_time_us, start.elapsed().as_micros() as u64);
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
        result.map_err(|e| {
            if matches!(e, CheckoutError::WaitTimeout { .. }) {
                GlobalStats::bump(&global.timeouts_query_wait);
            }
            tracing::warn!(error = %e, "no server connection for client");
            checkout_error(e)
        })
    }

    async fn checkout(&mut self) -> Result<PooledServer, PgError> {
        self.cancel.slot.set_waiting(true);
        let server = self.checkout_raw().await;
        let mut server = server.inspect_err(|_| self.cancel.slot.set_waiting(false))?;
        if let Err(e) = self.sync_params(&mut server).await {
            self.cancel.slot.set_waiting(false);
            return Err(e);
        }
        self.cancel.slot.set(Some(server.cancel_target())).await;
        Ok(server)
    }

    /// Makes the server's session parameters match this client's; no round trip when they
    /// already do.
    async fn sync_params(&mut self, server: &mut PooledServer) -> Result<(), PgError> {
        let wanted = self.params.fingerprint();
        if server.params_synced_for == Some(wanted) {
            return Ok(());
        }
        let Some(sql) = self.params.sync_sql(server.params(), &server.applied) else {
            server.params_synced_for = Some(wanted);
            return Ok(());
        };
        server.pristine = false;
        server.params_synced_for = None;
        let result = Box::pin(tokio::time::timeout(
            internal_timeout(&self.settings),
            server.simple_query(&sql),
        ))
        .await;
        match result {
            Ok(Ok(())) => {
                server.applied = self.params.unreported(server.params());
                self.params
                    .adopt_canonical(|name| server.param(name).map(str::to_owned));
                server.params_synced_for = Some(self.params.fingerprint());
                Ok(())
            }
            Ok(Err(QueryError::Server(f))) => {
                server.broken = true;
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
                server.broken = true;
                Err(PgError::fatal(
                    SqlState::CONNECTION_FAILURE,
                    format!("server connection failed while applying session parameters: {e}"),
                ))
            }
            Err(_) => {
                server.broken = true;
                Err(PgError::fatal(
                    SqlState::CONNECTION_FAILURE,
                    "server did not answer while applying session parameters",
                ))
            }
        }
    }

    /// Active: stream both ways until the transaction ends or something breaks.
    async fn pump(&mut self, h: &mut Held) -> Step {
        loop {
            // Client → server.
            let terminate = match self.scan_client(h) {
                Ok(t) => t,
                Err(e) => return Step::Fatal(e),
            };
            if !self.scratch.to_server.is_empty() {
                PoolStats::add(
                    &self.entry.stats.bytes_received,
                    self.scratch.to_server.len() as u64,
                );
                let written = h.server.write_all(&self.scratch.to_server).await;
                self.scratch.to_server.clear();
                if let Err(e) = written {
                    h.server.broken = true;
                    return Step::Fatal(server_lost(&e.to_string()));
                }
            }
            if terminate {
                return Step::ClientGone;
            }

            // Server → client.
            let done = match self.scan_server(h) {
                Ok(d) => d,
                Err(e) => return Step::Fatal(e),
            };
            if !self.scratch.to_client.is_empty() {
                PoolStats::add(
                    &self.entry.stats.bytes_sent,
                    self.scratch.to_client.len() as u64,
                );
                let written = self.client.stream.send(&self.scratch.to_client).await;
                self.scratch.to_client.clear();
                if written.is_err() {
                    return Step::ClientGone;
                }
            }
            if done {
                if self.mode == PoolMode::Statement && h.status != b'I' {
                    return Step::Fatal(PgError::fatal(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "transaction blocks are not allowed in statement pooling mode (pool_mode = statement)",
                    ));
                }
                return Step::TxDone;
            }

            // Wait for more from either side, or for the first timer that applies.
            let (_, deadline) = self.next_timer(h);
            if let Some(d) = deadline {
                self.scratch.alarm.arm(d);
            }
            tokio::select! {
                r = h.server.read() => {
                    if let Err(e) = r {
                        h.server.broken = true;
                        return Step::Fatal(server_lost(&e.to_string()));
                    }
                    h.last_server_byte = Instant::now();
                }
                r = read_into(&mut self.client.stream, &mut self.client.buf) => {
                    match r {
                        Ok(0) | Err(_) => return Step::ClientGone,
                        Ok(_) => {}
                    }
                    h.last_client_byte = Instant::now();
                }
                _ = self.scratch.alarm.fired(), if deadline.is_some() => {
                    // The alarm may ring early (it was armed for a deadline that has since
                    // moved on): act only on a timer that is really due.
                    let (timer, deadline) = self.next_timer(h);
                    if deadline.is_some_and(|d| d <= Instant::now()) {
                        if let Some(step) = self.on_timer(h, timer).await {
                            return step;
                        }
                    }
                }
            }
        }
    }

    /// The timer that fires first in the current state, if any.
    fn next_timer(&self, h: &Held) -> (Timer, Option<Instant>) {
        let s = &*self.settings;
        let mut best = (Timer::None, None::<Instant>);
        let mut consider = |t: Timer, at: Option<Instant>| {
            if let Some(at) = at {
                if best.1.is_none_or(|b| at < b) {
                    best = (t, Some(at));
                }
            }
        };
        if h.owed == 0 {
            if h.status != b'I' {
                consider(
                    Timer::IdleTransaction,
                    s.idle_transaction_timeout.map(|d| h.last_client_byte + d),
                );
            } else if self.mode == PoolMode::Session {
                consider(
                    Timer::ClientIdle,
                    s.client_idle_timeout.map(|d| h.last_client_byte + d),
                );
            }
        } else {
            match h.cancel_sent {
                Some(sent) => consider(Timer::CancelGrace, Some(sent + CANCEL_GRACE)),
                None => consider(
                    Timer::Query,
                    s.query_timeout.zip(h.query_since).map(|(d, t)| t + d),
                ),
            }
            // Silent since its last byte or since it was asked, whichever is later: a request
            // sent after the client sat idle in a transaction starts the clock afresh.
            let quiet_since = h
                .query_since
                .map_or(h.last_server_byte, |asked| asked.max(h.last_server_byte));
            consider(
                Timer::Unresponsive,
                s.server_unresponsive_timeout.map(|d| quiet_since + d),
            );
        }
        best
    }

    /// Handles a fired timer; `Some` ends the transaction.
    async fn on_timer(&mut self, h: &mut Held, timer: Timer) -> Option<Step> {
        let s = self.settings.clone();
        let fatal = |code, setting: &str, d: Option<Duration>, what: &str| {
            Some(Step::Fatal(PgError::fatal(
                code,
                format!(
                    "{setting} ({}) expired{what}",
                    fmt_duration(d.unwrap_or_default())
                ),
            )))
        };
        match timer {
            Timer::None => None,
            Timer::IdleTransaction => {
                GlobalStats::bump(&self.global().timeouts_idle_transaction);
                tracing::info!("idle_transaction_timeout expired");
                fatal(
                    SqlState::IDLE_IN_TRANSACTION_TIMEOUT,
                    "idle_transaction_timeout",
                    s.idle_transaction_timeout,
                    "",
                )
            }
            Timer::ClientIdle => {
                GlobalStats::bump(&self.global().timeouts_client_idle);
                tracing::info!("client_idle_timeout expired");
                fatal(
                    SqlState::IDLE_SESSION_TIMEOUT,
                    "client_idle_timeout",
                    s.client_idle_timeout,
                    "",
                )
            }
            Timer::Query => {
                GlobalStats::bump(&self.global().timeouts_query);
                tracing::warn!(
                    server = h.server.id,
                    "query_timeout expired; cancelling the query"
                );
                PgError::notice(format!(
                    "query_timeout ({}) expired: Breakwater is cancelling the query",
                    fmt_duration(s.query_timeout.unwrap_or_default())
                ))
                .write(&mut self.scratch.to_client);
                let target = h.server.cancel_target();
                h.cancel_sent = Some(Instant::now());
                let _ = target.send(CANCEL_GRACE).await;
                None
            }
            Timer::CancelGrace => {
                h.server.broken = true;
                fatal(
                    SqlState::QUERY_CANCELED,
                    "query_timeout",
                    s.query_timeout,
                    " and the server did not answer the cancel; closing the server connection",
                )
            }
            Timer::Unresponsive => {
                if h.server.socket_looks_dead() {
                    GlobalStats::bump(&self.global().timeouts_server_unresponsive);
                    h.server.broken = true;
                    tracing::warn!(
                        server = h.server.id,
                        "server unresponsive with a dead socket; dropping it"
                    );
                    return fatal(
                        SqlState::CONNECTION_FAILURE,
                        "server_unresponsive_timeout",
                        s.server_unresponsive_timeout,
                        ": the server stopped answering and its socket looks dead",
                    );
                }
                // A healthy long query: everything acknowledged. Look again later.
                h.last_server_byte = Instant::now();
                None
            }
        }
    }

    /// Moves what the client sent from its buffer to `to_server`, rewriting named prepared
    /// statements, and records what the server will owe. Returns whether the client sent
    /// Terminate. Large messages that need no rewriting stream through before they are whole.
    fn scan_client(&mut self, h: &mut Held) -> Result<bool, PgError> {
        let max = self.settings.max_message;
        let prepared_cap = self.settings.max_prepared_statements;
        loop {
            if h.client_skip > 0 {
                let n = move_bytes(
                    &mut self.client.buf,
                    &mut self.scratch.to_server,
                    h.client_skip,
                );
                h.client_skip -= n;
                if h.client_skip > 0 {
                    return Ok(false);
                }
            }
            let len = match frame::message_len(&self.client.buf, max) {
                Err(e) => return Err(PgError::fatal(SqlState::PROTOCOL_VIOLATION, e.to_string())),
                Ok(_) if self.client.buf.len() < HEADER_LEN => return Ok(false),
                Ok(complete) => (
                    complete,
                    u32::from_be_bytes([
                        self.client.buf[1],
                        self.client.buf[2],
                        self.client.buf[3],
                        self.client.buf[4],
                    ]) as usize,
                ),
            };
            let (complete, body_len) = (len.0, len.1 - 4);
            let tag = self.client.buf[0];
            // Messages the pooler reads must be whole; everything else streams.
            let needs_whole = matches!(
                tag,
                frontend::QUERY
                    | frontend::PARSE
                    | frontend::BIND
                    | frontend::DESCRIBE
                    | frontend::CLOSE
            );
            if needs_whole && complete.is_none() {
                return Ok(false);
            }
            let stream_through = |this: &mut Self, h: &mut Held| {
                move_bytes(
                    &mut this.client.buf,
                    &mut this.scratch.to_server,
                    HEADER_LEN,
                );
                h.client_skip = body_len;
            };
            match tag {
                frontend::TERMINATE => return Ok(true),
                frontend::QUERY => {
                    // Whole (see needs_whole).
                    let msg = self
                        .client
                        .buf
                        .get(..HEADER_LEN + body_len)
                        .unwrap_or_default();
                    h.owed += 1;
                    h.query_since.get_or_insert_with(Instant::now);
                    h.expect.push(Expect::Query);
                    if !h.dirty
                        && scan::text_may_leave_state(msg.get(HEADER_LEN..).unwrap_or_default())
                    {
                        h.dirty = true;
                    }
                    move_bytes(
                        &mut self.client.buf,
                        &mut self.scratch.to_server,
                        HEADER_LEN + body_len,
                    );
                }
                frontend::SYNC if h.copy_in_open => {
                    // The server ignores Sync during COPY IN; it gets no ReadyForQuery.
                    stream_through(self, h);
                }
                frontend::SYNC | frontend::FUNCTION_CALL => {
                    h.owed += 1;
                    h.query_since.get_or_insert_with(Instant::now);
                    if tag == frontend::SYNC {
                        h.batch_open = false;
                        h.expect.push(Expect::Sync);
                    } else {
                        h.expect.push(Expect::Query);
                    }
                    stream_through(self, h);
                }
                frontend::PARSE => {
                    h.batch_open = true;
                    let msg = self.client.buf.split_to(HEADER_LEN + body_len).freeze();
                    let body = msg.slice(HEADER_LEN..);
                    let (name, sql) = frontend::parse_parse(&body)
                        .map_err(|e| PgError::fatal(SqlState::PROTOCOL_VIOLATION, e.to_string()))?;
                    if !h.dirty && scan::text_may_leave_state(sql) {
                        h.dirty = true;
                    }
                    if name.is_empty() || prepared_cap == 0 {
                        h.expect.push(Expect::Parse {
                            hide: false,
                            prepared: None,
                        });
                        self.scratch.to_server.extend_from_slice(&msg);
                    } else {
                        let name = body.slice(..name.len());
                        let stmt = Arc::new(Statement::new(body.slice(name.len() + 1..)));
                        PoolStats::add(&self.entry.stats.client_parse_count, 1);
                        self.statements.insert(name.clone(), stmt.clone());
                        if h.server.prepared.contains(&stmt.global) {
                            h.expect.push(Expect::Synthetic(backend::PARSE_COMPLETE));
                        } else {
                            self.prepare_on_server(h, &stmt, Some(name));
                        }
                    }
                }
                frontend::BIND | frontend::DESCRIBE => {
                    h.batch_open = true;
                    let msg = self.client.buf.split_to(HEADER_LEN + body_len).freeze();
                    let body = msg.slice(HEADER_LEN..);
                    let expect = if tag == frontend::BIND {
                        PoolStats::add(&self.entry.stats.bind_count, 1);
                        Expect::Bind
                    } else {
                        Expect::Describe
                    };
                    // Bind: portal name, then statement name. Describe: 'S' or 'P', then name.
                    let (prefix_len, stmt_name) = statement_ref(tag, &body)?;
                    let stmt = match stmt_name {
                        Some(n) if !n.is_empty() && prepared_cap > 0 => {
                            self.statements.get(n).cloned()
                        }
                        _ => None,
                    };
                    match stmt {
                        Some(stmt) => {
                            if !h.server.prepared.contains(&stmt.global) {
                                self.prepare_on_server(h, &stmt, None);
                            }
                            let name_len = stmt_name.map_or(0, |n| n.len());
                            frame::write_message(&mut self.scratch.to_server, tag, |b| {
                                b.extend_from_slice(&body[..prefix_len]);
                                b.extend_from_slice(&stmt.global);
                                b.extend_from_slice(&body[prefix_len + name_len..]);
                            });
                        }
                        // Unnamed, or a name this client never prepared: the server answers.
                        None => self.scratch.to_server.extend_from_slice(&msg),
                    }
                    h.expect.push(expect);
                }
                frontend::CLOSE => {
                    h.batch_open = true;
                    let msg = self.client.buf.split_to(HEADER_LEN + body_len).freeze();
                    let body = &msg[HEADER_LEN..];
                    let (_, stmt_name) = statement_ref(tag, body)?;
                    match stmt_name {
                        Some(n) if !n.is_empty() && prepared_cap > 0 => {
                            // The shared server statement stays; only this client's view goes.
                            self.statements.remove(n);
                            h.expect.push(Expect::Synthetic(backend::CLOSE_COMPLETE));
                        }
                        _ => {
                            h.expect.push(Expect::Close { hide: false });
                            self.scratch.to_server.extend_from_slice(&msg);
                        }
                    }
                }
                frontend::EXECUTE => {
                    h.batch_open = true;
                    h.expect.push(Expect::Execute);
                    stream_through(self, h);
                }
                frontend::COPY_DATA => stream_through(self, h),
                frontend::COPY_DONE | frontend::COPY_FAIL => {
                    if h.copy_in_open {
                        h.copy_in_open = false;
                    } else {
                        h.expect.push(Expect::CopyEnd);
                    }
                    stream_through(self, h);
                }
                _ => {
                    // Flush and anything else: part of an extended batch, no reply of its own.
                    h.batch_open = true;
                    stream_through(self, h);
                }
            }
            h.expect.emit_synthetic(&mut self.scratch.to_client);
        }
    }

    /// Sends a Parse of `stmt` under its global name, closing the least recently used statement
    /// first when the connection is at `max_prepared_statements`. `client_name` is set when the
    /// client itself sent this Parse (its ParseComplete is the client's); otherwise it is
    /// injected before a Bind or Describe and its reply is hidden.
    fn prepare_on_server(
        &mut self,
        h: &mut Held,
        stmt: &Arc<Statement>,
        client_name: Option<bytes::Bytes>,
    ) {
        if let Some(evicted) = h
            .server
            .prepared
            .insert(stmt.global.clone(), self.settings.max_prepared_statements)
        {
            write_close_statement(&mut self.scratch.to_server, &evicted);
            h.expect.push(Expect::Close { hide: true });
        }
        stmt.write_parse(&mut self.scratch.to_server);
        PoolStats::add(&self.entry.stats.server_parse_count, 1);
        let hide = client_name.is_none();
        h.expect.push(Expect::Parse {
            hide,
            prepared: Some((client_name.unwrap_or_default(), stmt.global.clone())),
        });
    }

    /// Moves what the server sent to `to_client`, hiding replies to Breakwater's own requests
    /// and adding synthetic ones, and returns whether the transaction ended: an idle
    /// ReadyForQuery with nothing owed. It stops right after that ReadyForQuery; anything
    /// behind it is not this client's.
    fn scan_server(&mut self, h: &mut Held) -> Result<bool, PgError> {
        let max = h.server.max_message;
        loop {
            if h.server_skip > 0 {
                let n = move_bytes(
                    &mut h.server.buf,
                    &mut self.scratch.to_client,
                    h.server_skip,
                );
                h.server_skip -= n;
                if h.server_skip > 0 {
                    return Ok(false);
                }
            }
            let buf = &h.server.buf;
            let complete = match frame::message_len(buf, max) {
                Err(e) => return Err(server_lost(&e.to_string())),
                Ok(_) if buf.len() < HEADER_LEN => return Ok(false),
                Ok(c) => c,
            };
            let tag = buf[0];
            let body_len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize - 4;
            // An ErrorResponse is read only in pools that must write: its SQLSTATE may say the
            // host was demoted (25006).
            let inspect = matches!(
                tag,
                backend::READY_FOR_QUERY | backend::PARAMETER_STATUS | backend::COMMAND_COMPLETE
            ) || (tag == backend::ERROR_RESPONSE && self.watch_read_only);
            if inspect && complete.is_none() {
                return Ok(false);
            }
            let statements = &mut self.statements;
            let cache = &mut h.server.prepared;
            let known = &self.entry.known_statements;
            let params = &self.params;
            let settings = &self.settings;
            let verdict = h.expect.on_server_message(
                tag,
                |e| {
                    if let Expect::Parse {
                        prepared: Some((name, global)),
                        ..
                    } = e
                    {
                        cache.remove(global);
                        statements.forget_if(name, global);
                        known.forget(params.fingerprint(), global);
                    }
                },
                |global| {
                    known.insert(
                        params.fingerprint(),
                        &global,
                        settings.max_prepared_statements,
                    )
                },
            );
            if verdict == Verdict::Hide {
                // ParseComplete / CloseComplete: a bare header.
                if body_len > 0 {
                    return Err(server_lost("ParseComplete or CloseComplete with a body"));
                }
                h.server.buf.advance(HEADER_LEN);
                h.expect.emit_synthetic(&mut self.scratch.to_client);
                continue;
            }
            if tag == backend::COPY_IN_RESPONSE {
                let (ignored, open) = h.expect.on_copy_in();
                h.owed = h.owed.saturating_sub(ignored);
                h.copy_in_open = open;
            }
            if !inspect {
                move_bytes(&mut h.server.buf, &mut self.scratch.to_client, HEADER_LEN);
                h.server_skip = body_len;
                if h.server_skip == 0 {
                    h.expect.emit_synthetic(&mut self.scratch.to_client);
                }
                continue;
            }
            let msg = h.server.buf.split_to(HEADER_LEN + body_len);
            let body = &msg[HEADER_LEN..];
            match tag {
                backend::READY_FOR_QUERY => {
                    h.status = backend::parse_ready_for_query(body)
                        .map_err(|e| server_lost(&e.to_string()))?
                        .as_byte();
                    h.owed = h.owed.saturating_sub(1);
                    h.cancel_sent = None;
                    let stats = &self.entry.stats;
                    PoolStats::add(&stats.query_count, 1);
                    if let Some(t) = h.query_since.take() {
                        PoolStats::add(&stats.query_time_us, t.elapsed().as_micros() as u64);
                    }
                    if h.owed > 0 {
                        h.query_since = Some(Instant::now());
                    }
                    let statement_mode_done =
                        self.mode == PoolMode::Statement && h.owed == 0 && !h.batch_open;
                    if statement_mode_done && h.status != b'I' {
                        // Hold back this ReadyForQuery: the client must see the refusal as the
                        // answer to the statement that opened a transaction.
                        return Ok(true);
                    }
                    self.scratch.to_client.extend_from_slice(&msg);
                    h.expect.emit_synthetic(&mut self.scratch.to_client);
                    if h.at_boundary() || statement_mode_done {
                        return Ok(true);
                    }
                    continue;
                }
                backend::PARAMETER_STATUS => {
                    let (k, v) = backend::parse_parameter_status(body)
                        .map_err(|e| server_lost(&e.to_string()))?;
                    if let Some(t) = tracked_name(k) {
                        self.params.set(t, v);
                    }
                    if k == "in_hot_standby" || k == "default_transaction_read_only" {
                        // The server's role may have changed under us (a promotion, a reload).
                        self.entry.pool.role_suspect();
                    }
                    let (k, v) = (k.to_owned(), v.to_owned());
                    h.server.set_param(&k, &v);
                    h.server.pristine = false;
                }
                backend::ERROR_RESPONSE => {
                    if proto::error::parse_error_fields(body)
                        .is_ok_and(|f| f.code == READ_ONLY_SQL_TRANSACTION)
                    {
                        tracing::info!(server = h.server.id, "server refused a write (25006) in a read-write pool; re-checking host roles");
                        self.entry.pool.role_suspect();
                    }
                }
                _ => {
                    let tag = backend::command_tag(body);
                    if !h.dirty && scan::tag_leaves_state(tag) {
                        h.dirty = true;
                    }
                    if tag == b"DEALLOCATE ALL" || tag == b"DISCARD ALL" {
                        // The server dropped every prepared statement, ours included.
                        h.server.prepared.clear();
                        self.statements.clear();
                    }
                }
            }
            self.scratch.to_client.extend_from_slice(&msg);
            h.expect.emit_synthetic(&mut self.scratch.to_client);
        }
    }

    /// Gives a server back at a transaction boundary, resetting it first if the client left
    /// session state (or always, in session mode).
    async fn release(&mut self, mut h: Held) {
        // At release nothing is owed, so the queue is empty: keep its allocation.
        self.scratch.spare_expect = std::mem::take(&mut h.expect);
        self.scratch.spare_expect.clear();
        self.cancel.slot.set(None).await;
        let stats = &self.entry.stats;
        PoolStats::add(&stats.xact_count, 1);
        PoolStats::add(&stats.xact_time_us, h.since.elapsed().as_micros() as u64);
        if h.dirty || self.mode == PoolMode::Session {
            PoolStats::add(&stats.server_resets, 1);
            let reset = Box::pin(tokio::time::timeout(
                internal_timeout(&self.settings),
                h.server.simple_query(&self.settings.server_reset_query),
            ))
            .await;
            match reset {
                Ok(Ok(())) => {
                    // DISCARD ALL (the default) also drops prepared statements.
                    h.server.applied.clear();
                    h.server.params_synced_for = None;
                    h.server.prepared.clear();
                }
                Ok(Err(e)) => {
                    tracing::warn!(server = h.server.id, error = %e, "server_reset_query failed; closing the server connection");
                    discard(h.server);
                    return;
                }
                Err(_) => {
                    tracing::warn!(
                        server = h.server.id,
                        "server_reset_query timed out; closing the server connection"
                    );
                    discard(h.server);
                    return;
                }
            }
        }
        if h.server.broken || !h.server.buf.is_empty() || !self.entry.pool.still_wanted(&h.server) {
            discard(h.server);
        }
        // Dropping the object returns it to the pool.
    }

    /// The client left while holding a server. Nothing it started may outlive it: a running
    /// query is stopped and its replies read (see `finish_for_nobody`), an open transaction is
    /// rolled back, and the server verified idle; anything less certain (a half-sent message,
    /// COPY IN, a server that does not finish) closes the server connection.
    async fn abandon(&mut self, mut h: Held) {
        if (h.owed > 0 || h.batch_open || h.server_skip > 0)
            && !self.finish_for_nobody(&mut h).await
        {
            self.cancel.slot.set(None).await;
            discard(h.server);
            return;
        }
        if h.client_skip > 0
            || h.server_skip > 0
            || h.batch_open
            || !h.expect.is_empty()
            || !h.server.buf.is_empty()
        {
            self.cancel.slot.set(None).await;
            discard(h.server);
            return;
        }
        if h.status != b'I' {
            let rollback = Box::pin(tokio::time::timeout(
                internal_timeout(&self.settings),
                h.server.simple_query("ROLLBACK"),
            ))
            .await;
            if !matches!(rollback, Ok(Ok(()))) {
                self.cancel.slot.set(None).await;
                discard(h.server);
                return;
            }
            h.status = b'I';
        }
        self.release(h).await;
    }

    /// The client left while the server still owed it replies. Closing the server connection
    /// would have the pool open another, a fork and a login on the database, and clients vanish
    /// mid-query mostly when the database is slow already (applications time out and hang
    /// up). So: stop the query (a cancel, unless the replies are in already), read what the
    /// server still sends, for nobody, and keep the connection. Its replies go through the
    /// same scan as ever, so a SET, a failed Parse or a temp table in them is accounted for.
    /// `false` when that is not possible (a message half sent, COPY IN) or not done in
    /// CANCEL_GRACE: then it is closed, as before.
    async fn finish_for_nobody(&mut self, h: &mut Held) -> bool {
        if h.client_skip > 0 || h.copy_in_open || self.shutting_down() {
            return false;
        }
        if h.batch_open {
            // The server waits for the rest of the batch; a Sync ends it.
            let mut sync = BytesMut::with_capacity(HEADER_LEN);
            frontend::write_sync(&mut sync);
            if h.server.write_all(&sync).await.is_err() {
                return false;
            }
            h.batch_open = false;
            h.owed += 1;
            h.expect.push(Expect::Sync);
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
        // ignored there.
        let _ = h.server.cancel_target().send(CANCEL_GRACE).await;
        let drained = tokio::time::timeout(CANCEL_GRACE, async {
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
        tracing::debug!(server = h.server.id, kept, "client left mid-query");
        kept
    }

    /// Scans what the server has sent, as for a client, and drops it. True once it owes
    /// nothing more.
    fn drain_for_nobody(&mut self, h: &mut Held) -> Result<bool, PgError> {
        let done = self.scan_server(h);
        self.scratch.to_client.clear();
        Ok(done? || (h.owed == 0 && h.server_skip == 0 && !h.batch_open && h.expect.is_empty()))
    }
}

/// Counts and logs an expired client_idle_timeout; the error the client is told.
fn idle_timeout_expired(global: &GlobalStats, idle: Option<Duration>) -> PgError {
    GlobalStats::bump(&global.timeouts_client_idle);
    tracing::info!("client_idle_timeout expired");
    PgError::fatal(
        SqlState::IDLE_SESSION_TIMEOUT,
        format!(
            "client_idle_timeout ({}) expired",
            fmt_duration(idle.unwrap_or_default())
        ),
    )
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

/// Waits for a boxed timer; pending forever without one.
async fn expired(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Where the statement name sits in a Bind, Describe or Close body: the length of what comes
/// before it, and the name (`None` when the message refers to a portal).
fn statement_ref(tag: u8, body: &[u8]) -> Result<(usize, Option<&[u8]>), PgError> {
    let malformed = || {
        PgError::fatal(
            SqlState::PROTOCOL_VIOLATION,
            format!("malformed '{}' message", tag as char),
        )
    };
    let cstr_at = |at: usize| -> Result<&[u8], PgError> {
        let rest = body.get(at..).ok_or_else(malformed)?;
        let end = memchr::memchr(0, rest).ok_or_else(malformed)?;
        Ok(&rest[..end])
    };
    if tag == frontend::BIND {
        let portal = cstr_at(0)?;
        let at = portal.len() + 1;
        return Ok((at, Some(cstr_at(at)?)));
    }
    match body.first() {
        Some(b'S') => Ok((1, Some(cstr_at(1)?))),
        Some(b'P') => Ok((1, None)),
        _ => Err(malformed()),
    }
}

/// Moves up to `n` bytes from the front of `from` to the end of `to`; returns how many. A copy
/// and a pointer bump: `split_to` takes and drops a reference on the buffer's shared storage
/// (two atomic operations) for bytes that are copied at once, several times per transaction.
fn move_bytes(from: &mut BytesMut, to: &mut BytesMut, n: usize) -> usize {
    let n = n.min(from.len());
    to.extend_from_slice(&from[..n]);
    from.advance(n);
    n
}
