//! Server pools: one per (database, user). A pool opens logged-in [`ServerConn`]s through the
//! host's storm controls, hands them out in turn (see [`crate::slots`] for the bookkeeping) and
//! refuses to hand out one that died while idle.
//!
//! The pool never decides whether a connection is clean: the proxy returns a connection only at
//! an idle ReadyForQuery with nothing owed, and detaches (closes) it otherwise.
//!
//! Operators act on a pool through a few switches, never by reaching into a connection: a pause
//! gate in front of checkout (PAUSE/RESUME), an epoch that retires every connection opened
//! before it (RECONNECT, KILL, RELOAD), live size, minimum and timeouts (RELOAD, SET).

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use stats::{CloseReason, PoolStats};
use tokio::sync::{watch, Semaphore};

use crate::alarm::Alarm;
use crate::changes::Changes;
use crate::conn::ServerConn;
use crate::error::ConnectError;
use crate::failover::HostList;
use crate::host::Host;
use crate::pool_set::PoolStatus;
use crate::registry::{NewServer, ServerInfo, ServerRegistry};
use crate::role::TargetSessionAttrs;
use crate::settings::{ServerSettings, ServerTarget};
pub use crate::slots::Source;
use crate::slots::{Idle, Slots, Taken};

/// What the fleet's control connection calls itself in pg_stat_activity.
pub const FLEET_APPLICATION_NAME: &str = "breakwater fleet";

/// Caps shared between pools: `max_db_connections` (per database), `max_user_connections` (per
/// server user) and
/// `max_server_connections` (all pools). A connection holds a slot of each while it lives.
#[derive(Clone, Default)]
pub struct Limits(pub Vec<Arc<Semaphore>>);

pub struct ServerManager {
    target: ServerTarget,
    /// Known once a client logged in with SCRAM when the auth_file holds only a verifier.
    credential: std::sync::Mutex<Option<proto::auth::ServerCredential>>,
    /// Swapped whole by RELOAD/SET; readers clone the Arc, never the settings.
    settings: RwLock<Arc<ServerSettings>>,
    hosts: Arc<HostList>,
    limits: Limits,
    stats: Arc<PoolStats>,
    registry: Arc<ServerRegistry>,
    epoch: AtomicU64,
    /// Signalled whenever a server is released or closed (see [`crate::PoolSet`]).
    changes: Arc<Changes>,
    /// The database's fleet budget, if it has one: it may claim a server's slot as the server
    /// comes out of the idle list.
    fleet: std::sync::OnceLock<Arc<crate::fleet::Fleet>>,
}

impl ServerManager {
    fn settings(&self) -> Arc<ServerSettings> {
        match self.settings.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Logs and counts a close; every way a pooled connection ends goes through here, with
    /// one reason (as PgBouncer's `disconnect_server(…, reason)`).
    fn closing(&self, conn: &ServerConn, reason: CloseReason) {
        self.stats.server_closes.record(reason);
        log_close(conn, &self.target.database, &self.target.user, reason);
    }

    fn is_stale(&self, conn: &ServerConn) -> bool {
        conn.registration
            .as_ref()
            .is_some_and(|r| r.info.epoch < self.epoch.load(Ordering::Relaxed))
    }
}

/// Whether a checkout is making a connection right now. The caller owns it (one per client,
/// reused by every checkout) and lends it to [`ServerPool::checkout`]; the connection attempt
/// inside keeps it up to date.
#[derive(Debug, Default)]
pub struct ConnectFlag(AtomicBool);

impl ConnectFlag {
    /// Up while a connect is under way (a host admitted it), down while the attempt waits.
    pub(crate) fn set(&self, connecting: bool) {
        self.0.store(connecting, Ordering::Relaxed);
    }
}

/// A connection attempt made inside a checkout. The attempt raises the flag once a host has
/// admitted it and a connect is really under way ([`ConnectFlag::set`], in `failover`), so the
/// [`Checkout`] around it can tell that dropping it now would abandon a connect half done (the
/// database has accepted, forked a backend, perhaps begun the login). While it only waits (a
/// cap's permit, a host's back-off) the flag stays down, and a client that left is let go.
/// The flag comes down when the attempt ends, however it ends.
struct Connecting<'a, F> {
    attempt: F,
    flag: &'a ConnectFlag,
}

impl<F: Future + Unpin> Future for Connecting<'_, F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<F::Output> {
        let r = std::pin::Pin::new(&mut self.attempt).poll(cx);
        if r.is_ready() {
            self.flag.set(false);
        }
        r
    }
}

impl<F> Drop for Connecting<'_, F> {
    fn drop(&mut self) {
        self.flag.0.store(false, Ordering::Relaxed);
    }
}

/// A checkout in progress ([`ServerPool::checkout`]). Besides its result it says whether it is
/// making a connection right now ([`Checkout::is_connecting`]): a caller that wants to give up
/// (its client left) should then let it finish and give the server back, rather than waste a
/// backend the database is already forking.
///
/// Written by hand for the common wait: in the queue for a turn, then an idle server that may
/// go out as it is (see `crate::slots`). At 64 clients on a pool of 16
/// nearly every checkout waits so, and the same as nested async functions (the pause gate, the
/// reserve's timer, the alarm's select, the turn and the server's checks, each a future
/// polled through the others) cost about 650 instructions more per transaction
/// (benches/README.md, "The waiting checkout, round 2"). Anything more (the pause gate, a
/// pool with a reserve, a check query, a new connection) goes on in those async functions,
/// boxed.
pub struct Checkout<'a> {
    pool: &'a ServerPool,
    w: Wait,
    /// Lent to the slow path when there is one.
    alarm: Option<&'a mut Alarm>,
    connecting: &'a ConnectFlag,
    phase: Phase<'a>,
    /// When the common wait was served: the clock read that its checks used.
    served_at: Option<Instant>,
}

/// A checkout's terms (see [`ServerPool::checkout`]): when it started, how long it may wait
/// (`query_wait_timeout`), when its caller wants to be polled (query_wait_notify), and the
/// line it queues in.
#[derive(Debug, Clone, Copy)]
struct Wait {
    started: Instant,
    wait: Option<Duration>,
    wake_by: Option<Instant>,
    source: Source,
}

impl Wait {
    fn deadline(&self) -> Option<Instant> {
        self.wait.map(|w| self.started + w)
    }
}

enum Phase<'a> {
    /// Not polled yet.
    Start,
    /// In the pool's queue for a turn; listed for SHOW POOLS' maxwait once it has had to wait.
    Queued {
        turn: crate::slots::TurnWait<'a, Box<ServerConn>>,
        listed: Option<Waiter<'a>>,
    },
    /// Everything else (see [`Checkout`]).
    Slow {
        work: std::pin::Pin<
            Box<dyn Future<Output = Result<PooledServer, CheckoutError>> + Send + 'a>,
        >,
        _listed: Option<Waiter<'a>>,
    },
    Done,
}

impl Checkout<'_> {
    /// Is a connection attempt of this checkout under way (left pending by the last poll)?
    pub fn is_connecting(&self) -> bool {
        self.connecting.0.load(Ordering::Relaxed)
    }

    /// When it was served, if it read the clock then (the common wait does: the caller can
    /// use that reading instead of one more).
    pub fn served_at(&self) -> Option<Instant> {
        self.served_at
    }
}

impl Future for Checkout<'_> {
    type Output = Result<PooledServer, CheckoutError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let pool = this.pool;
        loop {
            match &mut this.phase {
                Phase::Start => {
                    if pool.is_paused() || pool.reserve.due(this.w.started).is_some() {
                        let Some(alarm) = this.alarm.take() else {
                            return Poll::Pending;
                        };
                        let work = pool.checkout_listed(this.w, alarm, this.connecting);
                        this.phase = Phase::Slow {
                            work: Box::pin(work),
                            _listed: None,
                        };
                    } else {
                        this.phase = Phase::Queued {
                            turn: pool.core.slots.turn(this.w.source),
                            listed: None,
                        };
                    }
                }
                Phase::Queued { turn, listed } => {
                    match std::pin::Pin::new(&mut *turn).poll(cx) {
                        Poll::Ready(Err(crate::slots::Closed)) => {
                            this.phase = Phase::Done;
                            return Poll::Ready(Err(pool.closed()));
                        }
                        Poll::Ready(Ok(mut served)) => match pool.take_now(&mut served, None) {
                            Now::Server(server, at) => {
                                served.keep();
                                this.served_at = Some(at);
                                this.phase = Phase::Done;
                                return Poll::Ready(Ok(server));
                            }
                            // The pool shrank under the turn: in line again.
                            Now::Again => *turn = pool.core.slots.turn(this.w.source),
                            Now::Later(first) => {
                                let listed = listed.take();
                                let Some(alarm) = this.alarm.take() else {
                                    return Poll::Pending;
                                };
                                let work = pool.checkout_inner(
                                    this.w,
                                    alarm,
                                    this.connecting,
                                    Some((served, first)),
                                );
                                this.phase = Phase::Slow {
                                    work: Box::pin(work),
                                    _listed: listed,
                                };
                            }
                        },
                        Poll::Pending => {
                            if listed.is_none() {
                                *listed = Some(Waiter::new(&pool.waiters, this.w.started));
                            }
                            let Some(alarm) = this.alarm.as_deref_mut() else {
                                return Poll::Pending;
                            };
                            let deadline = this.w.deadline();
                            if poll_deadline(alarm, deadline, &mut this.w.wake_by, cx).is_pending()
                            {
                                return Poll::Pending;
                            }
                            this.phase = Phase::Done;
                            return Poll::Ready(Err(pool.wait_timeout(this.w.wait, None)));
                        }
                    }
                }
                Phase::Slow { work, .. } => {
                    let r = work.as_mut().poll(cx);
                    if r.is_ready() {
                        this.phase = Phase::Done;
                    }
                    return r;
                }
                // Polled after it ended: like a fused future, nothing more.
                Phase::Done => return Poll::Pending,
            }
        }
    }
}

/// What a turn finds, when that can be decided without waiting.
enum Now<'a> {
    /// An idle server that may go out as it is, and the clock's reading for its checks; the
    /// turn goes with it.
    Server(PooledServer, Instant),
    /// The pool shrank under the turn: wait for another.
    Again,
    /// A server that needs its check query, or room to open one: async work for the turn.
    Later(First<'a>),
}

/// What a turn took that needs async work, guarded so that the books are told if that work is
/// dropped half-way.
enum First<'a> {
    Check(CheckingIdle<'a>, Instant),
    Room(Room<'a>),
}

impl ServerManager {
    fn target(&self) -> ServerTarget {
        let mut target = self.target.clone();
        target.credential = match self.credential.lock() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        target
    }

    /// One permit of each shared cap.
    async fn acquire_limits(&self) -> Result<Vec<tokio::sync::OwnedSemaphorePermit>, ConnectError> {
        let mut permits = Vec::with_capacity(self.limits.0.len());
        for sem in &self.limits.0 {
            let permit = match sem.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    let mut changed = false;
                    let next_change = self
                        .changes
                        .wait_until(|| std::mem::replace(&mut changed, true));
                    tokio::select! {
                        biased;
                        p = sem.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            // Limit semaphores are never closed; if one were, the cap is busy.
                            Err(_) => return Err(ConnectError::CapBusy),
                        },
                        () = next_change => return Err(ConnectError::CapBusy),
                    }
                }
            };
            permits.push(permit);
        }
        Ok(permits)
    }

    /// Opens a new server connection for the pool (deadpool's `create`).
    async fn open(&self, connecting: &ConnectFlag) -> Result<Box<ServerConn>, ConnectError> {
        // The epoch the connection belongs to is the one it started in, read before the target
        // it connects to: a RECONNECT or KILL during the connect (which may take seconds when
        // a host misbehaves, on a DNS answer from before) must retire it like the others.
        let epoch = self.epoch.load(Ordering::Relaxed);
        let target = self.target();
        // Slots of the shared caps first: waiting for one is bounded by the client's
        // query_wait_timeout around the whole checkout. deadpool decided to create because no
        // server was idle when it looked; one released meanwhile (its slot still held) would
        // never be seen by a create waiting for a slot, so any release or close ends the wait
        // and the checkout looks again.
        let permits = loop {
            let mut permits = self.acquire_limits().await?;
            // A permit a closed server gave back while the fleet wants permits back pays that
            // debt instead of opening a server (the control task would take it at its next
            // tick; a connect started meanwhile would hold it, without its lock).
            if !self.fleet.get().is_some_and(|f| f.claim_slot(&mut permits)) {
                break permits;
            }
        };
        let settings = self.settings();
        let started = Instant::now();
        let logging_in = stats::GaugeGuard::new(&self.stats.sv_login);
        // Boxed: connecting (DNS, TLS, login) is a large future, and every checkout embeds
        // this one; unboxed it would sit in every client task's memory even while idle.
        let conn = Box::pin(self.hosts.connect(&target, &settings, connecting)).await;
        drop(logging_in);
        let stats = &self.stats;
        match conn {
            Ok(mut c) => {
                c._limits = permits;
                PoolStats::add(&stats.server_connects, 1);
                PoolStats::add(&stats.connect_time_us, started.elapsed().as_micros() as u64);
                let (local, remote) = c.socket_addrs();
                c.registration = Some(self.registry.register(NewServer {
                    id: c.id(),
                    database: self.target.database.clone(),
                    user: self.target.user.clone(),
                    addr: c.addr().to_string(),
                    remote,
                    local,
                    pid: c.backend_pid(),
                    epoch,
                }));
                tracing::info!(server = c.id(), addr = %c.addr(), pid = c.backend_pid(),
                    database = %self.target.database, user = %self.target.user, "server connection opened");
                if let Some(sql) = &target.connect_query {
                    if let Err(e) = self.connect_query(&mut c, sql, &settings).await {
                        self.closing(&c, CloseReason::ConnectQueryFailed);
                        c.terminate();
                        return Err(e);
                    }
                }
                Ok(Box::new(c))
            }
            Err(e) => {
                PoolStats::add(&stats.server_connect_failures, 1);
                match &e {
                    ConnectError::ConnectTimeout { .. } => {
                        PoolStats::add(&stats.connect_timeouts, 1)
                    }
                    ConnectError::LoginTimeout { .. } => PoolStats::add(&stats.login_timeouts, 1),
                    _ => PoolStats::add(&stats.connect_refused, 1),
                }
                tracing::warn!(database = %self.target.database, user = %self.target.user,
                    hosts = %self.hosts.names(), error = %e, "server connection failed");
                Err(e)
            }
        }
    }

    /// `connect_query` on a connection just logged in, bounded by `server_login_timeout` (it
    /// is part of getting the connection ready). It must leave the server idle.
    async fn connect_query(
        &self,
        conn: &mut ServerConn,
        sql: &str,
        settings: &ServerSettings,
    ) -> Result<(), ConnectError> {
        let addr = conn.addr().to_string();
        let run = conn.simple_query(sql);
        let result = match settings.login_timeout {
            Some(t) => match crate::timer::timeout(t, run).await {
                Ok(r) => r,
                Err(_) => return Err(ConnectError::LoginTimeout { addr, timeout: t }),
            },
            None => run.await,
        };
        result.map_err(|source| ConnectError::ConnectQuery { addr, source })
    }

    /// Not once the host it was opened on changed role (see `failover`), nor while a failure
    /// drill treats that host as down.
    fn still_wanted(&self, conn: &ServerConn) -> bool {
        conn.origin.as_ref().is_none_or(|o| {
            self.hosts.still_wanted(o) && !o.host.drill().is_some_and(|d| d.is_down())
        })
    }
}

impl ServerManager {
    /// What may be known about an idle connection without a round trip: it may go out, it
    /// must be closed, or it needs `server_check_query` first. `now`: the caller's reading of
    /// the clock, if it has one (read here only if a setting needs it).
    fn reuse_verdict(&self, conn: &ServerConn, idle_since: Instant, now: Option<Instant>) -> Reuse {
        // Under the read lock rather than a clone of the Arc: two atomic operations fewer on
        // every checkout.
        let settings = match self.settings.read() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if self.is_stale(conn) {
            return Reuse::Close(CloseReason::StaleEpoch);
        }
        if !self.still_wanted(conn) {
            return Reuse::Close(CloseReason::RoleChanged);
        }
        // Clock reads cost; only the settings that need one take it.
        let now = (settings.lifetime.is_some() || settings.check_delay.is_some())
            .then(|| now.unwrap_or_else(Instant::now));
        // Deadlines compared with `now` rather than ages computed from it: an addition and a
        // comparison are cheaper than a subtraction of two clock readings.
        if let (Some(lifetime), Some(now)) = (settings.lifetime, now) {
            if past(now, conn.created(), conn.share(lifetime)) {
                return Reuse::Close(CloseReason::Lifetime);
            }
        }
        if !conn.is_healthy_idle() {
            return Reuse::Close(CloseReason::ClosedWhileIdle);
        }
        if let (Some(delay), Some(now)) = (settings.check_delay, now) {
            if past(now, idle_since, delay) && !settings.check_query.is_empty() {
                return Reuse::Check;
            }
        }
        Reuse::Ready
    }

    /// Why a connection coming out of the idle list may not be handed out, if it may not.
    async fn recycle_check(
        &self,
        conn: &mut ServerConn,
        idle_since: Instant,
    ) -> Option<CloseReason> {
        match self.reuse_verdict(conn, idle_since, None) {
            Reuse::Ready => None,
            Reuse::Close(r) => Some(r),
            Reuse::Check => {
                let settings = self.settings();
                let bound = settings.login_timeout.unwrap_or(Duration::from_secs(5));
                // Boxed: every checkout embeds this future, and it is rarely needed.
                let check = Box::pin(crate::timer::timeout(
                    bound,
                    conn.simple_query(&settings.check_query),
                ))
                .await;
                (!matches!(check, Ok(Ok(())))).then_some(CloseReason::CheckFailed)
            }
        }
    }
}

/// Is `now` more than `after` past `since`? (A deadline too far to represent never passes.)
fn past(now: Instant, since: Instant, after: Duration) -> bool {
    since
        .checked_add(after)
        .is_some_and(|deadline| now > deadline)
}

/// See [`ServerManager::reuse_verdict`].
enum Reuse {
    Ready,
    Close(CloseReason),
    Check,
}

fn log_close(conn: &ServerConn, database: &str, user: &str, reason: CloseReason) {
    // tracing's level is part of each call site, so one site per level.
    macro_rules! close {
        ($level:ident) => {
            tracing::$level!(
                server = conn.id(),
                pid = conn.backend_pid(),
                database,
                user,
                reason = reason.as_str(),
                "closing server connection"
            )
        };
    }
    if reason.is_routine() {
        close!(info);
    } else {
        close!(warn);
    }
}

/// What a pool's servers share with the pool: the manager that opens and checks them, and the
/// books. A checked-out server holds it, so it can come back even after its pool was dropped
/// (it is then closed, as the books say the pool is closed).
struct Core {
    manager: ServerManager,
    /// Boxed connections: the idle list moves pointers, not ~320-byte connections.
    slots: Slots<Box<ServerConn>>,
}

impl Core {
    /// An idle connection taken out of the list that may not go out: closed with its reason.
    fn close_taken(&self, conn: Box<ServerConn>, reason: CloseReason) {
        self.manager.closing(&conn, reason);
        self.slots.gone();
        conn.terminate();
        self.manager.changes.changed();
    }

    /// A connection counted in the books (checked out, or taken from the idle list) is closed
    /// for `reason` and its turn given back.
    fn close_checked_out(&self, conn: Box<ServerConn>, reason: CloseReason) {
        self.manager.closing(&conn, reason);
        self.slots.remove();
        conn.terminate();
    }

    /// Closes connections the books gave up (idle ones retired, surplus ones coming back).
    fn close_given_up(&self, gone: Vec<(Box<ServerConn>, CloseReason)>) {
        for (conn, reason) in gone {
            self.manager.closing(&conn, reason);
            conn.terminate();
        }
        self.manager.changes.changed();
    }
}

/// A server connection checked out of a pool. Dropping it returns it to the pool (or closes it
/// when the pool was told to reconnect since it was opened); call [`discard`] instead when it is
/// not clean.
pub struct PooledServer {
    /// `None` only after [`discard`] or inside `drop`, which both consume the value.
    conn: Option<Box<ServerConn>>,
    core: Arc<Core>,
}

impl PooledServer {
    fn new(conn: Box<ServerConn>, core: Arc<Core>) -> PooledServer {
        if let Some(r) = &conn.registration {
            r.info.set_in_use(true);
        }
        PooledServer {
            conn: Some(conn),
            core,
        }
    }
}

impl Deref for PooledServer {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        match &self.conn {
            Some(c) => c,
            None => unreachable!("PooledServer is only emptied while being consumed"),
        }
    }
}

impl DerefMut for PooledServer {
    fn deref_mut(&mut self) -> &mut ServerConn {
        match &mut self.conn {
            Some(c) => c,
            None => unreachable!("PooledServer is only emptied while being consumed"),
        }
    }
}

impl PooledServer {
    /// Gives the connection back to the pool, idle since `at`: what dropping it does, with the
    /// caller's reading of the clock (the end of its transaction) instead of one more.
    pub fn give_back_at(mut self, at: Instant) {
        self.give_back(at);
    }

    fn give_back(&mut self, at: Instant) {
        let Some(conn) = self.conn.take() else { return };
        if let Some(r) = &conn.registration {
            r.info.set_in_use(false);
        }
        let core = &self.core;
        let m = &core.manager;
        if m.is_stale(&conn) {
            core.close_checked_out(conn, CloseReason::StaleEpoch);
        } else if let Some(surplus) = core.slots.give_back(conn, at) {
            // The pool closed or shrank while this one was out.
            let reason = if core.slots.is_closed() {
                CloseReason::PoolClosed
            } else {
                CloseReason::PoolResized
            };
            m.closing(&surplus, reason);
            surplus.terminate();
        }
        m.changes.changed();
    }
}

impl Drop for PooledServer {
    fn drop(&mut self) {
        // Given back (`give_back_at`) or discarded already: no clock to read.
        if self.conn.is_some() {
            self.give_back(Instant::now());
        }
    }
}

/// Closes a checked-out connection instead of returning it, for `reason`: logged with the
/// server's id and counted per reason (SHOW SERVER_CLOSES, `breakwater_server_closes_total`).
pub fn discard(mut server: PooledServer, reason: CloseReason) {
    if let Some(conn) = server.conn.take() {
        server.core.close_checked_out(conn, reason);
        server.core.manager.changes.changed();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("query_wait_timeout ({timeout:?}) expired waiting for a server connection to database \"{database}\"{}",
        last.as_ref().map(|e| format!(" (last connection attempt: {e})")).unwrap_or_default())]
    WaitTimeout {
        database: String,
        timeout: Duration,
        /// The client's own last failed attempt, or else the host's: a timeout always says why
        /// no server came when one failed.
        last: Option<String>,
    },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("pool for database \"{database}\" is closed")]
    Closed { database: String },
}

pub struct ServerPool {
    core: Arc<Core>,
    /// Wakes the role probe at once (a 25006 on a read-write pool).
    role_check: Arc<tokio::sync::Notify>,
    pub database: String,
    pub user: String,
    min_size: AtomicUsize,
    /// `pool_size`, and the connections a long wait may add (see `crate::reserve`).
    reserve: crate::reserve::Reserve,
    /// `true` while paused: checkouts wait at the gate (still bounded by query_wait_timeout).
    paused: watch::Sender<bool>,
    /// Checkouts that had to wait, and since when.
    waiters: Waiters,
}

/// When each waiting checkout started, in slots reused as checkouts come and go: taking and
/// freeing a slot allocates nothing (a map keyed by a counter allocated and freed nodes as
/// waiters came and went, on the path of every checkout that waits). Only `max_wait` reads
/// them all, for SHOW POOLS.
#[derive(Default)]
struct Waiters(std::sync::Mutex<WaiterSlots>);

#[derive(Default)]
struct WaiterSlots {
    since: Vec<Option<Instant>>,
    free: Vec<usize>,
}

impl Waiters {
    fn slots(&self) -> std::sync::MutexGuard<'_, WaiterSlots> {
        match self.0.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }
}

/// Lists a waiting checkout for as long as it waits, however it ends (cancellation included).
struct Waiter<'a> {
    waiters: &'a Waiters,
    slot: usize,
}

impl<'a> Waiter<'a> {
    fn new(waiters: &'a Waiters, since: Instant) -> Waiter<'a> {
        let mut s = waiters.slots();
        // A freed slot is always in range; should one not be, a new slot is taken instead.
        let free = s.free.pop();
        let slot = match free.and_then(|i| Some((i, s.since.get_mut(i)?))) {
            Some((i, cell)) => {
                *cell = Some(since);
                i
            }
            None => {
                s.since.push(Some(since));
                s.since.len() - 1
            }
        };
        Waiter { waiters, slot }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut s = self.waiters.slots();
        if let Some(since) = s.since.get_mut(self.slot) {
            *since = None;
            s.free.push(self.slot);
        }
    }
}

/// Waits for `work` until `deadline` (`None` when it passed first), with `alarm` also ringing at
/// `wake_by`, which is then cleared: the `Pending` that follows is the caller's chance to act
/// (and an instant past, armed again, would ring at once, forever). `work` is polled first, so
/// a checkout served at once never polls the alarm.
async fn until<F: Future>(
    mut work: std::pin::Pin<&mut F>,
    alarm: &mut Alarm,
    deadline: Option<Instant>,
    wake_by: &mut Option<Instant>,
) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        poll_deadline(alarm, deadline, wake_by, cx).map(|()| None)
    })
    .await
}

/// The timer half of a wait (see [`until`]; [`Checkout`] polls it by hand): `Ready` once
/// `deadline` has passed. The alarm also rings at `wake_by`, which is then cleared and the
/// wait goes on: the task was woken, so its caller gets the `Pending` that follows.
fn poll_deadline(
    alarm: &mut Alarm,
    deadline: Option<Instant>,
    wake_by: &mut Option<Instant>,
    cx: &mut std::task::Context<'_>,
) -> Poll<()> {
    loop {
        // `arm` only ever brings the alarm forward: it rings at the earlier. It may also ring
        // earlier still, for another deadline of its owner's, hence the checks.
        for at in [deadline, *wake_by].into_iter().flatten() {
            alarm.arm(at);
        }
        if alarm.poll_fired(cx).is_pending() {
            return Poll::Pending;
        }
        // The alarm's clock (tokio's; the same as std's outside tests with paused time).
        let now = tokio::time::Instant::now().into_std();
        if deadline.is_some_and(|d| now >= d) {
            return Poll::Ready(());
        }
        if wake_by.is_some_and(|w| now >= w) {
            *wake_by = None;
        }
    }
}

/// `pool_size` and `min_pool_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSizes {
    pub size: usize,
    pub min_size: usize,
}

impl ServerPool {
    pub fn new(
        target: ServerTarget,
        settings: ServerSettings,
        PoolSizes { size, min_size }: PoolSizes,
        hosts: Arc<HostList>,
        limits: Limits,
        stats: Arc<PoolStats>,
        changes: Arc<Changes>,
    ) -> Arc<Self> {
        let role_check_interval = settings.role_check_interval;
        let database = target.database.clone();
        let user = target.user.clone();
        let credential = std::sync::Mutex::new(target.credential.clone());
        let core = Arc::new(Core {
            manager: ServerManager {
                target,
                credential,
                settings: RwLock::new(Arc::new(settings)),
                hosts,
                limits,
                stats,
                registry: Arc::new(ServerRegistry::default()),
                epoch: AtomicU64::new(0),
                changes,
                fleet: std::sync::OnceLock::new(),
            },
            slots: Slots::new(size.max(1)),
        });
        let pool = Arc::new(ServerPool {
            core,
            role_check: Arc::new(tokio::sync::Notify::new()),
            database,
            user,
            min_size: AtomicUsize::new(min_size),
            reserve: crate::reserve::Reserve::new(size.max(1)),
            paused: watch::channel(false).0,
            waiters: Waiters::default(),
        });
        if let Some(interval) = role_check_interval {
            if pool.hosts().attrs != TargetSessionAttrs::Any {
                spawn_role_checks(&pool, interval);
            }
        }
        pool
    }

    /// Gives the pool a way to log in when it had none (SCRAM keys from a client's login).
    pub fn offer_credential(&self, cred: proto::auth::ServerCredential) {
        if let Ok(mut c) = self.core.manager.credential.lock() {
            if c.is_none() {
                *c = Some(cred);
            }
        }
    }

    /// Replaces the way the pool logs in with what a client's login just proved (an
    /// auth_query secret, which changes when the role's password does; the auth_file's only
    /// at RELOAD). Connections already open keep working; new ones use this.
    pub fn renew_credential(&self, cred: proto::auth::ServerCredential) {
        if let Ok(mut c) = self.core.manager.credential.lock() {
            *c = Some(cred);
        }
    }

    /// Waits (FIFO) for a connection, creating one when the pool has room. While the server is
    /// unreachable the client keeps waiting — the host's back-off paces the attempts — until
    /// `wait` expires; errors that waiting cannot fix (wrong password, breaker open) return at
    /// once.
    /// While the pool is paused the wait starts at the pause gate; `wait` bounds both, from
    /// `started`. `alarm` is the caller's re-armable timer: a checkout that has to wait uses it
    /// instead of a timer of its own, and also has it ring at `wake_by`, when the caller wants
    /// to be polled (query_wait_notify: one timer per wait instead of two);
    /// `connecting` tells [`Checkout::is_connecting`]. A checkout that has to wait queues in
    /// `source`'s line (see [`Source`]).
    pub fn checkout<'a>(
        &'a self,
        started: Instant,
        wait: Option<Duration>,
        wake_by: Option<Instant>,
        alarm: &'a mut Alarm,
        connecting: &'a ConnectFlag,
        source: Source,
    ) -> Checkout<'a> {
        Checkout {
            pool: self,
            w: Wait {
                started,
                wait,
                wake_by,
                source,
            },
            alarm: Some(alarm),
            connecting,
            phase: Phase::Start,
            served_at: None,
        }
    }

    async fn checkout_listed(
        &self,
        w: Wait,
        alarm: &mut Alarm,
        connecting: &ConnectFlag,
    ) -> Result<PooledServer, CheckoutError> {
        let mut work = std::pin::pin!(self.checkout_inner(w, alarm, connecting, None));
        // The common case is served at the first poll. Only a checkout that has to wait is
        // listed, so SHOW POOLS' maxwait costs nothing on the fast path.
        let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(r) => r,
            Poll::Pending => {
                let _listed = Waiter::new(&self.waiters, w.started);
                work.await
            }
        }
    }

    /// How long the longest-waiting checkout has waited (PgBouncer's maxwait).
    pub fn max_wait(&self) -> Duration {
        self.waiters
            .slots()
            .since
            .iter()
            .flatten()
            .min()
            .map(|oldest| oldest.elapsed())
            .unwrap_or_default()
    }

    /// The checkout's async part: the pause gate, then turns until one yields a server. `first`:
    /// a turn [`Checkout`] holds already, with what it took.
    async fn checkout_inner<'s>(
        &'s self,
        w: Wait,
        alarm: &mut Alarm,
        connecting: &ConnectFlag,
        mut first: Option<(crate::slots::Turn<'s, Box<ServerConn>>, First<'s>)>,
    ) -> Result<PooledServer, CheckoutError> {
        let deadline = w.deadline();
        let Wait {
            started,
            wait,
            mut wake_by,
            source,
        } = w;
        let wait_timeout = |last: Option<ConnectError>| self.wait_timeout(wait, last);
        // With a turn in hand the gate was passed already.
        if first.is_none() && *self.paused.borrow() {
            let mut gate = self.paused.subscribe();
            // The sender lives as long as the pool, so this only ends by resuming.
            let resumed = std::pin::pin!(gate.wait_for(|paused| !*paused));
            if until(resumed, alarm, deadline, &mut wake_by)
                .await
                .is_none()
            {
                return Err(wait_timeout(None));
            }
        }
        let mut last = None;
        loop {
            let result = match first.take() {
                Some((turn, taken)) => {
                    let serve = std::pin::pin!(self.serve_turn(turn, connecting, Some(taken)));
                    until(serve, alarm, deadline, &mut wake_by).await
                }
                None => {
                    let get = std::pin::pin!(self.get_or_reserve(started, connecting, source));
                    until(get, alarm, deadline, &mut wake_by).await
                }
            };
            let Some(result) = result else {
                return Err(wait_timeout(last));
            };
            match result {
                Got::Server(s) => return Ok(s),
                Got::Failed(e) if e.is_permanent() => return Err(e.into()),
                // Not a failure: a server came free while the open waited for a cap's slot.
                Got::Failed(ConnectError::CapBusy) => {}
                Got::Failed(e) => last = Some(e),
                Got::Again => {}
                Got::Closed => return Err(self.closed()),
            }
        }
    }

    /// A wait for a server that ran out of time, counted.
    fn wait_timeout(&self, wait: Option<Duration>, last: Option<ConnectError>) -> CheckoutError {
        PoolStats::add(&self.core.manager.stats.wait_timeouts, 1);
        CheckoutError::WaitTimeout {
            database: self.database.clone(),
            timeout: wait.unwrap_or_default(),
            last: last
                .map(|e| e.to_string())
                .or_else(|| self.host().last_error()),
        }
    }

    fn closed(&self) -> CheckoutError {
        CheckoutError::Closed {
            database: self.database.clone(),
        }
    }

    /// The common checkout, without a future: a turn free now and an idle server that may go
    /// out without a round trip. `None` when the pool is paused or busy, has nothing idle, or
    /// its idle server needs more (a check query): [`ServerPool::checkout`] does the rest.
    ///
    /// `now` is the caller's reading of the clock, which the checks use instead of one more.
    pub fn try_checkout_idle(&self, now: Instant) -> Option<PooledServer> {
        if self.is_paused() {
            return None;
        }
        let core = &self.core;
        let m = &core.manager;
        let (turn, mut idle) = core.slots.try_idle(|c| c.at_home())?;
        if let Some(f) = m.fleet.get() {
            if f.claim_slot(&mut idle.item._limits) {
                drop(turn);
                self.close_taken(idle.item, CloseReason::FleetRelease);
                return None;
            }
        }
        match m.reuse_verdict(&idle.item, idle.since, Some(now)) {
            Reuse::Ready => {
                if !idle.item.at_home() {
                    idle.item.move_here();
                }
                turn.keep();
                Some(PooledServer::new(idle.item, core.clone()))
            }
            Reuse::Close(r) => {
                drop(turn);
                self.close_taken(idle.item, r);
                None
            }
            Reuse::Check => {
                core.slots.untake(turn, idle);
                None
            }
        }
    }

    /// An idle connection taken out of the list that may not go out: closed with its reason.
    fn close_taken(&self, conn: Box<ServerConn>, reason: CloseReason) {
        self.core.close_taken(conn, reason);
    }

    /// One try: waits for a turn, then hands out an idle connection that passes its checks or
    /// opens a new one.
    async fn get(&self, connecting: &ConnectFlag, source: Source) -> Got {
        let Ok(turn) = self.core.slots.turn(source).await else {
            return Got::Closed;
        };
        self.serve_turn(turn, connecting, None).await
    }

    /// What a turn takes, as far as it can be decided without waiting: an idle server that
    /// may go out as it is (those that may not are closed on the way), or the async work that
    /// is needed.
    ///
    /// `now`: the caller's reading of the clock, if it has one; else one is read here.
    fn take_now<'s>(
        &'s self,
        turn: &mut crate::slots::Turn<'s, Box<ServerConn>>,
        now: Option<Instant>,
    ) -> Now<'s> {
        let core = &self.core;
        let m = &core.manager;
        let now = now.unwrap_or_else(Instant::now);
        loop {
            match turn.take(|c| c.at_home()) {
                Taken::Idle(Idle { mut item, since }) => {
                    // A busy pool seldom has a server idle when the fleet's control task
                    // looks; a slot it wants back is taken here instead, as a server is reused.
                    if m.fleet
                        .get()
                        .is_some_and(|f| f.claim_slot(&mut item._limits))
                    {
                        self.close_taken(item, CloseReason::FleetRelease);
                        continue;
                    }
                    match m.reuse_verdict(&item, since, Some(now)) {
                        Reuse::Ready => {
                            if !item.at_home() {
                                item.move_here();
                            }
                            return Now::Server(PooledServer::new(item, core.clone()), now);
                        }
                        Reuse::Close(r) => self.close_taken(item, r),
                        Reuse::Check => {
                            let taken = CheckingIdle::new(core, item);
                            return Now::Later(First::Check(taken, since));
                        }
                    }
                }
                Taken::Room => return Now::Later(First::Room(Room(&core.slots, true))),
                Taken::Shrunk => return Now::Again,
            }
        }
    }

    /// Serves a turn: [`ServerPool::take_now`], then the check query or the new connection if
    /// one is needed. `first`: what the turn took already, if it took something.
    async fn serve_turn<'s>(
        &'s self,
        mut turn: crate::slots::Turn<'s, Box<ServerConn>>,
        connecting: &ConnectFlag,
        mut first: Option<First<'s>>,
    ) -> Got {
        let core = &self.core;
        let m = &core.manager;
        loop {
            let next = match first.take() {
                Some(f) => f,
                None => match self.take_now(&mut turn, None) {
                    Now::Server(server, _) => {
                        turn.keep();
                        return Got::Server(server);
                    }
                    Now::Again => return Got::Again,
                    Now::Later(f) => f,
                },
            };
            match next {
                First::Check(mut taken, since) => {
                    // Should this future be dropped during the check, the connection goes
                    // with it and the books must know (`CheckingIdle`).
                    let reason = m.recycle_check(taken.conn(), since).await;
                    let mut conn = taken.keep();
                    match reason {
                        None => {
                            if !conn.at_home() {
                                conn.move_here();
                            }
                            turn.keep();
                            return Got::Server(PooledServer::new(conn, core.clone()));
                        }
                        Some(r) => self.close_taken(conn, r),
                    }
                }
                First::Room(room) => {
                    // Boxed, once per new connection: the connect future is large and would
                    // otherwise sit inside every checkout's future, and so inside every
                    // transaction's, which is moved once per transaction.
                    let opened = Connecting {
                        attempt: Box::pin(m.open(connecting)),
                        flag: connecting,
                    }
                    .await;
                    room.used();
                    return match opened {
                        Ok(conn) => {
                            turn.keep();
                            Got::Server(PooledServer::new(conn, core.clone()))
                        }
                        Err(e) => {
                            core.slots.gone();
                            Got::Failed(e)
                        }
                    };
                }
            }
        }
    }

    /// [`ServerPool::get`], and for a checkout still waiting `reserve_pool_timeout` after it
    /// started, one connection of the reserve first (see `crate::reserve`). A checkout served
    /// at once, or a pool without a reserve, sets no timer.
    async fn get_or_reserve(
        &self,
        started: Instant,
        connecting: &ConnectFlag,
        source: Source,
    ) -> Got {
        let mut get = std::pin::pin!(self.get(connecting, source));
        let first = std::future::poll_fn(|cx| Poll::Ready(get.as_mut().poll(cx))).await;
        if let Poll::Ready(got) = first {
            return got;
        }
        let Some(at) = self.reserve.due(started) else {
            return get.await;
        };
        // Boxed: only a waiting checkout of a pool with a reserve needs it, and inline it
        // would grow every checkout's future.
        let timer = Box::pin(crate::timer::sleep_until(at.into()));
        tokio::select! {
            biased;
            got = get.as_mut() => return got,
            _ = timer => self.use_reserve(),
        }
        get.await
    }

    fn use_reserve(&self) {
        let _one = self.reserve.lock();
        let Some(size) = self.reserve.grown(self.core.slots.status().max_size) else {
            return;
        };
        // Growing gives nothing back to close.
        let _ = self.core.slots.resize(size);
        PoolStats::add(&self.stats().reserve_used, 1);
        tracing::info!(database = %self.database, user = %self.user, size,
            reserve_in_use = size.saturating_sub(self.reserve.base()),
            "a client waited reserve_pool_timeout: one more server connection from the reserve");
    }

    /// Back to `pool_size` once the reserve's connections are idle and nobody waits.
    fn give_back_reserve(&self) {
        let _one = self.reserve.lock();
        let s = self.core.slots.status();
        let Some(base) = self.reserve.shrunk(s.max_size, s.idle, s.waiting) else {
            return;
        };
        let gone = self.core.slots.resize(base);
        tracing::info!(database = %self.database, user = %self.user, closed = gone.len(),
            "reserve connections idle and nobody waiting: back to pool_size");
        self.core.close_given_up(
            gone.into_iter()
                .map(|c| (c, CloseReason::PoolResized))
                .collect(),
        );
    }

    /// `reserve_pool_size` and `reserve_pool_timeout` (at open and on RELOAD).
    pub fn set_reserve(&self, r: crate::reserve::ReserveSettings) {
        self.reserve.set(r);
    }

    /// Servers in use and idle, clients waiting, and the switches, for readers.
    pub fn status(&self) -> PoolStatus {
        let s = self.core.slots.status();
        PoolStatus {
            max_size: self.reserve.base(),
            reserve_size: self.reserve.settings().size,
            reserve_in_use: s.max_size.saturating_sub(self.reserve.base()),
            size: s.size,
            active: s.size.saturating_sub(s.idle),
            idle: s.idle,
            waiting: s.waiting,
            min_size: self.min_size(),
            paused: self.is_paused(),
        }
    }

    /// The pool's counters, written by the data path.
    pub fn stats(&self) -> &Arc<PoolStats> {
        &self.core.manager.stats
    }

    /// The first configured host.
    pub fn host(&self) -> &Arc<Host> {
        self.core.manager.hosts.first()
    }

    pub fn hosts(&self) -> &Arc<HostList> {
        &self.core.manager.hosts
    }

    /// May a connection released by a client go back to the pool? Not when its host changed
    /// role while it was checked out.
    pub fn still_wanted(&self, conn: &ServerConn) -> bool {
        self.core.manager.still_wanted(conn)
    }

    /// A server of this pool refused to write (SQLSTATE 25006) or reported a new
    /// `in_hot_standby`/`default_transaction_read_only`: re-check the hosts' roles now instead of
    /// at the next `server_role_check_interval`. Pools that take any role ignore it.
    pub fn role_suspect(&self) {
        if self.hosts().attrs != TargetSessionAttrs::Any {
            self.role_check.notify_one();
        }
    }

    /// Probes every host's role; if one changed, closes idle connections opened under the old
    /// role now (busy ones go when released or next checked out).
    pub async fn check_roles(&self) {
        let manager = &self.core.manager;
        let target = manager.target();
        let settings = manager.settings();
        let changed = manager
            .hosts
            .probe(&target, &settings, settings.role_check_timeout)
            .await;
        if changed {
            let gone = self.core.slots.retain(|idle| {
                (!manager.still_wanted(&idle.item)).then_some(CloseReason::RoleChanged)
            });
            self.core.close_given_up(gone);
        }
    }

    pub fn resize(&self, size: usize) {
        let _one = self.reserve.lock();
        self.reserve.set_base(size.max(1));
        let gone = self.core.slots.resize(size.max(1));
        self.core.close_given_up(
            gone.into_iter()
                .map(|c| (c, CloseReason::PoolResized))
                .collect(),
        );
    }

    pub fn min_size(&self) -> usize {
        self.min_size.load(Ordering::Relaxed)
    }

    pub fn set_min_size(&self, n: usize) {
        self.min_size.store(n, Ordering::Relaxed);
    }

    /// New timeouts for connections opened and recycled from now on (RELOAD, SET).
    pub fn set_settings(&self, settings: ServerSettings) {
        match self.core.manager.settings.write() {
            Ok(mut s) => *s = Arc::new(settings),
            Err(p) => *p.into_inner() = Arc::new(settings),
        }
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Retires every connection open now: idle ones close at once, busy ones when released.
    pub fn reconnect(&self) {
        let m = &self.core.manager;
        m.epoch.fetch_add(1, Ordering::Relaxed);
        let gone = self
            .core
            .slots
            .retain(|idle| m.is_stale(&idle.item).then_some(CloseReason::StaleEpoch));
        self.core.close_given_up(gone);
    }

    /// Joins the database's fleet budget (whose semaphore is among the pool's limits).
    pub(crate) fn set_fleet(&self, fleet: Arc<crate::fleet::Fleet>) {
        let _ = self.core.manager.fleet.set(fleet);
    }

    /// Closes up to `at_most` idle connections, so their fleet slots can be given back.
    /// Returns how many it closed.
    pub fn close_idle_for_fleet(&self, at_most: usize) -> usize {
        let mut picked = 0;
        let gone = self.core.slots.retain(|_| {
            (picked < at_most).then(|| {
                picked += 1;
                CloseReason::FleetRelease
            })
        });
        let closed = gone.len();
        if closed > 0 {
            self.core.close_given_up(gone);
        }
        closed
    }

    /// Opens a connection outside the pool, holding none of its caps: the fleet's control
    /// connection, which must reach the server the pool does, the same way (hosts, TLS, login).
    /// It says what it is in pg_stat_activity (`application_name`), and runs no
    /// `connect_query`: that prepares connections for clients.
    pub async fn open_control(&self) -> Result<ServerConn, ConnectError> {
        let m = &self.core.manager;
        let mut target = m.target();
        target
            .startup_params
            .retain(|(k, _)| !k.eq_ignore_ascii_case("application_name"));
        target
            .startup_params
            .push(("application_name".into(), FLEET_APPLICATION_NAME.into()));
        m.hosts
            .connect(&target, &m.settings(), &ConnectFlag::default())
            .await
    }

    /// Closes idle connections (PAUSE disconnects from the server once it is idle).
    pub fn close_idle(&self) {
        self.close_all_idle(CloseReason::Paused);
    }

    fn close_all_idle(&self, reason: CloseReason) {
        let gone = self.core.slots.retain(|_| Some(reason));
        self.core.close_given_up(gone);
    }

    /// Server connections opened before the last [`reconnect`](Self::reconnect), still open.
    pub fn stale_count(&self) -> usize {
        let epoch = self.core.manager.epoch.load(Ordering::Relaxed);
        self.servers().iter().filter(|s| s.epoch < epoch).count()
    }

    /// SHOW SERVERS rows for this pool.
    pub fn servers(&self) -> Vec<Arc<ServerInfo>> {
        self.core.manager.registry.list()
    }

    /// Closes idle connections past `server_idle_timeout` or `server_lifetime` (each with its
    /// own jitter, keeping `min_pool_size`), then opens connections up to `min_pool_size`,
    /// `server_connect_concurrency` at a time, paced by the host's storm controls.
    pub async fn maintain(&self, settings: &ServerSettings) {
        self.give_back_reserve();
        let min_size = self.min_size();
        let mut keep = min_size;
        let manager = &self.core.manager;
        let now = Instant::now();
        let gone = self.core.slots.retain(|idle| {
            let conn = &idle.item;
            let expired = if settings
                .lifetime
                .is_some_and(|l| now.saturating_duration_since(conn.created()) > conn.share(l))
            {
                Some(CloseReason::Lifetime)
            } else if !conn.is_healthy_idle() {
                Some(CloseReason::ClosedWhileIdle)
            } else if manager.is_stale(conn) {
                Some(CloseReason::StaleEpoch)
            } else if !manager.still_wanted(conn) {
                Some(CloseReason::RoleChanged)
            } else {
                None
            };
            let idle_too_long = settings
                .idle_timeout
                .is_some_and(|t| now.saturating_duration_since(idle.since) > conn.share(t));
            match expired {
                Some(r) => Some(r),
                None if idle_too_long && keep == 0 => Some(CloseReason::IdleTimeout),
                None => {
                    keep = keep.saturating_sub(1);
                    None
                }
            }
        });
        self.core.close_given_up(gone);
        let status = self.core.slots.status();
        if self.is_paused() || min_size.min(status.max_size) <= status.size {
            return;
        }
        // Asks for every missing connection at once (and for the idle ones, so that the pool
        // grows instead of handing the same idle one back): the host's limiter lets
        // `server_connect_concurrency` of them connect together, so eight warm connections to a
        // database whose connects take 3 s cost about two rounds, not eight. Held until all are
        // in; dropping them puts them in the idle list. A failed attempt ends this round, and the
        // rest with it: the host's back-off paces the next tick's. Only free turns are taken:
        // clients waiting come first.
        let missing = min_size.min(status.max_size) - status.size;
        let connecting = ConnectFlag::default();
        let connecting = &connecting;
        let mut gets: FuturesUnordered<_> = (0..missing + status.idle)
            .map(|_| async {
                match self.core.slots.try_turn() {
                    Ok(turn) => self.serve_turn(turn, connecting, None).await,
                    Err(_) => Got::Again,
                }
            })
            .collect();
        let mut held = Vec::new();
        while let Some(got) = gets.next().await {
            match got {
                Got::Server(c) => held.push(c),
                Got::Failed(_) => break,
                // Full or busy: clients took what was there, and the others go on.
                Got::Again | Got::Closed => {}
            }
        }
    }

    pub fn close(&self) {
        let gone = self.core.slots.close();
        self.core.close_given_up(
            gone.into_iter()
                .map(|c| (c, CloseReason::PoolClosed))
                .collect(),
        );
    }
}

/// What one try at a checkout came to.
enum Got {
    Server(PooledServer),
    Failed(ConnectError),
    /// Nothing yet (the pool shrank under this turn, or no turn was free): try again.
    Again,
    Closed,
}

/// Room for a new connection, taken from the books: given back if the attempt is dropped
/// half-way (the client gave up, its wait expired).
struct Room<'a>(&'a Slots<Box<ServerConn>>, bool);

impl Room<'_> {
    fn used(mut self) {
        self.1 = false;
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.gone();
        }
    }
}

/// An idle connection taken out of the books for its checks: should the check be dropped
/// half-way (its checkout given up), the connection closes as one whose check failed, and the
/// books are told.
struct CheckingIdle<'a> {
    core: &'a Core,
    conn: Option<Box<ServerConn>>,
}

impl<'a> CheckingIdle<'a> {
    fn new(core: &'a Core, conn: Box<ServerConn>) -> Self {
        CheckingIdle {
            core,
            conn: Some(conn),
        }
    }

    fn conn(&mut self) -> &mut ServerConn {
        match &mut self.conn {
            Some(c) => c,
            None => unreachable!("taken only by keep, which consumes it"),
        }
    }

    fn keep(mut self) -> Box<ServerConn> {
        match self.conn.take() {
            Some(c) => c,
            None => unreachable!("taken only by keep, which consumes it"),
        }
    }
}

impl Drop for CheckingIdle<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Its check query may be running: the server cannot be trusted idle.
            self.core.close_taken(conn, CloseReason::CheckFailed);
        }
    }
}

/// Probes the pool's hosts every `server_role_check_interval`, or at once when woken; ends when
/// the pool is closed or dropped.
fn spawn_role_checks(pool: &Arc<ServerPool>, interval: Duration) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = Arc::downgrade(pool);
    let wake = pool.role_check.clone();
    rt.spawn(async move {
        loop {
            tokio::select! {
                _ = crate::timer::sleep(interval) => {}
                _ = wake.notified() => {}
            }
            let Some(pool) = weak.upgrade() else { break };
            if pool.core.slots.is_closed() {
                break;
            }
            pool.check_roles().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_passes_only_once_strictly_behind_and_an_unrepresentable_one_never() {
        let t0 = Instant::now();
        let five = Duration::from_secs(5);
        assert!(!past(t0 + Duration::from_secs(4), t0, five));
        assert!(
            !past(t0 + five, t0, five),
            "at the deadline it has not passed yet"
        );
        assert!(past(t0 + Duration::from_secs(6), t0, five));
        assert!(!past(t0 + five, t0, Duration::MAX));
    }

    /// `wake_by` wakes the waiting task once and the wait goes on; the deadline ends it.
    #[tokio::test(start_paused = true)]
    async fn a_wait_is_woken_at_wake_by_and_ends_at_its_deadline() {
        let start = tokio::time::Instant::now();
        let mut alarm = Alarm::default();
        let deadline = Some((start + Duration::from_secs(10)).into_std());
        let mut wake_by = Some((start + Duration::from_secs(3)).into_std());
        let mut woken = Vec::new();
        std::future::poll_fn(|cx| {
            woken.push(start.elapsed().as_secs());
            poll_deadline(&mut alarm, deadline, &mut wake_by, cx)
        })
        .await;
        assert_eq!(
            woken,
            vec![0, 3, 10],
            "polled at the start, at wake_by and at the deadline"
        );
        assert_eq!(wake_by, None, "wake_by rings once");
    }
}
